"""Tests of hf_moe_routers.kernels: every dispatch op against its pure-torch reference, and the
softmax-top-k routers' forward, which routes through ``topk_softmax``.

On a machine without CUDA the Triton kernels run in Triton's numpy interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set below before the kernels module is first imported) in float32 / float64;
the interpreter is slow, so shapes are tiny. ``@pytest.mark.gpu`` tests (deselected by default) cover
bf16 / fp16 on CUDA, determinism and CUDA-graph capture.

Shape legend: T tokens, H hidden, E experts, K top-k, N = T * K pairs.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():
    # Must precede the first import of hf_moe_routers.kernels.triton_ops (loaded lazily on first use).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from conftest import model_inputs, tiny_model
from transformers import (
    GptOssConfig,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PretrainedConfig,
)
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import hf_moe_routers as H
from hf_moe_routers import kernels
from hf_moe_routers.kernels import (
    _backend,
    combine,
    hf_moe_routers_experts_forward,
    permute,
    reference_combine,
    reference_experts_forward,
    reference_permute,
    reference_routing_metadata,
    reference_topk_softmax,
    register_experts_implementation,
    routing_metadata,
    set_kernel_backend,
    topk_softmax,
    triton_available,
    triton_interpreting,
)


def _interpreter_skip_reason() -> str | None:
    if not triton_available():
        return "triton is not installed"
    if not triton_interpreting():
        return "TRITON_INTERPRET is not set (CUDA present: the gpu tests cover the Triton kernels)"
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(_backend.load_triton_ops().kernels.permute_kernel, InterpretedFunction):
        return "the kernels were decorated before TRITON_INTERPRET=1 was set"
    return None


_SKIP_REASON = _interpreter_skip_reason()
interpreter = pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "")
BACKENDS = ["torch", pytest.param("triton", marks=interpreter)]
TOL = dict(atol=1e-5, rtol=1e-5)


def make_index(T: int, E: int, K: int, kind: str, seed: int = 0) -> torch.Tensor:
    """``[T, K]`` int64 expert ids, distinct per token unless the kind says otherwise."""
    gen = torch.Generator().manual_seed(seed)
    index_TK = torch.rand(T, E, generator=gen).argsort(dim=-1)[:, :K]
    if kind == "empty":  # only experts {0, 1, ..., K} receive tokens; the rest get none
        index_TK = torch.rand(T, K + 1, generator=gen).argsort(dim=-1)[:, :K]
    elif kind == "one":  # every token sends slot s to expert s: all of slot 0 lands on expert 0
        index_TK = torch.arange(K).expand(T, K).clone()
    elif kind == "sentinel":  # expert-parallel ids owned by another rank
        index_TK[::3, 0] = E
        index_TK[1::4, -1] = E + 5
    return index_TK


# (T, E, K, kind): T = 1, T not a multiple of any block, T * K above one 128-pair metadata chunk.
ROUTINGS = [
    (1, 4, 2, "random"),
    (37, 8, 3, "random"),
    (50, 4, 1, "random"),
    (9, 4, 4, "random"),  # k = E
    (21, 8, 2, "empty"),
    (64, 8, 1, "one"),
    (23, 6, 2, "sentinel"),
    (45, 4, 4, "sentinel"),
]


def assert_metadata_equal(actual, expected) -> None:
    for name in ("counts_E", "offsets_E1", "sorted_pair_N", "pos_of_pair_N"):
        a, b = getattr(actual, name), getattr(expected, name)
        assert a.dtype == torch.int32, name
        assert torch.equal(a, b), name
    assert actual.top_k == expected.top_k


# ------------------------------------------------------------------------------ the references


@pytest.mark.parametrize("T,E,K,kind", ROUTINGS)
def test_reference_metadata_is_a_stable_grouping(T: int, E: int, K: int, kind: str) -> None:
    """Check the oracle itself against its definition, pair by pair."""
    index_TK = make_index(T, E, K, kind)
    meta = reference_routing_metadata(index_TK, E)
    ids = index_TK.reshape(-1).tolist()
    real = [p for p, e in enumerate(ids) if 0 <= e < E]
    expected_order = sorted(real, key=lambda p: (ids[p], p)) + [p for p in range(len(ids)) if p not in real]
    assert meta.sorted_pair_N.tolist() == expected_order
    assert meta.counts_E.tolist() == [ids.count(e) for e in range(E)]
    assert meta.offsets_E1.tolist() == [sum(ids.count(e) for e in range(f)) for f in range(E + 1)]
    assert torch.equal(meta.sorted_pair_N[meta.pos_of_pair_N.long()], torch.arange(T * K, dtype=torch.int32))


def test_reference_combine_and_permute_by_loops() -> None:
    T, E, K, H = 7, 4, 2, 3
    index_TK = make_index(T, E, K, "sentinel")
    meta = reference_routing_metadata(index_TK, E)
    x_TH, y_NH, w_TK = torch.randn(T, H), torch.randn(T * K, H), torch.rand(T, K)
    x_NH = reference_permute(x_TH, meta)
    out_TH = reference_combine(y_NH, w_TK, meta)
    for t in range(T):
        expected = torch.zeros(H)
        for s in range(K):
            row = int(meta.pos_of_pair_N[t * K + s])
            if index_TK[t, s] < E:
                expected += w_TK[t, s] * y_NH[row]
                assert torch.equal(x_NH[row], x_TH[t])
            else:
                assert torch.equal(x_NH[row], torch.zeros(H))
        torch.testing.assert_close(out_TH[t], expected)


# ------------------------------------------------------------------------------- top-k routing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (19, 8, 2), (6, 5, 5), (33, 16, 3)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_softmax_matches_reference(backend: str, T: int, E: int, K: int, renormalize: bool) -> None:
    logits_TE = torch.randn(E, T).t().requires_grad_()  # non-contiguous
    weights_TK, index_TK = topk_softmax(logits_TE, K, renormalize=renormalize, backend=backend)
    ref_logits = logits_TE.detach().clone().requires_grad_()
    ref_weights, ref_index = reference_topk_softmax(ref_logits, K, renormalize)
    assert weights_TK.dtype == torch.float32 and index_TK.dtype == torch.int64
    assert torch.equal(index_TK, ref_index)
    torch.testing.assert_close(weights_TK, ref_weights, **TOL)
    grad_TK = torch.randn(T, K)
    weights_TK.backward(grad_TK)
    ref_weights.backward(grad_TK)
    torch.testing.assert_close(logits_TE.grad, ref_logits.grad, **TOL)


@interpreter
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_softmax_gradcheck(renormalize: bool) -> None:
    logits_TE = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda logits: topk_softmax(logits, 3, renormalize=renormalize, backend="triton")[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits_TE,))


# ------------------------------------------------------------------- the routers' top-k step

#: The families whose router forward is ``SoftmaxTopKRoutedRouter.forward`` (modeling/base.py), with
#: whether their tiny config renormalises the top-k weights (``tests/conftest.py``).
SOFTMAX_FAMILIES = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True, "olmoe": False}


def _host_and_routed(family: str, dtype: torch.dtype) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """The host routers of a tiny model and the routers of a linear-routed copy of it."""
    host = tiny_model(family).to(dtype)
    routed = H.patch_moe_routers(copy.deepcopy(host), H.LinearRouterConfig())
    host_routers = [m for n, m in host.named_modules() if n.endswith("mlp.gate")]
    return host_routers, [router for _, router in routed.routed_routers()]


@pytest.mark.parametrize("family", list(SOFTMAX_FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_routed_softmax_router_equals_the_host_router_bit_for_bit(family: str, dtype: torch.dtype) -> None:
    """On CPU the op's torch path is the host's own softmax -> topk -> divide: outputs, dtypes and
    gradients are bit-identical (zero inputs give all-tied probabilities, so ties are covered)."""
    host_routers, routed_routers = _host_and_routed(family, dtype)
    assert len(host_routers) == len(routed_routers) > 0
    x_TH = torch.randn(23, host_routers[0].hidden_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    x_TH[:3] = 0.0
    for host_router, routed_router in zip(host_routers, routed_routers):
        results = []
        for router, weight in (
            (host_router, host_router.weight),
            (routed_router, routed_router.scorer.weight),
        ):
            x = x_TH.clone().requires_grad_()
            weight.grad = None
            logits_TE, weights_TK, index_TK = router(x)
            (logits_TE.float().sin().sum() + (weights_TK.float() * torch.arange(1.0, 3.0)).sum()).backward()
            results.append((logits_TE, weights_TK, index_TK, x.grad, weight.grad))
        for name, ours, theirs in zip(("logits", "weights", "index", "dx", "dW"), results[1], results[0]):
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), (family, name)


@pytest.mark.parametrize("family", list(SOFTMAX_FAMILIES))
def test_routed_softmax_router_forward_goes_through_topk_softmax(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router's top-k step is the kernels' op, called once per layer with the family's flag."""
    calls: list[tuple[tuple[int, ...], int, bool]] = []
    op = kernels.topk_softmax

    def spy(logits_TE: torch.Tensor, top_k: int, **kwargs: bool) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((tuple(logits_TE.shape), top_k, kwargs["renormalize"]))
        return op(logits_TE, top_k, **kwargs)

    model = H.patch_moe_routers(tiny_model(family), H.LinearRouterConfig())
    monkeypatch.setattr(kernels, "topk_softmax", spy)
    with torch.no_grad():
        model(**model_inputs(family))
    tokens, experts = 2 * 7, 6
    assert calls == [((tokens, experts), 2, SOFTMAX_FAMILIES[family])] * model.config.num_hidden_layers


