"""Experiment B: routing quality of every router in a small language MoE, and its vision counterpart.

Language: the Trainer script (:func:`hf_moe_routers.scripts.clm.main`) trains an OLMoE-shaped model
from scratch on the bundled Shakespeare subset (validation = whole held-out plays), with the same
size, data, steps and seed set for every router. One byte-level BPE tokenizer is trained once and
shared, so every run sees identical token blocks. After training, a few one-shot adaptation episodes
(``hf_moe_routers.experiments.adaptation`` on the causal LM: one held-out block, the selected expert per layer,
same budget) show the API on a language model: interference = change of next-token accuracy on
training-play blocks, gain = change on other held-out blocks.

Vision: the same routers in :class:`MoEImageClassifier` with sparse top-2-of-8 routing (as in the
LM), trained on all 10 classes; routing metrics and accuracy on the test split.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import report as R
from .adaptation import AdaptationBudget, CausalLMTarget, one_shot_episode
from .data import load_dataset
from .vision import ROUTER_LABELS, VisionSettings, accuracy, build_model, routing_quality, train_base

__all__ = ["LM_ROUTERS", "LMSpec", "make_plots", "quick_lm_spec", "render_outputs", "run_lm"]

#: Router key -> (router_type, router_kwargs for the Trainer script, label). SR-MoE keeps the
#: package's LM default (linear scoring, spectral penalty); the vision side uses prototype scoring.
LM_ROUTERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "linear": ("linear", {}, "linear"),
    "cosine": ("cosine", {"dim": 16}, "cosine (D=16)"),
    "l2r_m1": ("l2r", {"rank": 16, "num_anchors": 1}, "L2R (r=16, M=1)"),
    "l2r_m4": ("l2r", {"rank": 16, "num_anchors": 4}, "L2R (r=16, M=4)"),
    "sr_moe": ("sr_moe", {}, "SR-MoE (linear scoring, penalty)"),
    # Balancing variants (docs/ROUTERS.md section 6) of the linear router and L2R (r=16, M=4):
    # aux-loss-free expert bias (sign rule, no balance loss), and the global-batch balance loss
    # next to the micro-batch loss at the same 4 micro-batches of 4 blocks per optimizer step
    # (with one micro-batch per step the two are the same loss).
    "linear_bias": ("linear", {"expert_bias_update_rate": 1e-2}, "linear, expert bias (no aux loss)"),
    "linear_mb4": ("linear", {}, "linear, 4 micro-batches, micro-batch balance"),
    "linear_global": ("linear", {}, "linear, 4 micro-batches, global-batch balance"),
    "l2r_m4_bias": (
        "l2r",
        {"rank": 16, "num_anchors": 4, "expert_bias_update_rate": 1e-2},
        "L2R (M=4), expert bias (no aux loss)",
    ),
    "l2r_m4_mb4": ("l2r", {"rank": 16, "num_anchors": 4}, "L2R (M=4), 4 micro-batches, micro-batch balance"),
    "l2r_m4_global": (
        "l2r",
        {"rank": 16, "num_anchors": 4},
        "L2R (M=4), 4 micro-batches, global-batch balance",
    ),
}
#: Trainer flags of the balancing variants (the others train with the Trainer's defaults).
_EXPERT_BIAS = {"router_balance_loss": "none"}
_MICRO_BATCHES = {"gradient_accumulation_steps": 4}
_GLOBAL = {**_MICRO_BATCHES, "router_balance_granularity": "global_batch"}
LM_TRAINING_FLAGS: dict[str, dict[str, Any]] = {
    "linear_bias": _EXPERT_BIAS,
    "linear_mb4": _MICRO_BATCHES,
    "linear_global": _GLOBAL,
    "l2r_m4_bias": _EXPERT_BIAS,
    "l2r_m4_mb4": _MICRO_BATCHES,
    "l2r_m4_global": _GLOBAL,
}
#: The vision preset standing in for each LM router.
VISION_EQUIVALENT = {
    "linear": "linear",
    "cosine": "cosine",
    "l2r_m1": "l2r_m1",
    "l2r_m4": "l2r",
    "sr_moe": "sr_moe_penalty",
}
METRICS = (
    "load_entropy",
    "load_cv",
    "dead_experts",
    "token_entropy",
    "flip_rate",
    "query_concentration",
    "expert_concentration",
    "spectral_norm",
    "stable_rank",
)
#: Specialisation metrics of the LM (from the Trainer's evaluation logs; the plays are the domains).
LM_SPECIALISATION = ("coactivation_top_partner", "vocab_specialisation", "token_expert_mi", "domain_tv")
LM_METRICS = (*METRICS, *LM_SPECIALISATION)


@dataclasses.dataclass(frozen=True)
class LMSpec(R.ExperimentSpec):
    """What experiment B runs; defaults finish in ≤ 30 min on a 2-core CPU."""

    routers: tuple[str, ...] = tuple(LM_ROUTERS)
    seeds: tuple[int, ...] = (0, 1, 2)
    hidden_size: int = 96
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_experts: int = 8
    num_experts_per_tok: int = 2
    expert_intermediate_size: int = 192
    vocab_size: int = 2048
    block_size: int = 64
    batch_size: int = 16
    max_steps: int = 400
    learning_rate: float = 2e-3
    max_eval_blocks: int = 128
    adaptation_episodes: int = 4
    adaptation: AdaptationBudget = AdaptationBudget(steps=5, learning_rate=0.1, experts_per_layer=1)
    vision_datasets: tuple[str, ...] = ("digits", "mnist1d")
    vision_depth: int = 4
    vision_settings: VisionSettings = VisionSettings(top_k=2)


def quick_lm_spec() -> LMSpec:
    """One tiny LM run and one tiny vision run, for CI."""
    return LMSpec(
        routers=("l2r_m4",),
        seeds=(0,),
        hidden_size=32,
        num_hidden_layers=1,
        num_experts=4,
        expert_intermediate_size=32,
        vocab_size=300,
        block_size=32,
        batch_size=4,
        max_steps=4,
        max_eval_blocks=8,
        adaptation_episodes=1,
        adaptation=AdaptationBudget(steps=1, learning_rate=0.1),
        vision_datasets=("digits",),
        vision_depth=2,
        vision_settings=VisionSettings(
            top_k=2, hidden_size=16, expert_intermediate_size=16, num_experts=4, epochs=1
        ),
    )


def _lm_flags(spec: LMSpec, router: str, seed: int, output_dir: Path, tokenizer_dir: Path) -> list[str]:
    router_type, kwargs, _ = LM_ROUTERS[router]
    flags = {
        "output_dir": output_dir,
        "router_type": router_type,
        "router_kwargs": json.dumps(kwargs),
        "tokenizer_name_or_path": tokenizer_dir,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "expert_intermediate_size": spec.expert_intermediate_size,
        "block_size": spec.block_size,
        "per_device_train_batch_size": spec.batch_size,
        "max_steps": spec.max_steps,
        "learning_rate": spec.learning_rate,
        "warmup_steps": max(1, spec.max_steps // 20),
        "max_eval_blocks": spec.max_eval_blocks,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": max(1, spec.max_steps // 4),
        "router_plots": "false",
        "disable_tqdm": "true",
        "use_cpu": "true",
        "seed": seed,
    }
    extra = dict(LM_TRAINING_FLAGS.get(router, {}))
    if "gradient_accumulation_steps" in extra:  # the same blocks per optimizer step, in micro-batches
        flags["per_device_train_batch_size"] = max(
            1, spec.batch_size // int(extra["gradient_accumulation_steps"])
        )
    flags.update(extra)
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def _lm_adaptation(
    spec: LMSpec, run_dir: Path, tokenizer: Any, texts: dict[str, list[str]]
) -> dict[str, float]:
    """One-shot episodes on the trained LM (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    from .. import data_utils

    model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    n = 2 * spec.adaptation_episodes + 16
    train, held_out = data_utils.build_lm_datasets(
        texts["train"],
        texts["validation"],
        tokenizer,
        spec.block_size,
        max_train_blocks=16,
        max_eval_blocks=n,
    )

    def batch(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": blocks.clone()}

    base_eval = batch(train.blocks)
    new_eval = batch(held_out.blocks[-16:])
    target = CausalLMTarget(model)
    reports = [
        one_shot_episode(target, batch(held_out.blocks[[i]]), base_eval, new_eval, spec.adaptation)
        for i in range(spec.adaptation_episodes)
    ]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "lm_interference_pp": float(np.mean([r.interference_pp for r in reports])),
        "lm_new_gain_pp": float(
            np.mean([100 * (r.new_accuracy_after - r.new_accuracy_before) for r in reports])
        ),
        "lm_exposure": float(np.mean([r.exposure for r in reports])),
    }


def run_lm(
    spec: LMSpec, out_dir: Path, *, command: str, prefix: str = "", log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run experiment B; write ``{prefix}lm.{json,md}`` and the load heatmaps to ``out_dir``."""
    from .. import data_utils
    from ..records import RoutingHistory
    from ..scripts.clm import main as train_clm

    start = time.perf_counter()
    texts = data_utils.bundled_corpus()
    lm_runs: list[dict[str, Any]] = []
    lm_loads: dict[str, list[list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="hf_moe_routers_lm_") as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        tokenizer = data_utils.train_bpe_tokenizer(texts["train"], vocab_size=spec.vocab_size)
        tokenizer.save_pretrained(tokenizer_dir)
        for seed in spec.seeds:
            for router in spec.routers:
                run_dir = Path(tmp) / f"{router}_seed{seed}"
                metrics = train_clm(_lm_flags(spec, router, seed, run_dir, tokenizer_dir))
                history = RoutingHistory.load(run_dir / "routing_history.json").split("eval")
                if seed == spec.seeds[0] and history:
                    lm_loads[router] = history[-1].load
                record = {
                    "router": router,
                    "seed": seed,
                    "eval_perplexity": metrics["eval_perplexity"],
                    "eval_loss": metrics["eval_loss"],
                    "train_seconds": metrics["train_wall_seconds"],
                    **{m: metrics.get(f"eval_router/{m}", float("nan")) for m in LM_METRICS},
                    **_lm_adaptation(spec, run_dir, tokenizer, texts),
                }
                lm_runs.append(record)
                log(
                    f"LM {router} seed={seed}: ppl {record['eval_perplexity']:.1f}  H(load) "
                    f"{record['load_entropy']:.3f}  flip {record['flip_rate']:.4f}  "
                    f"({(time.perf_counter() - start) / 60:.1f} min)"
                )
    vision_runs: list[dict[str, Any]] = []
    vision_loads: dict[str, dict[str, list[list[float]]]] = {}
    for dataset in spec.vision_datasets:
        data = load_dataset(dataset)
        x_test, y_test = data.split("test")
        for seed in spec.seeds:
            for router in spec.routers:
                preset = VISION_EQUIVALENT.get(router)
                if preset is None:  # a balancing variant of the Trainer: no vision counterpart
                    continue
                model = build_model(data, spec.vision_depth, preset, spec.vision_settings, seed)
                train_base(model, data, list(range(10)), spec.vision_settings, seed)
                quality = routing_quality(model, x_test)
                if seed == spec.seeds[0]:
                    vision_loads.setdefault(dataset, {})[router] = quality["load"]
                vision_runs.append(
                    {
                        "dataset": dataset,
                        "router": router,
                        "preset": preset,
                        "seed": seed,
                        "test_accuracy": accuracy(model, x_test, y_test, list(range(10))),
                        **{m: quality[m] for m in METRICS},
                    }
                )
        log(f"vision {dataset} done ({(time.perf_counter() - start) / 60:.1f} min)")
    result = {
        **R.result_header("lm", command, start, spec),
        "lm_summary": _summarise(
            lm_runs, ("router",), ("eval_perplexity", *LM_METRICS, "lm_interference_pp", "lm_new_gain_pp")
        ),
        "vision_summary": _summarise(vision_runs, ("dataset", "router"), ("test_accuracy", *METRICS)),
        "lm_runs": lm_runs,
        "vision_runs": vision_runs,
        "lm_loads": lm_loads,
        "vision_loads": vision_loads,
    }
    return render_outputs(result, out_dir, prefix)


def render_outputs(result: dict[str, Any], out_dir: Path, prefix: str = "") -> dict[str, Any]:
    """Write ``{prefix}lm.md``, the load heatmaps and ``{prefix}lm.json`` from a result dict."""
    return R.write_outputs(result, out_dir, prefix, render_markdown=render_markdown, make_plots=make_plots)


def make_plots(result: dict[str, Any], out_dir: Path, prefix: str) -> list[str]:
    """The expert-load heatmaps: the LM's layers, and each vision dataset's stages; their file names."""
    spec = result["spec"]
    labels = {r: LM_ROUTERS[r][2] for r in spec["routers"]}
    plots = []
    if result["lm_loads"]:
        plots.append(f"{prefix}lm_load_heatmap.png")
        R.plot_load_heatmaps(
            result["lm_loads"],
            labels,
            out_dir / plots[-1],
            f"LM expert load per layer (validation plays, seed {spec['seeds'][0]})",
        )
    vision_labels = {
        r: ROUTER_LABELS[VISION_EQUIVALENT[r]] for r in spec["routers"] if r in VISION_EQUIVALENT
    }
    for dataset, loads in result["vision_loads"].items():
        plots.append(f"{prefix}lm_vision_load_heatmap_{dataset}.png")
        R.plot_load_heatmaps(
            loads,
            vision_labels,
            out_dir / plots[-1],
            f"{dataset}, depth {spec['vision_depth']}, top-2 of {spec['vision_settings']['num_experts']}: "
            f"expert load per stage (test split, seed {spec['seeds'][0]})",
        )
    return plots


def _summarise(
    runs: list[dict[str, Any]], keys: tuple[str, ...], metrics: tuple[str, ...]
) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in keys), []).append(run)
    out = []
    for group_key, group in groups.items():
        entry: dict[str, Any] = dict(zip(keys, group_key))
        entry["seeds"] = len(group)
        for metric in metrics:
            entry[metric], entry[f"{metric}_std"] = R.mean_std([float(g[metric]) for g in group])
        if "parameters" in group[0]:
            entry["parameters"] = group[0]["parameters"]
        out.append(entry)
    return out


def _routing_cells(entry: dict[str, Any], *, dead_digits: int) -> list[str]:
    """The routing columns both tables share: H(load), load CV, flip rate, query / expert
    concentration and dead experts of one summary entry (``dead_digits``: decimals of the last)."""
    return [
        R.fmt_pm(entry["load_entropy"], entry["load_entropy_std"], 3),
        R.fmt(entry["load_cv"], 3),
        R.fmt(entry["flip_rate"], 4),
        R.fmt(entry["query_concentration"], 3),
        R.fmt(entry["expert_concentration"], 3),
        R.fmt(entry["dead_experts"], dead_digits),
    ]


def render_markdown(result: dict[str, Any]) -> str:
    spec = result["spec"]
    lines = [
        "# Experiment B: routing quality, language model and vision",
        "",
        f"Command: `{result['command']}` ({result['wall_seconds'] / 60:.1f} min). Seeds {list(spec['seeds'])}; "
        "mean ± std over seeds.",
        "",
        f"## Language model (OLMoE-shaped, {spec['num_hidden_layers']} layers, hidden {spec['hidden_size']}, "
        f"{spec['num_experts']} experts top-{spec['num_experts_per_tok']}, {spec['max_steps']} steps × "
        f"{spec['batch_size']} blocks of {spec['block_size']} tokens; validation = 2 held-out plays)",
        "",
    ]
    rows = []
    for e in result["lm_summary"]:
        rows.append(
            [
                LM_ROUTERS[e["router"]][2],
                f"{e.get('parameters', 0) / 1e6:.3f}M",
                R.fmt_pm(e["eval_perplexity"], e["eval_perplexity_std"], 1),
                *_routing_cells(e, dead_digits=1),
                *(R.fmt(e.get(m, float("nan")), 3) for m in LM_SPECIALISATION),
                R.fmt_pm(e["lm_interference_pp"], e["lm_interference_pp_std"]),
                R.fmt_pm(e["lm_new_gain_pp"], e["lm_new_gain_pp_std"]),
            ]
        )
    headers = ["router", "params", "val ppl", "H(load)", "load CV", "flip rate", "query conc.", "expert conc.", "dead",
               "co-act. partner", "vocab spec.", "MI bits", "domain TV",
               "1-shot interf. pp", "1-shot gain pp"]  # fmt: skip
    lines.append(R.markdown_table(headers, rows))
    budget = spec["adaptation"]
    lines += [
        "",
        f"One-shot columns: {spec['adaptation_episodes']} episodes per run, each adapting the top expert per layer "
        f"of one held-out block for {budget['steps']} SGD steps at lr {budget['learning_rate']}; interference = "
        "change of next-token accuracy on 16 training-play blocks, gain = change on 16 other held-out blocks.",
        "",
        "Specialisation columns (validation tokens, mean over layers; `hf_moe_routers.metrics.catalog`): co-act. "
        "partner = mean over experts of the largest P(b | a), (K−1)/(E−1) when uniform; vocab spec. = "
        "occurrence-weighted share of a token id's occurrences routed to its most frequent expert (top-k slots, "
        "ids seen ≥ 5 times); MI = I(token id; expert) in bits, Miller–Madow corrected; domain TV = token-weighted "
        "total-variation distance of each validation play's expert load to the overall load.",
        "",
        "Balancing rows: 'expert bias' trains without a balance loss and moves a per-expert selection bias by "
        "u·sign(mean load − load) after every optimizer step (u = 1e-2); '4 micro-batches' rows take each "
        "optimizer step's 16 blocks as 4 micro-batches of 4, with the balance loss's load fractions per "
        "micro-batch or over the whole step (global batch).",
        "",
        f"## Vision counterpart (MoEImageClassifier, depth {spec['vision_depth']}, sparse top-2 of "
        f"{spec['vision_settings']['num_experts']}, all 10 classes, test split)",
        "",
    ]
    rows = []
    for e in result["vision_summary"]:
        rows.append(
            [
                e["dataset"],
                ROUTER_LABELS[VISION_EQUIVALENT[e["router"]]],
                R.fmt_pm(100 * e["test_accuracy"], 100 * e["test_accuracy_std"], 1),
                *_routing_cells(e, dead_digits=2),
            ]
        )
    headers = [
        "data",
        "router",
        "test acc %",
        "H(load)",
        "load CV",
        "flip rate",
        "query conc.",
        "expert conc.",
        "dead",
    ]
    lines.append(R.markdown_table(headers, rows))
    lines += [
        "",
        "Flip rate: share of tokens/examples whose top-k set changes under x + ε‖x‖·n at the router input "
        "(LM ε = 0.01, the Trainer's default; vision ε = 0.05). Concentration: mean pairwise cosine of router "
        "queries (query conc.) and of expert rows / anchors (expert conc.). Dead: experts with zero load "
        "(mean over layers).",
    ]
    return "\n".join(lines) + "\n"
