"""MoE dispatch kernels: top-k routing, routing metadata, permute, combine, and an experts implementation.

``topk_softmax`` is called by the softmax-top-k routers' forward (``modeling/base.py``); the rest
by the ``"hf_moe_routers"`` experts implementation (``experts.py``).

Triton is optional and imported lazily (only when a Triton kernel is first used); without it every
op runs its pure-torch path and the CUDA fallback is logged once. Nothing outside this package
imports Triton.

Typical use::

    from hf_moe_routers.kernels import register_experts_implementation
    register_experts_implementation()
    model.set_experts_implementation("hf_moe_routers")
"""

from hf_moe_routers.kernels._backend import (
    get_kernel_backend,
    set_kernel_backend,
    triton_available,
    triton_interpreting,
)
from hf_moe_routers.kernels.dispatch import combine, permute, routing_metadata, topk_softmax
from hf_moe_routers.kernels.experts import (
    EXPERTS_IMPLEMENTATION_NAME,
    grouped_mm,
    hf_moe_routers_experts_forward,
    preferred_experts_implementation,
    register_experts_implementation,
)
from hf_moe_routers.kernels.reference import (
    RoutingMetadata,
    reference_combine,
    reference_experts_forward,
    reference_permute,
    reference_routing_metadata,
    reference_topk_softmax,
)

__all__ = [
    "EXPERTS_IMPLEMENTATION_NAME",
    "RoutingMetadata",
    "combine",
    "get_kernel_backend",
    "grouped_mm",
    "hf_moe_routers_experts_forward",
    "permute",
    "preferred_experts_implementation",
    "reference_combine",
    "reference_experts_forward",
    "reference_permute",
    "reference_routing_metadata",
    "reference_topk_softmax",
    "register_experts_implementation",
    "routing_metadata",
    "set_kernel_backend",
    "topk_softmax",
    "triton_available",
    "triton_interpreting",
]
