"""What swapping a trained model's routers costs, and how much distillation buys back.

    python benchmarks/conversion.py                       # the whole table (about 30 min, 1 thread)
    python benchmarks/conversion.py --families olmoe --routers l2r_r4_m1 --steps 0 50 --tokens 1000

For each shipped reference model (``benchmarks/reference/<family>/``, plain transformers models
trained by ``benchmarks/train_reference.py``) and each router of ``ROUTERS``:

1. the original model's validation perplexity (float32);
2. ``patch_moe_routers`` with the router, right after patching (0 distillation steps);
3. ``distill_router`` for each of ``--steps`` on each of ``--tokens`` calibration tokens taken from
   the training plays, each from a fresh patch (so "200 steps" means one run of 200 steps);
   validation perplexity, top-1 and top-k agreement with the original gates on validation tokens,
   wall time and peak memory of patch + distillation;
4. a short fine-tune of the whole model (``--finetune_steps``, same budget for every row) of the
   unpatched original and of each router converted with the best distillation setting of step 3
   within the goal's budget, then validation perplexity again.

Perplexity is ``exp`` of the mean next-token cross-entropy over every block of the validation split
(the two held-out plays), each 128-token block scored on its own, in float32: the convention of
``train_reference.py``, so the "original" column reproduces the references' READMEs.

Peak memory is the largest resident-set growth over the process's size before the run, sampled
every 2 ms (CPU tensors are not seen by ``tracemalloc``); it includes the patched copy of the
model, since patching works on a copy here.

Writes ``--output_dir``/conversion.json, conversion.md and conversion.png. Bad flags exit with
status 2 and one line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
REPO_ROOT = SCRIPT.parent.parent
REFERENCE_DIR = REPO_ROOT / "benchmarks" / "reference"
FAMILIES = ("olmoe", "mixtral", "qwen3_moe")

#: The routers of the table: name -> router config (as ``RouterConfig.from_dict`` takes it). L2R at
#: a rank below the gate's rank (8 experts: the gate matrix has rank <= 8, so rank 4 must drop
#: directions) and one above it, each with 1 and 4 anchors.
ROUTERS: dict[str, dict[str, Any]] = {
    "sr_moe_linear": {"router_type": "sr_moe", "scoring": "linear"},
    "sr_moe_prototype": {"router_type": "sr_moe", "scoring": "prototype"},
    "l2r_r4_m1": {"router_type": "l2r", "rank": 4, "num_anchors": 1},
    "l2r_r4_m4": {"router_type": "l2r", "rank": 4, "num_anchors": 4},
    "l2r_r16_m1": {"router_type": "l2r", "rank": 16, "num_anchors": 1},
    "l2r_r16_m4": {"router_type": "l2r", "rank": 16, "num_anchors": 4},
    "cosine": {"router_type": "cosine"},
}
DEFAULT_STEPS = (0, 50, 200, 1000)
DEFAULT_TOKENS = (1_000, 10_000, 100_000)
#: The issue's goal: within this relative perplexity of the original ...
GOAL_RATIO = 1.01
#: ... after at most this many distillation steps on at most this many calibration tokens.
GOAL_STEPS, GOAL_TOKENS = 200, 100_000
BLOCK_SIZE = 128
CALIBRATION_BATCH_BLOCKS = 16  # 2,048 tokens per distillation step
EVAL_BATCH_BLOCKS = 32
AGREEMENT_BLOCKS = 64  # validation blocks whose router inputs measure agreement (8,192 tokens)

DEFAULTS: dict[str, Any] = {
    "distill_lr": 1e-2,
    "distill_temperature": 1.0,
    "finetune_steps": 100,
    "finetune_lr": 3e-4,
    "finetune_batch_blocks": 16,
    "seed": 0,
    "threads": 1,
}


class UsageError(Exception):
    """Bad command-line input: one line, exit status 2."""


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/conversion.py",
        description="Validation perplexity of the shipped references after a router swap and distillation.",
    )
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), help=f"of {FAMILIES}")
    parser.add_argument("--routers", nargs="+", default=list(ROUTERS), help=f"of {tuple(ROUTERS)}")
    parser.add_argument(
        "--steps", nargs="+", type=int, default=list(DEFAULT_STEPS), help="distillation steps"
    )
    parser.add_argument(
        "--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS), help="calibration tokens"
    )
    parser.add_argument("--distill_lr", type=float, default=DEFAULTS["distill_lr"])
    parser.add_argument("--distill_temperature", type=float, default=DEFAULTS["distill_temperature"])
    parser.add_argument(
        "--finetune_steps", type=int, default=DEFAULTS["finetune_steps"], help="0: no fine-tune rows"
    )
    parser.add_argument("--finetune_lr", type=float, default=DEFAULTS["finetune_lr"])
    parser.add_argument("--finetune_batch_blocks", type=int, default=DEFAULTS["finetune_batch_blocks"])
    parser.add_argument(
        "--max_eval_blocks", type=int, default=None, help="evenly spaced validation blocks (default: all)"
    )
    parser.add_argument("--reference_dir", default=str(REFERENCE_DIR))
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch threads")
    parser.add_argument("--no_plot", action="store_true", help="skip conversion.png")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for field, values, allowed in (
        ("--families", args.families, FAMILIES),
        ("--routers", args.routers, tuple(ROUTERS)),
    ):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise UsageError(f"{field}: unknown {unknown}; allowed: {', '.join(allowed)}")
    if any(s < 0 for s in args.steps):
        raise UsageError(f"--steps: must be >= 0, got {args.steps}")
    if any(t < BLOCK_SIZE for t in args.tokens):
        raise UsageError(f"--tokens: each must be >= {BLOCK_SIZE} (one block), got {args.tokens}")
    for field in ("distill_lr", "distill_temperature", "finetune_lr"):
        if not getattr(args, field) > 0:
            raise UsageError(f"--{field}: must be > 0, got {getattr(args, field)}")
    for field in ("finetune_steps",):
        if getattr(args, field) < 0:
            raise UsageError(f"--{field}: must be >= 0, got {getattr(args, field)}")
    for field in ("threads", "finetune_batch_blocks"):
        if getattr(args, field) < 1:
            raise UsageError(f"--{field}: must be >= 1, got {getattr(args, field)}")
    if args.max_eval_blocks is not None and args.max_eval_blocks < 1:
        raise UsageError(f"--max_eval_blocks: must be >= 1, got {args.max_eval_blocks}")
    for family in args.families:
        folder = Path(args.reference_dir) / family
        if not (folder / "config.json").is_file():
            raise UsageError(
                f"--reference_dir: {folder} has no config.json (train it: python benchmarks/train_reference.py "
                f"--family {family})"
            )


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


class PeakRSS:
    """Largest resident-set size (bytes) over a ``with`` block, above the size at its start."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.start = self._rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def perplexity(model: Any, blocks: Any) -> float:
    """``exp`` of the mean next-token cross-entropy of ``model`` over ``blocks`` ``[N, T]`` (float32)."""
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, blocks.shape[0], EVAL_BATCH_BLOCKS):
            batch = blocks[start : start + EVAL_BATCH_BLOCKS]
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            count += targets.numel()
    model.train(was_training)
    return math.exp(nll / count)