@interpreter
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_routed_softmax_router_runs_the_triton_kernel_when_selected(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the Triton backend (the interpreter here, CUDA in use) the router runs the fused kernel
    forward and backward, and the model matches the torch path."""
    ops = _backend.load_triton_ops()
    launches: list[str] = []
    for name in ("topk_softmax_op", "topk_softmax_backward_op"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, _f=original, _n=name: launches.append(_n) or _f(*args))
    model = H.patch_moe_routers(tiny_model(family), H.SRMoEConfig())
    inputs = model_inputs(family)
    results = []
    for backend in ("torch", "triton"):
        model.zero_grad()
        set_kernel_backend(backend)
        try:
            out = model(**inputs, labels=inputs["input_ids"], output_router_logits=True)
            out.loss.backward()
        finally:
            set_kernel_backend(None)
        results.append(
            (out.logits.detach(), [p.grad.clone() for _, r in model.routed_routers() for p in r.parameters()])
        )
    layers = model.config.num_hidden_layers
    assert launches == ["topk_softmax_op"] * layers + ["topk_softmax_backward_op"] * layers
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    for ours, torch_path in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(ours, torch_path, atol=1e-4, rtol=1e-4)


def test_remote_code_topk_softmax_is_the_reference_bit_for_bit() -> None:
    """Remote code has no kernels: its ``topk_softmax`` is a torch expression that must equal the
    op's torch path for the logits the router passes (any float dtype but float64)."""
    from hf_moe_routers.modeling.remote_code import EXCLUDED_MODULES

    fallback = eval(EXCLUDED_MODULES["hf_moe_routers.kernels"]["topk_softmax"], {"torch": torch})  # noqa: S307
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits_TE = (torch.randn(31, 8, generator=generator) * 4).to(dtype)
        logits_TE[:2] = 0.0
        for renormalize in (False, True):
            ours, ref = fallback(logits_TE, 3, renormalize), reference_topk_softmax(logits_TE, 3, renormalize)
            assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(ours, ref))
    assert all(
        torch.equal(a, b) for a, b in zip(fallback(logits_TE, 2), reference_topk_softmax(logits_TE, 2))
    )


