"""Vision building blocks of the experiments: router presets, base training, one-shot episodes and
routing-quality metrics of a :class:`MoEImageClassifier`.

Shapes: T examples, H hidden size, E experts, L stages, N classes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..reporting import RouterCapture, report_captures
from .adaptation import AdaptationBudget, VisionTarget, one_shot_episode
from .data import ImageData
from .vision_model import MoEImageClassifier, MoEImageClassifierConfig

__all__ = [
    "INTERFERENCE_ROUTERS",
    "ROUTERS",
    "ROUTER_LABELS",
    "VisionSettings",
    "accuracy",
    "build_model",
    "router_preset",
    "routing_quality",
    "run_episodes",
    "train_and_measure",
    "train_base",
]

#: The routers of experiment A, by table key. Sizes follow the package's tiny-model defaults
#: (cosine D = 16, L2R r = 16 with M = 4 anchors); SR-MoE uses the paper's prototype scoring.
ROUTERS: dict[str, dict[str, Any]] = {
    "linear": {"router_type": "linear"},
    "cosine": {"router_type": "cosine", "dim": 16},
    "sr_moe_penalty": {"router_type": "sr_moe", "scoring": "prototype", "spectral_mode": "penalty"},
    "sr_moe_constrain": {"router_type": "sr_moe", "scoring": "prototype", "spectral_mode": "constrain"},
    "l2r": {"router_type": "l2r", "rank": 16, "num_anchors": 4},
    "l2r_m1": {"router_type": "l2r", "rank": 16, "num_anchors": 1},
}
#: Experiment A's five routers.
INTERFERENCE_ROUTERS = ("linear", "cosine", "sr_moe_penalty", "sr_moe_constrain", "l2r")
ROUTER_LABELS = {
    "linear": "linear",
    "cosine": "cosine",
    "sr_moe_penalty": "SR-MoE (prototype, penalty)",
    "sr_moe_constrain": "SR-MoE (prototype, constrain)",
    "l2r": "L2R (r=16, M=4)",
    "l2r_m1": "L2R (r=16, M=1)",
}


@dataclasses.dataclass(frozen=True)
class VisionSettings:
    """Model and base-training settings shared by every router of a comparison.

    Args:
        hidden_size, num_experts, expert_intermediate_size, stem_channels: model sizes.
        top_k: None (dense soft routing) or K (sparse top-K).
        routing_temperature: τ dividing every router's logits.
        residual: residual stages (see ``experiments/vision_model.py``).
        balance_weight: load-balancing loss weight during base training (0 = off).
        sr_weight: if set, both SR-MoE penalty weights λ_σ = λ_sr (SR-MoE routers only).
        processor_weight: SR penalty weights on the local processors (0 = off; any router).
        epochs, batch_size, learning_rate: base training (Adam, cosine decay to 0).
    """

    hidden_size: int = 64
    num_experts: int = 8
    expert_intermediate_size: int = 64
    stem_channels: int = 16
    top_k: int | None = None
    routing_temperature: float = 1.0
    residual: bool = True
    balance_weight: float = 0.01
    sr_weight: float | None = None
    processor_weight: float = 0.0
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 3e-3

    def replace(self, **changes: Any) -> VisionSettings:
        return dataclasses.replace(self, **changes)


def router_preset(key: str, settings: VisionSettings) -> dict[str, Any]:
    """The router config dict of preset ``key`` under ``settings`` (SR weights applied)."""
    if key not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(map(repr, ROUTERS))}; got {key!r}.")
    router = dict(ROUTERS[key])
    if router["router_type"] == "sr_moe" and settings.sr_weight is not None:
        router.update(spectral_weight=settings.sr_weight, stable_rank_weight=settings.sr_weight)
    return router


def build_model(
    data: ImageData, depth: int, router: str, settings: VisionSettings, seed: int
) -> MoEImageClassifier:
    """A freshly initialised classifier for ``data`` with ``depth`` stages and router preset ``router``."""
    config = MoEImageClassifierConfig(
        stem_type=data.stem_type,
        input_size=data.input_size,
        stem_channels=settings.stem_channels,
        hidden_size=settings.hidden_size,
        num_stages=depth,
        num_experts=settings.num_experts,
        expert_intermediate_size=settings.expert_intermediate_size,
        top_k=settings.top_k,
        routing_temperature=settings.routing_temperature,
        residual=settings.residual,
        moe_router=router_preset(router, settings),
        router_aux_loss_coef=settings.balance_weight,
        processor_spectral_weight=settings.processor_weight,
        processor_stable_rank_weight=settings.processor_weight,
        num_labels=10,
    )
    torch.manual_seed(seed)
    return MoEImageClassifier(config)


def _masked_logits(logits_TN: torch.Tensor, allowed: list[int]) -> torch.Tensor:
    mask = torch.ones(logits_TN.shape[-1], dtype=torch.bool)
    mask[allowed] = False
    return logits_TN.float().masked_fill(mask, float("-inf"))


def train_base(
    model: MoEImageClassifier, data: ImageData, base_classes: list[int], settings: VisionSettings, seed: int
) -> dict[str, float]:
    """Train on the base classes of the training split (held-out classes' logits masked to −inf,
    so their head rows stay at initialisation). Loss: cross-entropy + balance + router penalties."""
    x, y = data.split("train")
    keep = torch.isin(y, torch.tensor(base_classes))
    x, y = x[keep], y[keep]
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(y) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
    )
    model.train()
    start = time.perf_counter()
    loss_value = float("nan")
    for _ in range(settings.epochs):
        order = torch.randperm(len(y), generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * settings.batch_size : (i + 1) * settings.batch_size]
            out = model(pixel_values=x[idx])
            loss = F.cross_entropy(_masked_logits(out.logits, base_classes), y[idx])
            if settings.balance_weight > 0:
                loss = loss + settings.balance_weight * out.aux_loss
            loss = loss + model.router_regularization_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_value = float(loss.detach())
    model.eval()
    return {"train_seconds": time.perf_counter() - start, "final_train_loss": loss_value}


@torch.no_grad()
def accuracy(model: MoEImageClassifier, x: torch.Tensor, y: torch.Tensor, allowed: list[int]) -> float:
    """Accuracy in [0, 1] with the argmax restricted to ``allowed`` classes."""
    model.eval()
    pred = _masked_logits(model(pixel_values=x).logits, allowed).argmax(-1)
    return float((pred == y).float().mean())


#: What :func:`routing_quality` reports, in this order (names of ``hf_moe_routers.metrics.catalog``).
QUALITY_METRICS = (
    "load_entropy",
    "load_cv",
    "dead_experts",
    "token_entropy",
    "top1_prob",
    "flip_rate",
    "query_concentration",
    "expert_concentration",
    "spectral_norm",
    "stable_rank",
)


@dataclasses.dataclass
class _StageRouter:
    """One stage of a :class:`MoEImageClassifier` as a router the routing report reads
    (``hf_moe_routers.reporting.ReportedRouter``); ``z_TH`` is the stage's router input."""

    stage: Any
    layer: str
    num_experts: int
    top_k: int

    def gate_matrix(self) -> torch.Tensor:
        # The scorer's own routing matrix (not SR-MoE's constrained one): what the tables always showed.
        return self.stage.scorer.routing_matrix().detach()

    def expert_rows(self) -> torch.Tensor:
        return self.stage.scorer.expert_embeddings().detach()

    def queries(self, z_TH: torch.Tensor) -> torch.Tensor:
        return self.stage.scorer.queries(z_TH)

    def route(self, z_TH: torch.Tensor) -> torch.Tensor:
        """The stage's top-k experts ``[T, K]`` (by routing weight, as the experts receive them)."""
        return torch.topk(self.stage.route(z_TH)[1], self.top_k, dim=-1).indices

    def lipschitz_bound(self) -> torch.Tensor:
        return self.stage.scorer.lipschitz_bound().detach() / self.stage.temperature

    def local_lipschitz_bound(self, z_TH: torch.Tensor) -> torch.Tensor:
        return self.stage.scorer.local_lipschitz_bound(z_TH).max().detach() / self.stage.temperature