def agreement(model: Any, blocks: Any) -> dict[str, float]:
    """Mean over layers of each router's top-1 / top-k agreement with its original gate on ``blocks``."""
    import torch

    from hf_moe_routers.modeling.base import RoutedRouterMixin
    from hf_moe_routers.patching import capture_router_inputs, routing_agreement

    routers = [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedRouterMixin)]
    inputs: dict[str, list[Any]] = {name: [] for name, _ in routers}
    for start in range(0, blocks.shape[0], EVAL_BATCH_BLOCKS):
        captured = capture_router_inputs(
            model, routers, {"input_ids": blocks[start : start + EVAL_BATCH_BLOCKS]}
        )
        for name, x in captured.items():
            inputs[name].append(x)
    layers = [routing_agreement(router, torch.cat(inputs[name])) for name, router in routers]
    return {
        "top1_agreement": sum(layer["top1_agreement"] for layer in layers) / len(layers),
        "topk_agreement": sum(layer["topk_agreement"] for layer in layers) / len(layers),
    }


def calibration_batches(train_blocks: Any, tokens: int) -> list[dict[str, Any]]:
    """The first ``ceil(tokens / 128)`` training blocks spread evenly over the training split, in
    batches of ``CALIBRATION_BATCH_BLOCKS`` blocks."""
    import torch

    count = min(math.ceil(tokens / BLOCK_SIZE), train_blocks.shape[0])
    index = torch.linspace(0, train_blocks.shape[0] - 1, count).round().long()
    chosen = train_blocks[index]
    return [
        {"input_ids": chosen[i : i + CALIBRATION_BATCH_BLOCKS]}
        for i in range(0, count, CALIBRATION_BATCH_BLOCKS)
    ]


