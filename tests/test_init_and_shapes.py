"""What transformers' distributed engine and init path need from every router.

FSDP2's ``fully_shard`` refuses 0-dim parameters, and transformers initialises a model built on the
meta device (big-model loading, ``from_pretrained`` of a partial checkpoint) through
``_init_weights`` alone, so every router type must (a) have no 0-dim parameter, (b) get the same
buffers from ``_init_weights`` as from ``__init__``, and (c) initialise every weight a checkpoint
leaves out exactly as a from-scratch model does. Checkpoints written by hf-moe-routers 0.1.0, which
stored one-number router parameters 0-dim, still load to identical outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, model_inputs, tiny_model
from safetensors.torch import load_file, save_file
from test_modeling import ROUTERS, auto_class, realign, routed_config
from transformers import PreTrainedModel, set_seed

import hf_moe_routers as H
from hf_moe_routers.modeling import ONE_ELEMENT_PARAMETERS, RoutedRouterMixin

ALL_FAMILIES = FAMILIES
#: Router configs that between them create every parameter and buffer any router type has.
EVERY_TENSOR = {
    **ROUTERS,
    "l2r_affine": H.L2RConfig(rank=8, num_anchors=2, phi="affine_tanh"),
    "cosine_learned": H.CosineRouterConfig(dim=6, learn_temperature=True),
    "sr_moe_fixed_bound": H.SRMoEConfig(spectral_bound=0.7),
}


#: (family, router) pairs; prototype scoring cannot represent gpt-oss's gate bias (a clear error).
PAIRS = [
    (family, name)
    for family in ALL_FAMILIES
    for name in sorted(EVERY_TENSOR)
    if not (family == "gpt_oss" and name == "prototype")
]


def _routers(model):
    return [m for m in model.modules() if isinstance(m, RoutedRouterMixin)]


def _model_class(family):
    return auto_class(family)._model_mapping[type(routed_config(family, ROUTERS["linear"]))]


@pytest.mark.parametrize(("family", "router_name"), PAIRS)
def test_no_router_parameter_is_zero_dim(family, router_name):
    model = H.patch_moe_routers(tiny_model(family), EVERY_TENSOR[router_name])
    for router in _routers(model):
        for name, tensor in list(router.named_parameters()) + list(router.named_buffers()):
            if isinstance(tensor, torch.nn.Parameter):
                assert tensor.dim() >= 1, name
            if name.split(".")[-1] in ONE_ELEMENT_PARAMETERS:
                assert tuple(tensor.shape) == (1,), name


def test_one_element_parameters_are_known():
    assert ONE_ELEMENT_PARAMETERS == {"phi_gamma", "phi_beta", "log_temperature"}


@pytest.mark.parametrize(("family", "router_name"), PAIRS)
def test_init_weights_gives_the_buffers_of_init(family, router_name, monkeypatch):
    # transformers' own check (test_init_weights_can_init_buffers): build with __init__ and no
    # _init_weights, and on the meta device then materialise and init_weights(); buffers must match.
    config = routed_config(family, EVERY_TENSOR[router_name])
    cls = _model_class(family)
    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedModel, "_initialize_weights", lambda *args, **kwargs: None)
        from_init = cls(copy.deepcopy(config))
    with torch.device("meta"):
        from_meta = cls(copy.deepcopy(config))
    from_meta.to_empty(device="cpu")
    from_meta.init_weights()
    init_buffers, meta_buffers = dict(from_init.named_buffers()), dict(from_meta.named_buffers())
    assert sorted(init_buffers) == sorted(meta_buffers)
    different = [k for k, v in init_buffers.items() if not torch.equal(v, meta_buffers[k])]
    assert not different


@pytest.mark.parametrize(("family", "router_name"), PAIRS)
def test_every_missing_weight_is_initialised_as_from_scratch(family, router_name, monkeypatch):
    # transformers' own check (test_can_init_all_missing_weights): a model loaded from an empty state
    # dict is initialised by _init_weights alone and must equal the from-scratch model, seed for seed.
    config = routed_config(family, EVERY_TENSOR[router_name])
    cls = _model_class(family)
    original = PreTrainedModel._initialize_weights

    def seeded(*args, **kwargs):
        set_seed(42)
        original(*args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", seeded)
    from_init = cls(copy.deepcopy(config))
    from_empty = cls.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    on_meta = [
        k for k, v in list(from_empty.named_parameters()) + list(from_empty.named_buffers()) if v.is_meta
    ]
    assert not on_meta
    expected, got = from_init.state_dict(), from_empty.state_dict()
    assert sorted(expected) == sorted(got)
    assert [k for k, v in expected.items() if not torch.equal(v, got[k])] == []


def _zero_dim_checkpoint(model, folder):
    """Save ``model`` and rewrite its one-number router tensors 0-dim, as 0.1.0 stored them."""
    model.save_pretrained(folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    rewritten = [k for k in tensors if k.rsplit(".", 1)[-1] in ONE_ELEMENT_PARAMETERS]
    assert rewritten
    for key in rewritten:
        assert tuple(tensors[key].shape) == (1,)  # what we write now
        tensors[key] = tensors[key].reshape(())
    save_file(tensors, path, metadata={"format": "pt"})
    return rewritten


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers", "gpt_oss"])
@pytest.mark.parametrize("router_name", ["l2r_affine", "cosine", "cosine_learned"])
def test_checkpoints_with_zero_dim_router_scalars_still_load(family, router_name, tmp_path):
    model = H.patch_moe_routers(tiny_model(family), EVERY_TENSOR[router_name]).eval()
    with torch.no_grad():  # values that differ from every init, so a silent re-init would show
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.rsplit(".", 1)[-1] in ONE_ELEMENT_PARAMETERS:
                tensor.fill_(0.37)
    _zero_dim_checkpoint(model, tmp_path)
    loaded = realign(auto_class(family).from_pretrained(tmp_path).eval())
    inputs = model_inputs(family)
    expected = realign(model)(**inputs).logits
    assert torch.equal(loaded(**inputs).logits, expected)
    # and through plain torch: a 0-dim state dict into the new [1] parameters
    old_state = {
        k: (v.reshape(()) if k.rsplit(".", 1)[-1] in ONE_ELEMENT_PARAMETERS else v)
        for k, v in model.state_dict().items()
    }
    fresh = realign(auto_class(family).from_pretrained(tmp_path).eval())
    with torch.no_grad():
        for name, tensor in list(fresh.named_parameters()) + list(fresh.named_buffers()):
            if name.rsplit(".", 1)[-1] in ONE_ELEMENT_PARAMETERS:
                tensor.fill_(-1.0)
    fresh.load_state_dict(old_state)
    assert torch.equal(fresh(**inputs).logits, expected)


def test_sr_moe_calibrates_from_the_whole_matrix_at_first_forward():
    # c = σ(W) and power_u = the top left-singular vector, set once when the router first runs.
    scorer = H.routers.build_scorer(H.SRMoEConfig(sigma_method="power"), 16, 5)
    scorer.reset_parameters(std=0.3)
    assert float(scorer.spectral_bound) == 0.0 and not scorer.power_u.any()
    weight = scorer.weight.detach().clone()
    scorer(torch.randn(3, 16))
    torch.testing.assert_close(scorer.spectral_bound, torch.linalg.matrix_norm(weight, ord=2))
    u = torch.linalg.svd(weight).U[:, 0]
    assert abs(float(scorer.power_u @ u)) == pytest.approx(1.0, abs=1e-6)
    # once set, a changed matrix does not move c (it is the bound training started from)
    with torch.no_grad():
        scorer.weight.mul_(3.0)
    scorer(torch.randn(3, 16))
    torch.testing.assert_close(scorer.spectral_bound, torch.linalg.matrix_norm(weight, ord=2))
    # a configured bound is used as is
    fixed = H.routers.build_scorer(H.SRMoEConfig(spectral_bound=0.7), 16, 5)
    assert float(fixed.spectral_bound) == pytest.approx(0.7)