# ----------------------------------------------------------------------------- routing metadata


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,K,kind", ROUTINGS + [(100, 6, 3, "random"), (40, 130, 4, "random")])
def test_routing_metadata_matches_reference(backend: str, T: int, E: int, K: int, kind: str) -> None:
    index_TK = make_index(T, E, K, kind)
    assert_metadata_equal(
        routing_metadata(index_TK, E, backend=backend), reference_routing_metadata(index_TK, E)
    )


# ---------------------------------------------------------------------------- permute / combine


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,K,kind", ROUTINGS)
@pytest.mark.parametrize("H", [48])
def test_permute_matches_reference(backend: str, T: int, E: int, K: int, kind: str, H: int) -> None:
    meta = reference_routing_metadata(make_index(T, E, K, kind), E)
    x_TH = torch.randn(H, T).t().requires_grad_()  # non-contiguous
    x_NH = permute(x_TH, meta, backend=backend)
    ref_x = x_TH.detach().clone().requires_grad_()
    expected_NH = reference_permute(ref_x, meta)
    assert torch.equal(x_NH, expected_NH)
    # Garbage in sentinel rows of the incoming gradient must not reach dx.
    grad_NH = torch.randn(T * K, H)
    grad_NH[int(meta.offsets_E1[-1]) :] = float("nan")
    x_NH.backward(grad_NH)
    expected_NH.backward(grad_NH)
    torch.testing.assert_close(x_TH.grad, ref_x.grad, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,K,kind", ROUTINGS)
@pytest.mark.parametrize("H", [32, 48])
def test_combine_matches_reference(backend: str, T: int, E: int, K: int, kind: str, H: int) -> None:
    meta = reference_routing_metadata(make_index(T, E, K, kind), E)
    y_wide = torch.randn(T * K, 2 * H)
    # Sentinel rows hold what a grouped GEMM leaves there: uninitialised memory, here NaN.
    y_wide[int(meta.offsets_E1[-1]) :] = float("nan")
    y_NH = y_wide[:, ::2].requires_grad_()  # non-contiguous: column stride 2
    w_TK = torch.rand(T, K, requires_grad=True)
    out_TH = combine(y_NH, w_TK, meta, backend=backend)
    ref_y, ref_w = y_NH.detach().clone().requires_grad_(), w_TK.detach().clone().requires_grad_()
    expected_TH = reference_combine(ref_y, ref_w, meta)
    torch.testing.assert_close(out_TH, expected_TH, **TOL)
    grad_TH = torch.randn(T, H)
    out_TH.backward(grad_TH)
    expected_TH.backward(grad_TH)
    torch.testing.assert_close(w_TK.grad, ref_w.grad, **TOL)
    torch.testing.assert_close(y_NH.grad, ref_y.grad, **TOL)
    assert torch.isfinite(y_NH.grad).all()


@interpreter
def test_permute_and_combine_gradcheck() -> None:
    T, E, K, H = 5, 4, 2, 8
    meta = routing_metadata(make_index(T, E, K, "sentinel"), E, backend="triton")
    x_TH = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: permute(x, meta, backend="triton"), (x_TH,))
    y_NH = torch.randn(T * K, H, dtype=torch.float64, requires_grad=True)
    w_TK = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: combine(y, w, meta, backend="triton"), (y_NH, w_TK))