@torch.no_grad()
def routing_quality(
    model: MoEImageClassifier, x: torch.Tensor, *, flip_epsilon: float = 0.05
) -> dict[str, Any]:
    """Routing metrics on inputs ``x``, each the mean over stages (``load`` per stage ``[L][E]``).

    One routing report (``hf_moe_routers.reporting.report_captures``, the Trainer's computation) of
    the stages on ``x``. Load counts each example's top-k experts (top-1 under dense routing). Flip
    rate is the share of examples whose top-k set changes under ``z + ε‖z‖·n`` at the router input.
    Query / expert concentration: mean pairwise cosine of router queries and of expert rows
    (prototypes, gate rows, anchors).
    """
    model.eval()
    out = model(pixel_values=x)
    k = model.config.top_k or 1
    routers = [
        _StageRouter(stage, f"stage_{i}", weights_TE.shape[-1], k)
        for i, (stage, weights_TE) in enumerate(zip(model.stages, out.routing_weights))
    ]
    captures = [
        RouterCapture(logits_TE, torch.topk(weights_TE, k, dim=-1).indices, z_TH)
        for logits_TE, weights_TE, z_TH in zip(out.router_logits, out.routing_weights, out.router_inputs)
    ]
    per_stage, loads = report_captures(routers, captures, flip_epsilon=flip_epsilon, seed=0)
    result: dict[str, Any] = {key: float(np.mean(per_stage[key])) for key in QUALITY_METRICS}
    result["load"] = loads
    return result


