"""Modular one-shot adaptation: teach a trained MoE a new class or task by updating only the experts
its router selects for the new data, and measure what that costs the old task.

The protocol (``docs/ROUTERS.md``, "Modular one-shot adaptation", operationalised here):

1. **Select**: run the (frozen) model on the new example(s); in each MoE layer take the
   ``experts_per_layer`` experts with the largest mean routing weight over the new tokens.
2. **Adapt**: ``steps`` steps of SGD (learning rate ``learning_rate``) on the model's loss for the new
   data, with gradients flowing only into the selected experts' slices of the expert tensors. The
   router, stem / embeddings, local processors, head and every other expert are frozen (their
   ``requires_grad`` is off, and the selected tensors' other expert rows get a zero gradient, so plain
   SGD leaves them bit-identical). The model runs in eval mode (no dropout, no router state updates).
3. **Measure**: accuracy on the base task before and after (**interference** = after − before, in
   percentage points; negative = forgetting), accuracy on the new task after, which experts changed,
   and **exposure**: the mean, over layers and base examples (tokens), of the routing weight the
   *unadapted* model gives to the experts that were adapted — the share of base computation that
   flows through modified experts.

The budget (steps, learning rate, experts per layer) is one :class:`AdaptationBudget`, so every
router gets exactly the same one. Two model kinds are supported through :class:`AdaptationTarget`:
:class:`VisionTarget` (``MoEImageClassifier``; accuracy = classification accuracy, optionally with
the argmax restricted to ``allowed_classes``) and :class:`CausalLMTarget` (our routed causal LMs;
accuracy = next-token accuracy over labelled tokens).

Shapes: T examples or tokens, E experts, L MoE layers, N classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "AdaptationBudget",
    "AdaptationResult",
    "AdaptationTarget",
    "CausalLMTarget",
    "OneShotReport",
    "VisionTarget",
    "adapt_experts",
    "adaptation_target",
    "exposure",
    "interference_pp",
    "one_shot_episode",
    "preserved_parameters",
    "select_experts",
]

Batch = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class AdaptationBudget:
    """The same for every router: how much one-shot adaptation may change.

    The defaults (10 steps at lr 0.01, one expert per layer) are the budget our validation sweep
    selected for the vision model (``benchmarks/results/sensitivity.md``): larger learning rates
    learn the new class faster but cost far more base accuracy than they gain.

    Args:
        steps: SGD steps on the new data (≥ 1).
        learning_rate: SGD step size (> 0).
        experts_per_layer: experts adapted in each MoE layer (≥ 1).
        momentum: SGD momentum (≥ 0, < 1).
    """

    steps: int = 10
    learning_rate: float = 0.01
    experts_per_layer: int = 1
    momentum: float = 0.0

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("experts_per_layer", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"AdaptationBudget.{name} must be an integer >= {minimum}; got {value!r}.")
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"AdaptationBudget.learning_rate must be a finite number > 0; got {lr!r}.")
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
            raise ValueError(f"AdaptationBudget.momentum must be a number in [0, 1); got {m!r}.")


class AdaptationTarget:
    """What adaptation needs from a model; subclass it for a new model kind.

    Subclasses set ``model`` and implement the four methods below.
    """

    model: nn.Module

    def expert_parameters(self) -> list[list[nn.Parameter]]:
        """Per MoE layer, the tensors holding its experts; dimension 0 of each indexes the expert."""
        raise NotImplementedError  # pragma: no cover - abstract

    @torch.no_grad()
    def routing_weights(self, batch: Batch) -> list[torch.Tensor]:
        """Per MoE layer, the weight each real example/token gives each expert ``[T, E]`` (0 if unselected)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def loss(self, batch: Batch) -> torch.Tensor:
        """The scalar loss adaptation minimises on ``batch``."""
        raise NotImplementedError  # pragma: no cover - abstract

    @torch.no_grad()
    def correct_and_total(self, batch: Batch) -> tuple[int, int]:
        """Number of correct predictions and of scored predictions on ``batch``."""
        raise NotImplementedError  # pragma: no cover - abstract

    # -- shared --------------------------------------------------------------------------------
    def num_experts(self) -> list[int]:
        return [params[0].shape[0] for params in self.expert_parameters()]

    @torch.no_grad()
    def accuracy(self, batches: Batch | Iterable[Batch]) -> float:
        """Accuracy in [0, 1] over one batch or several."""
        correct = total = 0
        for batch in _as_batches(batches):
            c, t = self.correct_and_total(batch)
            correct, total = correct + c, total + t
        if total == 0:
            raise ValueError("accuracy: the batches hold no scored example (empty, or every label masked).")
        return correct / total


