"""Experiment A, sensitivity: how much do one-shot results depend on protocol choices?

At one depth (default 8) and one dataset, every factor is varied one at a time around the defaults
of experiment A, on the **validation** split (this sweep chooses defaults, so it never reads the
test split):

- adaptation learning rate (same trained models, episodes re-run per value);
- routing temperature τ (every router's logits / τ);
- dense soft routing vs sparse top-2;
- load-balancing loss on / off;
- SR-MoE penalty weights λ_σ = λ_sr (SR-MoE routers only);
- SR penalties on the local processors too.

It also selects the adaptation learning rate that experiment A uses: the value with the highest
mean, over routers, of the class-balanced accuracy over the 9 classes in play after adaptation,
``(8 · base accuracy after + new-class accuracy after) / 9`` — every class counts the same, so
learning the new class cannot be bought with an arbitrary loss on the eight old ones.

Because a fixed learning rate is a different effective step for routers whose top expert carries
more or less of an example's routing weight, the sweep also reports each router's interference at
*matched* new-class accuracy (interpolated along its learning-rate curve).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import report as R
from .adaptation import AdaptationBudget
from .data import base_new_split, load_dataset
from .interference import DEFAULT_SETTINGS, QUICK_SETTINGS
from .vision import INTERFERENCE_ROUTERS, ROUTER_LABELS, VisionSettings, run_episodes, train_and_measure

__all__ = [
    "SensitivitySpec",
    "quick_sensitivity_spec",
    "render_outputs",
    "run_sensitivity",
    "variants",
]

SR_ROUTERS = ("sr_moe_penalty", "sr_moe_constrain")
FACTOR_BUDGET = AdaptationBudget(steps=10, learning_rate=0.03, experts_per_layer=1)


@dataclasses.dataclass(frozen=True)
class SensitivitySpec(R.ExperimentSpec):
    """What the sweep runs; defaults finish in ≤ 30 min on a 2-core CPU."""

    dataset: str = "digits"
    depth: int = 8
    routers: tuple[str, ...] = INTERFERENCE_ROUTERS
    seeds: tuple[int, ...] = (0, 1, 2)
    episodes_per_class: int = 8
    eval_split: str = "val"
    learning_rates: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    temperatures: tuple[float, ...] = (0.3, 3.0)
    sparse_top_k: int = 2
    sr_weights: tuple[float, ...] = (1e-3, 1e-1, 1.0)
    processor_weight: float = 1e-2
    settings: VisionSettings = DEFAULT_SETTINGS
    #: The budget of the factor rows (lr 0.03, the middle of the learning-rate grid); the
    #: learning-rate rows replace only its learning rate.
    budget: AdaptationBudget = FACTOR_BUDGET


def quick_sensitivity_spec() -> SensitivitySpec:
    """A tiny sweep for CI: depth 2, two routers, one seed, two epochs, one value per factor."""
    return SensitivitySpec(
        depth=2,
        routers=("linear", "sr_moe_penalty"),
        seeds=(0,),
        episodes_per_class=1,
        learning_rates=(0.01, 0.1),
        temperatures=(0.3,),
        sr_weights=(1.0,),
        settings=QUICK_SETTINGS,
        budget=AdaptationBudget(steps=2, learning_rate=FACTOR_BUDGET.learning_rate),
    )


def variants(spec: SensitivitySpec) -> list[tuple[str, str, dict[str, Any], tuple[str, ...]]]:
    """``(factor, value label, settings changes, routers)`` for every trained configuration."""
    base = spec.settings
    out: list[tuple[str, str, dict[str, Any], tuple[str, ...]]] = [("default", "default", {}, spec.routers)]
    for tau in spec.temperatures:
        out.append(
            (
                "routing temperature τ",
                f"{tau:g} (default {base.routing_temperature:g})",
                {"routing_temperature": tau},
                spec.routers,
            )
        )
    if base.top_k is None:
        out.append(
            (
                "routing",
                f"sparse top-{spec.sparse_top_k} (default dense)",
                {"top_k": spec.sparse_top_k},
                spec.routers,
            )
        )
    else:
        out.append(("routing", "dense (default sparse)", {"top_k": None}, spec.routers))
    flipped = 0.0 if base.balance_weight > 0 else 0.01
    out.append(
        (
            "balance loss",
            f"weight {flipped:g} (default {base.balance_weight:g})",
            {"balance_weight": flipped},
            spec.routers,
        )
    )
    sr = tuple(r for r in spec.routers if r in SR_ROUTERS)
    if sr:
        for weight in spec.sr_weights:
            out.append(("SR λ_σ = λ_sr", f"{weight:g} (default 0.01)", {"sr_weight": weight}, sr))
    out.append(
        (
            "SR penalties on local processors",
            f"λ = {spec.processor_weight:g} (default off)",
            {"processor_weight": spec.processor_weight},
            spec.routers,
        )
    )
    return out


def _episode_summary(episodes: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "interference_pp": float(np.mean([e["interference_pp"] for e in episodes])),
        "new_accuracy": float(np.mean([e["new_accuracy_after"] for e in episodes])),
        "base_accuracy_after": float(np.mean([e["base_accuracy_after"] for e in episodes])),
        "exposure": float(np.mean([e["exposure"] for e in episodes])),
    }


def run_sensitivity(
    spec: SensitivitySpec,
    out_dir: Path,
    *,
    command: str,
    prefix: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the sweep; write ``{prefix}sensitivity.{json,md}`` and the learning-rate plot."""
    start = time.perf_counter()
    data = load_dataset(spec.dataset)
    rows: list[dict[str, Any]] = []
    configs = variants(spec)
    total = sum(len(routers) for *_, routers in configs) * len(spec.seeds)
    for seed in spec.seeds:
        base, new = base_new_split(seed)
        for factor, label, changes, routers in configs:
            settings = spec.settings.replace(**changes)
            for router in routers:
                model, _, pre, quality = train_and_measure(
                    data, spec.depth, router, settings, seed, base, spec.eval_split
                )
                rates = spec.learning_rates if factor == "default" else (spec.budget.learning_rate,)
                for lr in rates:
                    budget = dataclasses.replace(spec.budget, learning_rate=lr)
                    episodes = run_episodes(
                        model, data, base, new, budget,
                        episodes_per_class=spec.episodes_per_class, eval_split=spec.eval_split, seed=seed,
                    )  # fmt: skip
                    rows.append(
                        {
                            "factor": factor,
                            "value": label,
                            "router": router,
                            "seed": seed,
                            "learning_rate": lr,
                            "pre_accuracy": pre,
                            "load_entropy": quality["load_entropy"],
                            "token_entropy": quality["token_entropy"],
                            **_episode_summary(episodes),
                        }
                    )
                done = len({(r["factor"], r["value"], r["router"], r["seed"]) for r in rows})
                log(
                    f"[{done}/{total}] seed={seed} {factor}={label} {router}: pre {100 * pre:.1f}%  "
                    f"interference {rows[-1]['interference_pp']:+.2f} pp  new {100 * rows[-1]['new_accuracy']:.1f}% "
                    f"({(time.perf_counter() - start) / 60:.1f} min)"
                )
        R.write_json(out_dir / f"{prefix}sensitivity.json", _result(spec, rows, command, start))
    return render_outputs(_result(spec, rows, command, start), out_dir, prefix)


