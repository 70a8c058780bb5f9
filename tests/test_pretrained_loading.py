"""Every loading path of a real checkpoint, then ``patch_moe_routers``: the shipped references.

The checkpoints are the plain pretrained references in ``benchmarks/reference/<family>/``
(``benchmarks/train_reference.py``: stock ``OlmoeForCausalLM``, ``MixtralForCausalLM`` and
``Qwen3MoeForCausalLM`` trained on the bundled Shakespeare plays, saved in bfloat16 by the default
``save_pretrained``, i.e. in the families' original per-expert layout). Never the hub. The inputs are
real token blocks: the validation plays of the package's bundled corpus cut by
``data_utils.build_lm_datasets`` with the folder's own tokenizer.

Each path is checked against a reference computation, not only for "no exception":

1. ``from_pretrained(dtype=torch.bfloat16)`` / ``dtype="auto"`` then patch: bf16 parameters; the new
   routers' parameters take the dtype of the gate they replace (bf16 here: ``attach_scorer`` casts
   the scorer to it) while their routing math runs in float32 (docs/ROUTERS.md §1) and an expert
   bias stays a float32 buffer (docs/ROUTERS.md, aux-loss-free balancing); the linear router is
   bit-identical to the unpatched bf16 model.
2. ``device_map="cpu"`` / ``"auto"`` then patch: logits equal to a plain load's, patched or not; a
   routed checkpoint loads with part of it offloaded to disk.
3. Sharded checkpoints (``max_shard_size="200KB"``, several shards and an index), routed and plain.
4. The families' original per-expert layout (``save_original_format=True``, transformers' default)
   and the fused in-memory layout (``False``), plain and routed.
5. A skeleton built on the meta device, materialised (``to_empty``, ``init_weights`` for the
   non-persistent buffers, ``load_state_dict``), then patched: identical to the normal path.
6. Calibration batches with left or right padding: the padded positions do not reach the report.
7. Patching a model in ``eval()`` under ``torch.no_grad()``.
8. Patching twice: a ``ValueError`` that names the problem.
9. ``torch.compile`` (backend ``"eager"``): no graph break in router code.
10. bitsandbytes quantized loading (skipped where bitsandbytes is not installed).

Tolerances: float32 logits that go through a save/load round trip are compared with
``atol = rtol = 1e-5`` after the state dicts were checked bit for bit (safetensors' zero-copy views at
arbitrary byte offsets can move CPU BLAS results by ~1e-8, docs/PITFALLS.md); everything computed
from the same weights in the same process is compared with ``torch.equal``.
"""

from __future__ import annotations

import inspect
import json
import re
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM
from transformers.models.olmoe.modeling_olmoe import OlmoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

import hf_moe_routers as H
from hf_moe_routers import data_utils
from hf_moe_routers.modeling import RoutedRouterMixin
from hf_moe_routers.patching import capture_router_inputs

REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "reference"
FAMILIES = ("olmoe", "mixtral", "qwen3_moe")
HOST_CLASSES = {"olmoe": OlmoeForCausalLM, "mixtral": MixtralForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM}
ROUTED_CLASSES = {
    "olmoe": H.RoutedOlmoeForCausalLM,
    "mixtral": H.RoutedMixtralForCausalLM,
    "qwen3_moe": H.RoutedQwen3MoeForCausalLM,
}
#: ``FamilyAdapter.name``, which the "already patched" message names.
ADAPTER_NAMES = {"olmoe": "Olmoe", "mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe"}
#: Key of layer 0's first expert in each layout (transformers' conversion_mapping: Mixtral has its
#: own legacy names, Qwen3-MoE and OLMoE reuse Qwen2-MoE's).
PER_EXPERT_KEY = {
    "olmoe": "model.layers.0.mlp.experts.0.gate_proj.weight",
    "mixtral": "model.layers.0.block_sparse_moe.experts.0.w1.weight",
    "qwen3_moe": "model.layers.0.mlp.experts.0.gate_proj.weight",
}
FUSED_KEY = "model.layers.0.mlp.experts.gate_up_proj"
#: Small L2R routers (hidden size 128): cheap, and unlike ``linear`` they do change the routing.
L2R = {"rank": 16, "num_anchors": 4}
BLOCK_SIZE = 32
#: Relative and absolute tolerance of float32 logits after a save/load round trip.
ROUND_TRIP_TOL = 1e-5


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def folder(family: str) -> Path:
    path = REFERENCE / family
    assert (path / "model.safetensors").is_file(), (
        f"{path} holds no model.safetensors: run benchmarks/train_reference.py --family {family} "
        "--output_dir benchmarks/reference"
    )
    return path


