"""The Trainer's callbacks: a concise progress bar, the routing plots, and the hook run once
after every optimizer step (the expert-bias updates)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm
from transformers import ProgressCallback, Trainer, TrainerCallback
from transformers.trainer_utils import has_length

from ..records import RoutingHistory

__all__ = ["ConciseProgressCallback", "OptimizerStepCallback", "add_plot_callback", "use_concise_progress"]


#: tqdm's default layout, spelled out because the ETA (``{remaining}``) is what the bar is for:
#: ``train:  40%|████      | 12/30 [00:05<00:07,  2.31it/s]``.
BAR_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)


class ConciseProgressCallback(ProgressCallback):
    """transformers' progress bar with a named training bar that shows elapsed and remaining time,
    an evaluation bar that leaves no line behind, and logs with the mean router metrics only
    (``router/<metric>``, not per layer)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.training_bar = tqdm(
                total=state.max_steps, desc="train", bar_format=BAR_FORMAT, dynamic_ncols=True
            )
        self.current_step = 0

    def on_prediction_step(
        self, args: Any, state: Any, control: Any, eval_dataloader: Any = None, **kwargs: Any
    ) -> None:
        # transformers keeps the bar of an evaluation outside training (the final one) on screen;
        # its result is printed anyway, so every evaluation bar is erased when done (leave=False).
        if state.is_world_process_zero and has_length(eval_dataloader):
            if self.prediction_bar is None:
                self.prediction_bar = tqdm(
                    total=len(eval_dataloader),
                    desc="eval",
                    bar_format=BAR_FORMAT,
                    leave=False,
                    dynamic_ncols=True,
                )
            self.prediction_bar.update(1)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is not None:
            logs = {k: v for k, v in logs.items() if not (k.count("/") >= 2 and "router/" in k)}
        super().on_log(args, state, control, logs=logs, **kwargs)


class OptimizerStepCallback(TrainerCallback):
    """Calls ``after_step()`` right after every optimizer step: once per step whatever the gradient
    accumulation (``Trainer`` calls ``on_optimizer_step`` after ``optimizer.step()``, before
    ``global_step`` is advanced and before anything is logged, saved or evaluated), also when the
    fp16 grad scaler skipped the parameter update."""

    def __init__(self, after_step: Callable[[], None]):
        self.after_step = after_step

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.after_step()


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