def render_outputs(result: dict[str, Any], out_dir: Path, prefix: str = "") -> dict[str, Any]:
    """Write ``{prefix}sensitivity.md``, the plots and the JSON from a result dict."""
    return R.write_outputs(
        result, out_dir, prefix, render_markdown=render_markdown, make_plots=_plot_learning_rate
    )


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (factor, value, router, learning rate)."""
    groups: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["factor"], row["value"], row["router"], row["learning_rate"]), []).append(row)
    out = []
    for (factor, value, router, lr), group in groups.items():
        entry: dict[str, Any] = {"factor": factor, "value": value, "router": router, "learning_rate": lr}
        for key in (
            "pre_accuracy",
            "interference_pp",
            "new_accuracy",
            "base_accuracy_after",
            "exposure",
            "load_entropy",
        ):
            entry[key], entry[f"{key}_std"] = R.mean_std([g[key] for g in group])
        entry["seeds"] = len(group)
        out.append(entry)
    return out


NUM_BASE_CLASSES = 8
MATCHED_NEW_ACCURACY = (0.25, 0.5)


def select_learning_rate(summary: list[dict[str, Any]]) -> tuple[float, dict[float, float]]:
    """The default-model learning rate maximising the router mean of the class-balanced accuracy
    ``(8 · base after + new after) / 9``; returns it and the score of every learning rate."""
    scores: dict[float, list[float]] = {}
    for entry in summary:
        if entry["factor"] == "default":
            balanced = NUM_BASE_CLASSES * entry["base_accuracy_after"] + entry["new_accuracy"]
            scores.setdefault(entry["learning_rate"], []).append(balanced / (NUM_BASE_CLASSES + 1))
    means = {lr: float(np.mean(v)) for lr, v in sorted(scores.items())}
    return max(means, key=means.get), means


def _lr_curve(summary: list[dict[str, Any]], router: str) -> list[dict[str, Any]]:
    """The summary entries of ``router``'s default models, by increasing learning rate."""
    return sorted(
        (e for e in summary if e["factor"] == "default" and e["router"] == router),
        key=lambda e: e["learning_rate"],
    )