def convert(
    original: Any, router: str, batches: list[dict[str, Any]], steps: int, args: argparse.Namespace
) -> tuple[Any, dict[str, float]]:
    """A patched (and, for ``steps > 0``, distilled) copy of ``original``, with its cost."""
    from hf_moe_routers import distill_router, patch_moe_routers

    with PeakRSS() as memory:
        start = time.perf_counter()
        model = patch_moe_routers(
            copy.deepcopy(original), ROUTERS[router], calibration_batches=batches[:1], seed=args.seed
        )
        if steps > 0:
            distill_router(
                model, batches, steps=steps, lr=args.distill_lr, temperature=args.distill_temperature
            )
        seconds = time.perf_counter() - start
    return model, {"seconds": round(seconds, 3), "peak_rss_growth_mb": round(memory.growth_mb, 1)}


def finetune(model: Any, train_blocks: Any, args: argparse.Namespace) -> Any:
    """``--finetune_steps`` of AdamW on every parameter, the model's own loss (LM + the family's
    balance loss), seeded batches of training blocks; the same for every row of a family."""
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.finetune_lr, weight_decay=0.0
    )
    model.train()
    for _ in range(args.finetune_steps):
        index = torch.randint(0, train_blocks.shape[0], (args.finetune_batch_blocks,), generator=generator)
        batch = train_blocks[index]
        loss = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    return model