@interpreter
def test_custom_ops_pass_opcheck() -> None:
    """Schemas, fake kernels and autograd registration are consistent (what torch.compile relies on)."""
    ops = _backend.load_triton_ops()
    meta = routing_metadata(make_index(6, 4, 2, "random"), 4, backend="triton")
    y_NH, w_TK = torch.randn(12, 8, requires_grad=True), torch.rand(6, 2, requires_grad=True)
    torch.library.opcheck(ops.combine_op, (y_NH, w_TK, meta.pos_of_pair_N, meta.offsets_E1))
    torch.library.opcheck(
        ops.permute_op, (torch.randn(6, 8, requires_grad=True), meta.pos_of_pair_N, meta.offsets_E1, 2)
    )
    torch.library.opcheck(ops.routing_metadata_op, (make_index(6, 4, 2, "random"), 4))
    torch.library.opcheck(ops.topk_softmax_op, (torch.randn(6, 4, requires_grad=True), 2, True))


@interpreter
def test_pipeline_compiles_without_graph_breaks() -> None:
    def route_and_dispatch(logits_TE: torch.Tensor, x_TH: torch.Tensor) -> torch.Tensor:
        weights_TK, index_TK = topk_softmax(logits_TE, 2, renormalize=True, backend="triton")
        meta = routing_metadata(index_TK, 4, backend="triton")
        return combine(permute(x_TH, meta, backend="triton") * 2.0, weights_TK, meta, backend="triton")

    compiled = torch.compile(route_and_dispatch, backend="aot_eager", fullgraph=True)
    logits_TE, x_TH = torch.randn(9, 4, requires_grad=True), torch.randn(9, 16, requires_grad=True)
    out_TH = compiled(logits_TE, x_TH)
    out_TH.square().sum().backward()
    ref_logits, ref_x = logits_TE.detach().clone().requires_grad_(), x_TH.detach().clone().requires_grad_()
    expected_TH = route_and_dispatch(ref_logits, ref_x)
    expected_TH.square().sum().backward()
    torch.testing.assert_close(out_TH, expected_TH, **TOL)
    torch.testing.assert_close(logits_TE.grad, ref_logits.grad, **TOL)
    torch.testing.assert_close(x_TH.grad, ref_x.grad, **TOL)


