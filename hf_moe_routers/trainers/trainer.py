"""``MoERouterTrainer``: a ``transformers.Trainer`` that adds the routing losses and logs routing metrics.

What it adds to the model's own loss, per micro-batch:
- the load-balancing loss, per layer by default (mean over layers of ``E·Σ f_e·P_e``,
  padding-masked), or transformers' pooled form; the model's own aux loss is switched off
  (``output_router_logits=False``) so it is never counted twice;
- the router z-loss (mean over layers, padding-masked) when its weight is non-zero;
- each routed router's parameter-only penalties (SR-MoE's spectral and stable-rank terms), summed
  over layers.
Under gradient accumulation the Trainer does not divide a loss normalised by ``num_items_in_batch``
(docs/TRANSFORMERS.md §6, pitfall 9), so these per-micro-batch terms are divided by the accumulation
steps here: the same total gradient for 1×B and 2×(B/2). Evaluation losses stay the model's
own (``eval_loss`` is the LM loss, so ``exp(eval_loss)`` is the perplexity); the router terms are
logged separately.

What it logs, at every logging step and evaluation: ``router/<metric>`` (mean over layers) and
``router/<metric>/<layer>`` — load entropy, CV, max-load ratio, dead experts (over the window),
token entropy, top-1 probability, k-th margin, aux (balance) loss, z-loss, reg loss and, every
``router_costly_metrics_interval`` logs, spectral norm, stable rank, Lipschitz bound (the largest
per-token bound of the logits' Jacobian norm on the window's inputs — finite for every router — and
``lipschitz_bound_global``, the global constant, ``inf`` where none exists), flip rate, angular
concentration of queries and of expert rows, and drift from the first logged routing.
Micro-batch values are averaged over the window and summed across processes before logging (a
batch that the ranks of a tensor-parallel group share counted once). Under FSDP2 the parameter
statistics are taken on the gathered, whole router parameters (``gathered_router_parameters``).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import ProgressCallback, Trainer

from .. import metrics as M
from ..records import RoutingHistory, RoutingRecord
from ..reporting.collector import RouterCapture, RouterCollector, RouterInfo, routing_scoring
from ..sharding import gathered_router_parameters
from .arguments import MoERouterTrainingArguments

__all__ = ["MoERouterTrainer"]

# Per-micro-batch metrics, accumulated as sums over the logging window.
WINDOW_METRICS = ("token_entropy", "top1_prob", "kth_margin", "aux_loss", "z_loss")
# Keys transformers puts router outputs under; stripped before compute_metrics (pitfall 10).
ROUTER_OUTPUT_KEYS = (
    "router_logits",
    "aux_loss",
    "encoder_router_logits",
    "decoder_router_logits",
    "encoder_z_loss",
    "encoder_aux_loss",
    "decoder_z_loss",
    "decoder_aux_loss",
    "z_loss",
)


class _Window:
    """Sums of per-layer metrics over the micro-batches of one logging window (or one evaluation)."""

    def __init__(self, num_layers: int, num_experts: list[int]):
        self.num_layers = num_layers
        # Sums stay on the device the router outputs live on until the window is logged: reading
        # them back per micro-batch would add a host sync per metric and layer to every step.
        self.sums_ML: torch.Tensor | None = None
        self.counts = torch.zeros(num_layers, dtype=torch.float64)  # host-side: plain increments
        self.loads = [torch.zeros(e, dtype=torch.float64) for e in num_experts]
        self.reg_loss_sum: torch.Tensor | float = 0.0
        self.reg_count = 0
        self.last: list[RouterCapture | None] = [None] * num_layers
        self.last_masks: list[torch.Tensor | None] = [None] * num_layers

    def empty(self) -> bool:
        return bool(self.counts.sum() == 0)


class _ConciseProgressCallback(ProgressCallback):
    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is not None:
            logs = {k: v for k, v in logs.items() if not (k.count("/") >= 2 and "router/" in k)}
        super().on_log(args, state, control, logs=logs, **kwargs)


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
            for field in (
                "router_balance_loss",
                "router_balance_loss_weight",
                "router_z_loss_weight",
                "router_spectral_weight",
                "router_stable_rank_weight",
                "router_flip_epsilon",
                "router_costly_metrics_interval",
                "router_metrics_max_tokens",
                "router_log_per_layer",
                "router_plots",
            ):
                setattr(self.args, field, getattr(defaults, field))
        self._collector = RouterCollector(self.accelerator.unwrap_model(self.model))
        self.routers: list[RouterInfo] = self._collector.routers
        self._scoring = routing_scoring(self.model)
        self._windows = {mode: self._new_window() for mode in ("train", "eval")}
        self._log_count = 0
        self._drift_reference: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.routing_history = RoutingHistory()
        self.last_local_window: dict[str, Any] = {}  # this process's sums of the last logged window
        self.last_window: dict[str, Any] = {}  # the same, reduced over all processes
        if self.args.router_plots:
            self._add_plot_callback()
        self._use_concise_progress()

    # ------------------------------------------------------------------------------------------
    # set-up helpers
    # ------------------------------------------------------------------------------------------
    def _new_window(self) -> _Window:
        return _Window(len(self.routers), [r.num_experts for r in self.routers])

    def _add_plot_callback(self) -> None:
        try:
            from .plots import RoutingPlotCallback
        except ImportError:  # matplotlib missing: the plots are an extra, say so once
            import logging

            logging.getLogger(__name__).warning("matplotlib is not installed: routing plots are off.")
            return

        def tensorboard_writer() -> Any:
            for callback in self.callback_handler.callbacks:
                writer = getattr(callback, "tb_writer", None)
                if writer is not None:
                    return writer
            return None

        # First in the list: TensorBoardCallback.on_train_end closes its writer before later callbacks run.
        callback = RoutingPlotCallback(self.routing_history, tensorboard_writer_getter=tensorboard_writer)
        self.callback_handler.callbacks.insert(0, callback)

    def _use_concise_progress(self) -> None:
        """The progress bar prints the mean router metrics only; per-layer values still reach
        ``log_history`` and every ``report_to`` backend."""
        for i, callback in enumerate(self.callback_handler.callbacks):
            if type(callback) is ProgressCallback:
                concise = _ConciseProgressCallback()
                concise.__dict__.update(callback.__dict__)
                self.callback_handler.callbacks[i] = concise

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

    def create_model_card(self, **kwargs: Any) -> None:
        """A routed-model card (router config, routing-metric table, plots, citations) in
        ``output_dir``; ``Trainer.push_to_hub`` calls it before uploading."""
        from ..cards import write_trainer_model_card

        write_trainer_model_card(self, **kwargs)

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Checkpoints keep the in-memory (fused) tensor layout.

        ``save_pretrained`` writes MoE experts back in the legacy per-expert layout by default, but
        ``Trainer._load_from_checkpoint`` reads the file with a raw ``load_state_dict(strict=False)``
        that applies no conversion: on resume the fused experts would silently keep their fresh
        values (only a warning lists them as missing). Final models (``save_model``) keep the
        default, interoperable layout; ``from_pretrained`` reads both.
        """
        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        original = unwrapped.__dict__.get("save_pretrained")
        unwrapped.save_pretrained = functools.partial(
            type(unwrapped).save_pretrained, unwrapped, save_original_format=False
        )
        try:
            super()._save_checkpoint(model, trial)
        finally:
            if original is None:
                del unwrapped.save_pretrained
            else:
                unwrapped.save_pretrained = original

    # ------------------------------------------------------------------------------------------
    # losses
    # ------------------------------------------------------------------------------------------
    def _router_masks(
        self, inputs: dict[str, Any], captures: list[RouterCapture | None]
    ) -> list[torch.Tensor | None]:
        """Per router, a ``[T]`` bool mask of real tokens when the inputs say which are padding."""
        masks: list[torch.Tensor | None] = []
        for info, capture in zip(self.routers, captures):
            if capture is None:
                masks.append(None)
                continue
            key = (
                "attention_mask"
                if info.stack == "encoder" or not self._config().is_encoder_decoder
                else "decoder_attention_mask"
            )
            mask = inputs.get(key)
            if mask is not None and mask.numel() == capture.logits_TE.shape[0]:
                masks.append(mask.reshape(-1).to(device=capture.logits_TE.device, dtype=torch.bool))
            else:
                masks.append(None)
        return masks

    def _probs(self, logits_TE: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor | None:
        if self._scoring == "softmax":
            return None
        return M.routing_probs(logits_TE, self._scoring, indices_TK)

    def _balance_loss(self, captures: list[RouterCapture], masks: list[torch.Tensor | None]) -> torch.Tensor:
        kind = self.args.router_balance_loss
        if kind == "per_layer":
            losses = [
                M.load_balance_loss(
                    c.logits_TE, c.indices_TK, m, probs=self._probs(c.logits_TE, c.indices_TK), validate=False
                )
                for c, m in zip(captures, masks)
            ]
            return torch.stack(losses).mean()
        # pooled: transformers' form, pooled within each group of layers that see the same tokens
        groups: dict[tuple[int, str], list[int]] = defaultdict(list)
        for i, (info, c) in enumerate(zip(self.routers, captures)):
            groups[(c.logits_TE.shape[0], info.stack)].append(i)
        values = []
        for members in groups.values():
            logits = [captures[i].logits_TE for i in members]
            indices = [captures[i].indices_TK for i in members]
            probs = None
            if self._scoring != "softmax":
                probs = [self._probs(captures[i].logits_TE, captures[i].indices_TK) for i in members]
            values.append(
                M.pooled_load_balance_loss(logits, indices, masks[members[0]], probs=probs, validate=False)
            )
        return torch.stack(values).mean()

    def _parameter_penalty(self, captures: list[RouterCapture | None]) -> torch.Tensor | None:
        """Σ over routed routers of their weighted parameter-only penalties (None if none has one).

        The raw terms come from the scorers' forward (see ``RouterCollector``), so LoRA deltas on
        router parameters, which PEFT applies only inside forward, are part of them.
        """
        overrides = {
            "spectral": self.args.router_spectral_weight,
            "stable_rank": self.args.router_stable_rank_weight,
        }
        total = None
        for info, capture in zip(self.routers, captures):
            if not info.routed or capture is None or not capture.penalty_terms:
                continue
            weights = info.scorer.regularization_weights()
            for name, value in capture.penalty_terms.items():
                weight = overrides.get(name) if overrides.get(name) is not None else weights.get(name, 0.0)
                if weight:
                    term = weight * value.float()
                    total = term if total is None else total + term
        return total

    # ------------------------------------------------------------------------------------------
    # compute_loss
    # ------------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        mode = "train" if model.training else "eval"
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
        present = [c for c in captures if c is not None]
        if present:
            masks = self._router_masks(inputs, captures)
            router_loss = self._router_loss(captures, masks, mode)
            if router_loss is not None and mode == "train":
                if self._loss_counts_as_ga_scaled(num_items_in_batch):
                    router_loss = router_loss / self.current_gradient_accumulation_steps
                loss = loss + router_loss.to(loss.dtype)
            self._accumulate(mode, captures, masks)
        if isinstance(outputs, dict) and any(k in outputs for k in ROUTER_OUTPUT_KEYS):
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k not in ROUTER_OUTPUT_KEYS})
        return (loss, outputs) if return_outputs else loss

    def _router_loss(
        self, captures: list[RouterCapture | None], masks: list[torch.Tensor | None], mode: str
    ) -> torch.Tensor | None:
        window = self._windows[mode]
        pairs = [(c, m) for c, m in zip(captures, masks) if c is not None]
        total = None
        balance_weight = self._balance_weight()
        if self.args.router_balance_loss in ("per_layer", "pooled") and balance_weight > 0:
            total = balance_weight * self._balance_loss([c for c, _ in pairs], [m for _, m in pairs])
        z_weight = self._z_weight()
        if z_weight > 0:
            z = torch.stack([M.z_loss(c.logits_TE, m, validate=False) for c, m in pairs]).mean()
            total = z_weight * z if total is None else total + z_weight * z
        if mode == "train":
            penalty = self._parameter_penalty(captures)
            if penalty is not None:
                window.reg_loss_sum = window.reg_loss_sum + penalty.detach().double()
                window.reg_count += 1
                total = penalty if total is None else total + penalty
        return total

    @torch.no_grad()
    def _accumulate(
        self, mode: str, captures: list[RouterCapture | None], masks: list[torch.Tensor | None]
    ) -> None:
        window = self._windows[mode]
        for i, (capture, mask) in enumerate(zip(captures, masks)):
            if capture is None:
                continue
            logits, indices = capture.logits_TE.detach(), capture.indices_TK
            values = [  # in WINDOW_METRICS order
                M.token_entropy(logits, mask),
                M.top1_prob(logits, mask),
                M.kth_margin(logits, self.routers[i].top_k, mask),
                M.load_balance_loss(
                    logits, indices, mask, probs=self._probs(logits, indices), validate=False
                ),
                M.z_loss(logits, mask, validate=False),
            ]
            dtype = torch.float32 if logits.device.type == "mps" else torch.float64
            stacked = torch.stack([v.to(device=logits.device, dtype=dtype) for v in values])
            if window.sums_ML is None:
                window.sums_ML = stacked.new_zeros(len(WINDOW_METRICS), window.num_layers)
            window.sums_ML[:, i] += stacked
            window.counts[i] += 1
            counts_E = M.expert_counts(indices, self.routers[i].num_experts, mask, dtype=dtype)
            window.loads[i] = window.loads[i].to(counts_E.device, dtype) + counts_E
            window.last[i] = capture
            window.last_masks[i] = mask

    # ------------------------------------------------------------------------------------------
    # logging
    # ------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        window = self._windows[mode]
        if self._has_data(window):
            if mode == "train":
                self._log_count += 1
            costly = mode == "eval" or (self._log_count - 1) % self.args.router_costly_metrics_interval == 0
            extra = self._window_logs(window, costly, mode)
            prefix = "eval_" if mode == "eval" else ""
            # In place: `evaluate()` returns the very dict it logs, so its caller sees these too.
            logs.update({f"{prefix}{k}": v for k, v in extra.items()})
            self._windows[mode] = self._new_window()
        super().log(logs, start_time)

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the processes, each batch counted once.

        The ranks of one tensor-parallel group (TP, and EP with ``ep_size == tp_size``) all run the
        same batch and hold identical sums: the total over all processes counts it ``tp_size`` times.
        """
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum").cpu()
            replicas = self._ranks_per_batch()
            return total / replicas if replicas > 1 else total
        return tensor

    def _ranks_per_batch(self) -> int:
        try:
            return max(1, int(self.get_tp_size() or 1))
        except Exception:  # pragma: no cover - a Trainer without tensor-parallel support
            return 1

    def _has_data(self, window: _Window) -> bool:
        """Whether any process saw router outputs in this window (a collective on every rank, so
        that all ranks take the same branch)."""
        if self.accelerator.num_processes == 1:
            return not window.empty()
        return bool(self._reduce_sum(window.counts.sum().reshape(1)).item() > 0)

    def _window_logs(self, window: _Window, costly: bool, mode: str) -> dict[str, float]:
        names = list(WINDOW_METRICS)
        sums = (
            window.sums_ML.cpu().double()
            if window.sums_ML is not None
            else torch.zeros(len(names), window.num_layers, dtype=torch.float64)
        )
        local_loads = [v.cpu().double() for v in window.loads]
        widths = [len(v) for v in local_loads]
        packed = torch.cat(
            [
                sums.reshape(-1),
                window.counts,
                torch.cat(local_loads),
                torch.tensor([float(window.reg_loss_sum), float(window.reg_count)], dtype=torch.float64),
            ]
        )
        self.last_local_window = {"counts": window.counts.clone(), "loads": local_loads}
        packed = self._reduce_sum(packed)
        num_layers = window.num_layers
        sums = packed[: len(names) * num_layers].reshape(len(names), num_layers)
        counts = packed[len(names) * num_layers : (len(names) + 1) * num_layers]
        loads = torch.split(packed[(len(names) + 1) * num_layers : -2], widths)
        reg_sum, reg_count = packed[-2], packed[-1]
        self.last_window = {"counts": counts.clone(), "loads": [v.clone() for v in loads]}

        per_layer: dict[str, list[float]] = {}
        safe = counts.clamp_min(1)
        for j, name in enumerate(names):
            per_layer[name] = (sums[j] / safe).tolist()
        for name in ("load_entropy", "load_cv", "max_load_ratio", "dead_experts"):
            per_layer[name] = []
        fractions = []
        for load in loads:
            total = load.sum()
            fraction = load / total if total > 0 else load
            fractions.append(fraction.tolist())
            per_layer["load_entropy"].append(float(M.load_entropy(fraction)))
            per_layer["load_cv"].append(float(M.load_cv(fraction)))
            per_layer["max_load_ratio"].append(float(M.max_load_ratio(fraction)))
            per_layer["dead_experts"].append(float(M.dead_experts(load)))
        if costly:
            per_layer.update(self._costly_metrics(window))

        logs: dict[str, float] = {}
        for name, values in per_layer.items():
            finite = [v for v in values if not math.isnan(v)]
            logs[f"router/{name}"] = sum(finite) / len(finite) if finite else float("nan")
            if self.args.router_log_per_layer:
                for info, value in zip(self.routers, values):
                    logs[f"router/{name}/{info.layer}"] = value
        if mode == "train":
            logs["router/reg_loss"] = float(reg_sum / reg_count) if reg_count > 0 else 0.0
        step = self.state.global_step
        self.routing_history.append(
            RoutingRecord(
                step=step,
                split=mode,
                layers=[r.layer for r in self.routers],
                load=fractions,
                metrics=per_layer,
            )
        )
        return logs

    @torch.no_grad()
    def _costly_metrics(self, window: _Window) -> dict[str, list[float]]:
        """Parameter and stability metrics from each router's last captured inputs (averaged
        across processes).

        Under FSDP2 the routers' parameters are shards outside forward: they are gathered for the
        duration (every rank logs at the same step), so σ_max, stable rank and the Lipschitz bounds
        are those of the whole matrices, never of one rank's rows.
        """
        model = self.accelerator.unwrap_model(self.model)
        with gathered_router_parameters(model, [info.module for info in self.routers]):
            return self._costly_metrics_on_whole_parameters(window)

    def _costly_metrics_on_whole_parameters(self, window: _Window) -> dict[str, list[float]]:
        names = (
            "spectral_norm",
            "stable_rank",
            "lipschitz_bound",
            "flip_rate",
            "query_concentration",
            "expert_concentration",
            "drift",
            "lipschitz_bound_global",
        )
        values = torch.full((len(names), len(self.routers)), float("nan"), dtype=torch.float64)
        generator = torch.Generator().manual_seed(self.args.seed + self.state.global_step)
        for i, info in enumerate(self.routers):
            capture, mask = window.last[i], window.last_masks[i]
            # Prefer what the scorer saw inside forward (PEFT deltas included).
            matrix = (
                capture.routing_matrix
                if capture is not None and capture.routing_matrix is not None
                else info.gate_matrix()
            )
            rows = (
                capture.expert_rows
                if capture is not None and capture.expert_rows is not None
                else info.expert_rows()
            )
            values[0, i] = float(M.spectral_norm(matrix.float()))
            values[1, i] = float(M.stable_rank(matrix.float()))
            values[7, i] = float(info.lipschitz_bound())
            values[2, i] = values[7, i]  # replaced by the bound on observed inputs when there are some
            values[5, i] = float(M.angular_concentration(rows.float()))
            if capture is None:
                continue
            x_TH = capture.inputs_TH if mask is None else capture.inputs_TH[mask.to(capture.inputs_TH.device)]
            if x_TH.shape[0] > self.args.router_metrics_max_tokens:
                pick = torch.randperm(x_TH.shape[0], generator=generator)[
                    : self.args.router_metrics_max_tokens
                ]
                x_TH = x_TH[pick.to(x_TH.device)]
            if x_TH.shape[0] < 2:
                continue
            flips = M.flip_rate(
                info.route,
                x_TH,
                epsilon=self.args.router_flip_epsilon,
                seed=self.args.seed + self.state.global_step,
            )
            values[3, i] = float(flips.flip_rate)
            values[2, i] = float(info.local_lipschitz_bound(x_TH))
            values[4, i] = float(M.angular_concentration(info.queries(x_TH)))
            if i not in self._drift_reference:
                self._drift_reference[i] = (x_TH.clone(), info.route(x_TH))
            ref_x, ref_idx = self._drift_reference[i]
            values[6, i] = float(M.topk_agreement(info.route(ref_x), ref_idx))
        if self.accelerator.num_processes > 1:
            present = ~torch.isnan(values)  # NaN = not computed on that rank; inf is a value
            total = self._reduce_sum(torch.where(present, values, torch.zeros_like(values)))
            count = self._reduce_sum(present.to(torch.float64))
            values = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
        return {name: values[j].tolist() for j, name in enumerate(names)}