def run_episodes(
    model: MoEImageClassifier,
    data: ImageData,
    base_classes: list[int],
    new_classes: list[int],
    budget: AdaptationBudget,
    *,
    episodes_per_class: int,
    eval_split: str,
    seed: int,
) -> list[dict[str, Any]]:
    """One-shot episodes: for each new class, ``episodes_per_class`` single training examples.

    Each episode adapts the experts selected for one example of new class c with the argmax over
    the base classes plus c, then measures base accuracy on ``eval_split``'s base-class examples and
    new-class accuracy on its class-c examples; the model is restored afterwards.
    """
    x_train, y_train = data.split("train")
    x_eval, y_eval = data.split(eval_split)
    base_mask = torch.isin(y_eval, torch.tensor(base_classes))
    base_eval = {"pixel_values": x_eval[base_mask], "labels": y_eval[base_mask]}
    rng = np.random.default_rng(10_000 + seed)
    episodes = []
    for new_class in new_classes:
        target = VisionTarget(model, allowed_classes=[*base_classes, new_class])
        new_mask = y_eval == new_class
        new_eval = {"pixel_values": x_eval[new_mask], "labels": y_eval[new_mask]}
        pool = np.flatnonzero((y_train == new_class).numpy())
        for example in rng.choice(pool, size=min(episodes_per_class, len(pool)), replace=False):
            batch = {"pixel_values": x_train[[int(example)]], "labels": y_train[[int(example)]]}
            report = one_shot_episode(target, batch, base_eval, new_eval, budget)
            episodes.append(
                {
                    "new_class": new_class,
                    "example": int(example),
                    "base_accuracy_before": report.base_accuracy_before,
                    "base_accuracy_after": report.base_accuracy_after,
                    "interference_pp": report.interference_pp,
                    "new_accuracy_after": report.new_accuracy_after,
                    "exposure": report.exposure,
                    "num_changed": report.num_changed,
                    "final_loss": report.losses[-1],
                }
            )
    return episodes


def train_and_measure(
    data: ImageData,
    depth: int,
    router: str,
    settings: VisionSettings,
    seed: int,
    base_classes: list[int],
    eval_split: str,
) -> tuple[MoEImageClassifier, dict[str, float], float, dict[str, Any]]:
    """Build and train a base model, then measure it on ``eval_split``'s base-class examples.

    What every experiment-A cell does before its episodes: :func:`build_model`, :func:`train_base`
    on ``base_classes``, then the base-class accuracy (argmax over ``base_classes``) and
    :func:`routing_quality` on the base-class examples ``x [T_base, ...]`` of ``eval_split``.

    Returns:
        ``(model, train info, pre-adaptation accuracy in [0, 1], routing-quality dict)``.
    """
    model = build_model(data, depth, router, settings, seed)
    info = train_base(model, data, base_classes, settings, seed)
    x_eval, y_eval = data.split(eval_split)
    base_mask = torch.isin(y_eval, torch.tensor(base_classes))
    pre = accuracy(model, x_eval[base_mask], y_eval[base_mask], base_classes)
    return model, info, pre, routing_quality(model, x_eval[base_mask])