# ------------------------------------------------------------------------- experts implementation


@use_experts_implementation(has_gate=False, has_post_expert_norm=True)
class UngatedNormedExperts(torch.nn.Module):
    """A NemotronH-like layout (``up_proj`` + activation, no gate) with a post-expert norm."""

    def __init__(self, config: PretrainedConfig, hidden: int = 12, intermediate: int = 20) -> None:
        super().__init__()
        self.num_experts = 6
        self.up_proj = torch.nn.Parameter(torch.empty(self.num_experts, intermediate, hidden))
        self.down_proj = torch.nn.Parameter(torch.empty(self.num_experts, hidden, intermediate))
        self.act_fn = torch.nn.functional.gelu
        self.post_expert_norm = torch.nn.LayerNorm(hidden)


def _tiny_experts(family: str, expert_parallel: bool = False) -> tuple[torch.nn.Module, int]:
    """(experts module, hidden size) of one layout family."""
    torch.manual_seed(0)
    if family == "mixtral":
        experts, hidden = (
            MixtralExperts(MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=6)),
            16,
        )
    elif family == "mixtral_odd":  # sizes that rule out the aligned native grouped_mm on CPU
        experts, hidden = (
            MixtralExperts(MixtralConfig(hidden_size=10, intermediate_size=7, num_local_experts=6)),
            10,
        )
    elif family == "gpt_oss":  # transposed, biased, interleaved gate/up with a clamped custom gate
        experts, hidden = (
            GptOssExperts(GptOssConfig(hidden_size=16, intermediate_size=24, num_local_experts=6)),
            16,
        )
    else:
        experts, hidden = UngatedNormedExperts(PretrainedConfig()), 12
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0.0, 0.3)
    experts._is_expert_parallel = expert_parallel
    return experts, hidden


EXPERT_CASES = [("mixtral", "random"), ("mixtral", "sentinel"), ("mixtral_odd", "one"), ("gpt_oss", "empty"),
                ("gpt_oss", "sentinel"), ("ungated", "random")]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,kind", EXPERT_CASES)
