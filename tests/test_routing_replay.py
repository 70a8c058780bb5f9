"""Routing capture and replay: ``output_router_indices=True`` returns the experts each router chose,
``router_indices=`` (or ``replay_routing``) forces them, for every family and router type.

Replay forces the experts; the gate weights come from the router's *current* scores at those experts
with the family's rule, so replaying a model's own routing reproduces its outputs bit for bit (CPU).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import model_inputs, tiny_model
from test_modeling import ROUTERS, realign, skip_prototype_with_gate_bias

import hf_moe_routers as H
from hf_moe_routers.families import family_for_router
from hf_moe_routers.modeling import CapturedRouting, RoutedRouterMixin, capture_routing, replay_routing


def routers_of(model) -> list[tuple[str, RoutedRouterMixin]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedRouterMixin)]


def scramble_routers(model, seed: int = 7) -> None:
    """Replace every multi-element router parameter by fresh random values (a different routing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".scorer." in name and param.numel() > 1:
                scale = max(float(param.std()), 0.5)
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def router_calls(model, inputs) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(logits [T, E], output tuple, experts [T, K]) of every router in one forward."""
    seen = {}

    def hook(name):
        def record(module, args, output):
            adapter = family_for_router(module)
            logits = adapter.output_logits(output, int(module.num_experts))
            indices = adapter.output_indices(output, logits, adapter.router_top_k(module), router=module)
            seen[name] = (logits.detach(), output, indices)

        return record

    handles = [router.register_forward_hook(hook(name)) for name, router in routers_of(model)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def expected_weights(router, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The family's gate weights of the experts ``indices`` from the scores ``logits`` (hand rule)."""
    family = family_for_router(router).host_model_type
    if family == "deepseek_v3":
        weights = logits.sigmoid().gather(1, indices)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor
    if family == "gpt_oss":
        return logits.gather(1, indices).softmax(dim=-1)
    weights = logits.float().softmax(dim=-1).gather(1, indices)
    if family == "mixtral" or getattr(router, "norm_topk_prob", False):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights


@pytest.mark.parametrize("router_name", list(ROUTERS))
def test_capture_then_replay_for_every_family_and_router(family, router_name):
    skip_prototype_with_gate_bias(family, router_name)
    model = H.patch_moe_routers(tiny_model(family), ROUTERS[router_name]).eval()
    routers = routers_of(model)
    inputs = model_inputs(family, padded=family != "switch_transformers")
    with torch.no_grad():
        out = model(**inputs, output_router_indices=True)
    recorded = out.router_indices
    # One [T, K] int64 tensor per routed router, in module order: what each router chose.
    calls = router_calls(model, inputs)
    assert len(recorded) == len(routers) > 0
    for (name, router), indices in zip(routers, recorded):
        top_k = family_for_router(router).router_top_k(router)
        assert indices.dtype == torch.int64 and indices.shape == (calls[name][0].shape[0], top_k)
        assert torch.equal(indices, calls[name][2]), name
    with capture_routing(model) as captured, torch.no_grad():
        model(**inputs)
    assert isinstance(captured, CapturedRouting) and captured.names == tuple(n for n, _ in routers)
    assert all(torch.equal(a, b) for a, b in zip(captured.router_indices, recorded))

    # Replaying the model's own routing changes nothing, bit for bit.
    with torch.no_grad():
        replayed = model(**inputs, router_indices=recorded, output_router_indices=True)
        with replay_routing(model, captured):
            in_context = model(**inputs)
    assert torch.equal(replayed.logits, out.logits) and torch.equal(in_context.logits, out.logits)
    assert all(torch.equal(a, b) for a, b in zip(replayed.router_indices, recorded))

    # New router weights: their own routing differs, a replay still routes to the recorded experts,
    # with gate weights from the new scores at those experts.
    scramble_routers(model)
    with torch.no_grad():
        fresh = model(**inputs, output_router_indices=True)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.router_indices, recorded))
    with torch.no_grad():
        forced = model(**inputs, router_indices=recorded, output_router_indices=True)
    assert all(torch.equal(a, b) for a, b in zip(forced.router_indices, recorded))
    assert not torch.equal(forced.logits, out.logits)
    with replay_routing(model, {name: indices for (name, _), indices in zip(routers, recorded)}):
        calls = router_calls(model, inputs)
    for (name, router), indices in zip(routers, recorded):
        logits, output, chosen = calls[name]
        assert torch.equal(chosen, indices), name
        weights = expected_weights(router, logits, indices)
        if family == "switch_transformers":
            dispatch, top1_prob, _ = output
            assert torch.allclose(top1_prob.reshape(-1, 1), weights.to(top1_prob.dtype))
            kept = dispatch.reshape(-1, dispatch.shape[-1]).argmax(dim=-1)
            is_kept = dispatch.reshape(-1, dispatch.shape[-1]).any(dim=-1)
            assert torch.equal(kept[is_kept], indices[is_kept, 0])
        else:
            assert torch.equal(output[2], indices)
            assert torch.allclose(output[1].float(), weights.float(), atol=1e-6), name


def test_replay_trains_the_router_through_the_weights_and_ignores_the_expert_bias(family):
    config = H.L2RConfig(rank=4, num_anchors=2, expert_bias_update_rate=1e-2)
    model = H.patch_moe_routers(tiny_model(family), config).train()
    inputs = model_inputs(family)
    labels = inputs.get("decoder_input_ids", inputs["input_ids"])
    with torch.no_grad():
        recorded = model(**inputs, output_router_indices=True).router_indices
        for _, router in routers_of(model):
            router.selection_bias()[0] = 100.0  # would send every token to expert 0
    out = model(**inputs, labels=labels, router_indices=recorded, output_router_indices=True)
    assert all(torch.equal(a, b) for a, b in zip(out.router_indices, recorded))
    out.loss.backward()
    for _, router in routers_of(model):
        assert router.base_scorer.anchors.grad is not None
        assert float(router.base_scorer.anchors.grad.abs().sum()) > 0


