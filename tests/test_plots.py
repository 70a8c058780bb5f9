"""Routing plots: the figures hold exactly the history's numbers, and the callback writes them safely."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from transformers import TrainerControl, TrainerState, TrainingArguments  # noqa: E402

from hf_moe_routers.records import RoutingHistory, RoutingRecord  # noqa: E402
from hf_moe_routers.reporting.plots import (  # noqa: E402
    CURVES_FILE,
    LOAD_HEATMAP_FILE,
    plot_load_heatmap,
    plot_router_curves,
    save_routing_plots,
)
from hf_moe_routers.trainers.plots import RoutingPlotCallback  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = ["layer_0", "layer_1", "layer_2"]
STEPS = [10, 20, 30, 40, 50]
NUM_EXPERTS = 4
FLIP_STEPS = {10, 30, 50}  # flip rate is a costly metric: only every other window has it


def _load_LE(n: int) -> list[list[float]]:
    """Record n's load: layer 0 balanced, layer 1 collapsing onto expert 0, layer 2 skewed."""
    collapse = min(1.0, 0.25 + 0.2 * n)
    rest = (1.0 - collapse) / 3
    return [
        [0.25, 0.25, 0.25, 0.25],
        [collapse, rest, rest, rest],
        [0.4, 0.3, 0.2, 0.1],
    ]


def _metrics_L(n: int, step: int) -> dict[str, list[float]]:
    metrics = {
        "spectral_norm": [1.0 + n, 2.0 + n, 3.0 + 2 * n],
        "stable_rank": [3.0, 2.5 - 0.3 * n, 1.5],
    }
    if step in FLIP_STEPS:
        metrics["flip_rate"] = [0.01 * n, 0.02 * n, 0.03 * n]
    return metrics


@pytest.fixture
def history() -> RoutingHistory:
    """3 layers x 4 experts x 5 training windows, plus two evaluations."""
    routing = RoutingHistory()
    for n, step in enumerate(STEPS):
        routing.append(RoutingRecord(step, "train", list(LAYERS), _load_LE(n), _metrics_L(n, step)))
        if step in (30, 50):
            routing.append(RoutingRecord(step, "eval", list(LAYERS), _load_LE(n), _metrics_L(n, step)))
    return routing


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def _heatmap_panels(figure: Any) -> list[Any]:
    """The layer panels (axes holding an image), in layer order; the colour bar has none."""
    return [ax for ax in figure.axes if ax.images]


def _lines_by_label(ax: Any) -> dict[str, Any]:
    return {line.get_label(): line for line in ax.get_lines()}


# --------------------------------------------------------------------------------------------------
# plot_load_heatmap
# --------------------------------------------------------------------------------------------------


def test_heatmap_image_data_is_the_load_matrix(history: RoutingHistory, tmp_path: Path) -> None:
    path = tmp_path / "heat.png"
    figure = plot_load_heatmap(history, path)
    _assert_png(path)
    panels = _heatmap_panels(figure)
    assert [ax.get_title().split(" ")[0] for ax in panels] == LAYERS
    for layer, ax in enumerate(panels):
        expected_EN = np.array([_load_LE(n)[layer] for n in range(len(STEPS))]).T
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), expected_EN)
    # Every column is labelled with its record's step.
    assert [t.get_text() for t in panels[0].get_xticklabels()] == [str(s) for s in STEPS]


def test_heatmap_colour_is_centred_on_the_uniform_load(history: RoutingHistory) -> None:
    image = _heatmap_panels(plot_load_heatmap(history))[1].images[0]
    # The uniform load maps to the middle of the colour map (white in RdBu_r), the collapsed
    # expert to the top and a dead one to the bottom.
    assert image.norm(1 / NUM_EXPERTS) == pytest.approx(0.5)
    assert image.norm(1.0) == pytest.approx(1.0)
    assert image.norm(0.0) == pytest.approx(0.0)


def test_heatmap_of_eval_split_and_many_layers(tmp_path: Path) -> None:
    routing = RoutingHistory()
    layers = [f"layer_{i}" for i in range(10)]
    uniform = [[1 / 64] * 64 for _ in layers]
    routing.append(RoutingRecord(7, "eval", layers, uniform, {}))
    figure = plot_load_heatmap(routing, tmp_path / "eval.png", split="eval")
    assert len(_heatmap_panels(figure)) == 10  # the two empty grid slots are removed
    _assert_png(tmp_path / "eval.png")


