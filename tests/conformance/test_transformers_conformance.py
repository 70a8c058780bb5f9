"""transformers' own common test mixins, run against our routed model classes (docs/CONFORMANCE.md).

For every host family this module defines one test class for the unpatched family (the *control*,
e.g. ``MixtralControl`` on ``MixtralModel`` / ``MixtralForCausalLM``) and one per router type
(``MixtralRoutedLinear``, ``MixtralRoutedSrMoe``, ``MixtralRoutedL2r``, ``MixtralRoutedCosine`` on
``RoutedMixtralModel`` / ``RoutedMixtralForCausalLM``). Each class mixes in transformers'
``ModelTesterMixin``, ``TrainingTesterMixin``, ``TensorParallelTesterMixin``,
``ExpertParallelTesterMixin`` and ``FSDPTesterMixin`` (taken from the sdist of the installed
transformers, see ``_sdist.py``) plus ``test_config`` (``ConfigTester.run_common_tests``).

The rule: a routed case may fail only where its control fails.

* A control case that fails is an xfail when ``_known.CONTROL_KNOWN_FAILURES`` lists it (with its
  reason), else a failure.
* A routed case that fails is skipped with "the unpatched <Family> fails it too" when the same case of
  the control fails (the control's outcome is taken from this session or, when the control did not
  run, by running it on the spot); or skipped with the reason of ``_known.ROUTED_ALLOWED``; else it
  fails.

Two look-ups of the mixins are routed to the host family, so a routed class is tested as its family:

* the distributed mixins only run model types on transformers' allow-lists
  (``TP_/EP_/FSDP_DISTRIBUTED_TEST_MODEL_TYPES``); each routed model type is added to the lists its
  host family is on;
* ``ModelTesterMixin`` picks inputs and checks by class name from transformers' Auto mappings; a
  routed class name is listed wherever its host class name is (``_route_auto_mapping_names``);
* ``ModelTesterMixin`` greps source files (copyright year, ``@use_experts_implementation``); a routed
  class's source is read as its host class's (``_HostSourceInspect``).

``test_can_init_all_missing_weights``, which transformers skips for families added before 2023,
runs for every class (``test_can_init_all_missing_weights_before_2023 = True``).

``unittest``'s ``subTest`` is made a plain block in these classes: a failing sub-case fails its case
(and goes through the rule above) instead of being recorded apart by the runner.

Which classes a plain ``pytest`` run selects is decided in ``conftest.py`` (the default subset).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import traceback
import unittest

import pytest

from conformance._known import control_known_failure, routed_allowed
from conformance._sdist import SdistUnavailable, import_root
from conformance._testers import (
    FAMILY_NAMES,
    HOSTS,
    ROUTER_TYPES,
    FamilyTester,
    config_class,
    config_tester_kwargs,
    model_classes,
)
from hf_moe_routers.modeling import FAMILIES

# Without transformers' test code a dev run skips this module with the reason; CI (CI=true) fails.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

try:
    import parameterized  # noqa: F401 - transformers' mixins need it
except ImportError:  # pragma: no cover - depends on the environment
    if IN_CI:
        raise
    pytest.skip(
        "transformers' test mixins need `parameterized` (pip install parameterized)", allow_module_level=True
    )

try:
    import_root()
except SdistUnavailable as exc:  # pragma: no cover - depends on the network
    if IN_CI:
        raise RuntimeError(
            f"conformance tests need transformers' sdist (CI=true, so this fails): {exc}"
        ) from exc
    pytest.skip(
        f"transformers' sdist is unavailable, conformance tests skipped: {exc}", allow_module_level=True
    )

from hf_sdist_tests import (  # noqa: E402
    test_expert_parallel_mixin,
    test_fsdp_mixin,
    test_modeling_common,
    test_tensor_parallel_mixin,
)
from hf_sdist_tests.generation.test_utils import GenerationTesterMixin  # noqa: E402
from hf_sdist_tests.test_configuration_common import ConfigTester  # noqa: E402
from hf_sdist_tests.test_expert_parallel_mixin import ExpertParallelTesterMixin  # noqa: E402
from hf_sdist_tests.test_fsdp_mixin import FSDPTesterMixin  # noqa: E402
from hf_sdist_tests.test_modeling_common import ModelTesterMixin  # noqa: E402
from hf_sdist_tests.test_tensor_parallel_mixin import TensorParallelTesterMixin  # noqa: E402
from hf_sdist_tests.test_training_mixin import TrainingTesterMixin  # noqa: E402

MIXINS = (
    ModelTesterMixin,
    GenerationTesterMixin,
    TrainingTesterMixin,
    TensorParallelTesterMixin,
    ExpertParallelTesterMixin,
    FSDPTesterMixin,
)


def _route_allow_lists() -> None:
    """Put each routed model type on the distributed allow-lists its host family is on."""
    for module, name in (
        (test_tensor_parallel_mixin, "TP_DISTRIBUTED_TEST_MODEL_TYPES"),
        (test_expert_parallel_mixin, "EP_DISTRIBUTED_TEST_MODEL_TYPES"),
        (test_fsdp_mixin, "FSDP_DISTRIBUTED_TEST_MODEL_TYPES"),
    ):
        allowed = getattr(module, name)
        if allowed is not None:
            allowed.update(a.routed_model_type for a in FAMILIES.values() if a.host_model_type in allowed)


_route_allow_lists()


def _route_auto_mapping_names() -> None:
    """Let the mixins find our classes in transformers' Auto mappings by name.

    ``ModelTesterMixin`` decides which inputs and checks a class gets (labels for a causal LM head, the
    seq2seq loss checks, which classes ``test_training`` trains) from ``get_values(MODEL_FOR_..._NAMES)``,
    lists of transformers' own class names. In the imported module only, ``get_values`` also returns
    the routed class name of every host class name it returns.
    """
    routed_names = {
        host.__name__: routed.__name__
        for adapter in FAMILIES.values()
        for host, routed in adapter.model_classes.items()
    }
    get_values = test_modeling_common.get_values

    def get_values_with_routed(mapping):
        values = list(get_values(mapping))
        return values + [routed_names[v] for v in values if v in routed_names]

    test_modeling_common.get_values = get_values_with_routed


_route_auto_mapping_names()


class _HostSourceInspect:
    """``inspect`` for the imported ``test_modeling_common``, reading a routed class's source as its
    host class's: the mixin greps source files (the copyright year of the config's file decides
    whether ``test_can_init_all_missing_weights`` runs; ``@use_experts_implementation`` in the model's
    module whether ``test_moe_models_record_router_logits`` does), and our classes live in our
    files but inherit the host's experts and weights."""

    def __init__(self, host_of: dict[type, type]):
        self._host_of = host_of

    def __getattr__(self, name):
        return getattr(inspect, name)

    def getfile(self, obj):
        return inspect.getfile(self._host_of.get(obj, obj))

    def getmodule(self, obj, *args):
        return inspect.getmodule(self._host_of.get(obj, obj), *args)