def matched_interference(summary: list[dict[str, Any]], router: str, new_accuracy: float) -> float | None:
    """Interference (pp) of ``router`` where its learning-rate curve reaches ``new_accuracy``.

    Linear interpolation between the two learning rates whose mean new-class accuracies bracket the
    target (the first crossing); None if no learning rate of the sweep reaches it.
    """
    curve = _lr_curve(summary, router)
    for low, high in zip(curve, curve[1:]):
        a, b = low["new_accuracy"], high["new_accuracy"]
        if a <= new_accuracy <= b and b > a:
            t = (new_accuracy - a) / (b - a)
            return (1 - t) * low["interference_pp"] + t * high["interference_pp"]
    if curve and curve[0]["new_accuracy"] == new_accuracy:
        return curve[0]["interference_pp"]
    return None


def _result(spec: SensitivitySpec, rows: list[dict[str, Any]], command: str, start: float) -> dict[str, Any]:
    summary = summarise(rows)
    chosen, scores = select_learning_rate(summary) if rows else (float("nan"), {})
    matched = {
        router: {
            f"{target:g}": matched_interference(summary, router, target) for target in MATCHED_NEW_ACCURACY
        }
        for router in spec.routers
    }
    return {
        **R.result_header("sensitivity", command, start, spec),
        "selected_learning_rate": chosen,
        "learning_rate_scores": scores,
        "matched_interference_pp": matched,
        "summary": summary,
        "rows": rows,
    }


def render_markdown(result: dict[str, Any]) -> str:
    spec, summary = result["spec"], result["summary"]
    default_lr = spec["budget"]["learning_rate"]
    lines = [
        f"# Experiment A, sensitivity (depth {spec['depth']}, {spec['dataset']}, `{spec['eval_split']}` split)",
        "",
        f"Command: `{result['command']}` ({result['wall_seconds'] / 60:.1f} min). Seeds {list(spec['seeds'])}, "
        f"{spec['episodes_per_class']} episodes per held-out class and seed; {spec['budget']['steps']} SGD steps, "
        f"1 expert per stage. Each factor is varied alone around the defaults; mean ± std over seeds.",
        "",
        "## Adaptation learning rate (default models)",
        "",
    ]
    rows = []
    for entry in sorted(
        (e for e in summary if e["factor"] == "default"),
        key=lambda e: (e["learning_rate"], spec["routers"].index(e["router"])),
    ):
        rows.append(
            [
                f"{entry['learning_rate']:g}",
                ROUTER_LABELS[entry["router"]],
                R.fmt_pm(entry["interference_pp"], entry["interference_pp_std"]),
                R.fmt_pm(100 * entry["new_accuracy"], 100 * entry["new_accuracy_std"], 1),
                R.fmt(entry["exposure"], 3),
            ]
        )
    lines.append(R.markdown_table(["lr", "router", "interference pp", "new %", "exposure"], rows))
    scores = ", ".join(f"{float(lr):g}: {100 * s:.2f}%" for lr, s in result["learning_rate_scores"].items())
    lines += [
        "",
        f"Selection score (router mean of the class-balanced 9-class accuracy after adaptation, "
        f"(8·base + new)/9): {scores}. **Selected lr = {result['selected_learning_rate']:g}** "
        f"(the factor rows below use {default_lr:g}).",
        "",
        "## Interference at matched new-class accuracy (interpolated along each router's lr curve)",
        "",
    ]
    targets = list(next(iter(result["matched_interference_pp"].values()), {}))
    rows = [
        [ROUTER_LABELS[router]] + [R.fmt(v) if v is not None else "not reached" for v in by_target.values()]
        for router, by_target in result["matched_interference_pp"].items()
    ]
    lines.append(
        R.markdown_table(
            ["router", *[f"interference pp at new = {100 * float(t):g}%" for t in targets]], rows
        )
    )
    lines += [
        "",
        f"## Protocol factors (adaptation lr {default_lr:g})",
        "",
    ]
    rows = []
    order = [v[:2] for v in variants_from_dict(spec)]
    for factor, value in order:
        for router in spec["routers"]:
            match = [
                e for e in summary
                if e["factor"] == factor and e["value"] == value and e["router"] == router
                and e["learning_rate"] == default_lr
            ]  # fmt: skip
            if not match:
                continue
            e = match[0]
            rows.append(
                [
                    factor,
                    value,
                    ROUTER_LABELS[router],
                    R.fmt_pm(100 * e["pre_accuracy"], 100 * e["pre_accuracy_std"], 1),
                    R.fmt_pm(e["interference_pp"], e["interference_pp_std"]),
                    R.fmt_pm(100 * e["new_accuracy"], 100 * e["new_accuracy_std"], 1),
                    R.fmt(e["exposure"], 3),
                    R.fmt(e["load_entropy"], 3),
                ]
            )
    headers = ["factor", "value", "router", "pre-acc %", "interference pp", "new %", "exposure", "H(load)"]
    lines.append(R.markdown_table(headers, rows))
    return "\n".join(lines) + "\n"