def test_heatmap_rejects_a_missing_split_and_ragged_loads(history: RoutingHistory) -> None:
    with pytest.raises(ValueError, match="no 'test' record.*'eval', 'train'"):
        plot_load_heatmap(history, split="test")
    with pytest.raises(ValueError, match="no 'train' record"):
        plot_load_heatmap(RoutingHistory())
    history.records[0].load[2] = [0.5, 0.5]
    with pytest.raises(ValueError, match="layer_2.*number of experts"):
        plot_load_heatmap(history)


# --------------------------------------------------------------------------------------------------
# plot_router_curves
# --------------------------------------------------------------------------------------------------


def test_curves_hold_the_per_layer_values(history: RoutingHistory, tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    figure = plot_router_curves(history, path)
    _assert_png(path)
    axes = figure.axes
    assert [ax.get_ylabel() for ax in axes] == ["spectral norm", "stable rank", "flip rate"]
    for ax, metric in zip(axes, ["spectral_norm", "stable_rank", "flip_rate"]):
        steps = [s for s in STEPS if metric != "flip_rate" or s in FLIP_STEPS]
        values_NL = np.array([_metrics_L(STEPS.index(s), s)[metric] for s in steps])
        lines = _lines_by_label(ax)
        assert set(lines) == {*LAYERS, "mean"}
        for layer, name in enumerate(LAYERS):
            np.testing.assert_array_equal(lines[name].get_xdata(), steps)
            np.testing.assert_allclose(lines[name].get_ydata(), values_NL[:, layer])
        np.testing.assert_allclose(lines["mean"].get_ydata(), values_NL.mean(axis=1))


def test_curves_of_a_metric_never_recorded_are_an_empty_panel(history: RoutingHistory) -> None:
    figure = plot_router_curves(history, metrics=("lipschitz_bound", "stable_rank"))
    missing, present = figure.axes
    assert missing.get_lines() == []
    assert "not recorded" in missing.texts[0].get_text()
    assert len(present.get_lines()) == len(LAYERS) + 1


def test_curves_errors(history: RoutingHistory) -> None:
    with pytest.raises(ValueError, match="no 'eval' record"):
        plot_router_curves(RoutingHistory([history.records[0]]), split="eval")
    with pytest.raises(ValueError, match="metrics is empty"):
        plot_router_curves(history, metrics=())
    history.records[0].metrics["spectral_norm"] = [1.0]
    with pytest.raises(ValueError, match="one per layer"):
        plot_router_curves(history)


# --------------------------------------------------------------------------------------------------
# save_routing_plots and the callback
# --------------------------------------------------------------------------------------------------


class FakeWriter:
    """Records add_figure calls the way a SummaryWriter would receive them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None]] = []

    def add_figure(self, tag: str, figure: Any, global_step: int | None = None, close: bool = True) -> None:
        assert figure.axes  # a real, drawable figure
        self.calls.append((tag, global_step))


ALL_FILES = {
    LOAD_HEATMAP_FILE,
    CURVES_FILE,
    "routing_load_heatmap_eval.png",
    "routing_curves_eval.png",
}
ALL_TAGS = ["router/load_heatmap", "router/curves", "eval/router/load_heatmap", "eval/router/curves"]


def test_save_routing_plots_writes_every_split(history: RoutingHistory, tmp_path: Path) -> None:
    writer = FakeWriter()
    written = save_routing_plots(history, tmp_path / "out", writer=writer, global_step=50)
    assert {p.name for p in written} == ALL_FILES
    for path in written:
        _assert_png(path)
    assert writer.calls == [(tag, 50) for tag in ALL_TAGS]
    assert not list((tmp_path / "out").glob("*.partial"))  # write-then-rename leaves nothing behind


def _state(step: int, is_zero: bool = True) -> TrainerState:
    state = TrainerState()
    state.global_step = step
    state.is_world_process_zero = is_zero
    return state


def _args(output_dir: Path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(output_dir), report_to="none")


@pytest.mark.parametrize("event", ["on_evaluate", "on_save", "on_train_end"])
def test_callback_writes_on_process_zero(history: RoutingHistory, tmp_path: Path, event: str) -> None:
    writer = FakeWriter()
    callback = RoutingPlotCallback(history, tensorboard_writer_getter=lambda: writer)
    getattr(callback, event)(_args(tmp_path), _state(50), TrainerControl())
    assert {p.name for p in tmp_path.iterdir()} == ALL_FILES
    assert writer.calls == [(tag, 50) for tag in ALL_TAGS]


def test_callback_does_nothing_on_other_processes(history: RoutingHistory, tmp_path: Path) -> None:
    writer = FakeWriter()
    callback = RoutingPlotCallback(history, tensorboard_writer_getter=lambda: writer)
    for event in ("on_evaluate", "on_save", "on_train_end"):
        getattr(callback, event)(_args(tmp_path), _state(50, is_zero=False), TrainerControl())
    assert list(tmp_path.iterdir()) == []
    assert writer.calls == []


def test_callback_skips_an_empty_history_and_unchanged_splits(
    history: RoutingHistory, tmp_path: Path
) -> None:
    writer = FakeWriter()
    empty = RoutingPlotCallback(RoutingHistory(), tensorboard_writer_getter=lambda: writer)
    empty.on_train_end(_args(tmp_path), _state(0), TrainerControl())
    assert list(tmp_path.iterdir()) == [] and writer.calls == []

    callback = RoutingPlotCallback(history, tensorboard_writer_getter=lambda: writer)
    callback.on_evaluate(_args(tmp_path), _state(50), TrainerControl())
    callback.on_save(_args(tmp_path), _state(50), TrainerControl())  # no new record
    assert len(writer.calls) == len(ALL_TAGS)

    # A new training record redraws the training plots only.
    history.append(RoutingRecord(60, "train", list(LAYERS), _load_LE(5), _metrics_L(5, 60)))
    callback.on_save(_args(tmp_path), _state(60), TrainerControl())
    assert writer.calls[len(ALL_TAGS) :] == [("router/load_heatmap", 60), ("router/curves", 60)]


def test_callback_every_n_logs_counts_training_records(tmp_path: Path) -> None:
    routing = RoutingHistory()
    writer = FakeWriter()
    callback = RoutingPlotCallback(routing, tensorboard_writer_getter=lambda: writer, every_n_logs=2)
    for n, step in enumerate(STEPS):
        routing.append(RoutingRecord(step, "train", list(LAYERS), _load_LE(n), _metrics_L(n, step)))
        callback.on_log(_args(tmp_path), _state(step), TrainerControl(), logs={"loss": 1.0})
    # Written after the 2nd and the 4th record, train split only.
    assert writer.calls == [("router/load_heatmap", 20), ("router/curves", 20)] + [
        ("router/load_heatmap", 40),
        ("router/curves", 40),
    ]
    assert {p.name for p in tmp_path.iterdir()} == {LOAD_HEATMAP_FILE, CURVES_FILE}
    with pytest.raises(ValueError, match="every_n_logs"):
        RoutingPlotCallback(routing, every_n_logs=0)


def test_callback_without_writer_and_with_broken_getter(history: RoutingHistory, tmp_path: Path) -> None:
    RoutingPlotCallback(history, tensorboard_writer_getter=lambda: None).on_save(
        _args(tmp_path / "a"), _state(50), TrainerControl()
    )
    assert {p.name for p in (tmp_path / "a").iterdir()} == ALL_FILES

    def broken() -> None:
        raise RuntimeError("no writer")

    RoutingPlotCallback(history, tensorboard_writer_getter=broken).on_save(
        _args(tmp_path / "b"), _state(50), TrainerControl()
    )
    assert {p.name for p in (tmp_path / "b").iterdir()} == ALL_FILES


def test_callback_never_raises_on_a_bad_history(history: RoutingHistory, tmp_path: Path, caplog: Any) -> None:
    history.records[-1].metrics["spectral_norm"] = [1.0]  # wrong length: plotting raises
    callback = RoutingPlotCallback(history)
    callback.on_train_end(_args(tmp_path), _state(50), TrainerControl())
    assert "routing plots: writing failed" in caplog.text


def test_callback_logs_images_to_a_real_summary_writer(history: RoutingHistory, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "runs"))
    RoutingPlotCallback(history, tensorboard_writer_getter=lambda: writer).on_evaluate(
        _args(tmp_path / "out"), _state(50), TrainerControl()
    )
    writer.close()
    events = EventAccumulator(str(tmp_path / "runs"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(ALL_TAGS)
    image = events.Images("router/load_heatmap")[0]
    assert image.step == 50 and image.width > 500 and image.height > 100