def load_family(folder: Path, max_eval_blocks: int | None) -> tuple[Any, Any, Any]:
    """The reference in float32 and its training and validation blocks (its own tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_moe_routers import data_utils

    tokenizer = AutoTokenizer.from_pretrained(folder)
    corpus = data_utils.bundled_corpus()
    train, validation = data_utils.build_lm_datasets(
        corpus["train"], corpus["validation"], tokenizer, BLOCK_SIZE
    )
    validation_blocks = validation.blocks
    if max_eval_blocks is not None:
        validation_blocks, _ = data_utils.build_lm_datasets(
            corpus["validation"], None, tokenizer, BLOCK_SIZE, max_train_blocks=max_eval_blocks
        )
        validation_blocks = validation_blocks.blocks
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, train.blocks, validation_blocks


def rank_limited_perplexity(model: Any, rank: int, blocks: Any) -> float:
    """Perplexity with every gate replaced by its best rank-``rank`` approximation (truncated SVD).

    A latent router of rank r scores experts through an r-dimensional projection of the input, so
    it cannot tell apart what the gate separates in the directions it drops: this is the
    perplexity of the best exact rank-r *linear* scoring, the floor that L2R at rank r is measured
    against (its bounded scoring adds a second approximation on top).
    """
    import copy

    import torch

    limited = copy.deepcopy(model)
    with torch.no_grad():
        for name, weight in limited.named_parameters():
            if name.endswith(".gate.weight") and weight.ndim == 2 and rank < min(weight.shape):
                u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
                weight.copy_((u[:, :rank] * s[:rank]) @ vh[:rank])
    return perplexity(limited, blocks)


def run_family(family: str, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    import torch

    model, train_blocks, validation_blocks = load_family(
        Path(args.reference_dir) / family, args.max_eval_blocks
    )
    agreement_blocks = validation_blocks[:AGREEMENT_BLOCKS]
    original_ppl = perplexity(model, validation_blocks)
    log(f"{family}: original validation perplexity {original_ppl:.3f}")
    ranks = sorted({int(ROUTERS[r]["rank"]) for r in args.routers if "rank" in ROUTERS[r]})
    rank_limits = {}
    for rank in ranks:
        limited = rank_limited_perplexity(model, rank, validation_blocks)
        rank_limits[str(rank)] = {"perplexity": limited, "perplexity_ratio": limited / original_ppl}
        log(f"{family}: gates truncated to rank {rank}: ppl {limited:.3f} (x{limited / original_ppl:.4f})")
    rows: list[dict[str, Any]] = []
    for router in args.routers:
        # Patching alone does not look at the calibration tokens (the new router is initialised from
        # the gate's weights), so the 0-step row is measured once per router.
        settings = [(None, 0)] if 0 in args.steps else []
        settings += [(tokens, steps) for tokens in args.tokens for steps in args.steps if steps > 0]
        for tokens, steps in settings:
            batches = calibration_batches(train_blocks, tokens or BLOCK_SIZE * CALIBRATION_BATCH_BLOCKS)
            torch.manual_seed(args.seed)
            converted, cost = convert(model, router, batches, steps, args)
            ppl = perplexity(converted, validation_blocks)
            row = {
                "family": family,
                "router": router,
                "calibration_tokens": tokens,
                "distill_steps": steps,
                "perplexity": ppl,
                "perplexity_ratio": ppl / original_ppl,
                **agreement(converted, agreement_blocks),
                **cost,
            }
            rows.append(row)
            log(
                f"{family} {router:>16} tokens {tokens or 0:>6} steps {steps:>4}: ppl {ppl:8.3f} "
                f"(x{row['perplexity_ratio']:.4f}) top-1 {row['top1_agreement']:.3f} "
                f"top-k {row['topk_agreement']:.3f} {cost['seconds']:.1f} s"
            )
            del converted
    finetuned = (
        finetune_rows(family, model, train_blocks, validation_blocks, rows, args, log)
        if args.finetune_steps
        else []
    )
    return {
        "family": family,
        "original_perplexity": original_ppl,
        "rank_limits": rank_limits,
        "rows": rows,
        "finetune": finetuned,
    }


def best_within_goal(rows: list[dict[str, Any]], family: str, router: str) -> dict[str, Any] | None:
    """The lowest-perplexity row of (family, router) within the goal's budget."""
    eligible = [
        r
        for r in rows
        if r["family"] == family
        and r["router"] == router
        and r["distill_steps"] <= GOAL_STEPS
        and (r["calibration_tokens"] or 0) <= GOAL_TOKENS
    ]
    return min(eligible, key=lambda r: r["perplexity"]) if eligible else None