def load(family: str, **kwargs) -> PreTrainedModel:
    """The shipped reference through ``AutoModelForCausalLM.from_pretrained`` (float32 unless told)."""
    kwargs.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder(family), **kwargs)


@cache
def _validation_texts() -> tuple[str, ...]:
    return tuple(data_utils.bundled_corpus()["validation"])


@cache
def token_blocks(family: str) -> torch.Tensor:
    """``[4, 32]`` real token ids: evenly spaced blocks of the validation plays, cut by the package
    with the folder's own tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(folder(family))
    blocks, _ = data_utils.build_lm_datasets(
        list(_validation_texts()), None, tokenizer, BLOCK_SIZE, max_train_blocks=4
    )
    return blocks.blocks


def logits_of(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def patch(model: PreTrainedModel, config, **kwargs) -> PreTrainedModel:
    return H.patch_moe_routers(model, config, **kwargs)


def routers_of(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedRouterMixin)]


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Same keys, dtypes and values, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def assert_round_trip_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=ROUND_TRIP_TOL, atol=ROUND_TRIP_TOL)


def checkpoint_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            keys.update(handle.keys())
    return keys


# --------------------------------------------------------------------------------------------------
# 1. dtype=torch.bfloat16 and dtype="auto"
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_and_auto_dtype_loads_then_patch(family):
    ids = token_blocks(family)
    assert AutoConfig.from_pretrained(folder(family)).dtype == torch.bfloat16
    explicit = load(family, dtype=torch.bfloat16)
    auto = load(family, dtype="auto")
    for model in (explicit, auto):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_same_state(explicit, auto)
    expected = logits_of(explicit, ids)

    # The bf16 weights upcast exactly: the float32 load holds the same numbers.
    full = load(family, dtype=torch.float32)
    for (name, p16), (_, p32) in zip(explicit.named_parameters(), full.named_parameters()):
        assert torch.equal(p16.float(), p32), name

    # linear: the host gate in the host dtype, bit-identical to the unpatched bf16 model.
    linear = patch(auto, H.LinearRouterConfig())
    assert torch.equal(logits_of(linear, ids), expected)
    for _, router in routers_of(linear):
        assert {p.dtype for p in router.scorer.parameters()} == {torch.bfloat16}

    # l2r: parameters in the gate's dtype (bf16), routing math and recorded logits in float32,
    # and an enabled expert bias a float32 buffer.
    l2r = patch(load(family, dtype=torch.bfloat16), H.L2RConfig(**L2R, expert_bias_update_rate=1e-3))
    routers = routers_of(l2r)
    assert len(routers) == 2
    for _, router in routers:
        assert {p.dtype for p in router.scorer.parameters()} == {torch.bfloat16}
        assert router.expert_bias.dtype == torch.float32
    with torch.no_grad():
        out = l2r(input_ids=ids, output_router_logits=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert [t.dtype for t in out.router_logits] == [torch.float32, torch.float32]


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_bias_stays_float32_through_a_bf16_routed_checkpoint(family, tmp_path):
    model = patch(load(family, dtype=torch.bfloat16), H.L2RConfig(**L2R, expert_bias_update_rate=1e-3))
    for _, router in routers_of(model):
        router.update_expert_bias(torch.arange(8.0))  # -> bias ±1e-3, not representable in bf16 next to 1
        router.update_expert_bias(torch.arange(8.0).flip(0) * 0.5)
    model.save_pretrained(tmp_path)
    for dtype in (torch.bfloat16, "auto"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        assert type(loaded) is ROUTED_CLASSES[family]
        for (name, saved), (_, back) in zip(routers_of(model), routers_of(loaded)):
            assert back.expert_bias.dtype == torch.float32, name
            assert torch.equal(back.expert_bias, saved.expert_bias), name
            assert {p.dtype for p in back.scorer.parameters()} == {torch.bfloat16}, name


def _gate_whose_sigma_rounds_down_in_bf16(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` itself or the first ``bf16(weight · (1 + j/128))`` whose float32 σ_max is above its
    bf16 rounding (about half of all gates are; the layer-0 gate of each shipped reference is, j = 0:
    the search only keeps the test meaningful if the references are retrained)."""
    for j in range(64):
        candidate = (weight.float() * (1 + j / 128)).to(torch.bfloat16)
        sigma = torch.linalg.matrix_norm(candidate.float(), ord=2)
        if sigma.to(torch.bfloat16).float() < sigma:
            return candidate
    raise AssertionError("no scaled gate with a σ_max that rounds down in bf16")


