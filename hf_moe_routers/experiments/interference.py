"""Experiment A: interference of modular one-shot adaptation vs depth, per router and dataset.

Protocol (also in the README, "Protocol of experiment A", and ``docs/ROUTERS.md``):

- Split: per seed, 2 of the 10 classes are held out (a seeded permutation, the same for every
  router); the model trains on the other 8 (training split), with the held-out classes' logits
  masked so their head rows stay at initialisation.
- Episode: one training example of a held-out class c; the router's top expert per stage (for that
  example) is updated for ``budget.steps`` SGD steps, everything else frozen; the argmax then runs
  over the 8 base classes plus c (the new class competes). Base accuracy on the base-class
  examples of the evaluation split before/after (interference, pp), new-class accuracy on its
  class-c examples after, exposure; the model is restored before the next episode. The same
  episodes (same examples) run under each budget of ``spec.budgets``.
- Per cell (dataset × depth × router): mean over seeds of the per-seed mean, std over seeds, and the
  std over all episodes pooled; pre-adaptation accuracy (8-way, evaluation split), load entropy
  (top-1 / top-k counts on the evaluation split, mean over stages).
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
from .data import DATASETS, base_new_split, load_dataset
from .vision import INTERFERENCE_ROUTERS, ROUTER_LABELS, VisionSettings, run_episodes, train_and_measure

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_SETTINGS",
    "QUICK_SETTINGS",
    "STRONG_BUDGET",
    "InterferenceSpec",
    "quick_spec",
    "render_outputs",
    "run_interference",
]

#: Base-training settings of experiment A (chosen before any test-split evaluation; see the README).
DEFAULT_SETTINGS = VisionSettings()
#: The tiny models of the ``--quick`` runs (CI), here and in the sensitivity sweep.
QUICK_SETTINGS = DEFAULT_SETTINGS.replace(
    hidden_size=16, expert_intermediate_size=16, num_experts=4, epochs=2
)
#: The adaptation budget every router gets, selected by the ``sensitivity`` command on the
#: validation split (depth 8, digits; the learning rate with the best class-balanced accuracy after
#: adaptation): see ``benchmarks/results/sensitivity.md``.
DEFAULT_BUDGET = AdaptationBudget(steps=10, learning_rate=0.01, experts_per_layer=1)
#: A second budget, 10× the learning rate: the smallest learning rate of the sweep at which every
#: router learned the new class to ≥ 15% on validation, so interference is compared where the
#: adaptation does something for every router.
STRONG_BUDGET = AdaptationBudget(steps=10, learning_rate=0.1, experts_per_layer=1)
DATASET_LABELS = {"digits": "scikit-learn digits (8×8, conv stem)", "mnist1d": "MNIST-1D (conv1d stem)"}


@dataclasses.dataclass(frozen=True)
class InterferenceSpec(R.ExperimentSpec):
    """What experiment A runs. Defaults: the full grid (≤ 30 min on a 2-core CPU)."""

    datasets: tuple[str, ...] = DATASETS
    depths: tuple[int, ...] = (2, 4, 8)
    routers: tuple[str, ...] = INTERFERENCE_ROUTERS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    episodes_per_class: int = 10
    eval_split: str = "test"
    settings: VisionSettings = DEFAULT_SETTINGS
    budgets: tuple[AdaptationBudget, ...] = (DEFAULT_BUDGET, STRONG_BUDGET)


def quick_spec() -> InterferenceSpec:
    """One tiny cell (digits, depth 2, two routers, one seed, 2 epochs) for CI."""
    return InterferenceSpec(
        datasets=("digits",),
        depths=(2,),
        routers=("linear", "sr_moe_penalty"),
        seeds=(0,),
        episodes_per_class=2,
        settings=QUICK_SETTINGS,
        budgets=(AdaptationBudget(steps=2, learning_rate=0.01), AdaptationBudget(steps=2, learning_rate=0.1)),
    )


def run_cell(dataset: str, depth: int, router: str, seed: int, spec: InterferenceSpec) -> dict[str, Any]:
    """Train one base model and run its episodes; a JSON-ready record."""
    data = load_dataset(dataset)
    base, new = base_new_split(seed)
    model, info, pre, quality = train_and_measure(
        data, depth, router, spec.settings, seed, base, spec.eval_split
    )
    start = time.perf_counter()
    by_budget = {}
    for budget in spec.budgets:
        episodes = run_episodes(
            model, data, base, new, budget,
            episodes_per_class=spec.episodes_per_class, eval_split=spec.eval_split, seed=seed,
        )  # fmt: skip
        by_budget[f"{budget.learning_rate:g}"] = {
            "interference_pp": [round(e["interference_pp"], 4) for e in episodes],
            "new_accuracy": [round(e["new_accuracy_after"], 4) for e in episodes],
            "exposure": [round(e["exposure"], 4) for e in episodes],
        }
    return {
        "dataset": dataset,
        "depth": depth,
        "router": router,
        "seed": seed,
        "base_classes": base,
        "new_classes": new,
        "pre_accuracy": pre,
        "train_seconds": info["train_seconds"],
        "episode_seconds": time.perf_counter() - start,
        "routing": quality,
        "episodes": by_budget,
    }


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (dataset, depth, router, learning rate): means and spreads over seeds and episodes."""
    groups: dict[tuple[str, int, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        for lr in run["episodes"]:
            groups.setdefault((run["dataset"], run["depth"], run["router"], lr), []).append(run)
    cells = []
    for (dataset, depth, router, lr), group in groups.items():
        cell: dict[str, Any] = {
            "dataset": dataset, "depth": depth, "router": router, "learning_rate": float(lr), "seeds": len(group),
        }  # fmt: skip
        for key in ("interference_pp", "new_accuracy", "exposure"):
            per_seed = [float(np.mean(r["episodes"][lr][key])) for r in group]
            pooled = [v for r in group for v in r["episodes"][lr][key]]
            cell[key], cell[f"{key}_std_seeds"] = R.mean_std(per_seed)
            cell[f"{key}_std_episodes"] = R.mean_std(pooled)[1]
        cell["episodes"] = sum(len(r["episodes"][lr]["interference_pp"]) for r in group)
        cell["pre_accuracy"], cell["pre_accuracy_std"] = R.mean_std([r["pre_accuracy"] for r in group])
        for key in ("load_entropy", "dead_experts", "token_entropy", "flip_rate"):
            cell[key], cell[f"{key}_std"] = R.mean_std([r["routing"][key] for r in group])
        cells.append(cell)
    return cells


def _lrs(spec: dict[str, Any]) -> list[float]:
    return [float(b["learning_rate"]) for b in spec["budgets"]]


def _cell(
    cells: list[dict[str, Any]], dataset: str, depth: int, router: str, lr: float
) -> dict[str, Any] | None:
    for c in cells:
        if (c["dataset"], c["depth"], c["router"]) == (dataset, depth, router) and c["learning_rate"] == lr:
            return c
    return None


def render_markdown(result: dict[str, Any]) -> str:
    """The Markdown tables of experiment A: per dataset, one row per (router, depth)."""
    spec, cells = result["spec"], result["cells"]
    lrs = _lrs(spec)
    steps = spec["budgets"][0]["steps"]
    lines = [
        "# Experiment A: interference of modular one-shot adaptation vs depth",
        "",
        f"Command: `{result['command']}` ({result['wall_seconds'] / 60:.1f} min, "
        f"{result['environment']['torch_threads']} thread(s)). Seeds {list(spec['seeds'])}, "
        f"{spec['episodes_per_class']} one-shot episodes per held-out class and seed, evaluated on the "
        f"`{spec['eval_split']}` split. Budgets, the same for every router: {steps} SGD steps on the selected "
        f"expert of each stage at lr {' and lr '.join(f'{lr:g}' for lr in lrs)} (the same episodes under both). "
        + (
            "MoE stages are residual (the default)."
            if spec["settings"].get("residual", True)
            else "**Ablation: MoE stages without residual connections** (`--no-residual`)."
        ),
        "",
        "Interference = base-class accuracy after − before (pp; negative = forgetting), mean over seeds "
        "± std over seeds [std over all episodes]. Pre-acc = 8-way base accuracy before adaptation (%). "
        "New = accuracy on the new class after adaptation (%; the new class competes in the argmax). "
        "Exposure = share of the base examples' routing weight on the adapted experts. H(load) = "
        "normalised load entropy of the top-1 choices.",
    ]
    for dataset in spec["datasets"]:
        rows = []
        for router in spec["routers"]:
            for depth in sorted(spec["depths"]):
                per_lr = [_cell(cells, dataset, depth, router, lr) for lr in lrs]
                if any(c is None for c in per_lr):
                    continue
                first = per_lr[0]
                row = [
                    ROUTER_LABELS[router],
                    depth,
                    R.fmt_pm(100 * first["pre_accuracy"], 100 * first["pre_accuracy_std"], 1),
                    R.fmt(first["load_entropy"], 3),
                    R.fmt(first["exposure"], 3),
                ]
                for c in per_lr:
                    row += [
                        f"{R.fmt_pm(c['interference_pp'], c['interference_pp_std_seeds'])} "
                        f"[{R.fmt(c['interference_pp_std_episodes'])}]",
                        R.fmt_pm(100 * c["new_accuracy"], 100 * c["new_accuracy_std_seeds"], 1),
                    ]
                rows.append(row)
        headers = ["router", "depth", "pre-acc %", "H(load)", "exposure"]
        for lr in lrs:
            headers += [f"interference pp (lr {lr:g})", f"new % (lr {lr:g})"]
        lines += ["", f"## {DATASET_LABELS.get(dataset, dataset)}", "", R.markdown_table(headers, rows)]
    lines += ["", "## Mean over depths and datasets", ""]
    rows = []
    for router in spec["routers"]:
        row = [ROUTER_LABELS[router]]
        mine = [c for c in cells if c["router"] == router]
        row.append(
            R.fmt(100 * float(np.mean([c["pre_accuracy"] for c in mine if c["learning_rate"] == lrs[0]])), 1)
        )
        for lr in lrs:
            chosen = [c for c in mine if c["learning_rate"] == lr]
            row += [R.fmt(float(np.mean([c["interference_pp"] for c in chosen]))),
                    R.fmt(100 * float(np.mean([c["new_accuracy"] for c in chosen])), 1)]  # fmt: skip
        rows.append(row)
    headers = ["router", "pre-acc %"]
    for lr in lrs:
        headers += [f"interference pp (lr {lr:g})", f"new % (lr {lr:g})"]
    lines.append(R.markdown_table(headers, rows))
    lines += _paired_table(result, lrs)
    lines += ["", "## Pre-adaptation accuracy change from the shallowest to the deepest model (pp)", ""]
    depths = sorted(spec["depths"])
    rows = []
    for router in spec["routers"]:
        row = [ROUTER_LABELS[router]]
        for dataset in spec["datasets"]:
            shallow = _cell(cells, dataset, depths[0], router, lrs[0])
            deep = _cell(cells, dataset, depths[-1], router, lrs[0])
            row.append(
                R.fmt(100 * (deep["pre_accuracy"] - shallow["pre_accuracy"])) if shallow and deep else "n/a"
            )
        rows.append(row)
    headers = ["router", *[f"{d}: depth {depths[-1]} − depth {depths[0]}" for d in spec["datasets"]]]
    lines.append(R.markdown_table(headers, rows))
    return "\n".join(lines) + "\n"


def _paired_table(result: dict[str, Any], lrs: list[float], reference: str = "linear") -> list[str]:
    """Router − ``reference`` on the same (dataset, depth, seed): same data, classes and episodes."""
    spec = result["spec"]
    if reference not in spec["routers"]:
        return []
    runs = {(r["dataset"], r["depth"], r["seed"], r["router"]): r for r in result["runs"]}
    rows = []
    for router in spec["routers"]:
        if router == reference:
            continue
        row = [ROUTER_LABELS[router]]
        keys = [k[:3] for k in runs if k[3] == router and (*k[:3], reference) in runs]
        pre = [
            100 * (runs[(*k, router)]["pre_accuracy"] - runs[(*k, reference)]["pre_accuracy"]) for k in keys
        ]
        row.append(R.fmt_pm(*R.mean_std(pre)))
        for lr in lrs:
            name = f"{lr:g}"
            diffs = [
                float(np.mean(runs[(*k, router)]["episodes"][name]["interference_pp"]))
                - float(np.mean(runs[(*k, reference)]["episodes"][name]["interference_pp"]))
                for k in keys
            ]
            row.append(R.fmt_pm(*R.mean_std(diffs)) + f" ({sum(d < 0 for d in diffs)}/{len(diffs)} worse)")
        rows.append(row)
    headers = ["router", "pre-acc pp"] + [f"interference pp (lr {lr:g})" for lr in lrs]
    return [
        "",
        f"## Paired difference from the {reference} router (same dataset, depth, seed, held-out classes and "
        "episodes; mean ± std over the pairs; 'worse' = more negative interference than linear)",
        "",
        R.markdown_table(headers, rows),
    ]


def make_plots(result: dict[str, Any], out_dir: Path, prefix: str) -> list[str]:
    """Pre-accuracy, interference and new accuracy vs depth (per budget), and load heatmaps."""
    spec, cells = result["spec"], result["cells"]
    lrs = _lrs(spec)
    rows: dict[str, tuple[str, str, float, float]] = {
        "pre_accuracy": ("pre_accuracy", "pre_accuracy_std", 100.0, lrs[0])
    }
    labels = {"pre_accuracy": "pre-adaptation acc. (%)"}
    for lr in lrs:
        rows[f"interference@{lr:g}"] = ("interference_pp", "interference_pp_std_seeds", 1.0, lr)
        labels[f"interference@{lr:g}"] = f"interference (pp), lr {lr:g}"
    for lr in lrs:
        rows[f"new@{lr:g}"] = ("new_accuracy", "new_accuracy_std_seeds", 100.0, lr)
        labels[f"new@{lr:g}"] = f"new-class acc. (%), lr {lr:g}"
    panels: dict[tuple[str, str], dict[str, tuple[list[float], list[float], list[float]]]] = {}
    for name, (key, std_key, scale, lr) in rows.items():
        for dataset in spec["datasets"]:
            for router in spec["routers"]:
                chosen = [_cell(cells, dataset, d, router, lr) for d in sorted(spec["depths"])]
                chosen = [c for c in chosen if c is not None]
                if chosen:
                    panels.setdefault((name, dataset), {})[router] = (
                        [c["depth"] for c in chosen],
                        [scale * c[key] for c in chosen],
                        [scale * c[std_key] for c in chosen],
                    )
    files = [f"{prefix}interference_vs_depth.png"]
    R.plot_series_grid(
        panels,
        list(rows),
        list(spec["datasets"]),
        xlabel="MoE stages (depth)",
        row_labels=labels,
        col_labels=DATASET_LABELS,
        series_labels={r: ROUTER_LABELS[r] for r in spec["routers"]},
        path=out_dir / files[0],
        xscale="log",
        xticks=sorted(spec["depths"]),
        zero_line_rows=tuple(n for n in rows if n.startswith("interference")),
        title="One-shot adaptation of the selected experts (mean ± std over seeds, test split)",
    )
    deepest = max(spec["depths"])
    for dataset in spec["datasets"]:
        loads = {
            r["router"]: r["routing"]["load"]
            for r in result["runs"]
            if r["dataset"] == dataset and r["depth"] == deepest and r["seed"] == spec["seeds"][0]
        }
        if loads:
            name = f"{prefix}load_heatmap_{dataset}_depth{deepest}.png"
            R.plot_load_heatmaps(
                loads,
                {r: ROUTER_LABELS[r] for r in spec["routers"]},
                out_dir / name,
                f"{DATASET_LABELS.get(dataset, dataset)}, depth {deepest}, seed {spec['seeds'][0]}: expert load "
                "per stage (top-1 of the dense routing weights, base-class test examples)",
            )
            files.append(name)
    return files


def run_interference(
    spec: InterferenceSpec,
    out_dir: Path,
    *,
    command: str,
    prefix: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every cell of ``spec``, write ``{prefix}interference.{json,md}`` and plots to ``out_dir``."""
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    total = len(spec.datasets) * len(spec.depths) * len(spec.routers) * len(spec.seeds)
    result: dict[str, Any] = {}
    for dataset in spec.datasets:
        for depth in spec.depths:
            for seed in spec.seeds:
                for router in spec.routers:
                    run = run_cell(dataset, depth, router, seed, spec)
                    runs.append(run)
                    summary = "  ".join(
                        f"lr {lr}: {np.mean(e['interference_pp']):+.2f} pp, new {100 * np.mean(e['new_accuracy']):.0f}%"
                        for lr, e in run["episodes"].items()
                    )
                    log(
                        f"[{len(runs)}/{total}] {dataset} depth={depth} {router} seed={seed}: "
                        f"pre {100 * run['pre_accuracy']:.1f}%  {summary}  "
                        f"({run['train_seconds']:.0f}+{run['episode_seconds']:.0f} s, "
                        f"{(time.perf_counter() - start) / 60:.1f} min)"
                    )
            result = _result(spec, runs, command, start)
            R.write_json(out_dir / f"{prefix}interference.json", result)  # partial results survive a kill
    return render_outputs(_result(spec, runs, command, start), out_dir, prefix)


def render_outputs(result: dict[str, Any], out_dir: Path, prefix: str = "") -> dict[str, Any]:
    """Write ``{prefix}interference.md``, the plots and the JSON from a result dict."""
    return R.write_outputs(result, out_dir, prefix, render_markdown=render_markdown, make_plots=make_plots)


def _result(spec: InterferenceSpec, runs: list[dict[str, Any]], command: str, start: float) -> dict[str, Any]:
    return {**R.result_header("interference", command, start, spec), "cells": aggregate(runs), "runs": runs}