def variants_from_dict(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], tuple[str, ...]]]:
    """:func:`variants` of a spec read back from JSON."""
    fields = dict(spec)
    fields["settings"] = VisionSettings(**spec["settings"])
    fields["budget"] = AdaptationBudget(**spec["budget"])
    for key in ("routers", "seeds", "learning_rates", "temperatures", "sr_weights"):
        fields[key] = tuple(spec[key])
    return variants(SensitivitySpec(**fields))


def _plot_learning_rate(result: dict[str, Any], out_dir: Path, prefix: str) -> list[str]:
    spec, summary = result["spec"], result["summary"]
    panels: dict[tuple[str, str], dict[str, tuple[list[float], list[float], list[float]]]] = {}
    for metric, scale in (("interference_pp", 1.0), ("new_accuracy", 100.0)):
        for router in spec["routers"]:
            chosen = _lr_curve(summary, router)
            panels.setdefault((metric, spec["dataset"]), {})[router] = (
                [e["learning_rate"] for e in chosen],
                [scale * e[metric] for e in chosen],
                [scale * e[f"{metric}_std"] for e in chosen],
            )
    tradeoff = {
        ("interference_pp", "tradeoff"): {
            router: (
                [100 * e["new_accuracy"] for e in chosen],
                [e["interference_pp"] for e in chosen],
                [e["interference_pp_std"] for e in chosen],
            )
            for router in spec["routers"]
            for chosen in [_lr_curve(summary, router)]
        }
    }
    name = f"{prefix}sensitivity_learning_rate.png"
    R.plot_series_grid(
        panels,
        ["interference_pp", "new_accuracy"],
        [spec["dataset"]],
        xlabel="adaptation learning rate",
        row_labels={"interference_pp": "interference (pp)", "new_accuracy": "new-class acc. (%)"},
        col_labels={spec["dataset"]: f"{spec['dataset']}, depth {spec['depth']}, validation split"},
        series_labels={r: ROUTER_LABELS[r] for r in spec["routers"]},
        path=out_dir / name,
        xscale="log",
        xticks=sorted(spec["learning_rates"]),
        zero_line_rows=("interference_pp",),
    )
    tradeoff_name = f"{prefix}sensitivity_tradeoff.png"
    R.plot_series_grid(
        tradeoff,
        ["interference_pp"],
        ["tradeoff"],
        xlabel="new-class accuracy after adaptation (%)",
        row_labels={"interference_pp": "interference (pp)"},
        col_labels={"tradeoff": f"{spec['dataset']}, depth {spec['depth']}: one point per learning rate"},
        series_labels={r: ROUTER_LABELS[r] for r in spec["routers"]},
        path=out_dir / tradeoff_name,
        zero_line_rows=("interference_pp",),
    )
    return [name, tradeoff_name]
