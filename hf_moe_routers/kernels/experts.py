"""The ``"hf_moe_routers"`` experts implementation for transformers 5.x MoE models.

transformers routes every ``@use_experts_implementation`` experts module (Mixtral, Qwen2/3-MoE,
OLMoE, gpt-oss, ...) through ``ALL_EXPERTS_FUNCTIONS[config._experts_implementation]``. After
``register_experts_implementation()``, ``model.set_experts_implementation("hf_moe_routers")`` (or
``from_pretrained(..., experts_implementation="hf_moe_routers")``) makes those modules call
``hf_moe_routers_experts_forward``: our routing metadata, permute and combine (Triton on CUDA) around
two grouped GEMMs (``torch._grouped_mm`` where it applies).

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T * K pairs.
"""

from __future__ import annotations

import torch
import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from hf_moe_routers.kernels._backend import Backend, resolve_backend, triton_available
from hf_moe_routers.kernels.dispatch import combine, permute, routing_metadata

EXPERTS_IMPLEMENTATION_NAME = "hf_moe_routers"


def _aligned_for_native_grouped_mm(*tensors: torch.Tensor) -> bool:
    """The CPU ``grouped_mm`` kernel needs 16-byte aligned data pointers and strides."""
    for tensor in tensors:
        size = tensor.element_size()
        if tensor.data_ptr() % 16 != 0:
            return False
        if any(stride != 1 and (stride * size) % 16 != 0 for stride in tensor.stride()):
            return False
    return True


def _native_grouped_mm_ok(input_NK: torch.Tensor, weight_EKM: torch.Tensor) -> bool:
    native = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")
    if not native:
        return False
    if torch.compiler.is_compiling() and weight_EKM.dtype != torch.bfloat16:
        return False  # inductor lowers grouped_mm for bf16 only
    if weight_EKM.device.type == "cuda":
        return torch.cuda.get_device_capability(weight_EKM.device) >= (8, 0)
    if weight_EKM.device.type == "cpu":
        # The output's row stride is M elements, so M must be 16-byte aligned too.
        out_row_bytes = weight_EKM.shape[-1] * weight_EKM.element_size()
        return out_row_bytes % 16 == 0 and _aligned_for_native_grouped_mm(input_NK, weight_EKM)
    return True


def grouped_mm(input_NK: torch.Tensor, weight_EKM: torch.Tensor, group_ends_E: torch.Tensor) -> torch.Tensor:
    """Rows ``group_ends_E[e-1]:group_ends_E[e]`` of ``input_NK`` times ``weight_EKM[e]``.

    The seam for the expert GEMMs: ``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm`` where
    they apply, else transformers' per-expert loop op (opaque to ``torch.compile``). Rows past
    ``group_ends_E[-1]`` (sentinel pairs) are left uninitialised, in the output and in the input
    gradient.

    Args:
        input_NK: ``[N, K_in]`` rows in expert order (cast to ``weight_EKM``'s dtype).
        weight_EKM: ``[E, K_in, M]``.
        group_ends_E: int32 ``[E]`` inclusive end row of each expert.

    Returns:
        ``[N, M]``.
    """
    input_NK = input_NK.to(weight_EKM.dtype)
    if _native_grouped_mm_ok(input_NK, weight_EKM):
        if hasattr(torch.nn.functional, "grouped_mm"):
            return torch.nn.functional.grouped_mm(input_NK, weight_EKM, offs=group_ends_E)
        return torch._grouped_mm(input_NK, weight_EKM, offs=group_ends_E)
    return torch.ops.transformers.grouped_mm_fallback(input_NK, weight_EKM, offs=group_ends_E)


def _grouped_linear(
    x_NK: torch.Tensor,
    weight: torch.Tensor,
    group_ends_E: torch.Tensor,
    bias_NM: torch.Tensor | None,
    is_transposed: bool,
) -> torch.Tensor:
    """``x @ W_e^T + b_e`` per expert group; ``weight`` is ``[E, M, K]``, or ``[E, K, M]`` if transposed."""
    out_NM = grouped_mm(x_NK, weight if is_transposed else weight.transpose(-2, -1), group_ends_E)
    return out_NM if bias_NM is None else out_NM + bias_NM