def test_sr_moe_bound_of_a_bf16_gate_leaves_routing_unchanged_at_step_0():
    family = "olmoe"
    ids = token_blocks(family)
    model = load(family, dtype=torch.bfloat16)
    gate = model.model.layers[0].mlp.gate
    with torch.no_grad():
        gate.weight.copy_(_gate_whose_sigma_rounds_down_in_bf16(gate.weight))
    penalty = patch(load(family, dtype=torch.bfloat16), H.SRMoEConfig(spectral_mode="penalty"))
    constrain = patch(model, H.SRMoEConfig(spectral_mode="constrain"))
    with torch.no_grad():
        penalty.model.layers[0].mlp.gate.scorer.weight.copy_(gate.scorer.weight)
        penalty.model.layers[0].mlp.gate.scorer.spectral_bound.copy_(gate.scorer.spectral_bound)
    scorer = constrain.model.layers[0].mlp.gate.scorer
    assert torch.equal(scorer.effective_routing_matrix(), scorer.weight.detach().float())
    with torch.no_grad():
        assert penalty.model.layers[0].mlp.gate.scorer.regularization_terms()["spectral"].item() == 0.0
    assert torch.equal(logits_of(constrain, ids), logits_of(penalty, ids))


# --------------------------------------------------------------------------------------------------
# 2. device_map
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
@pytest.mark.parametrize("family", FAMILIES)
def test_device_map_loads_then_patch(family, device_map):
    ids = token_blocks(family)
    plain = load(family)
    expected = logits_of(plain, ids)
    mapped = load(family, device_map=device_map)
    assert {p.device.type for p in mapped.parameters()} == {"cpu"}
    assert_same_state(mapped, plain)
    assert torch.equal(logits_of(mapped, ids), expected)
    assert torch.equal(logits_of(patch(mapped, H.LinearRouterConfig()), ids), expected)
    # A router that changes the routing: the same as patching the plain load.
    l2r_plain = patch(load(family), H.L2RConfig(**L2R))
    l2r_mapped = patch(load(family, device_map=device_map), H.L2RConfig(**L2R))
    assert_same_state(l2r_mapped, l2r_plain)
    assert torch.equal(logits_of(l2r_mapped, ids), logits_of(l2r_plain, ids))


#: Layer 1 (with its router) offloaded to disk by accelerate's big-model loading.
DISK_OFFLOAD_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


