"""A patch-and-compare demo on tiny models built from configs (no downloads).

For each router: patch a tiny Mixtral-shaped model, report top-k agreement with the original
router, distil the router, save, reload with ``AutoModelForCausalLM`` and check the logits match.
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from ..distillation import distill_router
from ..patching import patch_moe_routers
from ..routers import CosineRouterConfig, L2RConfig, LinearRouterConfig, RouterConfig, SRMoEConfig


def _tiny_mixtral(seed: int) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():  # a decisive gate, like a trained one (init std 0.02 ties every expert)
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.3)
    return model


def run_demo(seed: int = 0, distill_steps: int = 100) -> list[dict]:
    """Patch, distil, save and reload a tiny Mixtral with every router; print and return a table."""
    routers: list[RouterConfig] = [
        LinearRouterConfig(),
        SRMoEConfig(),
        SRMoEConfig(spectral_mode="constrain"),
        L2RConfig(rank=16, num_anchors=4),
        CosineRouterConfig(dim=16),
    ]
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [{"input_ids": torch.randint(0, 256, (8, 64), generator=generator)} for _ in range(2)]
    probe = {"input_ids": torch.randint(0, 256, (2, 32), generator=generator)}
    rows = []
    for router_config in routers:
        start = time.perf_counter()
        model, report = patch_moe_routers(
            _tiny_mixtral(seed), router_config, calibration_batches=batches, return_report=True
        )
        after = report
        if report.mean_topk_agreement < 1.0:
            after = distill_router(model, batches, steps=distill_steps)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
            with torch.no_grad():
                for tensor in list(loaded.parameters()) + list(loaded.buffers()):
                    tensor.data = tensor.data.clone()  # aligned copies (see tests/test_modeling.py)
                same = torch.equal(model(**probe).logits, loaded(**probe).logits)
        bounds = [float(r.lipschitz_bound()) for _, r in model.routed_routers()]
        rows.append(
            {
                "router": router_config.router_type
                + (f"/{router_config.spectral_mode}" if isinstance(router_config, SRMoEConfig) else ""),
                "agreement_patched": report.mean_topk_agreement,
                "agreement_distilled": after.mean_topk_agreement,
                "lipschitz_bound": sum(bounds) / len(bounds),
                "reload_identical": same,
                "seconds": time.perf_counter() - start,
            }
        )
    header = f"{'router':<18}{'top-k agr. (patch)':>20}{'(distilled)':>13}{'Lipschitz':>11}{'reload ==':>11}{'s':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['router']:<18}{row['agreement_patched']:>20.4f}{row['agreement_distilled']:>13.4f}"
            f"{row['lipschitz_bound']:>11.3g}{str(row['reload_identical']):>11}{row['seconds']:>7.1f}"
        )
    return rows