def _route_source_lookups() -> None:
    host_of = {routed: host for a in FAMILIES.values() for host, routed in a.model_classes.items()}
    host_of.update(
        {config_class(family, r): config_class(family, None) for family in HOSTS for r in ROUTER_TYPES}
    )
    test_modeling_common.inspect = _HostSourceInspect(host_of)


_route_source_lookups()


# --------------------------------------------------------------------------------------------
# Outcomes of the control cases
# --------------------------------------------------------------------------------------------


def _summary(exc: BaseException) -> str:
    """The error in one line: type, first line of the message, innermost frame."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" [{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}]" if frames else ""
    return f"{type(exc).__name__}: {first}{where}"


# (family, case) -> ("passed" | "skipped" | "failed", detail)
CONTROL_OUTCOMES: dict[tuple[str, str], tuple[str, str]] = {}
CONTROL_CLASSES: dict[str, type] = {}


def _control_outcome(family: str, case: str) -> tuple[str, str]:
    """The control's outcome of ``case``: from this session, or by running it now."""
    if (family, case) not in CONTROL_OUTCOMES:
        cls = CONTROL_CLASSES[family]
        test = cls(case)
        try:
            test.setUp()
            getattr(cls, case).__conformance_raw__(test)
        except unittest.SkipTest as exc:
            CONTROL_OUTCOMES[family, case] = ("skipped", str(exc))
        except Exception as exc:
            CONTROL_OUTCOMES[family, case] = ("failed", _summary(exc))
        else:
            CONTROL_OUTCOMES[family, case] = ("passed", "")
        finally:
            test.doCleanups()
    return CONTROL_OUTCOMES[family, case]