def test_routed_checkpoint_loads_with_disk_offload(tmp_path):
    """The way to run a patched model that does not fit: patch in memory, save, then load the routed
    checkpoint with a device_map (here layer 1 offloaded to disk). One family: the offloading is
    accelerate's, the same code for all three."""
    family = "olmoe"
    ids = token_blocks(family)
    model = patch(load(family), H.L2RConfig(**L2R))
    expected = logits_of(model, ids)
    model.save_pretrained(tmp_path / "routed")
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "routed", device_map=DISK_OFFLOAD_MAP, offload_folder=tmp_path / "offload"
    )
    assert type(offloaded) is ROUTED_CLASSES[family]
    assert offloaded.model.layers[1].mlp.gate.scorer.query_proj.is_meta  # really offloaded
    assert_round_trip_close(logits_of(offloaded, ids), expected)


@pytest.mark.parametrize("where", ["disk_offload", "meta_skeleton"])
def test_patching_weights_on_the_meta_device_is_refused_clearly(where, tmp_path):
    family = "olmoe"
    if where == "disk_offload":
        model = load(family, device_map=DISK_OFFLOAD_MAP, offload_folder=tmp_path / "offload")
        assert model.model.layers[1].mlp.gate.weight.is_meta
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder(family)))
    with pytest.raises(ValueError, match=r"'model\.[\w.]+' is on the meta device"):
        patch(model, H.LinearRouterConfig())
    assert type(model) is HOST_CLASSES[family]  # refused before anything changed


# --------------------------------------------------------------------------------------------------
# 3. Sharded checkpoints
# --------------------------------------------------------------------------------------------------


def _assert_sharded(path: Path) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2, shards
    assert all((path / shard).is_file() for shard in shards)
    assert not (path / "model.safetensors").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_routed_checkpoint_loads_to_identical_logits(family, tmp_path):
    ids = token_blocks(family)
    model = patch(load(family), H.L2RConfig(**L2R))
    expected = logits_of(model, ids)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    _assert_sharded(tmp_path)
    for loader in (AutoModelForCausalLM, ROUTED_CLASSES[family]):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is ROUTED_CLASSES[family]
        assert loaded.config.moe_router == model.config.moe_router
        assert_same_state(loaded, model)
        assert_round_trip_close(logits_of(loaded, ids), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_plain_reference_loads_then_patches(family, tmp_path):
    ids = token_blocks(family)
    load(family, dtype="auto").save_pretrained(tmp_path, max_shard_size="200KB")  # bf16, as shipped
    _assert_sharded(tmp_path)
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    whole = load(family)
    assert type(sharded) is HOST_CLASSES[family]
    assert_same_state(sharded, whole)
    expected = logits_of(whole, ids)
    assert_round_trip_close(logits_of(sharded, ids), expected)
    assert torch.equal(logits_of(patch(sharded, H.LinearRouterConfig()), ids), logits_of(sharded, ids))
    l2r_sharded = patch(
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32), H.L2RConfig(**L2R)
    )
    l2r_whole = patch(load(family), H.L2RConfig(**L2R))
    assert_same_state(l2r_sharded, l2r_whole)
    assert_round_trip_close(logits_of(l2r_sharded, ids), logits_of(l2r_whole, ids))


