"""Writing results: JSON, Markdown tables and PNG figures (matplotlib Agg figures, never pyplot).

Shapes: ``L`` stages/layers, ``E`` experts; a load matrix is ``[L][E]`` fractions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "ExperimentSpec",
    "environment",
    "fmt",
    "fmt_pm",
    "markdown_table",
    "mean_std",
    "plot_load_heatmaps",
    "plot_series_grid",
    "result_header",
    "save_figure",
    "write_json",
    "write_outputs",
]

_DPI = 110


def environment() -> dict[str, Any]:
    """Versions and thread count, so a reader can tell which machine produced a result file."""
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    """Base of the experiments' frozen spec dataclasses (``InterferenceSpec``, ``LMSpec``, ...)."""

    def to_dict(self) -> dict[str, Any]:
        """Every field, nested dataclasses included, as plain JSON-ready values."""
        return dataclasses.asdict(self)


def result_header(experiment: str, command: str, start: float, spec: ExperimentSpec) -> dict[str, Any]:
    """The keys every result file starts with: what ran, how (``command``), how long and where.

    Args:
        start: ``time.perf_counter()`` when the experiment began; ``wall_seconds`` is measured to now.
    """
    return {
        "experiment": experiment,
        "command": command,
        "wall_seconds": time.perf_counter() - start,
        "environment": environment(),
        "spec": spec.to_dict(),
    }


def write_outputs(
    result: dict[str, Any],
    out_dir: Path,
    prefix: str,
    *,
    render_markdown: Callable[[dict[str, Any]], str],
    make_plots: Callable[[dict[str, Any], Path, str], list[str]],
) -> dict[str, Any]:
    """Write ``{prefix}{experiment}.md``, the plots and ``{prefix}{experiment}.json`` from a result.

    The JSON goes last, so that it lists the plots (``result["plots"]``, names relative to
    ``out_dir``) and ``--replot`` can redraw everything from it alone. Returns ``result``.
    """
    name = f"{prefix}{result['experiment']}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(render_markdown(result))
    result["plots"] = make_plots(result, out_dir, prefix)
    write_json(out_dir / f"{name}.json", result)
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (inf/NaN as strings), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=1, sort_keys=False) + "\n")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) of finite values."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def fmt_pm(mean: float, std: float, digits: int = 2) -> str:
    return f"{fmt(mean, digits)} ± {fmt(std, digits)}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; numeric alignment is left to the caller's formatting."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def save_figure(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.savefig(path)


def plot_series_grid(
    panels: dict[tuple[str, str], dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]]],
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    xlabel: str,
    row_labels: dict[str, str],
    col_labels: dict[str, str],
    series_labels: dict[str, str],
    path: Path,
    xscale: str = "linear",
    zero_line_rows: Sequence[str] = (),
    title: str | None = None,
    xticks: Sequence[float] | None = None,
) -> None:
    """A rows × cols grid of line plots with error bars.

    ``panels[(row, col)][series] = (x, mean, std)``; every series keeps one colour across panels.
    """
    width = max(6.0, 4.2 * len(cols))
    fig = _figure(width, 2.9 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    names = sorted({s for panel in panels.values() for s in panel}, key=list(series_labels).index)
    colours = {s: f"C{i}" for i, s in enumerate(names)}
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            for series, (x, mean, std) in panels.get((row, col), {}).items():
                ax.errorbar(
                    x,
                    mean,
                    yerr=std,
                    marker="o",
                    ms=4,
                    capsize=3,
                    color=colours[series],
                    label=series_labels[series],
                )
            if row in zero_line_rows:
                ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
            ax.set_xscale(xscale)
            if xticks is not None:
                ax.set_xticks(list(xticks), labels=[f"{t:g}" for t in xticks])
                ax.minorticks_off()
            if i == 0:
                ax.set_title(_wrap(col_labels.get(col, col), 4.2), fontsize=10)
            if j == 0:
                ax.set_ylabel(row_labels.get(row, row))
            if i == len(rows) - 1:
                ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        # About 2.7 inches per legend entry at font size 8: wrap into as many rows as needed.
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncol=max(1, min(len(labels), int(width / 2.7))),
            fontsize=8,
        )
    if title:
        fig.suptitle(_wrap(title, width), fontsize=10)
    save_figure(fig, path)


def _wrap(text: str, width_inches: float) -> str:
    """Wrap a title to the figure width (about 12 characters per inch at font size 10)."""
    return textwrap.fill(text, width=max(30, int(12 * width_inches)))


def plot_load_heatmaps(
    loads: dict[str, list[list[float]]], labels: dict[str, str], path: Path, title: str
) -> None:
    """One heatmap per router of its load ``[L][E]`` as a ratio to uniform (log2 colour scale)."""
    from matplotlib.colors import TwoSlopeNorm

    names = [n for n in labels if n in loads]
    fig = _figure(2.6 * len(names) + 1.0, 3.2)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    image = None
    for ax, name in zip(axes, names):
        load_LE = np.asarray(loads[name], dtype=np.float64)
        ratio = np.log2(np.clip(load_LE * load_LE.shape[1], 1 / 16, 16))  # 0 = uniform; ±4 saturates
        image = ax.imshow(ratio, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -4.0, 4.0), aspect="auto")
        ax.set_title(labels[name], fontsize=8)
        ax.set_xlabel("expert")
        ax.set_xticks(range(load_LE.shape[1]))
        ax.set_yticks(range(load_LE.shape[0]))
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("stage / layer")
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), shrink=0.85)
        bar.set_label("log2(load × E)  (0 = uniform, −4 = dead)", fontsize=8)
    fig.suptitle(_wrap(title, 2.6 * len(names) + 1.0), fontsize=10)
    save_figure(fig, path)
