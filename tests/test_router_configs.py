"""Router configs: validation errors name the field and the allowed values; JSON round trips."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import pytest

from hf_moe_routers import CosineRouterConfig, L2RConfig, LinearRouterConfig, RouterConfig, SRMoEConfig
from hf_moe_routers.routers import SCORERS, LinearScorer, RouterScorer, build_scorer
from hf_moe_routers.routers import base as routers_base

ALL_CONFIGS = [
    LinearRouterConfig(),
    SRMoEConfig(),
    SRMoEConfig(scoring="prototype", spectral_mode="constrain", spectral_bound=2.5, sigma_method="power"),
    L2RConfig(rank=8, num_anchors=3, phi="tanh", anchor_reduce="max", input_norm="none"),
    CosineRouterConfig(dim=4, temperature=0.5, learn_temperature=False),
]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: c.router_type)
def test_json_round_trip(config):
    text = json.dumps(config.to_dict())
    restored = RouterConfig.from_dict(json.loads(text))
    assert restored == config
    assert type(restored) is type(config)


BAD_FIELDS = [
    (SRMoEConfig, {"scoring": "cosine"}, "scoring", "'linear', 'prototype'"),
    (SRMoEConfig, {"spectral_mode": "clip"}, "spectral_mode", "'penalty', 'constrain', 'none'"),
    (SRMoEConfig, {"spectral_bound": 0.0}, "spectral_bound", "> 0.0"),
    (SRMoEConfig, {"spectral_bound": "big"}, "spectral_bound", "a number or None"),
    (SRMoEConfig, {"spectral_weight": -1.0}, "spectral_weight", ">= 0.0"),
    (SRMoEConfig, {"stable_rank_weight": float("nan")}, "stable_rank_weight", "finite"),
    (SRMoEConfig, {"sigma_method": "lanczos"}, "sigma_method", "'exact', 'power'"),
    (SRMoEConfig, {"power_iterations": 0}, "power_iterations", ">= 1"),
    (SRMoEConfig, {"temperature": 0}, "temperature", "> 0.0"),
    (L2RConfig, {"rank": 0}, "rank", ">= 1"),
    (L2RConfig, {"rank": -3}, "rank", ">= 1"),
    (L2RConfig, {"rank": "three"}, "rank", "an integer"),
    (L2RConfig, {"rank": 4.0}, "rank", "an integer"),
    (L2RConfig, {"num_anchors": 0}, "num_anchors", ">= 1"),
    (L2RConfig, {"phi": "sigmoid"}, "phi", "'affine_tanh', 'tanh'"),
    (L2RConfig, {"anchor_norm_p": 0.0}, "anchor_norm_p", "> 0.0"),
    (L2RConfig, {"anchor_reduce": "mean"}, "anchor_reduce", "'logsumexp', 'max'"),
    (L2RConfig, {"temperature": -1.0}, "temperature", "> 0.0"),
    (L2RConfig, {"input_norm": "layer"}, "input_norm", "'rms', 'none'"),
    (L2RConfig, {"anchor_init_noise": -0.1}, "anchor_init_noise", ">= 0.0"),
    (L2RConfig, {"check_finite": "yes"}, "check_finite", "True or False"),
    (CosineRouterConfig, {"dim": 0}, "dim", ">= 1"),
    (CosineRouterConfig, {"temperature": 0.0}, "temperature", "> 0.0"),
    (CosineRouterConfig, {"learn_temperature": 1}, "learn_temperature", "True or False"),
    (CosineRouterConfig, {"min_temperature": 0.0}, "min_temperature", "> 0.0"),
    (CosineRouterConfig, {"min_temperature": 0.5, "temperature": 0.3}, "min_temperature", "<= temperature"),
]


@pytest.mark.parametrize(("cls", "kwargs", "field", "allowed"), BAD_FIELDS, ids=lambda v: str(v))
def test_validation_errors_name_field_and_allowed_values(cls, kwargs, field, allowed):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert f"{cls.__name__}.{field}" in message
    assert allowed in message


def test_bool_is_not_a_number():
    with pytest.raises(ValueError, match="rank must be an integer"):
        L2RConfig(rank=True)


def test_unknown_router_type_lists_types():
    with pytest.raises(ValueError) as info:
        RouterConfig.from_dict({"router_type": "hash"})
    for name in ("'cosine'", "'l2r'", "'linear'", "'sr_moe'"):
        assert name in str(info.value)


def test_unknown_field_is_an_error():
    with pytest.raises(ValueError, match=r"Unknown field\(s\) \['ranks'\] for L2RConfig"):
        RouterConfig.from_dict({"router_type": "l2r", "ranks": 4})


def test_defaults_follow_the_design():
    sr = SRMoEConfig()
    assert (sr.scoring, sr.spectral_mode, sr.spectral_bound, sr.sigma_method) == (
        "linear",
        "penalty",
        None,
        "exact",
    )
    assert sr.spectral_weight == sr.stable_rank_weight == 1e-2 and sr.temperature == 1.0
    l2r = L2RConfig()
    assert (l2r.phi, l2r.anchor_norm_p, l2r.anchor_reduce, l2r.input_norm) == (
        "affine_tanh",
        4.0,
        "logsumexp",
        "rms",
    )


# ------------------------------------------------------------------------------ the one registry


def test_every_router_type_is_one_config_scorer_pair():
    """``SCORERS`` is the only registry: configs are found through their scorer's ``config_class``."""
    assert RouterConfig.registered_types() == tuple(sorted(SCORERS)) == ("cosine", "l2r", "linear", "sr_moe")
    for router_type, scorer_class in SCORERS.items():
        assert scorer_class.config_class.router_type == router_type
        config = RouterConfig.from_dict({"router_type": router_type})
        assert type(config) is scorer_class.config_class
        assert type(build_scorer(config, 256, 4)) is scorer_class
    with pytest.raises(TypeError):
        SCORERS["hash"] = LinearScorer  # type: ignore[index]  # a read-only view


@pytest.fixture
def restore_registry() -> Iterator[None]:
    saved = dict(routers_base._ROUTER_TYPES)
    yield
    routers_base._ROUTER_TYPES.clear()
    routers_base._ROUTER_TYPES.update(saved)


def test_defining_a_scorer_registers_its_router_type(restore_registry):
    @dataclasses.dataclass
    class ScaledLinearConfig(RouterConfig):
        router_type = "scaled_linear"
        scale: float = 2.0

    assert "scaled_linear" not in RouterConfig.registered_types()  # a config alone is not a type

    class ScaledLinearScorer(LinearScorer):
        config_class = ScaledLinearConfig

    assert SCORERS["scaled_linear"] is ScaledLinearScorer
    config = RouterConfig.from_json_kwargs("scaled_linear", '{"scale": 3.0}')
    assert config == ScaledLinearConfig(scale=3.0)
    assert type(build_scorer(config.to_dict(), 8, 4)) is ScaledLinearScorer


def test_a_router_type_cannot_be_registered_twice(restore_registry):
    with pytest.raises(TypeError, match="'linear' is already registered by .*LinearScorer"):

        class AnotherLinearScorer(RouterScorer):
            config_class = LinearRouterConfig

    class PlainVariant(LinearScorer):  # inherits config_class: a variant, not a new type
        pass

    assert SCORERS["linear"] is LinearScorer