# --------------------------------------------------------------------------------------------------
# 4. Per-expert (original) and fused layouts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_per_expert_and_fused_layouts_load_to_identical_logits(family, tmp_path):
    assert "save_original_format" in inspect.signature(PreTrainedModel.save_pretrained).parameters
    ids = token_blocks(family)
    # The shipped folder was written by the default save_pretrained: the original per-expert layout.
    shipped = checkpoint_keys(folder(family))
    assert PER_EXPERT_KEY[family] in shipped and FUSED_KEY not in shipped

    plain = load(family)
    routed = patch(load(family), H.L2RConfig(**L2R))
    for name, model in (("plain", plain), ("routed", routed)):
        expected = logits_of(model, ids)
        per_expert, fused = tmp_path / f"{name}_per_expert", tmp_path / f"{name}_fused"
        model.save_pretrained(per_expert, save_original_format=True)
        model.save_pretrained(fused, save_original_format=False)
        per_expert_keys, fused_keys = checkpoint_keys(per_expert), checkpoint_keys(fused)
        assert PER_EXPERT_KEY[family] in per_expert_keys and FUSED_KEY not in per_expert_keys
        assert FUSED_KEY in fused_keys and PER_EXPERT_KEY[family] not in fused_keys
        if name == "routed":  # the router's own tensors are written in both layouts
            assert any(".gate.scorer.query_proj" in key for key in per_expert_keys)
            assert any(".gate.scorer.query_proj" in key for key in fused_keys)
        for path in (per_expert, fused):
            loaded = AutoModelForCausalLM.from_pretrained(path)
            assert type(loaded) is type(model)
            assert_same_state(loaded, model)
            assert_round_trip_close(logits_of(loaded, ids), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_per_expert_checkpoint_loads_into_the_routed_class(family):
    """``Routed<Family>ForCausalLM.from_pretrained(plain folder)``: the conversion rules registered
    for the routed class rebuild the fused experts bit for bit; the routers, absent from the
    checkpoint, are initialised (finite, not the host gate)."""
    plain = load(family)
    routed = ROUTED_CLASSES[family].from_pretrained(folder(family), dtype=torch.float32)
    assert type(routed) is ROUTED_CLASSES[family]
    routed_state, plain_state = routed.state_dict(), plain.state_dict()
    shared = [key for key in plain_state if ".gate.weight" not in key]
    assert shared and all(torch.equal(routed_state[key], plain_state[key]) for key in shared)
    for name, router in routers_of(routed):
        weight = router.scorer.weight
        assert torch.isfinite(weight).all() and not torch.equal(weight, plain_state[f"{name}.weight"])


# --------------------------------------------------------------------------------------------------
# 5. Meta-device skeleton
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_skeleton_materialised_then_patched_matches_the_normal_path(family):
    ids = token_blocks(family)
    normal = load(family)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(folder(family)), dtype=torch.float32
        )
    assert all(p.is_meta for p in skeleton.parameters())
    skeleton.to_empty(device="cpu")
    # to_empty leaves every tensor uninitialised, and the state dict does not hold the
    # non-persistent buffers (the rotary inv_freq): transformers' own init fills them.
    skeleton.init_weights()
    skeleton.load_state_dict(normal.state_dict(), strict=True)
    skeleton.eval()
    for (name, a), (_, b) in zip(skeleton.named_buffers(), normal.named_buffers()):
        assert torch.equal(a, b), name
    assert torch.equal(logits_of(skeleton, ids), logits_of(normal, ids))
    patched_skeleton = patch(skeleton, H.L2RConfig(**L2R))
    patched_normal = patch(normal, H.L2RConfig(**L2R))
    assert_same_state(patched_skeleton, patched_normal)
    assert torch.equal(logits_of(patched_skeleton, ids), logits_of(patched_normal, ids))


# --------------------------------------------------------------------------------------------------
# 6. Calibration batches with padding
# --------------------------------------------------------------------------------------------------