# --------------------------------------------------------------------------------------------
# Test classes
# --------------------------------------------------------------------------------------------


def _guard(fn, family: str, router_type: str | None, case: str):
    """Wrap one test method with the control rule (see the module docstring)."""
    label = FAMILIES[family].name

    if router_type is None:

        @functools.wraps(fn)
        def control_case(self):
            try:
                fn(self)
            except unittest.SkipTest as exc:
                CONTROL_OUTCOMES[family, case] = ("skipped", str(exc))
                raise
            except Exception as exc:
                CONTROL_OUTCOMES[family, case] = ("failed", _summary(exc))
                reason = control_known_failure(family, case)
                if reason is not None:
                    pytest.xfail(f"known failure of the unpatched {label}: {reason} | {_summary(exc)}")
                raise
            CONTROL_OUTCOMES[family, case] = ("passed", "")

        control_case.__conformance_raw__ = fn
        return control_case

    @functools.wraps(fn)
    def routed_case(self):
        try:
            fn(self)
        except unittest.SkipTest:
            raise
        except Exception as exc:
            status, detail = _control_outcome(family, case)
            if status == "failed":
                self.skipTest(f"the unpatched {label} fails {case} too ({detail}); routed: {_summary(exc)}")
            reason = routed_allowed(family, router_type, case)
            if reason is not None:
                self.skipTest(f"allowed routed failure of {case}: {reason} | {_summary(exc)}")
            raise

    routed_case.__conformance_raw__ = fn
    return routed_case


def _class_name(family: str, router_type: str | None) -> str:
    stem = "".join(part.capitalize() for part in family.split("_"))
    if router_type is None:
        return f"{stem}Control"
    return f"{stem}Routed" + "".join(part.capitalize() for part in router_type.split("_"))


def _make_test_class(family: str, router_type: str | None) -> type:
    base, head = model_classes(family, router_type)
    encoder_decoder = family == "switch_transformers"

    def setUp(self):  # noqa: N802 - unittest's name
        self.model_tester = FamilyTester(self, family, router_type)
        self.config_tester = ConfigTester(
            self, config_class=self.model_tester.config_class, **config_tester_kwargs(family, router_type)
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @contextlib.contextmanager
    def subTest(self, msg=None, **params):  # noqa: N802 - unittest's name
        yield

    namespace = {
        "__module__": __name__,
        "__doc__": f"transformers' mixins on {head.__name__} / {base.__name__}"
        + (
            " (control: the unpatched family)"
            if router_type is None
            else f" with router_type={router_type!r}"
        ),
        # The head model first: the training mixin falls back to all_model_classes[0] for Switch.
        "all_model_classes": (head, base),
        "is_encoder_decoder": encoder_decoder,
        # transformers skips this check for families added before 2023 (Switch) as "not prioritized";
        # we run it everywhere (for the control too: the rule above still applies).
        "test_can_init_all_missing_weights_before_2023": True,
        "conformance_family": family,
        "conformance_router": router_type,
        "setUp": setUp,
        "test_config": test_config,
        "subTest": subTest,
    }
    cls = type(_class_name(family, router_type), (*MIXINS, unittest.TestCase), namespace)
    for case in dir(cls):
        fn = getattr(cls, case)
        if case.startswith("test_") and callable(fn):
            setattr(cls, case, _guard(fn, family, router_type, case))
    return cls


for _family in FAMILY_NAMES:
    assert _family in HOSTS and _family in FAMILIES
    CONTROL_CLASSES[_family] = _make_test_class(_family, None)
    globals()[CONTROL_CLASSES[_family].__name__] = CONTROL_CLASSES[_family]
    for _router in ROUTER_TYPES:
        _cls = _make_test_class(_family, _router)
        globals()[_cls.__name__] = _cls
del _family, _router, _cls