def hf_moe_routers_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Experts forward with our dispatch; drop-in for transformers' ``grouped_mm`` implementation.

    ``self`` is the experts module. Honoured attributes: ``num_experts``, ``has_gate`` (fused
    ``gate_up_proj`` + ``_apply_gate``, else ``up_proj`` + ``act_fn``), ``has_bias``,
    ``is_transposed``, ``has_post_expert_norm`` and ``_is_expert_parallel`` (ids ``>= num_experts``
    are sentinels: they cost no GEMM rows and contribute nothing). A custom ``_apply_gate`` (gpt-oss:
    interleaved, clamped) is called as is, so ``is_concatenated`` needs no handling here.

    Args:
        hidden_states: ``[T, H]``.
        top_k_index: ``[T, K]`` expert ids (gpt-oss passes it positionally as ``router_indices``).
        top_k_weights: ``[T, K]`` routing weights; gradients flow into them.
        backend: dispatch backend override, see ``dispatch``.

    Returns:
        ``[T, H]`` in ``hidden_states``' dtype.
    """
    num_experts = self.num_experts
    backend = resolve_backend(hidden_states.device, backend)
    metadata = routing_metadata(top_k_index, num_experts, backend=backend)
    group_ends_E = metadata.offsets_E1[1:]
    if group_ends_E.is_cuda:
        # A fresh buffer rather than a view at a 4-byte offset: GPU grouped GEMMs may assume alignment.
        group_ends_E = group_ends_E.clone()
    x_NH = permute(hidden_states, metadata, backend=backend)

    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    is_transposed = getattr(self, "is_transposed", False)
    sentinel_N1 = None
    if getattr(self, "_is_expert_parallel", False):
        rows_N = torch.arange(x_NH.shape[0], device=x_NH.device)
        sentinel_N1 = (rows_N >= metadata.offsets_E1[-1]).unsqueeze(-1)
    expert_of_row_N = None
    if has_bias:
        # Sentinel rows get a clamped (valid, ignored) expert so the bias gather stays in bounds.
        flat_ids_N = top_k_index.reshape(-1)
        expert_of_row_N = flat_ids_N[metadata.sorted_pair_N.long()].clamp(0, num_experts - 1)

    first_weight = self.gate_up_proj if has_gate else self.up_proj
    first_bias = None
    if expert_of_row_N is not None:
        first_bias = (self.gate_up_proj_bias if has_gate else self.up_proj_bias)[expert_of_row_N]
    h_N2I = _grouped_linear(x_NH, first_weight, group_ends_E, first_bias, is_transposed)
    if sentinel_N1 is not None:
        # The grouped GEMM leaves sentinel rows uninitialised; masking here also zeroes their
        # gradient on the way back (transformers does the same).
        h_N2I = h_N2I.masked_fill(sentinel_N1, 0.0)
    h_NI = self._apply_gate(h_N2I) if has_gate else self.act_fn(h_N2I)

    down_bias = self.down_proj_bias[expert_of_row_N] if expert_of_row_N is not None else None
    y_NH = _grouped_linear(h_NI, self.down_proj, group_ends_E, down_bias, is_transposed)
    if sentinel_N1 is not None:
        y_NH = y_NH.masked_fill(sentinel_N1, 0.0)
    if getattr(self, "has_post_expert_norm", False):
        y_NH = self.post_expert_norm(y_NH)

    out_TH = combine(y_NH, top_k_weights, metadata, backend=backend)
    return out_TH.to(hidden_states.dtype)


def register_experts_implementation(name: str = EXPERTS_IMPLEMENTATION_NAME) -> str:
    """Register ``hf_moe_routers_experts_forward`` in transformers' ``ALL_EXPERTS_FUNCTIONS``.

    Idempotent. Afterwards ``model.set_experts_implementation(name)`` or
    ``from_pretrained(..., experts_implementation=name)`` selects it. The name is not saved in
    ``config.json`` (transformers does not save it), so re-apply it after loading.

    Returns:
        The registered name.
    """
    if ALL_EXPERTS_FUNCTIONS.get(name) is not hf_moe_routers_experts_forward:
        ALL_EXPERTS_FUNCTIONS.register(name, hf_moe_routers_experts_forward)
    return name


def preferred_experts_implementation(device: torch.device | str) -> str | None:
    """``"hf_moe_routers"`` (registered) where our Triton dispatch would run, else ``None``.

    For model code that wants the kernel by default on CUDA: ``None`` means keep transformers'
    default. On CUDA without Triton the fallback is logged once.
    """
    device = torch.device(device)
    if device.type == "cuda" and triton_available():
        return register_experts_implementation()
    resolve_backend(device, "auto")  # logs the fallback once
    return None
