"""``RoutingPlotCallback``: redraws the routing plots into ``output_dir`` (and TensorBoard) as a run goes.

The figures themselves are drawn from the run's :class:`RoutingHistory` by
:mod:`hf_moe_routers.reporting.plots`, which needs no Trainer; this module only decides *when* to
draw (evaluations, saves, the end of training, every few logs) and keeps a plotting failure from
ending the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..records import RoutingHistory
from ..reporting.plots import DEFAULT_CURVE_METRICS, FigureWriter, save_routing_plots

__all__ = ["RoutingPlotCallback"]

logger = logging.getLogger(__name__)


class RoutingPlotCallback(TrainerCallback):
    """Writes the routing plots into ``args.output_dir`` (and TensorBoard) as training goes.

    Plots are written on every evaluation, every checkpoint save and at the end of training, and
    with ``every_n_logs`` also each time that many new training records have arrived. Only the
    world-process-zero writes. Plotting is diagnostics: any failure is logged as a warning and
    training goes on, and an empty history is skipped silently.

    Args:
        history: the Trainer's :class:`RoutingHistory` (read, never modified).
        tensorboard_writer_getter: returns the current TensorBoard ``SummaryWriter`` or None; called
            at each write, because HF's ``TensorBoardCallback`` creates its writer lazily.
        every_n_logs: also write after every this many training records; None: only on the events.
        metrics: the curves to draw (see :func:`plot_router_curves`).
    """

    def __init__(
        self,
        history: RoutingHistory,
        tensorboard_writer_getter: Callable[[], FigureWriter | None] | None = None,
        every_n_logs: int | None = None,
        metrics: Sequence[str] = DEFAULT_CURVE_METRICS,
    ) -> None:
        if every_n_logs is not None and every_n_logs < 1:
            raise ValueError(f"every_n_logs must be a positive int or None, got {every_n_logs}.")
        self.history = history
        self.tensorboard_writer_getter = tensorboard_writer_getter
        self.every_n_logs = every_n_logs
        self.metrics = tuple(metrics)
        # Records per split at the last write: on_evaluate, on_save and on_train_end often fire with
        # nothing new, and a train-only refresh need not redraw (and re-log) the eval plots.
        self._written_counts: dict[str, int] = {}
        self._last_log_bucket = 0
        self._disabled = False

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Count training records rather than on_log calls: evaluations also call on_log, and the
        # record of a window may be appended just after its on_log (the next log catches it up).
        if self.every_n_logs is None:
            return
        bucket = len(self.history.split("train")) // self.every_n_logs
        if bucket > self._last_log_bucket:
            self._last_log_bucket = bucket
            self._write(args, state)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._write(args, state)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._write(args, state)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._write(args, state)

    def _writer(self) -> FigureWriter | None:
        """The TensorBoard writer now, or None (also when the getter itself fails)."""
        if self.tensorboard_writer_getter is None:
            return None
        try:
            return self.tensorboard_writer_getter()
        except Exception:  # a broken getter must cost the TensorBoard images only, not the PNGs
            logger.warning(
                "routing plots: tensorboard_writer_getter failed; skipping TensorBoard.", exc_info=True
            )
            return None

    def _write(self, args: TrainingArguments, state: TrainerState) -> None:
        """Redraw the splits that got new records since the last write, on process zero, never raising."""
        if self._disabled or not state.is_world_process_zero or args.output_dir is None:
            return
        counts = {split: len(self.history.split(split)) for split in {r.split for r in self.history.records}}
        changed = [split for split, count in counts.items() if count != self._written_counts.get(split)]
        if not changed:  # also the empty history
            return
        self._written_counts = counts
        try:
            save_routing_plots(
                self.history,
                args.output_dir,
                metrics=self.metrics,
                writer=self._writer(),
                global_step=state.global_step,
                splits=changed,
            )
        except ImportError:
            # No matplotlib: say so once instead of at every evaluation.
            self._disabled = True
            logger.warning("routing plots disabled: matplotlib is not installed (pip install matplotlib).")
        except Exception:  # a plotting bug must never end a long training run
            logger.warning("routing plots: writing failed at step %d.", state.global_step, exc_info=True)
