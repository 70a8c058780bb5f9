"""Selection, thread count and report of the conformance run (docs/CONFORMANCE.md).

Selection. A plain ``pytest`` run keeps the *default subset* of the conformance classes (below) and
deselects the rest; ``pytest --conformance-full`` (or ``HF_MOE_ROUTERS_CONFORMANCE=full``, or
``make conformance``) keeps every class; ``HF_MOE_ROUTERS_CONFORMANCE=off`` or ``-m "not conformance"``
drops them all; ``HF_MOE_ROUTERS_CONFORMANCE=rest`` keeps what the default subset leaves out (so the
full grid can be split in two runs: a plain one and a ``rest`` one).

Threads. Every conformance test runs with ``torch.set_num_threads(HF_MOE_ROUTERS_CONFORMANCE_THREADS)``
(default 1; restored afterwards), and each spawned rank process of the distributed mixins with
``HF_MOE_ROUTERS_RANK_THREADS`` (default 1, see ``_standins/distributed_testing_utils.py``).

Report. Every outcome is written as ``{class: {case: [outcome, reason]}}`` to ``<cache>/last-run.json``
(or ``--conformance-report PATH``); the terminal summary counts passed / failed / skipped / xfailed per
class, routed vs control, and lists the routed cases skipped where the control passed.
"""

from __future__ import annotations

import collections
import json
import os

import pytest
import torch

collect_ignore = ["_standins"]

MODULE = "test_transformers_conformance.py"

# The default subset (what a plain `pytest` / `make test` runs), about 15 minutes on 2 CPU cores:
# one routed class per family, the router types rotated over the families so each is covered at
# least once (linear: Qwen2-MoE; sr_moe: OLMoE, Switch; l2r: Qwen3-MoE, DeepSeek-V3; cosine: Mixtral,
# gpt-oss). These classes run every case, except that the cases that spawn rank processes
# (tensor / expert parallel, FSDP) run only on the two families on transformers' FSDP allow-list
# (Mixtral: FSDP; Qwen3-MoE: TP, EP and FSDP). Controls run only on demand, for a routed case that
# fails (see test_transformers_conformance.py).
DEFAULT_ROUTER = {
    "mixtral": "cosine",
    "qwen2_moe": "linear",
    "qwen3_moe": "l2r",
    "olmoe": "sr_moe",
    "deepseek_v3": "l2r",
    "gpt_oss": "cosine",
    "switch_transformers": "sr_moe",
}
DEFAULT_DISTRIBUTED_FAMILIES = {"mixtral", "qwen3_moe"}
SPAWNING_CASES = (
    "test_tp_forward",
    "test_tp_backward",
    "test_tp_generation",
    "test_ep_",
    "test_fsdp2_",
    "test_hsdp_",
)


def in_default_subset(family: str, router_type: str | None, case: str) -> bool:
    if router_type is None or DEFAULT_ROUTER[family] != router_type:
        return False
    return family in DEFAULT_DISTRIBUTED_FAMILIES or not case.startswith(SPAWNING_CASES)


# transformers' own pytest marks, used by the mixins (their conftest registers them upstream)
TRANSFORMERS_MARKS = (
    "is_training_test",
    "is_tensor_parallel_test",
    "is_expert_parallel_test",
    "is_fsdp_test",
    "is_pipeline_test",
    "is_staging_test",
    "is_agent_test",
    "accelerate_tests",
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "torch_compile_test",
)


def pytest_addoption(parser):
    parser.addoption(
        "--conformance-full",
        action="store_true",
        default=False,
        help="run every conformance class (all families x control + every router type), not the default subset",
    )
    parser.addoption(
        "--conformance-report",
        default=None,
        help="where to write the JSON of every conformance outcome (default: <cache>/last-run.json)",
    )


def pytest_configure(config):
    for mark in TRANSFORMERS_MARKS:
        config.addinivalue_line("markers", f"{mark}: transformers' own test mark (conformance mixins)")


def _mode(config) -> str:
    if config.getoption("--conformance-full"):
        return "full"
    return os.environ.get("HF_MOE_ROUTERS_CONFORMANCE", "default").lower()


def _is_conformance(item) -> bool:
    return item.nodeid.split("::", 1)[0].endswith(MODULE)


def pytest_collection_modifyitems(config, items):
    mode = _mode(config)
    keep, drop = [], []
    for item in items:
        if not _is_conformance(item):
            keep.append(item)
            continue
        item.add_marker(pytest.mark.conformance)
        family, router = item.cls.conformance_family, item.cls.conformance_router
        default = in_default_subset(family, router, item.name)
        selected = mode == "full" or (mode == "default" and default) or (mode == "rest" and not default)
        (keep if selected else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _conformance_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("HF_MOE_ROUTERS_CONFORMANCE_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


_OUTCOMES: dict[str, dict[str, list[str]]] = collections.defaultdict(dict)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if not _is_conformance(item):
        return report
    cls, case = item.cls.__name__, item.name
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if hasattr(report, "wasxfail"):
            outcome, reason = "xfailed", report.wasxfail
        elif report.skipped:
            outcome, reason = "skipped", str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else ""
        elif report.failed:
            outcome, reason = (
                "failed",
                report.longreprtext.strip().splitlines()[-1][:400] if report.longreprtext else "",
            )
        else:
            outcome, reason = "passed", ""
        _OUTCOMES[cls][case] = [outcome, reason]
    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _OUTCOMES:
        return
    from pathlib import Path

    from conformance._sdist import cache_dir

    path = Path(config.getoption("--conformance-report") or cache_dir() / "last-run.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_OUTCOMES, indent=1, sort_keys=True))
    write = terminalreporter.write_line
    terminalreporter.section("conformance: outcomes per class (routed vs control)")
    kinds = ("passed", "failed", "skipped", "xfailed")
    write(f"{'class':36s}" + "".join(f"{k:>9s}" for k in kinds))
    for cls in sorted(_OUTCOMES, key=lambda c: (c.split("Control")[0].split("Routed")[0], "Routed" in c, c)):
        counts = collections.Counter(outcome for outcome, _ in _OUTCOMES[cls].values())
        write(f"{cls:36s}" + "".join(f"{counts[k]:9d}" for k in kinds))
    write(f"(every case with its reason: {path})")
    # A routed skip where the control ran the case is lost coverage: list it.
    lost = []
    for cls, cases in sorted(_OUTCOMES.items()):
        if "Routed" not in cls:
            continue
        control = _OUTCOMES.get(cls.split("Routed")[0] + "Control", {})
        for case, (outcome, reason) in sorted(cases.items()):
            if outcome == "skipped" and control.get(case, [None])[0] == "passed":
                lost.append(f"  {cls}::{case}: {reason[:200]}")
    if lost:
        write("routed cases skipped where the control passed:")
        for line in lost:
            write(line)
