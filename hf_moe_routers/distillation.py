"""Router distillation: fit a patched model's new routers to the gates they replaced.

``distill_router`` trains only router parameters so that each router's softmax matches its
pretrained gate (KL on the router's real inputs), which raises the top-k agreement that a change of
scoring function (L2R, cosine, prototypes) loses at patch time. Agreement is measured as in
``hf_moe_routers.patching``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .families import FAMILIES
from .modeling.base import RoutedRouterMixin
from .patching import PatchReport, as_batches, capture_router_inputs, reference_logits, routing_agreement

__all__ = ["distill_router"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def _calibration_kl(
    routers: list[tuple[str, nn.Module]], collected: list[dict[str, torch.Tensor]], temperature: float
) -> dict[str, float]:
    """Each router's KL(gate || router) over all collected inputs (the distillation loss, undivided)."""
    kl = {}
    for name, router in routers:
        x_TH = torch.cat([c[name] for c in collected])
        teacher = F.log_softmax(reference_logits(router, x_TH) / temperature, dim=-1)
        student = F.log_softmax(router.scorer(x_TH).float() / temperature, dim=-1)  # type: ignore[attr-defined]
        kl[name] = float(F.kl_div(student, teacher, log_target=True, reduction="batchmean"))
    return kl


def _scorer_state(router: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in router.scorer.state_dict().items()}  # type: ignore[attr-defined]


@torch.no_grad()
def _load_scorer_state(router: nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = router.scorer.state_dict()  # type: ignore[attr-defined]
    for key, value in state.items():
        current[key].copy_(value)


@torch.no_grad()
def _match_logit_scale(
    routers: list[tuple[str, nn.Module]], collected: list[dict[str, torch.Tensor]]
) -> None:
    for name, router in routers:
        x_TH = torch.cat([c[name] for c in collected])
        teacher = reference_logits(router, x_TH).std(dim=-1).mean()
        student = router.scorer(x_TH).float().std(dim=-1).mean()  # type: ignore[attr-defined]
        if student > 0 and torch.isfinite(teacher / student):
            router.scorer.scale_logits_(float(teacher / student))  # type: ignore[attr-defined]


def distill_router(
    model: nn.Module,
    batches: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    steps: int = 100,
    *,
    lr: float = 1e-2,
    temperature: float = 1.0,
    weight_decay: float = 0.0,
    match_scale: bool = True,
    keep_best: bool = True,
) -> PatchReport:
    """Train only router parameters so each router's softmax matches its reference gate (KL).

    The model runs once per batch without gradients to collect each router's real inputs (padding
    dropped); every step then fits all routers on those inputs at once. Every other parameter is
    left untouched (no gradients are computed for it).

    Args:
        model: a model patched with ``keep_reference=True`` (the default).
        batches: model inputs (a dict or an iterable of dicts) to take router inputs from.
        steps: optimisation steps (≥ 1), cycling over the collected batches.
        lr: AdamW learning rate.
        temperature: softmax temperature of teacher and student in the KL.
        weight_decay: AdamW weight decay.
        match_scale: first rescale each student's logits (L2R's γ, the cosine temperature) so
            their mean per-token spread matches the teacher's; bounded scorers otherwise spend
            the first steps chasing the teacher's scale and lose the SVD init's ranking.
        keep_best: measure each router's KL on all collected inputs before and after the steps and
            keep the parameters with the lower one, so distillation never returns a router that
            fits its gate worse than the one it started from. This matters for routers that start
            exact (SR-MoE linear, the linear router): their gradient is rounding noise, which Adam
            normalises into steps of size ``lr`` that move the routing.

    Returns:
        A ``PatchReport`` of top-k agreement after distillation on the collected inputs.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}.")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr!r}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}.")
    routers = [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedRouterMixin)]
    if not routers:
        raise ValueError("distill_router needs a model patched with patch_moe_routers.")
    missing = [n for n, m in routers if getattr(m, "reference_weight", None) is None]
    if missing:
        raise ValueError(
            f"Routers {missing[:3]}... keep no reference gate: call distill_router right after "
            "patch_moe_routers(..., keep_reference=True)."
        )
    batch_list = as_batches(batches)
    if not batch_list:
        raise ValueError("distill_router needs at least one batch.")
    was_training = model.training
    model.eval()
    collected: list[dict[str, torch.Tensor]] = [capture_router_inputs(model, routers, b) for b in batch_list]

    if match_scale:
        _match_logit_scale(routers, collected)
    if keep_best:
        start_kl = _calibration_kl(routers, collected, temperature)
        start_state = {name: _scorer_state(router) for name, router in routers}
    params = [p for _, r in routers for p in r.scorer.parameters() if p.requires_grad]  # type: ignore[attr-defined]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for _, router in routers:
        router.scorer.train()  # type: ignore[attr-defined]
    for step in range(steps):
        inputs = collected[step % len(collected)]
        loss = torch.zeros((), device=params[0].device)
        for name, router in routers:
            x_TH = inputs[name]
            with torch.no_grad():
                teacher = F.log_softmax(reference_logits(router, x_TH) / temperature, dim=-1)
            student = F.log_softmax(router.scorer(x_TH).float() / temperature, dim=-1)  # type: ignore[attr-defined]
            loss = loss + F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if keep_best:
        model.eval()  # the scorers too: SR-MoE's power iteration must not advance while measuring
        end_kl = _calibration_kl(routers, collected, temperature)
        for name, router in routers:
            if end_kl[name] > start_kl[name]:
                _load_scorer_state(router, start_state[name])
                logger.info("distill_router: %s fits its gate better as it started; kept", name)
    model.train(was_training)

    layers = {
        name: routing_agreement(router, torch.cat([c[name] for c in collected])) for name, router in routers
    }
    family = FAMILIES[model.config.model_type].name  # type: ignore[attr-defined]
    router_type = routers[0][1].router_config.router_type  # type: ignore[attr-defined]
    report = PatchReport(router_type=router_type, family=family, source="distillation batches", layers=layers)
    logger.info("after distillation: %s", report)
    return report
