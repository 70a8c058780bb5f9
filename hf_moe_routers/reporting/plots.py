"""Plots of a run's routing history: expert-load heatmaps and per-layer router curves.

Shapes: ``N`` records of one split (logging windows or evaluations), ``L`` router layers, ``E``
experts; ``load_NE`` is one layer's load fraction of every expert in every record.

Figures are bare :class:`matplotlib.figure.Figure` objects on an Agg canvas, never pyplot figures:
nothing is registered in pyplot's global figure list (so a long run cannot leak figures and there is
nothing to close), the user's interactive backend (a notebook's, say) is left alone, and nothing is
ever shown. matplotlib is imported lazily so that the package imports without it.

Drawing needs only a :class:`RoutingHistory` (``records``), never a Trainer: a saved
``routing_history.json`` can be redrawn offline. ``hf_moe_routers.trainers.plots`` holds the
callback that calls :func:`save_routing_plots` during training.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..records import RoutingHistory, RoutingRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure

__all__ = [
    "COACTIVATION_FILE",
    "CURVES_FILE",
    "DEFAULT_CURVE_METRICS",
    "LOAD_HEATMAP_FILE",
    "FigureWriter",
    "plot_coactivation",
    "plot_load_heatmap",
    "plot_router_curves",
    "save_routing_plots",
]

LOAD_HEATMAP_FILE = "routing_load_heatmap.png"
CURVES_FILE = "routing_curves.png"
COACTIVATION_FILE = "routing_coactivation.png"
DEFAULT_CURVE_METRICS: tuple[str, ...] = ("spectral_norm", "stable_rank", "flip_rate")

_DPI = 110
_HEATMAP_COLUMNS = 4  # panels per row: wide panels keep the time axis readable up to 32 layers
_MAX_RATIO_LOG2 = 4.0  # colours saturate at 16x above/below uniform: beyond that it is collapse anyway
_MAX_LEGEND_LAYERS = 12  # more layers than this get a colour bar instead of a legend entry each
_MARKER_MAX_POINTS = 20  # markers make sparse series (a few evaluations, a single point) visible


class FigureWriter(Protocol):
    """What :func:`save_routing_plots` needs from a ``torch.utils.tensorboard.SummaryWriter``."""

    def add_figure(self, tag: str, figure: Any, global_step: int | None = None, close: bool = True) -> None:
        """Render ``figure`` and log it as an image under ``tag``."""


def _records_of(history: RoutingHistory, split: str) -> list[RoutingRecord]:
    """The records of ``split``, or a ValueError that says which splits the history does hold."""
    records = history.split(split)
    if not records:
        present = sorted({r.split for r in history.records})
        raise ValueError(
            f"the routing history has no {split!r} record (splits present: {present or 'none'}); "
            "nothing to plot."
        )
    if not records[-1].layers:
        raise ValueError(f"the {split!r} records name no router layer; nothing to plot.")
    return records


def _load_per_layer(records: Sequence[RoutingRecord]) -> tuple[list[str], list[np.ndarray]]:
    """Layer names and, per layer, ``load_NE`` over the records.

    Layers may differ in E (each is its own array), but a layer's E must not change over the run.
    """
    layers = list(records[-1].layers)
    for record in records:
        if len(record.load) != len(layers):
            raise ValueError(
                f"record at step {record.step} has load for {len(record.load)} layers, expected {len(layers)}."
            )
    loads = []
    for index, name in enumerate(layers):
        rows = [record.load[index] for record in records]
        widths = sorted({len(row) for row in rows})
        if len(widths) != 1 or widths[0] == 0:
            raise ValueError(
                f"layer {name!r}: the number of experts varies or is 0 over the records: {widths}."
            )
        loads.append(np.asarray(rows, dtype=np.float64))
    return layers, loads


def _metric_series(
    records: Sequence[RoutingRecord], metric: str, num_layers: int
) -> tuple[np.ndarray, np.ndarray]:
    """``steps_N`` and ``values_NL`` of the records that hold ``metric``; the others are skipped.

    Costly metrics (flip rate, say) run only every few windows, so a missing value is normal and
    must not break the line into a gap or a fake zero.
    """
    kept = [r for r in records if metric in r.metrics]
    for record in kept:
        if len(record.metrics[metric]) != num_layers:
            raise ValueError(
                f"record at step {record.step}: {metric!r} has {len(record.metrics[metric])} values, "
                f"expected one per layer ({num_layers})."
            )
    steps_N = np.asarray([r.step for r in kept], dtype=np.int64)
    values_NL = np.asarray([r.metrics[metric] for r in kept], dtype=np.float64).reshape(len(kept), num_layers)
    return steps_N, values_NL


def _finite_mean(values_NL: np.ndarray) -> np.ndarray:
    """Mean over layers of the finite values (NaN where a record has none), without NaN warnings."""
    finite_NL = np.isfinite(values_NL)
    count_N = finite_NL.sum(axis=1)
    total_N = np.where(finite_NL, values_NL, 0.0).sum(axis=1)
    return np.divide(total_N, count_N, out=np.full(len(count_N), np.nan), where=count_N > 0)


def _new_figure(width: float, height: float) -> Figure:
    """A bare Figure on an Agg canvas (see the module docstring for why not pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike[str] | None) -> None:
    """Write ``figure`` as a PNG at ``path`` (nothing when None), creating the folder if needed."""
    if path is None:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a viewer or sync job watching output_dir never sees a half-written PNG.
    partial = target.with_name(target.name + ".partial")
    try:
        figure.savefig(partial, format="png", dpi=_DPI)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _step_tick_indices(steps: Sequence[int], max_ticks: int = 6) -> list[int]:
    """Columns to label on an image whose column ``i`` is the record logged at ``steps[i]``.

    Prefer the records that fall on round step numbers (steps are usually multiples of
    ``logging_steps``), so the axis reads 400, 800, ... rather than 10, 410, ...; else spread evenly.
    """
    from matplotlib.ticker import MaxNLocator

    column_of = {step: index for index, step in enumerate(steps)}
    for num_bins in range(max_ticks - 1, 1, -1):
        candidates = MaxNLocator(nbins=num_bins, integer=True).tick_values(steps[0], steps[-1])
        round_steps = sorted({int(v) for v in candidates if steps[0] <= v <= steps[-1]})
        if len(round_steps) >= 2 and all(step in column_of for step in round_steps):
            return [column_of[step] for step in round_steps]
    spread = MaxNLocator(nbins=max_ticks - 1, integer=True).tick_values(0, len(steps) - 1)
    return sorted({int(v) for v in spread if 0 <= v < len(steps)})


