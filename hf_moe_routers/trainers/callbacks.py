"""The Trainer's callbacks: a concise progress bar and the routing plots."""

from __future__ import annotations

import logging
from typing import Any

from transformers import ProgressCallback, Trainer

from ..records import RoutingHistory

__all__ = ["ConciseProgressCallback", "add_plot_callback", "use_concise_progress"]


class ConciseProgressCallback(ProgressCallback):
    """A progress bar that prints the mean router metrics only (``router/<metric>``, not per layer)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is not None:
            logs = {k: v for k, v in logs.items() if not (k.count("/") >= 2 and "router/" in k)}
        super().on_log(args, state, control, logs=logs, **kwargs)


def use_concise_progress(trainer: Trainer) -> None:
    """Swap the Trainer's progress bar for :class:`ConciseProgressCallback`; per-layer values still
    reach ``log_history`` and every ``report_to`` backend."""
    callbacks = trainer.callback_handler.callbacks
    for i, callback in enumerate(callbacks):
        if type(callback) is ProgressCallback:
            concise = ConciseProgressCallback()
            concise.__dict__.update(callback.__dict__)
            callbacks[i] = concise


def add_plot_callback(trainer: Trainer, history: RoutingHistory) -> None:
    """Draw ``history`` with ``RoutingPlotCallback`` (and into TensorBoard when it is a backend)."""
    try:
        from .plots import RoutingPlotCallback
    except ImportError:  # matplotlib missing: the plots are an extra, say so once
        logging.getLogger(__name__).warning("matplotlib is not installed: routing plots are off.")
        return

    def tensorboard_writer() -> Any:
        for callback in trainer.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                return writer
        return None

    # First in the list: TensorBoardCallback.on_train_end closes its writer before later callbacks run.
    callback = RoutingPlotCallback(history, tensorboard_writer_getter=tensorboard_writer)
    trainer.callback_handler.callbacks.insert(0, callback)
