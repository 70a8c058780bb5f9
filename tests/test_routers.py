"""Scorer math against independent references, closed forms and hand-checkable properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_moe_routers.numerics import stable_rank
from hf_moe_routers.routers import (
    CosineRouterConfig,
    L2RConfig,
    LinearRouterConfig,
    SRMoEConfig,
    build_scorer,
)

H, E = 24, 6


def make(config, hidden=H, experts=E, seed=0, std=0.3):
    torch.manual_seed(seed)
    scorer = build_scorer(config, hidden, experts)
    scorer.reset_parameters(std=std)
    return scorer


# --------------------------------------------------------------------------------------------
# Reference formulas, written independently of the modules
# --------------------------------------------------------------------------------------------


def l2r_reference(scorer, x):
    cfg = scorer.config
    x = x.double()
    if cfg.input_norm == "rms":
        x = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)
    q = x @ scorer.query_proj.double().t()
    out = torch.empty(x.shape[0], scorer.num_experts, dtype=torch.float64)
    gamma = scorer.phi_gamma.double()
    for t in range(x.shape[0]):
        qn = q[t].norm()
        if cfg.phi == "affine_tanh":
            phi = gamma * (1 + scorer.phi_beta.double() * torch.tanh(qn))
        else:
            phi = gamma * torch.tanh(qn / gamma)
        for e in range(scorer.num_experts):
            scores = []
            for m in range(cfg.num_anchors):
                k = scorer.anchors[e, m].double()
                cos = (q[t] @ k) / (qn * k.norm())
                psi = 1 + (k.norm() - 1) / cfg.anchor_norm_p
                scores.append(phi * psi * cos / cfg.temperature)
            scores = torch.stack(scores)
            out[t, e] = torch.logsumexp(scores, 0) if cfg.anchor_reduce == "logsumexp" else scores.max()
    return out


@pytest.mark.parametrize(
    "config",
    [
        L2RConfig(rank=5, num_anchors=3),
        L2RConfig(rank=5, num_anchors=2, phi="tanh", anchor_reduce="max", input_norm="none", temperature=0.7),
    ],
    ids=["repro", "ours"],
)
def test_l2r_matches_reference_formula(config):
    scorer = make(config)
    with torch.no_grad():
        scorer.anchors.mul_(torch.rand_like(scorer.anchors[..., :1]) * 3)  # spread anchor norms
        scorer.phi_beta is not None and scorer.phi_beta.fill_(0.7)
        scorer.phi_gamma.fill_(1.3)
    x = torch.randn(9, H)
    torch.testing.assert_close(scorer(x).double(), l2r_reference(scorer, x), rtol=1e-5, atol=1e-5)


def test_prototype_softmax_equals_negative_squared_distance():
    config = SRMoEConfig(scoring="prototype", temperature=0.5)
    scorer = make(config)
    x = torch.randn(11, H)
    distances = torch.cdist(x.double(), scorer.prototypes.double()) ** 2
    expected = torch.softmax(-distances / 0.5, dim=-1)
    torch.testing.assert_close(torch.softmax(scorer(x).double(), -1), expected, rtol=1e-5, atol=1e-6)


def test_cosine_matches_reference():
    scorer = make(CosineRouterConfig(dim=4, temperature=0.2))
    x = torch.randn(7, H)
    q = F.normalize(x @ scorer.proj.t(), dim=-1)
    e = F.normalize(scorer.embeddings, dim=-1)
    torch.testing.assert_close(scorer(x), q @ e.t() / 0.2)


# --------------------------------------------------------------------------------------------
# Lipschitz bounds
# --------------------------------------------------------------------------------------------

FINITE_BOUND_CONFIGS = [
    LinearRouterConfig(),
    SRMoEConfig(),
    SRMoEConfig(spectral_mode="constrain", spectral_bound=0.5),
    SRMoEConfig(scoring="prototype", temperature=0.3),
    L2RConfig(rank=6, num_anchors=3, phi="tanh", input_norm="none"),
    L2RConfig(rank=6, num_anchors=2, phi="tanh", input_norm="none", anchor_reduce="max", temperature=0.5),
    L2RConfig(rank=6, num_anchors=2, phi="tanh", input_norm="rms"),
]


@pytest.mark.parametrize("config", FINITE_BOUND_CONFIGS, ids=lambda c: c.to_json_string())
def test_lipschitz_bound_holds_on_random_pairs(config):
    scorer = make(config)
    bound = scorer.lipschitz_bound()
    assert torch.isfinite(bound) and bound > 0
    torch.manual_seed(1)
    worst = 0.0
    for scale in (1e-3, 0.1, 1.0, 10.0):
        x = torch.randn(256, H) * scale
        for step in (1e-4, 1e-2, 1.0):
            y = x + step * scale * torch.randn_like(x)
            ratio = (scorer(x).double() - scorer(y).double()).norm(dim=-1) / (x - y).double().norm(dim=-1)
            worst = max(worst, float(ratio.max().detach()))
    assert worst <= float(bound) * (1 + 1e-4)
    if config.router_type in ("linear", "sr_moe"):
        assert worst >= 0.5 * float(bound)  # affine maps attain their bound: the bound is tight


def test_lipschitz_bound_is_infinite_where_none_exists():
    assert math.isinf(make(L2RConfig(rank=4, num_anchors=2)).lipschitz_bound())  # affine_tanh: jump at q = 0
    assert math.isinf(make(CosineRouterConfig(dim=4)).lipschitz_bound())
    # Witness: two inputs arbitrarily close around the origin with logits far apart.
    scorer = make(L2RConfig(rank=4, num_anchors=1, input_norm="none"))
    direction = torch.randn(1, H)
    gap = (scorer(1e-6 * direction) - scorer(-1e-6 * direction)).norm()
    assert gap > 0.1


# --------------------------------------------------------------------------------------------
# SR-MoE spectral control
# --------------------------------------------------------------------------------------------


def test_stable_rank_equals_svd_definition():
    scorer = make(SRMoEConfig())
    singular = torch.linalg.svdvals(scorer.weight.double())
    expected = (singular**2).sum() / singular[0] ** 2
    torch.testing.assert_close(scorer.stable_rank().double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(stable_rank(torch.diag(torch.tensor([3.0, 1.0]))), torch.tensor(10.0 / 9.0))
    terms = scorer.regularization_terms()
    torch.testing.assert_close(terms["stable_rank"].double(), 1 - expected / min(E, H), rtol=1e-5, atol=0)


@pytest.mark.parametrize("sigma_method", ["exact", "power"])
def test_constrain_keeps_spectral_norm_below_bound_after_optimizer_steps(sigma_method):
    bound = 0.8
    scorer = make(
        SRMoEConfig(
            spectral_mode="constrain", spectral_bound=bound, sigma_method=sigma_method, power_iterations=3
        )
    )
    scorer.train()
    optimizer = torch.optim.SGD(scorer.parameters(), lr=0.5)
    x = torch.randn(64, H)
    for _ in range(30):
        loss = -scorer(x).pow(2).mean()  # pushes the weights to grow without limit
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Training forwards advance the power iteration to the final weights (σ̂ tracks σ from below).
    for _ in range(1 if sigma_method == "exact" else 20):
        scorer(x)
    raw_sigma = torch.linalg.matrix_norm(scorer.weight.detach(), ord=2)
    assert raw_sigma > 2 * bound  # the raw parameter did grow ...
    effective = torch.linalg.matrix_norm(scorer.effective_matrix().detach(), ord=2)
    slack = 1e-5 if sigma_method == "exact" else 1e-3  # power iteration under-estimates σ slightly
    assert effective <= bound * (1 + slack)  # ... but the matrix that routes stayed bounded
    assert scorer.lipschitz_bound() <= bound * (1 + slack)


def test_penalty_pulls_spectral_norm_back_to_bound():
    scorer = make(SRMoEConfig(spectral_mode="penalty", spectral_bound=0.5, stable_rank_weight=0.0))
    with torch.no_grad():
        scorer.spectral_bound.fill_(0.5)
    sigma0 = float(scorer.spectral_norm())
    assert sigma0 > 0.5
    terms = scorer.regularization_terms()
    torch.testing.assert_close(
        terms["spectral"], torch.tensor((sigma0 - 0.5 * (1 + 1e-6)) ** 2), rtol=1e-4, atol=0
    )
    optimizer = torch.optim.SGD(scorer.parameters(), lr=0.1)
    for _ in range(200):
        optimizer.zero_grad()
        (scorer.regularization_loss() / scorer.config.spectral_weight).backward()
        optimizer.step()
    assert abs(float(scorer.spectral_norm()) - 0.5) < 0.02


def test_power_iteration_converges_to_exact_sigma():
    scorer = make(SRMoEConfig(sigma_method="power", spectral_mode="penalty", power_iterations=1))
    with torch.no_grad():
        scorer.power_u.copy_(F.normalize(torch.randn(E), dim=0))  # forget the exact start
    scorer.train()
    x = torch.randn(4, H)
    for _ in range(50):
        scorer(x)
    sigma_hat = scorer._sigma(scorer.weight.float(), update=False)
    torch.testing.assert_close(
        sigma_hat, torch.linalg.matrix_norm(scorer.weight.detach(), ord=2), rtol=1e-3, atol=0
    )


def test_default_bound_is_sigma_at_init_and_routing_is_unchanged():
    weight = torch.randn(E, H)
    for mode in ("penalty", "constrain", "none"):
        scorer = build_scorer(SRMoEConfig(spectral_mode=mode), H, E)
        scorer.init_from_dense(weight)
        torch.testing.assert_close(scorer.spectral_bound, torch.linalg.matrix_norm(weight, ord=2))
        x = torch.randn(10, H)
        assert torch.equal(scorer(x), F.linear(x, weight))
        if mode == "penalty":
            assert scorer.regularization_terms()["spectral"] == 0


# --------------------------------------------------------------------------------------------
# L2R numerics and conversion
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phi", ["affine_tanh", "tanh"])
@pytest.mark.parametrize("input_norm", ["rms", "none"])
def test_l2r_logits_finite_and_bounded_for_zero_and_huge_inputs(phi, input_norm):
    scorer = make(L2RConfig(rank=6, num_anchors=4, phi=phi, input_norm=input_norm))
    bound = scorer.logit_bound()
    for x in (torch.zeros(3, H), 1e4 * torch.randn(5, H), torch.full((2, H), 1e4), 1e-30 * torch.randn(2, H)):
        logits = scorer(x)
        assert torch.isfinite(logits).all()
        assert logits.abs().max() <= bound + 1e-4
    # gradients stay finite at the origin too
    x = torch.zeros(2, H, requires_grad=True)
    scorer(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_l2r_full_rank_single_anchor_converts_gate_with_high_agreement():
    torch.manual_seed(3)
    weight = torch.randn(E, H)
    scorer = build_scorer(L2RConfig(rank=E, num_anchors=1), H, E)
    scorer.init_from_dense(weight)
    x = torch.randn(2000, H)
    ref = F.linear(x, weight).topk(2, dim=-1).indices
    new = scorer(x).topk(2, dim=-1).indices
    agreement = (new.unsqueeze(-1) == ref.unsqueeze(-2)).any(-1).float().mean()
    assert agreement > 0.9
    # With equal gate-row norms ψ is the same for every expert: the ranking is exactly preserved.
    scorer.init_from_dense(F.normalize(weight, dim=-1) * 2.0)
    ref = F.linear(x, F.normalize(weight, dim=-1)).argsort(dim=-1)
    assert torch.equal(scorer(x).argsort(dim=-1), ref)


def test_l2r_rank_above_hidden_size_is_rejected():
    with pytest.raises(
        ValueError, match=r"L2RConfig.rank must be between 1 and the model's hidden size 24; got 30"
    ):
        build_scorer(L2RConfig(rank=30), H, E)


def test_routing_math_stays_float32_under_bf16_autocast():
    for config in (SRMoEConfig(), L2RConfig(rank=4, num_anchors=2), CosineRouterConfig(dim=4)):
        scorer = make(config)
        x = torch.randn(5, H)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = scorer(x.bfloat16())
            loss = scorer.regularization_loss()
        assert logits.dtype == torch.float32 and loss.dtype == torch.float32
        torch.testing.assert_close(logits, scorer(x.bfloat16().float()))


def test_scale_logits_is_exact_for_affine_tanh_and_cosine():
    x = torch.randn(8, H)
    for config in (L2RConfig(rank=4, num_anchors=1), CosineRouterConfig(dim=4)):
        scorer = make(config)
        before = scorer(x)
        assert scorer.scale_logits_(2.5)
        torch.testing.assert_close(scorer(x), 2.5 * before, rtol=1e-5, atol=1e-6)
    assert not make(L2RConfig(rank=4, phi="tanh")).scale_logits_(2.0)


LOCAL_BOUND_CONFIGS = [
    SRMoEConfig(scoring="prototype"),
    L2RConfig(rank=6, num_anchors=3),
    L2RConfig(rank=6, num_anchors=2, phi="tanh", input_norm="none", anchor_reduce="max"),
    CosineRouterConfig(dim=5, temperature=0.4),
]


@pytest.mark.parametrize("config", LOCAL_BOUND_CONFIGS, ids=lambda c: c.to_json_string())
def test_local_lipschitz_bound_dominates_the_jacobian_norm(config):
    scorer = make(config)
    with torch.no_grad():
        if hasattr(scorer, "phi_beta") and scorer.phi_beta is not None:
            scorer.phi_beta.fill_(0.6)
    torch.manual_seed(2)
    x = torch.cat([torch.randn(6, H), 0.05 * torch.randn(3, H), 20 * torch.randn(3, H)])
    bounds = scorer.local_lipschitz_bound(x)
    assert bounds.shape == (x.shape[0],) and torch.isfinite(bounds).all()
    for t in range(x.shape[0]):
        jacobian = torch.autograd.functional.jacobian(lambda v: scorer(v.unsqueeze(0))[0], x[t])
        assert torch.linalg.matrix_norm(jacobian, ord=2) <= bounds[t] * (1 + 1e-4) + 1e-6