def _set_step_axis(ax: Axes, steps: Sequence[int]) -> None:
    """Label the image columns of ``ax`` with the steps of their records."""
    columns = _step_tick_indices(steps)
    ax.set_xticks(columns, labels=[str(steps[c]) for c in columns])


def _ratio_limit_log2(num_experts: int) -> float:
    """Half-width of the colour scale in ``log2(load / uniform)``.

    One expert can take at most E times its uniform share, so a scale wider than ``log2 E`` wastes
    colours; a floor of 1 keeps E = 2 (or 1) readable.
    """
    return float(min(max(math.log2(max(num_experts, 1)), 1.0), _MAX_RATIO_LOG2))


def _uniform_centred_norm(num_experts: int, limit_log2: float) -> Normalize:
    """Colour norm on load fractions: the middle colour at the uniform load ``1/E``.

    The scale is ``log2(load · E)`` clipped to ``±limit_log2``: with 64–128 experts a linear scale up
    to the collapsed layer's load of 1 would paint a 3x-overloaded expert almost white, while in
    ratio terms it is plainly visible. Dead experts (load 0) take the lowest colour.
    """
    from matplotlib.colors import FuncNorm

    floor_ratio = 2.0**-limit_log2

    def forward(load: np.ndarray) -> np.ndarray:
        return np.log2(np.maximum(np.asarray(load, dtype=np.float64) * num_experts, floor_ratio))

    def inverse(log_ratio: np.ndarray) -> np.ndarray:
        return np.exp2(np.asarray(log_ratio, dtype=np.float64)) / num_experts

    return FuncNorm(
        (forward, inverse), vmin=floor_ratio / num_experts, vmax=2.0**limit_log2 / num_experts, clip=True
    )


def _count(number: int, noun: str) -> str:
    """``'1 record'``, ``'5 records'``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _ratio_label(ratio: float) -> str:
    """``0.25 -> '1/4'``, ``4 -> '4'``: colour-bar labels as multiples of the uniform load."""
    return f"1/{round(1 / ratio)}" if ratio < 1 else f"{round(ratio)}"


def _draw_layer_heatmap(
    ax: Axes, title: str, load_NE: np.ndarray, steps: Sequence[int], limit_log2: float, cmap: Colormap
) -> None:
    """One layer's panel: experts on y, records on x, colour = load fraction."""
    from matplotlib.ticker import MaxNLocator

    num_experts = load_NE.shape[1]
    # Columns are records, not steps, so an uneven logging interval still gives equal, gap-free
    # columns; the tick labels carry the real step numbers.
    ax.imshow(
        load_NE.T,
        aspect="auto",
        origin="lower",
        cmap=cmap,
        norm=_uniform_centred_norm(num_experts, limit_log2),
    )
    ax.set_title(f"{title} (E={num_experts})", fontsize=9)
    _set_step_axis(ax, steps)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.tick_params(labelsize=7)