def test_experts_forward_matches_reference(backend: str, family: str, kind: str) -> None:
    experts, hidden = _tiny_experts(family, expert_parallel=kind == "sentinel")
    T, K = 11, 2
    index_TK = make_index(T, 6, K, kind)
    x_TH, w_TK = torch.randn(T, hidden), torch.rand(T, K)
    grads = []
    ours = lambda *args: hf_moe_routers_experts_forward(*args, backend=backend)  # noqa: E731
    for forward in (ours, reference_experts_forward):
        experts.zero_grad()
        x, w = x_TH.clone().requires_grad_(), w_TK.clone().requires_grad_()
        out_TH = forward(experts, x, index_TK, w)
        out_TH.square().sum().backward()
        grads.append([out_TH, x.grad, w.grad] + [p.grad.clone() for p in experts.parameters()])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_forward_compiles_without_graph_breaks(backend: str) -> None:
    experts, hidden = _tiny_experts("mixtral")
    index_TK, w_TK = make_index(9, 6, 2, "random"), torch.rand(9, 2, requires_grad=True)
    x_TH = torch.randn(9, hidden, requires_grad=True)
    forward = lambda x, index, w: hf_moe_routers_experts_forward(experts, x, index, w, backend=backend)  # noqa: E731
    out_TH = torch.compile(forward, fullgraph=True, backend="aot_eager")(x_TH, index_TK, w_TK)
    out_TH.sum().backward()
    torch.testing.assert_close(out_TH, reference_experts_forward(experts, x_TH, index_TK, w_TK), **TOL)
    assert x_TH.grad is not None and w_TK.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_whole_model_matches_eager(backend: str, family: str) -> None:
    """Forward and backward of a tiny model: "hf_moe_routers" equals "eager" in logits, loss and grads."""
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100)  # fmt: skip
    torch.manual_seed(0)
    if family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4))
    else:
        model = OlmoeForCausalLM(OlmoeConfig(**common, num_experts=4, num_experts_per_tok=2))
    register_experts_implementation()
    input_ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    results = []
    for implementation in ("eager", "hf_moe_routers"):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        set_kernel_backend(backend)
        try:
            out = model(input_ids, labels=input_ids, output_router_logits=True)
            out.loss.backward()
        finally:
            set_kernel_backend(None)
        results.append(
            (out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        )
    (eager_logits, eager_loss, eager_grads), (ours_logits, ours_loss, ours_grads) = results
    torch.testing.assert_close(ours_logits, eager_logits, **TOL)
    torch.testing.assert_close(ours_loss, eager_loss, **TOL)
    assert eager_grads.keys() == ours_grads.keys()
    for name, grad in eager_grads.items():
        assert (grad is None) == (ours_grads[name] is None), name
        if grad is not None:
            torch.testing.assert_close(ours_grads[name], grad, **TOL, msg=name)


def test_register_is_idempotent_and_selectable() -> None:
    assert register_experts_implementation() == "hf_moe_routers"
    assert register_experts_implementation() == "hf_moe_routers"
    assert ALL_EXPERTS_FUNCTIONS["hf_moe_routers"] is hf_moe_routers_experts_forward
    assert list(ALL_EXPERTS_FUNCTIONS.keys()).count("hf_moe_routers") == 1


def test_backend_selection_and_fallback_message(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    with pytest.raises(ValueError):
        set_kernel_backend("cuda-graphs")
    assert _backend.resolve_backend(torch.device("cpu"), "torch") == "torch"
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    monkeypatch.setattr(_backend, "_said_once", set())
    with caplog.at_level("WARNING", logger=_backend.__name__):
        assert _backend.resolve_backend(torch.device("cuda"), "auto") == "torch"
        assert _backend.resolve_backend(torch.device("cuda"), "auto") == "torch"
    assert sum("falls back to the pure-torch path" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="not installed"):
        _backend.resolve_backend(torch.device("cuda"), "triton")


def test_package_works_without_triton() -> None:
    """Import and run the experts forward in a process where ``import triton`` fails."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # `import triton` now raises ImportError; find_spec returns None
        import torch
        from hf_moe_routers.kernels import reference_routing_metadata, routing_metadata, triton_available
        assert not triton_available()
        index = torch.randint(0, 4, (5, 2))
        assert torch.equal(routing_metadata(index, 4).sorted_pair_N, reference_routing_metadata(index, 4).sorted_pair_N)
        try:
            routing_metadata(index, 4, backend="triton")
        except RuntimeError as error:
            assert "not installed" in str(error)
        else:
            raise AssertionError("expected a RuntimeError")
        assert not any(m.startswith("triton.") for m in sys.modules)
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not triton_available(), reason="needs CUDA and Triton"
)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,E,K,kind", ROUTINGS + [(4096, 128, 8, "random"), (3000, 64, 8, "empty")])
def test_cuda_ops_match_reference(dtype: torch.dtype, T: int, E: int, K: int, kind: str) -> None:
    index_TK = make_index(T, E, K, kind).cuda()
    meta = routing_metadata(index_TK, E)
    assert_metadata_equal(meta, reference_routing_metadata(index_TK, E))
    x_TH = torch.randn(T, 256, device="cuda", dtype=dtype)
    assert torch.equal(permute(x_TH, meta), reference_permute(x_TH, meta))
    y_NH, w_TK = torch.randn(T * K, 256, device="cuda", dtype=dtype), torch.rand(T, K, device="cuda")
    torch.testing.assert_close(
        combine(y_NH, w_TK, meta), reference_combine(y_NH, w_TK, meta), atol=1e-2, rtol=1e-2
    )
    logits_TE = torch.randn(T, E, device="cuda", dtype=dtype)
    weights_TK, _ = topk_softmax(logits_TE, K, renormalize=True)
    torch.testing.assert_close(
        weights_TK, reference_topk_softmax(logits_TE, K, True)[0], atol=1e-5, rtol=1e-5
    )


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_cuda_experts_bf16_match_grouped_mm_and_are_deterministic(family: str) -> None:
    experts = _tiny_experts(family)[0].cuda().to(torch.bfloat16)
    T, K = 2048, 2
    index_TK = make_index(T, 6, K, "random").cuda()
    x_TH = torch.randn(T, 16, device="cuda", dtype=torch.bfloat16)
    w_TK = torch.rand(T, K, device="cuda")
    runs = []
    for forward in (
        hf_moe_routers_experts_forward,
        hf_moe_routers_experts_forward,
        ALL_EXPERTS_FUNCTIONS["grouped_mm"],
    ):
        experts.zero_grad()
        x, w = x_TH.clone().requires_grad_(), w_TK.clone().requires_grad_()
        out = forward(experts, x, index_TK, w)
        out.float().square().sum().backward()
        runs.append([out, x.grad, w.grad] + [p.grad.clone() for p in experts.parameters()])
    (first, second, grouped) = runs
    # Bitwise repeatable: the dispatch has no atomics (the dW sums are the grouped GEMM's own business).
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])
    for ours, theirs in zip(first, grouped):
        torch.testing.assert_close(ours.float(), theirs.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_cuda_whole_model_matches_eager(family: str) -> None:
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100)  # fmt: skip
    torch.manual_seed(0)
    if family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=8)).cuda()
    else:
        model = OlmoeForCausalLM(OlmoeConfig(**common, num_experts=8, num_experts_per_tok=2)).cuda()
    register_experts_implementation()
    input_ids = torch.randint(0, 100, (4, 33), device="cuda")
    results = []
    for implementation in ("eager", "hf_moe_routers"):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
        results.append((out.logits.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-3, rtol=1e-3)
    for ours, eager in zip(results[1][1], results[0][1]):
        if eager is not None:
            torch.testing.assert_close(ours, eager, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@cuda
def test_cuda_dispatch_is_graph_capturable() -> None:
    """No host sync: the whole dispatch can be captured in a CUDA graph and replayed."""
    index_TK = make_index(512, 16, 4, "random").cuda()
    x_TH, w_TK = torch.randn(512, 128, device="cuda"), torch.rand(512, 4, device="cuda")
    expected = reference_combine(reference_permute(x_TH, reference_routing_metadata(index_TK, 16)), w_TK,
                                 reference_routing_metadata(index_TK, 16))  # fmt: skip
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        meta = routing_metadata(index_TK, 16)
        combine(permute(x_TH, meta), w_TK, meta)  # warm up (JIT compile) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        meta = routing_metadata(index_TK, 16)
        out_TH = combine(permute(x_TH, meta), w_TK, meta)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out_TH, expected, atol=1e-5, rtol=1e-5)