def test_gradient_checkpointing_recomputes_the_replayed_routing():
    model = H.patch_moe_routers(tiny_model("qwen3_moe"), H.LinearRouterConfig()).train()
    inputs = model_inputs("qwen3_moe")
    with torch.no_grad():
        recorded = model(**inputs, output_router_indices=True).router_indices
    scramble_routers(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with replay_routing(model, recorded), capture_routing(model) as captured:
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for name, _ in routers_of(model):
        assert len(captured.calls[name]) == 2  # the forward and its recomputation in backward
        assert all(torch.equal(call, captured.calls[name][0]) for call in captured.calls[name])
    assert all(torch.equal(captured.calls[n][0], r) for (n, _), r in zip(routers_of(model), recorded))


def test_contexts_nest_and_restore():
    model = H.patch_moe_routers(tiny_model("mixtral"), H.LinearRouterConfig()).eval()
    inputs = model_inputs("mixtral")
    with torch.no_grad():
        own = model(**inputs, output_router_indices=True).router_indices
        other = tuple(torch.remainder(indices + 1, 6) for indices in own)
        with replay_routing(model, own):
            with replay_routing(model, other):
                inner = model(**inputs, output_router_indices=True).router_indices
            outer = model(**inputs, output_router_indices=True).router_indices
        after = model(**inputs, output_router_indices=True).router_indices
    assert all(torch.equal(a, b) for a, b in zip(inner, other))
    assert all(torch.equal(a, b) for a, b in zip(outer, own))
    assert all(torch.equal(a, b) for a, b in zip(after, own))
    assert all(
        router._replay_indices is None and router._capture_list is None for _, router in routers_of(model)
    )


def test_bad_routings_raise_clear_errors():
    model = H.patch_moe_routers(tiny_model("mixtral"), H.LinearRouterConfig()).eval()
    inputs = model_inputs("mixtral")
    with torch.no_grad():
        own = model(**inputs, output_router_indices=True).router_indices
    name = routers_of(model)[0][0]
    cases = [
        (own[:1], "2 routed routers but the routing has 1"),
        ({name: own[0]}, "missing: ['model.layers.1.mlp.gate']"),
        ({**dict(zip([n for n, _ in routers_of(model)], own)), "lm_head": own[0]}, "no routed router"),
        ((own[0][:, :1], own[1]), "chooses 2 experts per token"),
        ((own[0].float(), own[1]), "integer tensor"),
        ((own[0] + 6, own[1]), "outside [0, 6)"),
    ]
    for routing, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            with replay_routing(model, routing):
                pass
    with pytest.raises(ValueError, match="routes 14 tokens, but the replayed routing has 7"):
        with torch.no_grad():
            model(**inputs, router_indices=tuple(i[:7] for i in own))


def test_signature_is_the_hosts_and_plain_calls_are_unchanged(family):
    model = H.patch_moe_routers(tiny_model(family), H.LinearRouterConfig()).eval()
    host = tiny_model(family)
    assert inspect.signature(model.forward) == inspect.signature(host.forward)
    inputs = model_inputs(family)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, host(**inputs).logits)
        plain = model(**inputs, return_dict=False)
        with_indices = model(**inputs, return_dict=False, output_router_indices=True)
    assert len(with_indices) == len(plain) + 1 and isinstance(with_indices[-1], tuple)


REMOTE_SCRIPT = """
    import sys
    sys.modules["hf_moe_routers"] = None  # the remote code alone
    import json, torch
    from transformers import AutoModelForCausalLM
    repo, ref_path = sys.argv[1], sys.argv[2]
    ref = torch.load(ref_path)
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
        for name, param in model.named_parameters():
            if ".scorer." in name:
                param.mul_(-1.0)  # another routing
        out = model(**ref["inputs"], router_indices=ref["indices"], output_router_indices=True)
    print(json.dumps({
        "module": type(model).__module__,
        "replayed": all(torch.equal(a, b) for a, b in zip(out.router_indices, ref["indices"])),
    }))
"""


def test_replay_works_in_remote_code(tmp_path):
    model = H.patch_moe_routers(tiny_model("olmoe"), H.CosineRouterConfig(dim=6)).eval()
    inputs = model_inputs("olmoe")
    with torch.no_grad():
        indices = realign(model)(**inputs, output_router_indices=True).router_indices
    model.save_pretrained(tmp_path / "repo")
    torch.save({"inputs": inputs, "indices": indices}, tmp_path / "ref.pt")
    env = {
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(REMOTE_SCRIPT),
            str(tmp_path / "repo"),
            str(tmp_path / "ref.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules.") and got["replayed"]


def test_router_configs_with_the_bias_replay_too():
    config = dataclasses.replace(ROUTERS["sr_moe"], expert_bias_update_rate=1e-3)
    model = H.patch_moe_routers(tiny_model("deepseek_v3"), config).eval()
    inputs = model_inputs("deepseek_v3")
    with torch.no_grad():
        out = model(**inputs, output_router_indices=True)
        assert torch.equal(model(**inputs, router_indices=out.router_indices).logits, out.logits)