def finetune_rows(
    family: str,
    model: Any,
    train_blocks: Any,
    validation_blocks: Any,
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    log: Any,
) -> list[dict[str, Any]]:
    import torch

    from hf_moe_routers import drop_reference_gates

    torch.manual_seed(args.seed)
    unpatched = finetune(copy.deepcopy(model), train_blocks, args)
    base_ppl = perplexity(unpatched, validation_blocks)
    del unpatched
    log(f"{family}: unpatched after {args.finetune_steps} fine-tune steps: ppl {base_ppl:.3f}")
    out = [
        {
            "family": family,
            "router": "original (unpatched)",
            "distill_steps": None,
            "calibration_tokens": None,
            "perplexity": base_ppl,
            "perplexity_ratio": 1.0,
        }
    ]
    for router in args.routers:
        best = best_within_goal(rows, family, router)
        if best is None:
            continue
        torch.manual_seed(args.seed)
        tokens = best["calibration_tokens"] or BLOCK_SIZE * CALIBRATION_BATCH_BLOCKS
        converted, _ = convert(
            model, router, calibration_batches(train_blocks, tokens), best["distill_steps"], args
        )
        drop_reference_gates(converted)
        torch.manual_seed(args.seed)
        ppl = perplexity(finetune(converted, train_blocks, args), validation_blocks)
        out.append(
            {
                "family": family,
                "router": router,
                "distill_steps": best["distill_steps"],
                "calibration_tokens": best["calibration_tokens"],
                "perplexity": ppl,
                "perplexity_ratio": ppl / base_ppl,
            }
        )
        log(
            f"{family} {router:>16} after fine-tune: ppl {ppl:.3f} (x{ppl / base_ppl:.4f} of the unpatched fine-tune)"
        )
        del converted
    return out


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def goal_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per family and router: perplexity right after patching, the best within the goal's budget,
    the best overall, and whether the goal is met (SR-MoE linear: identical; others: within 1%)."""
    out = []
    for result in results:
        family, rows = result["family"], result["rows"]
        for router in dict.fromkeys(r["router"] for r in rows):
            mine = [r for r in rows if r["router"] == router]
            patched = next((r for r in mine if r["distill_steps"] == 0), None)
            best_goal = best_within_goal(rows, family, router)
            best_any = min(mine, key=lambda r: r["perplexity"])
            if router == "sr_moe_linear":
                met = patched is not None and patched["perplexity"] == result["original_perplexity"]
                goal = "identical after patching"
            else:
                met = best_goal is not None and best_goal["perplexity_ratio"] <= GOAL_RATIO
                goal = f"<= {GOAL_RATIO:.2f}x after <= {GOAL_STEPS} steps on <= {GOAL_TOKENS:,} tokens"
            out.append(
                {
                    "family": family,
                    "router": router,
                    "original": result["original_perplexity"],
                    "after_patch": patched["perplexity"] if patched else None,
                    "best_within_goal": best_goal,
                    "best_overall": best_any,
                    "goal": goal,
                    "goal_met": met,
                }
            )
    return out


def _setting(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    if not row["distill_steps"]:
        return f"{row['perplexity']:.2f} (x{row['perplexity_ratio']:.3f}, patch only)"
    return (
        f"{row['perplexity']:.2f} (x{row['perplexity_ratio']:.3f}, {row['distill_steps']} steps, "
        f"{row['calibration_tokens']:,} tok)"
    )


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# Converting a pretrained model: perplexity after the router swap",
        "",
        f"Generated by `{payload['command']}` on {payload['machine']} ({payload['threads']} torch thread(s)); "
        f"{payload['wall_seconds'] / 60:.1f} min in all.",
        "",
        "Validation perplexity of the shipped references (`benchmarks/reference/`, plain transformers models "
        "trained on the bundled training plays) on the whole validation split, float32, after "
        "`patch_moe_routers` and `distill_router` (lr "
        f"{payload['settings']['distill_lr']}, temperature {payload['settings']['distill_temperature']}, "
        f"{CALIBRATION_BATCH_BLOCKS * BLOCK_SIZE:,} calibration tokens per step). "
        "Agreement: top-k/top-1 agreement of the new routers with the original gates on validation tokens, "
        "mean over layers.",
        "",
        "## Headline: the goal per router",
        "",
        "| family | router | original | right after patching | best within goal budget | best overall | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in payload["goals"]:
        after = f"{g['after_patch']:.2f}" if g["after_patch"] is not None else "–"
        lines.append(
            f"| {g['family']} | {g['router']} | {g['original']:.2f} | {after} | {_setting(g['best_within_goal'])} | "
            f"{_setting(g['best_overall'])} | {g['goal']} | {'yes' if g['goal_met'] else '**no**'} |"
        )
    limits = [
        (result["family"], rank, v)
        for result in payload["results"]
        for rank, v in result.get("rank_limits", {}).items()
    ]
    if limits:
        lines += [
            "",
            "## What a latent rank can reach",
            "",
            "Perplexity with each gate replaced by its best rank-r approximation (truncated SVD): the best an "
            "exact rank-r linear scoring can do, the floor for L2R at rank r (whose bounded scoring is a second "
            "approximation on top). The gates have as many rows as experts, so a rank at or above that is exact.",
            "",
            "| family | rank | perplexity | x original |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {family} | {rank} | {v['perplexity']:.3f} | {v['perplexity_ratio']:.4f} |"
            for family, rank, v in limits
        ]
    lines += ["", "## Every setting", ""]
    lines += [
        "| family | router | calibration tokens | distill steps | perplexity | x original | top-1 agr. | top-k agr. | "
        "patch+distill s | peak RSS growth MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in payload["results"]:
        for r in result["rows"]:
            tokens = f"{r['calibration_tokens']:,}" if r["calibration_tokens"] else "–"
            lines.append(
                f"| {r['family']} | {r['router']} | {tokens} | {r['distill_steps']} | {r['perplexity']:.3f} | "
                f"{r['perplexity_ratio']:.4f} | {r['top1_agreement']:.3f} | {r['topk_agreement']:.3f} | "
                f"{r['seconds']:.2f} | {r['peak_rss_growth_mb']:.1f} |"
            )
    finetuned = [r for result in payload["results"] for r in result["finetune"]]
    if finetuned:
        lines += [
            "",
            f"## After a short fine-tune of the whole model ({payload['settings']['finetune_steps']} steps, "
            f"lr {payload['settings']['finetune_lr']}, {payload['settings']['finetune_batch_blocks']} blocks per step)",
            "",
            "Each router converted with its best setting within the goal's budget, then fine-tuned exactly like the "
            "unpatched original (same batches, same optimiser, the model's own loss: LM + the family's balance loss).",
            "",
            "| family | router | conversion | perplexity | x unpatched fine-tune |",
            "|---|---|---|---|---|",
        ]
        for r in finetuned:
            conversion = (
                "–"
                if r["distill_steps"] is None
                else (
                    "patch only"
                    if not r["distill_steps"]
                    else f"{r['distill_steps']} steps, {r['calibration_tokens']:,} tok"
                )
            )
            lines.append(
                f"| {r['family']} | {r['router']} | {conversion} | {r['perplexity']:.3f} | {r['perplexity_ratio']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    """Perplexity ratio against distillation steps, one panel per family, at the largest calibration size."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    results = payload["results"]
    figure = Figure(figsize=(5 * len(results), 4), constrained_layout=True)
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    for ax, result in zip(axes, results, strict=True):
        tokens = max((r["calibration_tokens"] or 0) for r in result["rows"])
        for router in dict.fromkeys(r["router"] for r in result["rows"]):
            points = sorted(
                (r["distill_steps"], r["perplexity_ratio"])
                for r in result["rows"]
                if r["router"] == router and r["calibration_tokens"] in (None, tokens)
            )
            ax.plot([max(s, 1) for s, _ in points], [v for _, v in points], marker="o", label=router)
        ax.axhline(GOAL_RATIO, color="grey", linestyle="--", linewidth=1, label="goal (1%)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"distillation steps ({tokens:,} calibration tokens; 0 drawn at 1)")
        ax.set_ylabel("validation perplexity / original")
        ax.set_title(f"{result['family']} (original {result['original_perplexity']:.1f})")
    axes[0].legend(fontsize=7)
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except UsageError as error:
        sys.stderr.write(f"{parser.prog}: error: {error}\n")
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:
        pass  # set once per process: when called in-process (tests) the pool is already up

    def log(message: str) -> None:
        print(message, flush=True)

    start = time.perf_counter()
    results = [run_family(family, args, log) for family in args.families]
    payload = {
        "command": "python benchmarks/conversion.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "threads": args.threads,
        "torch": torch.__version__,
        "settings": {
            k: getattr(args, k)
            for k in (
                "distill_lr",
                "distill_temperature",
                "finetune_steps",
                "finetune_lr",
                "finetune_batch_blocks",
                "seed",
                "max_eval_blocks",
            )
        },
        "routers": {name: ROUTERS[name] for name in args.routers},
        "results": results,
        "wall_seconds": time.perf_counter() - start,
    }
    payload["goals"] = goal_rows(results)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "conversion.json").write_text(json.dumps(payload, indent=1) + "\n")
    (output / "conversion.md").write_text(markdown(payload))
    if not args.no_plot:
        plot(payload, output / "conversion.png")
    log(f"wrote {output / 'conversion.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