def _add_ratio_colorbar(figure: Figure, axes: Sequence[Axes], limit_log2: float, cmap: Colormap) -> None:
    """One colour bar for every panel, in units of the uniform load (the same meaning for any E)."""
    from matplotlib.cm import ScalarMappable

    mappable = ScalarMappable(norm=_uniform_centred_norm(1, limit_log2), cmap=cmap)
    colorbar = figure.colorbar(mappable, ax=list(axes), shrink=min(1.0, 4.0 / max(len(axes), 1)) ** 0.5)
    exponents = range(-math.floor(limit_log2), math.floor(limit_log2) + 1)
    ratios = [2.0**k for k in exponents]
    colorbar.set_ticks(ratios, labels=[_ratio_label(r) for r in ratios])
    colorbar.ax.tick_params(labelsize=8)
    colorbar.set_label("load ÷ uniform load 1/E", fontsize=8)


def plot_load_heatmap(
    history: RoutingHistory, path: str | os.PathLike[str] | None = None, split: str = "train"
) -> Figure:
    """Expert load per layer over training: one heatmap panel per layer.

    In each panel x is the logging step, y the expert index and the colour the expert's load
    fraction, on a diverging scale centred on the uniform load ``1/E`` (white) and logarithmic in
    ``load · E``: red is overloaded, blue underloaded, dark blue dead. The image data of every panel
    is the raw load fractions ``load_NE.T`` (``[E, N]``), so ``fig.axes[i].images[0].get_array()``
    reads them back. Panels are laid out four per row, which stays readable from 2 to 32 layers.

    Args:
        history: the run's routing history.
        path: where to write the PNG (folders are created); None to only return the figure.
        split: ``"train"`` or ``"eval"``.

    Returns:
        The figure (not registered with pyplot; nothing to close).

    Raises:
        ValueError: the history has no record of ``split``, or the records' shapes disagree.
    """
    from matplotlib import colormaps

    records = _records_of(history, split)
    layers, loads = _load_per_layer(records)
    steps = [r.step for r in records]
    max_experts = max(load_NE.shape[1] for load_NE in loads)
    num_columns = min(len(layers), _HEATMAP_COLUMNS)
    num_rows = math.ceil(len(layers) / num_columns)
    # Taller panels for more experts, capped so 8 rows of 128-expert panels still fit a screen.
    panel_height = min(1.5 + max_experts / 48, 3.0)
    figure = _new_figure(width=3.3 * num_columns + 1.3, height=panel_height * num_rows + 0.9)
    grid = figure.subplots(num_rows, num_columns, squeeze=False)
    panels = list(grid.flat)
    limit_log2 = _ratio_limit_log2(max_experts)
    cmap = colormaps["RdBu_r"]
    for index, (ax, name, load_NE) in enumerate(zip(panels, layers, loads)):
        _draw_layer_heatmap(ax, name, load_NE, steps, limit_log2, cmap)
        # Step labels only where no panel sits below (not sharex: it would also hide the labels of
        # panels above the empty slots of an incomplete last row).
        if index + num_columns < len(layers):
            ax.tick_params(labelbottom=False)
    for ax in panels[len(layers) :]:
        ax.remove()
    used = panels[: len(layers)]
    _add_ratio_colorbar(figure, used, limit_log2, cmap)
    figure.suptitle(
        f"Expert load per layer ({split}, {_count(len(records), 'record')})\n"
        "white: uniform 1/E · red: overloaded · blue: under-used · darkest blue: (nearly) dead",
        fontsize=10,
    )
    figure.supxlabel("step", fontsize=9)
    figure.supylabel("expert", fontsize=9)
    _save(figure, path)
    return figure


def _layer_colours(num_layers: int) -> list[tuple[float, float, float, float]]:
    """Distinct colours for a few layers; a depth gradient (first layer dark) for many."""
    from matplotlib import colormaps

    if num_layers <= 10:
        return [colormaps["tab10"](i) for i in range(num_layers)]
    return [colormaps["viridis"](i / (num_layers - 1)) for i in range(num_layers)]