def _as_batches(batches: Batch | Iterable[Batch]) -> list[Batch]:
    if isinstance(batches, dict):
        return [batches]
    out = list(batches)
    if not out or not all(isinstance(b, dict) for b in out):
        raise ValueError("batches must be a dict of model inputs or a non-empty list of such dicts.")
    return out


class VisionTarget(AdaptationTarget):
    """Adaptation of a :class:`~hf_moe_routers.experiments.vision_model.MoEImageClassifier`.

    Batches are ``{"pixel_values": [T, ...], "labels": [T]}``.

    Args:
        model: the classifier.
        allowed_classes: if given, the classes that compete in the argmax and in the loss (the
            others' logits are set to −inf): e.g. the base classes plus the one new class.
    """

    def __init__(self, model: nn.Module, allowed_classes: Sequence[int] | None = None):
        if not hasattr(model, "stages"):
            raise ValueError(f"VisionTarget needs a MoEImageClassifier; got {type(model).__name__}.")
        self.model = model
        num_labels = int(model.config.num_labels)
        self.class_mask: torch.Tensor | None = None
        if allowed_classes is not None:
            allowed = sorted({int(c) for c in allowed_classes})
            if not allowed or allowed[0] < 0 or allowed[-1] >= num_labels:
                raise ValueError(
                    f"allowed_classes must be non-empty class ids in [0, {num_labels}); got {list(allowed_classes)}."
                )
            mask = torch.zeros(num_labels, dtype=torch.bool)
            mask[allowed] = True
            self.class_mask = mask

    def expert_parameters(self) -> list[list[nn.Parameter]]:
        return [stage.experts.expert_parameters() for stage in self.model.stages]

    def _logits(self, batch: Batch) -> torch.Tensor:
        logits_TN = self.model(pixel_values=batch["pixel_values"]).logits.float()
        if self.class_mask is not None:
            logits_TN = logits_TN.masked_fill(~self.class_mask.to(logits_TN.device), float("-inf"))
        return logits_TN

    @torch.no_grad()
    def routing_weights(self, batch: Batch) -> list[torch.Tensor]:
        return [w.float() for w in self.model(pixel_values=batch["pixel_values"]).routing_weights]

    def loss(self, batch: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(self._logits(batch), batch["labels"].long())

    @torch.no_grad()
    def correct_and_total(self, batch: Batch) -> tuple[int, int]:
        pred_T = self._logits(batch).argmax(-1)
        return int((pred_T == batch["labels"].to(pred_T.device)).sum()), int(pred_T.numel())


class CausalLMTarget(AdaptationTarget):
    """Adaptation of a routed causal LM of this package (Mixtral, Qwen2/3-MoE, OLMoE families).

    Batches are ``{"input_ids", "attention_mask", "labels"}`` (labels −100 where not scored).
    Experts are each MoE block's fused expert tensors (``gate_up_proj [E, 2F, H]``,
    ``down_proj [E, H, F]``); a Qwen2-MoE shared expert is not a routed expert and stays frozen.
    """

    def __init__(self, model: nn.Module):
        routers = getattr(model, "routed_routers", None)
        if routers is None:
            raise ValueError(
                f"CausalLMTarget needs a routed causal LM from hf_moe_routers; got {type(model).__name__}."
            )
        self.model = model
        self.routers = routers()
        if not self.routers:
            raise ValueError(f"{type(model).__name__} has no routed router.")
        self._experts: list[list[nn.Parameter]] = []
        for name, router in self.routers:
            block = model.get_submodule(name.rsplit(".", 1)[0])
            experts = getattr(block, "experts", None)
            num = int(router.num_experts)
            params = [p for p in experts.parameters() if p.ndim >= 1 and p.shape[0] == num] if experts else []
            if not params:
                raise ValueError(
                    f"CausalLMTarget: the MoE block of router {name!r} has no stacked expert tensors "
                    f"(an `experts` module whose parameters have {num} rows); Switch Transformers is not supported."
                )
            self._experts.append(params)

    def expert_parameters(self) -> list[list[nn.Parameter]]:
        return self._experts

    @torch.no_grad()
    def routing_weights(self, batch: Batch) -> list[torch.Tensor]:
        captured: list[tuple[torch.Tensor, torch.Tensor]] = []

        def hook(module: nn.Module, args: Any, output: tuple[torch.Tensor, ...]) -> None:
            captured.append((output[1].float(), output[2]))  # (weights_TK, indices_TK)

        handles = [router.register_forward_hook(hook) for _, router in self.routers]
        try:
            self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        finally:
            for handle in handles:
                handle.remove()
        mask = batch.get("attention_mask")
        mask_T = None if mask is None else mask.reshape(-1).bool()
        out = []
        for (weights_TK, indices_TK), num in zip(captured, self.num_experts()):
            dense_TE = torch.zeros(weights_TK.shape[0], num, device=weights_TK.device)
            dense_TE.scatter_(-1, indices_TK, weights_TK)
            out.append(dense_TE if mask_T is None else dense_TE[mask_T.to(dense_TE.device)])
        return out

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.model(**batch).loss

    @torch.no_grad()
    def correct_and_total(self, batch: Batch) -> tuple[int, int]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = self.model(**inputs).logits
        pred = logits[:, :-1].argmax(-1)
        target = batch["labels"][:, 1:].to(pred.device)
        scored = target != -100
        return int(((pred == target) & scored).sum()), int(scored.sum())


def adaptation_target(model: nn.Module, **kwargs: Any) -> AdaptationTarget:
    """The :class:`AdaptationTarget` for ``model`` (vision classifier or routed causal LM)."""
    from .vision_model import MoEImageClassifier

    if isinstance(model, MoEImageClassifier):
        return VisionTarget(model, **kwargs)
    if kwargs:
        raise ValueError(
            f"adaptation_target: unexpected options {sorted(kwargs)} for {type(model).__name__}."
        )
    return CausalLMTarget(model)


# --------------------------------------------------------------------------------------------
# Selection, adaptation, measurement
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AdaptationResult:
    """What :func:`adapt_experts` did.

    Attributes:
        selected: per layer, the expert ids that were allowed to change.
        changed: per layer, the expert ids whose parameters actually differ afterwards.
        losses: the adaptation loss before each step.
    """

    selected: list[list[int]]
    changed: list[list[int]]
    losses: list[float]


@torch.no_grad()
def select_experts(target: AdaptationTarget, batch: Batch, experts_per_layer: int) -> list[list[int]]:
    """Per layer, the ``experts_per_layer`` experts with the largest mean routing weight on ``batch``."""
    out = []
    with _eval_mode(target.model):
        for weights_TE in target.routing_weights(batch):
            if experts_per_layer > weights_TE.shape[-1]:
                raise ValueError(
                    f"experts_per_layer ({experts_per_layer}) exceeds the layer's {weights_TE.shape[-1]} experts."
                )
            top = torch.topk(weights_TE.mean(0), experts_per_layer).indices
            out.append(sorted(int(e) for e in top))
    return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def preserved_parameters(model: nn.Module) -> Iterator[None]:
    """Restore every parameter and buffer of ``model`` on exit (episodes start from the same model)."""
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for key, value in model.state_dict(keep_vars=True).items():
                value.copy_(saved[key])


def adapt_experts(
    target: AdaptationTarget,
    batch: Batch,
    budget: AdaptationBudget,
    selected: list[list[int]] | None = None,
) -> AdaptationResult:
    """Update only the selected experts of ``target.model`` on ``batch``, in place.

    Args:
        target: the model's :class:`AdaptationTarget`.
        batch: the new example(s), model inputs with labels.
        budget: steps, learning rate, experts per layer, momentum.
        selected: per layer, the experts to adapt; default :func:`select_experts` on ``batch``.
    """
    model = target.model
    layers = target.expert_parameters()
    if selected is None:
        selected = select_experts(target, batch, budget.experts_per_layer)
    if len(selected) != len(layers):
        raise ValueError(f"selected names {len(selected)} layers; the model has {len(layers)} MoE layers.")
    before = [[p.detach().clone() for p in params] for params in layers]
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = []
    trainable: list[nn.Parameter] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for params, experts in zip(layers, selected):
            num = params[0].shape[0]
            if any(not 0 <= e < num for e in experts):
                raise ValueError(f"selected expert ids {experts} must lie in [0, {num}).")
            for p in params:
                mask = torch.zeros(num, dtype=p.dtype, device=p.device)
                mask[list(experts)] = 1.0
                mask = mask.reshape(num, *([1] * (p.ndim - 1)))
                p.requires_grad_(True)
                # Zero gradient for the unselected rows: SGD then leaves them exactly as they were.
                handles.append(p.register_hook(lambda grad, mask=mask: grad * mask))
                trainable.append(p)
        optimizer = torch.optim.SGD(trainable, lr=budget.learning_rate, momentum=budget.momentum)
        losses = []
        with _eval_mode(model):
            for _ in range(budget.steps):
                optimizer.zero_grad(set_to_none=True)
                loss = target.loss(batch)
                losses.append(float(loss.detach()))
                loss.backward()
                optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    changed = []
    for params, old in zip(layers, before):
        diff_E = torch.zeros(params[0].shape[0], dtype=torch.bool, device=params[0].device)
        for p, q in zip(params, old):
            diff_E |= (p.detach() != q).reshape(p.shape[0], -1).any(-1)
        changed.append(diff_E.nonzero().flatten().tolist())
    return AdaptationResult(selected=selected, changed=changed, losses=losses)


@torch.no_grad()
def exposure(target: AdaptationTarget, batches: Batch | Iterable[Batch], experts: list[list[int]]) -> float:
    """Mean over layers and examples/tokens of the routing weight given to ``experts`` (per layer).

    Measure it with the model *before* adaptation: it is the share of base-task computation that
    flows through the experts the adaptation rewires. Layers with no adapted expert count as 0.
    """
    with _eval_mode(target.model):
        weights = [target.routing_weights(batch) for batch in _as_batches(batches)]
    return _exposure_from_weights(weights, experts)


def _exposure_from_weights(weights_BLTE: list[list[torch.Tensor]], experts: list[list[int]]) -> float:
    """``weights_BLTE[batch][layer]`` is ``[T, E]``; see :func:`exposure`."""
    num_layers = len(weights_BLTE[0])
    if len(experts) != num_layers:
        raise ValueError(f"experts names {len(experts)} layers; the model has {num_layers} MoE layers.")
    per_layer = []
    for layer, ids in enumerate(experts):
        total = sum(float(w[layer][:, list(ids)].sum()) if ids else 0.0 for w in weights_BLTE)
        count = sum(w[layer].shape[0] for w in weights_BLTE)
        if count == 0:
            raise ValueError("exposure: the batches hold no example.")
        per_layer.append(total / count)
    return sum(per_layer) / num_layers


def interference_pp(accuracy_before: float, accuracy_after: float) -> float:
    """Base-task accuracy change in percentage points (accuracies in [0, 1]); negative = forgetting."""
    for name, value in (("accuracy_before", accuracy_before), ("accuracy_after", accuracy_after)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be an accuracy in [0, 1]; got {value!r}.")
    return 100.0 * (accuracy_after - accuracy_before)


@dataclasses.dataclass
class OneShotReport:
    """One adaptation episode.

    Attributes:
        base_accuracy_before, base_accuracy_after: base-task accuracy in [0, 1].
        interference_pp: ``100 · (after − before)``.
        new_accuracy_before, new_accuracy_after: new-task accuracy in [0, 1].
        exposure: :func:`exposure` of the base data, routed by the unadapted model, on the experts
            that changed.
        selected, changed: per layer, the selected and the actually changed experts.
        num_changed: total changed experts over layers.
        losses: adaptation loss before each step.
    """

    base_accuracy_before: float
    base_accuracy_after: float
    interference_pp: float
    new_accuracy_before: float
    new_accuracy_after: float
    exposure: float
    selected: list[list[int]]
    changed: list[list[int]]
    num_changed: int
    losses: list[float]


def one_shot_episode(
    target: AdaptationTarget,
    adapt_batch: Batch,
    base_eval: Batch | Iterable[Batch],
    new_eval: Batch | Iterable[Batch],
    budget: AdaptationBudget,
    *,
    restore: bool = True,
) -> OneShotReport:
    """Measure, adapt on ``adapt_batch``, measure again; restore the model unless ``restore=False``."""
    base_eval, new_eval = _as_batches(base_eval), _as_batches(new_eval)
    with _eval_mode(target.model):
        base_before = target.accuracy(base_eval)
        new_before = target.accuracy(new_eval)
        # Routing of the base data by the unadapted model: exposure is read from it afterwards.
        base_weights = [target.routing_weights(batch) for batch in base_eval]
    selected = select_experts(target, adapt_batch, budget.experts_per_layer)
    context = preserved_parameters(target.model) if restore else contextlib.nullcontext()
    with context:
        result = adapt_experts(target, adapt_batch, budget, selected)
        with _eval_mode(target.model):
            base_after = target.accuracy(base_eval)
            new_after = target.accuracy(new_eval)
    exposed = _exposure_from_weights(base_weights, result.changed)
    return OneShotReport(
        base_accuracy_before=base_before,
        base_accuracy_after=base_after,
        interference_pp=interference_pp(base_before, base_after),
        new_accuracy_before=new_before,
        new_accuracy_after=new_after,
        exposure=exposed,
        selected=result.selected,
        changed=result.changed,
        num_changed=sum(len(c) for c in result.changed),
        losses=result.losses,
    )