def _padded_batch(family: str, side: str) -> tuple[dict, list[dict]]:
    """Two real sequences of 32 and 20 tokens: one padded batch ``[2, 32]`` with its attention mask,
    and the same sequences unpadded, one batch each."""
    ids = token_blocks(family)[:2]
    pad = AutoConfig.from_pretrained(folder(family)).pad_token_id
    lengths = (BLOCK_SIZE, 20)
    padded = torch.full((2, BLOCK_SIZE), pad, dtype=torch.long)
    mask = torch.zeros(2, BLOCK_SIZE, dtype=torch.long)
    for row, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(BLOCK_SIZE - n, BLOCK_SIZE)
        padded[row, cols] = ids[row, :n]
        mask[row, cols] = 1
    unpadded = [{"input_ids": ids[row : row + 1, :n]} for row, n in enumerate(lengths)]
    return {"input_ids": padded, "attention_mask": mask}, unpadded


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_ignores_padded_positions(family, side):
    padded, unpadded = _padded_batch(family, side)
    num_real = int(padded["attention_mask"].sum())
    config = H.L2RConfig(**L2R)
    model, with_padding = patch(load(family), config, calibration_batches=padded, return_report=True)
    _, without_padding = patch(load(family), config, calibration_batches=unpadded, return_report=True)
    assert with_padding.source == without_padding.source == "calibration batches"
    assert with_padding.layers.keys() == without_padding.layers.keys()
    # Agreement is a mean over the 52 real tokens of a discrete overlap: equal up to one token
    # whose top-k could flip on a last-bit difference of batched attention.
    for name, values in with_padding.layers.items():
        for metric, value in values.items():
            assert abs(value - without_padding.layers[name][metric]) <= 1 / num_real + 1e-9, (name, metric)
    # The router inputs the report used: the padded batch's real tokens, in order, and no pad.
    routers = routers_of(model)
    captured = capture_router_inputs(model, routers, padded)
    separate = [capture_router_inputs(model, routers, batch) for batch in unpadded]
    for name, _ in routers:
        assert captured[name].shape[0] == num_real
        torch.testing.assert_close(
            captured[name], torch.cat([batch[name] for batch in separate]), rtol=1e-5, atol=1e-5
        )  # measured: at most 3e-6 on inputs of size up to 5 (batched vs single-sequence attention)
    # Control: without the mask the pads are counted (and left padding shifts the real tokens).
    unmasked = capture_router_inputs(model, routers, {"input_ids": padded["input_ids"]})
    assert all(x.shape[0] == 2 * BLOCK_SIZE for x in unmasked.values())


# --------------------------------------------------------------------------------------------------
# 7. eval() and torch.no_grad()
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_in_eval_under_no_grad(family):
    ids = token_blocks(family)
    model = load(family)
    assert not model.training  # from_pretrained returns the model in eval mode
    expected = logits_of(model, ids)
    with torch.no_grad():
        linear = patch(model, H.LinearRouterConfig())
        l2r = patch(load(family), H.L2RConfig(**L2R))
    for patched in (linear, l2r):
        assert not patched.training
        for name, router in routers_of(patched):
            assert not router.training, name
            params = list(router.scorer.parameters())
            assert params and all(p.requires_grad and p.is_leaf and p.grad is None for p in params), name
    assert torch.equal(logits_of(linear, ids), expected)
    # The new routers train: a language-model loss reaches every parameter of every router.
    l2r.train()
    l2r(input_ids=ids, labels=ids).loss.backward()
    for name, router in routers_of(l2r):
        for pname, param in router.scorer.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), (name, pname)
        assert router.scorer.query_proj.grad.abs().sum() > 0, name


def test_patching_an_eval_model_leaves_every_module_in_eval():
    family = "olmoe"
    ids = token_blocks(family)
    model = patch(load(family), H.SRMoEConfig(sigma_method="power", spectral_mode="constrain"))
    power_u = [router.scorer.power_u.clone() for _, router in routers_of(model)]
    model(input_ids=ids)  # eval forward, gradients enabled
    assert all(torch.equal(r.scorer.power_u, u) for (_, r), u in zip(routers_of(model), power_u))
    assert [name for name, module in model.named_modules() if module.training] == []


# --------------------------------------------------------------------------------------------------
# 8. Patching twice
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_twice_is_refused_and_changes_nothing(family, tmp_path):
    ids = token_blocks(family)
    model = patch(load(family), H.L2RConfig(**L2R))
    expected = logits_of(model, ids)
    message = re.escape(
        f"This {ADAPTER_NAMES[family]} model is already patched (router_type='l2r'); "
        "load the original checkpoint to patch it again."
    )
    with pytest.raises(ValueError, match=message):
        patch(model, H.SRMoEConfig())
    assert all(router.router_config.router_type == "l2r" for _, router in routers_of(model))
    assert torch.equal(logits_of(model, ids), expected)
    # A routed checkpoint loaded back is just as patched.
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        patch(AutoModelForCausalLM.from_pretrained(tmp_path), H.LinearRouterConfig())