def _draw_metric_curves(
    ax: Axes,
    metric: str,
    records: Sequence[RoutingRecord],
    layers: Sequence[str],
    colours: Sequence[Any],
) -> None:
    """One subplot: one line per layer (labelled with the layer name) plus the mean over layers."""
    steps_N, values_NL = _metric_series(records, metric, len(layers))
    ax.set_ylabel(metric.replace("_", " "), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)
    if len(steps_N) == 0:
        ax.text(0.5, 0.5, f"{metric!r} not recorded", transform=ax.transAxes, ha="center", va="center")
        return
    sparse = len(steps_N) <= _MARKER_MAX_POINTS
    marker, mean_marker = ("o", "D") if sparse else (None, None)
    width = 1.2 if len(layers) <= _MAX_LEGEND_LAYERS else 0.8  # thin lines keep the mean visible
    for layer, (name, colour) in enumerate(zip(layers, colours)):
        ax.plot(steps_N, values_NL[:, layer], color=colour, lw=width, marker=marker, ms=3, label=name)
    if len(layers) > 1:
        mean_N = _finite_mean(values_NL)
        ax.plot(steps_N, mean_N, color="black", lw=1.8, ls="--", marker=mean_marker, ms=3, label="mean")


def _add_layer_key(
    figure: Figure, axes: Sequence[Axes], layers: Sequence[str], colours: Sequence[Any]
) -> None:
    """A legend naming each layer, or (for many layers) a colour bar of layer depth plus the mean."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    mean = [Line2D([], [], color="black", lw=1.8, ls="--", label="mean")] if len(layers) > 1 else []
    if len(layers) <= _MAX_LEGEND_LAYERS:
        handles = [Line2D([], [], color=c, lw=1.2, label=name) for name, c in zip(layers, colours)]
        figure.legend(handles=handles + mean, loc="outside right upper", fontsize=8)
        return
    mappable = ScalarMappable(norm=Normalize(0, len(layers) - 1), cmap="viridis")
    colorbar = figure.colorbar(mappable, ax=list(axes), fraction=0.04, aspect=40)
    colorbar.ax.tick_params(labelsize=8)
    colorbar.set_label(f"layer index ({layers[0]} … {layers[-1]})", fontsize=8)
    figure.legend(handles=mean, loc="outside lower right", fontsize=8)


def plot_router_curves(
    history: RoutingHistory,
    path: str | os.PathLike[str] | None = None,
    split: str = "train",
    metrics: Sequence[str] = DEFAULT_CURVE_METRICS,
) -> Figure:
    """Per-layer curves of router metrics over training: one subplot per metric.

    Each subplot holds one line per layer (``label`` = the layer name; x = steps of the records that
    hold the metric, y = its values) and, with several layers, a dashed ``"mean"`` line. Records
    without the metric are skipped; a metric no record holds gets an empty panel saying so.

    Args:
        history: the run's routing history.
        path: where to write the PNG (folders are created); None to only return the figure.
        split: ``"train"`` or ``"eval"``.
        metrics: names in ``record.metrics``, one subplot each, top to bottom.

    Returns:
        The figure (not registered with pyplot; nothing to close).

    Raises:
        ValueError: the history has no record of ``split``, ``metrics`` is empty, or a record has a
            metric with a value count other than its number of layers.
    """
    from matplotlib.ticker import MaxNLocator

    if not metrics:
        raise ValueError("metrics is empty: name at least one metric to plot.")
    records = _records_of(history, split)
    layers = list(records[-1].layers)
    colours = _layer_colours(len(layers))
    figure = _new_figure(width=9.0, height=2.3 * len(metrics) + 0.8)
    axes = list(figure.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0])
    for ax, metric in zip(axes, metrics):
        _draw_metric_curves(ax, metric, records, layers, colours)
    axes[-1].set_xlabel("step", fontsize=9)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # no "29.5" around a single record
    _add_layer_key(figure, axes, layers, colours)
    figure.suptitle(f"Router metrics per layer ({split})", fontsize=11)
    _save(figure, path)
    return figure


def plot_coactivation(
    probs_LEE: Any,
    layers: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Expert co-activation ``P(b | a)`` per layer: one ``E × E`` heatmap panel per layer.

    Row a, column b is the share of the tokens routed to expert a that are also routed to b
    (``hf_moe_routers.metrics.coactivation``). The diagonal (1 by definition) is left blank so that
    the colour scale, 0 to 1, shows the pairs; rows of experts that received no token are blank
    too. The image data of panel i is layer i's matrix with a NaN diagonal, so
    ``fig.axes[i].images[0].get_array()`` reads it back.

    Args:
        probs_LEE: ``[L, E, E]`` (or one layer ``[E, E]``) tensor or array, e.g.
            ``SpecialisationAccumulator.coactivation()``; NaN columns past a layer's E are dropped.
        layers: panel titles (default ``layer_0 ...``), one per layer.
        path: where to write the PNG (folders are created); None to only return the figure.

    Returns:
        The figure (not registered with pyplot; nothing to close).

    Raises:
        ValueError: not ``[L, E, E]``, or ``layers`` of another length.
    """
    from matplotlib import colormaps

    probs = np.asarray(probs_LEE, dtype=np.float64)
    if probs.ndim == 2:
        probs = probs[None]
    if probs.ndim != 3 or probs.shape[1] != probs.shape[2] or probs.shape[0] == 0:
        raise ValueError(f"probs_LEE must have shape [L, E, E] (or [E, E]); got {probs.shape}.")
    names = [f"layer_{i}" for i in range(probs.shape[0])] if layers is None else list(layers)
    if len(names) != probs.shape[0]:
        raise ValueError(f"layers names {len(names)} layers but probs_LEE holds {probs.shape[0]}.")
    num_columns = min(len(names), _HEATMAP_COLUMNS)
    num_rows = math.ceil(len(names) / num_columns)
    max_experts = probs.shape[1]
    panel = min(2.2 + max_experts / 40, 4.0)
    figure = _new_figure(width=panel * num_columns + 1.2, height=panel * num_rows + 0.8)
    panels = list(figure.subplots(num_rows, num_columns, squeeze=False).flat)
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    image = None
    for ax, name, matrix in zip(panels, names, probs):
        # A layer narrower than the widest: its padding columns are NaN all the way down.
        width = int(np.sum(~np.all(np.isnan(matrix), axis=0))) or matrix.shape[0]
        shown = matrix[:width, :width].copy()
        np.fill_diagonal(shown, np.nan)
        image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, origin="upper", interpolation="nearest")
        ax.set_title(f"{name} (E={width})", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in panels[len(names) :]:
        ax.remove()
    if image is not None:
        colorbar = figure.colorbar(image, ax=panels[: len(names)], shrink=0.8)
        colorbar.set_label("P(b | a)", fontsize=8)
        colorbar.ax.tick_params(labelsize=8)
    figure.suptitle(
        "Expert co-activation: share of expert a's tokens also routed to b (diagonal blank)", fontsize=10
    )
    figure.supxlabel("expert b", fontsize=9)
    figure.supylabel("expert a", fontsize=9)
    _save(figure, path)
    return figure


def _file_name(base: str, split: str) -> str:
    """``routing_curves.png`` for training, ``routing_curves_eval.png`` for evaluation."""
    return base if split == "train" else base.replace(".png", f"_{split}.png")


def _tag(name: str, split: str) -> str:
    """TensorBoard tag: ``router/<name>`` for training, ``eval/router/<name>`` like HF's eval scalars."""
    return f"router/{name}" if split == "train" else f"{split}/router/{name}"


def save_routing_plots(
    history: RoutingHistory,
    output_dir: str | os.PathLike[str],
    *,
    metrics: Sequence[str] = DEFAULT_CURVE_METRICS,
    writer: FigureWriter | None = None,
    global_step: int | None = None,
    splits: Sequence[str] | None = None,
) -> list[Path]:
    """Write the load heatmap and the router curves of every split the history holds.

    Files: ``routing_load_heatmap.png`` and ``routing_curves.png`` for ``"train"``, with an
    ``_<split>`` suffix for other splits (``routing_curves_eval.png``). With ``writer``, each figure
    is also logged with ``writer.add_figure`` under ``router/load_heatmap`` and ``router/curves``
    (``eval/router/...`` for evaluation). ``splits`` limits the work to those splits (the ones absent
    from the history are skipped).

    Returns:
        The paths written (empty for an empty history).
    """
    plotters: list[tuple[str, str, Callable[..., Figure]]] = [
        ("load_heatmap", LOAD_HEATMAP_FILE, plot_load_heatmap),
        ("curves", CURVES_FILE, lambda h, p, split: plot_router_curves(h, p, split, metrics)),
    ]
    written = []
    present = list(dict.fromkeys(r.split for r in history.records))  # first-seen order: train, eval
    for split in present if splits is None else [s for s in present if s in splits]:
        for name, base, plot in plotters:
            path = Path(output_dir) / _file_name(base, split)
            figure = plot(history, path, split=split)
            written.append(path)
            if writer is not None:
                writer.add_figure(_tag(name, split), figure, global_step=global_step)
    return written
