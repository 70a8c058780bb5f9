"""``MoERouterTrainer``: a ``transformers.Trainer`` that adds the routing losses and logs routing metrics.

What it adds to the model's own loss, per micro-batch (``trainers/losses.py``):
- the load-balancing loss, per layer by default (mean over layers of ``E·Σ f_e·P_e``,
  padding-masked), or transformers' pooled form; its f and P over each micro-batch by default,
  or per sequence, or over the global batch (``router_balance_granularity``); the model's own aux
  loss is switched off (``output_router_logits=False``) so it is never counted twice;
- the router z-loss (mean over layers, padding-masked) when its weight is non-zero;
- each routed router's parameter-only penalties (SR-MoE's spectral and stable-rank terms), summed
  over layers.
Under gradient accumulation the Trainer does not divide a loss normalised by ``num_items_in_batch``
(docs/TRANSFORMERS.md §6, pitfall 9), so these per-micro-batch terms are divided by the accumulation
steps here: the same total gradient for 1×B and 2×(B/2). Evaluation losses stay the model's
own (``eval_loss`` is the LM loss, so ``exp(eval_loss)`` is the perplexity); the router terms are
logged separately.

Aux-loss-free balancing: the expert counts of each router (padding excluded) are summed over the
micro-batches of every optimizer step and over the processes (``trainers/step_loads.py``), and right
after the optimizer step every router whose ``expert_bias_enabled`` gets
``update_expert_bias(counts_E)``, once per step (``OptimizerStepCallback``); the biases are logged
as ``router/expert_bias_absmax`` and ``router/expert_bias_range``.

What it logs, at every logging step and evaluation (``trainers/routing_logs.py``, computed by
``hf_moe_routers.reporting``, named by ``hf_moe_routers.metrics.catalog``): ``router/<metric>``
(mean over layers) and ``router/<metric>/<layer>`` — load entropy, CV, max-load ratio, dead experts
(over the window), token entropy, top-1 probability, k-th margin, aux (balance) loss, z-loss, reg
loss and, every ``router_costly_metrics_interval`` logs, spectral norm, stable rank, Lipschitz bound
(the largest per-token bound of the logits' Jacobian norm on the window's inputs — finite for every
router — and ``lipschitz_bound_global``, the global constant, ``inf`` where none exists), flip rate,
angular concentration of queries and of expert rows, and drift from the first logged routing; with
``router_specialisation`` the specialisation metrics of the window (co-activation, vocabulary
specialisation, token-expert mutual information, domain specialisation when batches carry domain
ids, router saturation at evaluations against ``router_saturation_reference``;
``trainers/specialisation_logs.py``).
Micro-batch values are averaged over the window and summed across processes before logging (a
batch that the ranks of a tensor-parallel group share counted once). Under FSDP2 the parameter
statistics are taken on the gathered, whole router parameters (``gathered_router_parameters``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..records import RoutingHistory
from ..reporting.collector import RouterCapture, RouterCollector, RouterInfo, routing_scoring
from ..reporting.report import RoutingWindow, mean_over_layers
from .arguments import MoERouterTrainingArguments
from .callbacks import OptimizerStepCallback, add_plot_callback, use_concise_progress
from .checkpoint import fused_layout_saves
from .losses import (
    ROUTER_OUTPUT_KEYS,
    GlobalLoad,
    balance_loss,
    parameter_penalty,
    router_masks,
    sequence_rows,
    z_loss_term,
)
from .routing_logs import ProcessSums, costly_metrics, report_window
from .specialisation_logs import SpecialisationLogs
from .step_loads import StepLoads

__all__ = ["MoERouterTrainer"]

logger = logging.getLogger(__name__)

#: The expert co-activation heatmap of the last evaluation, next to the other routing plots.
COACTIVATION_PLOT = "routing_coactivation_eval.png"

# MoERouterTrainingArguments fields given their defaults when the Trainer gets plain TrainingArguments.
_ROUTER_FIELDS = (
    "router_balance_loss",
    "router_balance_granularity",
    "router_balance_loss_weight",
    "router_z_loss_weight",
    "router_spectral_weight",
    "router_stable_rank_weight",
    "router_flip_epsilon",
    "router_costly_metrics_interval",
    "router_metrics_max_tokens",
    "router_log_per_layer",
    "router_specialisation",
    "router_domain_names",
    "router_domain_key",
    "router_saturation_reference",
    "router_plots",
)


class MoERouterTrainer(Trainer):
    """A Trainer for (routed or plain) transformers MoE models: routing losses and routing metrics.

    Takes every ``Trainer`` argument; ``args`` should be ``MoERouterTrainingArguments`` (plain
    ``TrainingArguments`` get our defaults). ``routing_history`` holds every logged window; the
    plots callback draws from it.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, MoERouterTrainingArguments):
            defaults = MoERouterTrainingArguments(output_dir=self.args.output_dir)
            for field in _ROUTER_FIELDS:
                setattr(self.args, field, getattr(defaults, field))
        self._collector = RouterCollector(self.accelerator.unwrap_model(self.model))
        self.routers: list[RouterInfo] = self._collector.routers
        self._scoring = routing_scoring(self.model)
        self._sums = ProcessSums(self.accelerator, self._ranks_per_batch)
        self._step_loads = StepLoads([r.num_experts for r in self.routers], self._sums, self.args.device)
        self.add_callback(OptimizerStepCallback(self._after_optimizer_step))
        self._windows = {mode: self._new_window() for mode in ("train", "eval")}
        self._log_count = 0
        self._specialisation = (
            SpecialisationLogs(
                self.routers,
                self.args.device,
                is_encoder_decoder=bool(self._config().is_encoder_decoder),
                domain_names=self.args.router_domain_names,
                domain_key=self.args.router_domain_key,
                saturation_reference=self.args.router_saturation_reference,
            )
            if self.args.router_specialisation
            else None
        )
        self._drift_reference: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.routing_history = RoutingHistory()
        self.last_local_window: dict[str, Any] = {}  # this process's sums of the last logged window
        self.last_window: dict[str, Any] = {}  # the same, reduced over all processes
        if self.args.router_plots:
            add_plot_callback(self, self.routing_history)
        use_concise_progress(self)

    # ------------------------------------------------------------------------------------------
    # set-up helpers
    # ------------------------------------------------------------------------------------------
    def _new_window(self) -> RoutingWindow:
        return RoutingWindow(self.routers, self._scoring)

    def _config(self) -> Any:
        return self.accelerator.unwrap_model(self.model).config

    def _balance_weight(self) -> float:
        if self.args.router_balance_loss_weight is not None:
            return float(self.args.router_balance_loss_weight)
        return float(getattr(self._config(), "router_aux_loss_coef", 0.0) or 0.0)

    def _z_weight(self) -> float:
        if self.args.router_z_loss_weight is not None:
            return float(self.args.router_z_loss_weight)
        return float(getattr(self._config(), "router_z_loss_coef", 0.0) or 0.0)

    def _loss_counts_as_ga_scaled(self, num_items_in_batch: Any) -> bool:
        """Mirrors ``Trainer.training_step``: True when it will *not* divide the loss by the GA steps."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )

    def _global_balance(self) -> bool:
        """Whether this run's balance loss takes f over the global batch (a collective per micro-batch)."""
        return (
            self.args.router_balance_granularity == "global_batch"
            and self.args.router_balance_loss in ("per_layer", "pooled")
            and self._balance_weight() > 0
        )

    def _bias_routers(self) -> list[int]:
        """Positions of the routers whose aux-loss-free expert bias is updated (``expert_bias_enabled``)."""
        return [i for i, r in enumerate(self.routers) if getattr(r.module, "expert_bias_enabled", False)]

    def _ranks_per_batch(self) -> int:
        try:
            return max(1, int(self.get_tp_size() or 1))
        except Exception:  # pragma: no cover - a Trainer without tensor-parallel support
            return 1

    def create_model_card(self, **kwargs: Any) -> None:
        """A routed-model card (router config, routing-metric table, plots, citations) in
        ``output_dir``; ``Trainer.push_to_hub`` calls it before uploading."""
        from ..cards import write_trainer_model_card

        write_trainer_model_card(self, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, then the folder's card rendered from this run.

        The model's ``save_pretrained`` writes a card only from the model (it knows no data,
        arguments or evaluation), so the card is rendered again here from the trainer's arguments,
        state, datasets and routing history; a hand-written README.md is kept. A final save
        (not a checkpoint's) takes the plots drawn in ``args.output_dir`` along when it saves
        elsewhere, so that the card's links work.
        """
        super().save_model(output_dir, _internal_call=_internal_call)
        if not self.args.should_save:
            return
        from ..cards import PLOT_FILES, write_trainer_model_card

        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        plots = []
        if not _internal_call:
            drawn = [Path(self.args.output_dir, name) for _, name in PLOT_FILES]
            plots = [path for path in drawn if path.is_file()]
        write_trainer_model_card(self, output_dir=folder, overwrite=False, plots=plots)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Checkpoints keep the in-memory (fused) tensor layout (see ``fused_layout_saves``)."""
        with fused_layout_saves(self.accelerator.unwrap_model(self.model, keep_torch_compile=False)):
            super()._save_checkpoint(model, trial)

    # ------------------------------------------------------------------------------------------
    # losses
    # ------------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        mode = "train" if model.training else "eval"
        domains = None
        if self._specialisation is not None:
            inputs, domains = self._specialisation.pop_domains(inputs)
        elif self.args.router_domain_key in inputs:
            inputs = {k: v for k, v in inputs.items() if k != self.args.router_domain_key}
        if self.args.router_balance_loss != "model" and hasattr(self._config(), "output_router_logits"):
            # Our balance loss replaces the model's own aux loss; never count it twice.
            inputs = {**inputs, "output_router_logits": False}
        self._collector.start()
        try:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        finally:
            captures = self._collector.stop()
        ran = any(c is not None for c in captures)
        masks = router_masks(self.routers, inputs, captures, bool(self._config().is_encoder_decoder))
        if mode == "train":
            # Every process adds every micro-batch, routers or not: the global-batch sums are a collective.
            batch_tokens = self._add_step_loads(captures, masks)
            router_loss = self._router_loss(captures, masks, inputs, batch_tokens) if ran else None
            if router_loss is not None:
                if self._loss_counts_as_ga_scaled(num_items_in_batch):
                    router_loss = router_loss / self.current_gradient_accumulation_steps
                loss = loss + router_loss.to(loss.dtype)
        if ran:
            self._windows[mode].add(captures, masks)
            if self._specialisation is not None:
                self._specialisation.add(mode, inputs, captures, masks, domains)
        if isinstance(outputs, dict) and any(k in outputs for k in ROUTER_OUTPUT_KEYS):
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k not in ROUTER_OUTPUT_KEYS})
        return (loss, outputs) if return_outputs else loss

    def _add_step_loads(
        self, captures: list[RouterCapture | None], masks: list[torch.Tensor | None]
    ) -> torch.Tensor | None:
        """Add a training micro-batch's expert counts to the optimizer step's (``StepLoads``) when the
        global-batch balance loss or an expert bias needs them; the micro-batch's real tokens per
        router over all processes ``[L]`` for the global-batch loss, else None."""
        reduce = self._global_balance()
        if not reduce and not self._bias_routers():
            return None
        return self._step_loads.add(captures, masks, self.state.global_step, reduce=reduce)

    def _router_loss(
        self,
        captures: list[RouterCapture | None],
        masks: list[torch.Tensor | None],
        inputs: dict[str, Any],
        batch_tokens: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The weighted router terms of one training micro-batch (None when every weight is zero)."""
        ran = [i for i, c in enumerate(captures) if c is not None]
        present = [captures[i] for i in ran]
        present_masks = [masks[i] for i in ran]
        total = None
        balance_weight = self._balance_weight()
        if self.args.router_balance_loss in ("per_layer", "pooled") and balance_weight > 0:
            stacks = [self.routers[i].stack for i in ran]
            granularity = self.args.router_balance_granularity
            loads = None
            if granularity == "global_batch":
                assert batch_tokens is not None  # _add_step_loads reduced this micro-batch
                step, replicas = self._step_loads, self._sums.data_parallel_replicas
                loads = [
                    GlobalLoad(
                        step.router_counts(step.global_LE, i), step.global_L[i], batch_tokens[i], replicas
                    )
                    for i in ran
                ]
            loss = balance_loss(
                self.args.router_balance_loss,
                stacks,
                present,
                present_masks,
                self._scoring,
                granularity=granularity,
                rows=sequence_rows(inputs) if granularity == "sequence" else None,
                loads=loads,
            )
            total = balance_weight * loss
        z_weight = self._z_weight()
        if z_weight > 0:
            z = z_weight * z_loss_term(present, present_masks)
            total = z if total is None else total + z
        overrides = {
            "spectral": self.args.router_spectral_weight,
            "stable_rank": self.args.router_stable_rank_weight,
        }
        penalty = parameter_penalty(self.routers, captures, overrides)
        if penalty is not None:
            self._windows["train"].add_penalty(penalty)
            total = penalty if total is None else total + penalty
        return total

    # ------------------------------------------------------------------------------------------
    # aux-loss-free expert bias
    # ------------------------------------------------------------------------------------------
    def _after_optimizer_step(self) -> None:
        """Right after each optimizer step (``OptimizerStepCallback``): every router with an enabled
        expert bias gets ``update_expert_bias`` with the step's counts (summed over its micro-batches
        and the processes, padding excluded), then the sums start over for the next step."""
        loads = self._step_loads
        enabled = self._bias_routers()
        if enabled and loads.step is not None:
            counts_LE, _ = loads.step_totals()
            for i in enabled:
                self.routers[i].module.update_expert_bias(loads.router_counts(counts_LE, i))
        loads.reset()

    def _expert_bias_logs(self) -> dict[str, float]:
        """``router/expert_bias_absmax`` (``max_i |b_i|``) and ``router/expert_bias_range``
        (``max_i b_i - min_i b_i``, what the routing feels: a constant shift changes no choice) of
        every router with an enabled bias, mean over those layers, then per layer."""
        per_layer: dict[str, dict[str, float]] = {"expert_bias_absmax": {}, "expert_bias_range": {}}
        for i in self._bias_routers():
            info = self.routers[i]
            bias = info.module.selection_bias()
            if bias is None:
                continue
            bias = bias.detach().float()
            per_layer["expert_bias_absmax"][info.layer] = float(bias.abs().max())
            per_layer["expert_bias_range"][info.layer] = float(bias.max() - bias.min())
        logs: dict[str, float] = {}
        for name, values in per_layer.items():
            if not values:
                continue
            logs[f"router/{name}"] = mean_over_layers(list(values.values()))
            if self.args.router_log_per_layer:
                logs.update({f"router/{name}/{layer}": value for layer, value in values.items()})
        return logs

    # ------------------------------------------------------------------------------------------
    # logging
    # ------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        window = self._windows[mode]
        if self._sums.any_data(window):
            if mode == "train":
                self._log_count += 1
            costly = mode == "eval" or (self._log_count - 1) % self.args.router_costly_metrics_interval == 0
            specialisation = (
                self._specialisation.report(mode, self._sums.distributed, self._sums.ranks_per_batch())
                if self._specialisation is not None
                else {}
            )
            report = report_window(
                window,
                self._sums,
                self._costly_metrics if costly else None,
                extra=specialisation,
                layers=[r.layer for r in self.routers],
                log_per_layer=self.args.router_log_per_layer,
                mode=mode,
                step=self.state.global_step,
            )
            self.last_local_window, self.last_window = report.local, report.reduced
            self.routing_history.append(report.record)
            prefix = "eval_" if mode == "eval" else ""
            # In place: `evaluate()` returns the very dict it logs, so its caller sees these too.
            logs.update({f"{prefix}{k}": v for k, v in report.logs.items()})
            if mode == "train":
                logs.update(self._expert_bias_logs())
            elif specialisation:
                self._plot_coactivation()
            self._windows[mode] = self._new_window()
        super().log(logs, start_time)

    def _plot_coactivation(self) -> None:
        """Draw the last evaluation's expert co-activation (``routing_coactivation_eval.png``);
        plots are diagnostics, so a failure is a warning."""
        probs = self._specialisation.last_coactivation.get("eval") if self._specialisation else None
        if probs is None or not self.args.router_plots or not self.is_world_process_zero():
            return
        try:
            from ..reporting.plots import plot_coactivation

            plot_coactivation(
                probs, [r.layer for r in self.routers], path=Path(self.args.output_dir, COACTIVATION_PLOT)
            )
        except Exception as error:  # noqa: BLE001 - a plot must never end a run
            logger.warning("could not draw %s: %s", COACTIVATION_PLOT, error)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        if self._specialisation is not None:
            self._specialisation.start_evaluation()  # saturation pairs evaluation batches by position
        return super().evaluate(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        # The domain ids are not a model input, but they must survive remove_unused_columns.
        super()._set_signature_columns_if_needed()
        key = self.args.router_domain_key
        if self._signature_columns is not None and key not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, key]

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the processes, each batch counted once (see ``ProcessSums``)."""
        return self._sums(tensor)

    def _costly_metrics(self, window: RoutingWindow) -> dict[str, list[float]]:
        """Parameter and stability metrics from each router's last captured inputs (see
        ``routing_logs.costly_metrics``), seeded by the step so every rank samples alike."""
        seed = self.args.seed + self.state.global_step
        return costly_metrics(
            self.accelerator.unwrap_model(self.model),
            self.routers,
            window,
            self._sums,
            max_tokens=self.args.router_metrics_max_tokens,
            flip_epsilon=self.args.router_flip_epsilon,
            seed=seed,
            drift_reference=self._drift_reference,
        )