def test_a_patch_that_fails_leaves_the_model_unpatched():
    family = "olmoe"
    model = load(family)
    vocab = model.config.vocab_size
    ids = token_blocks(family)
    config, state, expected = model.config, model.state_dict(), logits_of(model, ids)
    with pytest.raises(IndexError):  # an embedding lookup out of range
        patch(model, H.L2RConfig(**L2R), calibration_batches={"input_ids": torch.full((1, 4), vocab)})
    assert type(model) is HOST_CLASSES[family]
    assert model.config is config and type(config).__name__ == type(load(family).config).__name__
    assert not any(isinstance(m, RoutedRouterMixin) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert torch.equal(logits_of(model, ids), expected)
    patch(model, H.L2RConfig(**L2R), calibration_batches={"input_ids": token_blocks(family)})
    assert type(model) is ROUTED_CLASSES[family]


# --------------------------------------------------------------------------------------------------
# 9. torch.compile
# --------------------------------------------------------------------------------------------------

ROUTER_CONFIGS = {"linear": H.LinearRouterConfig(), "l2r": H.L2RConfig(**L2R)}


@pytest.mark.parametrize("router_type", ["linear", "l2r"])
@pytest.mark.parametrize("family", FAMILIES)
def test_routers_compile_with_fullgraph(family, router_type):
    """Each routed router's forward compiles as one graph (``fullgraph=True`` raises on any graph
    break) and gives its eager outputs bit for bit on the real router inputs. The bound ``forward``
    is compiled, not the module: once the model ran with ``output_router_logits=True`` transformers
    hangs an output-capturing forward hook on the router (it reads a ``ContextVar`` Dynamo cannot
    trace outside a compiled model), which is not router code (docs/PITFALLS.md)."""
    ids = token_blocks(family)
    model = patch(load(family), ROUTER_CONFIGS[router_type])
    routers = routers_of(model)
    inputs = capture_router_inputs(model, routers, {"input_ids": ids})
    torch._dynamo.reset()
    for name, router in routers:
        compiled = torch.compile(router.forward, backend="eager", fullgraph=True)
        with torch.no_grad():
            got, expected = compiled(inputs[name]), router(inputs[name])
        assert len(got) == len(expected) == 3
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), name


def test_compiled_patched_model_adds_no_graph_break():
    """The whole model: transformers itself breaks the graph once (output_capturing's hook
    installation lock); patching with linear or l2r adds no graph and no break, and the compiled
    model gives the eager logits bit for bit. One family: the routers differ per family only in
    the forward tested above."""
    family = "olmoe"
    ids = token_blocks(family)

    def explain(model):
        torch._dynamo.reset()
        result = torch._dynamo.explain(model)(input_ids=ids)
        return result.graph_count, result.graph_break_count

    baseline = explain(load(family))
    for router_type, config in ROUTER_CONFIGS.items():
        model = patch(load(family), config)
        assert explain(model) == baseline, router_type
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(logits_of(compiled, ids), logits_of(model, ids))
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# 10. bitsandbytes
# --------------------------------------------------------------------------------------------------


def test_bitsandbytes_quantized_load_then_patch():
    pytest.importorskip(
        "bitsandbytes",
        reason="bitsandbytes is not installed in this environment (CPU-only): the 4-bit loading path is untested here",
    )
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes 4-bit loading needs a CUDA device")
    from transformers import BitsAndBytesConfig

    family = "olmoe"
    ids = token_blocks(family).cuda()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        folder(family), quantization_config=quantization, device_map="cuda"
    )
    expected = logits_of(model, ids)
    patched = patch(model, H.LinearRouterConfig())
    assert torch.equal(logits_of(patched, ids), expected)
