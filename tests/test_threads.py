"""torch's thread count in the scripts: the CPUs available to the process, explicit settings first.

Every expected value below is worked out by hand from the faked affinity mask, cgroup files and
environment. Tests that let torch's thread count change put it back: other tests compare results bit
for bit, and the count changes the order of floating-point reductions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from hf_moe_routers.scripts import clm, finetune
from hf_moe_routers.scripts.threads import (
    ThreadChoice,
    available_cpus,
    choose_threads,
    configure_torch_threads,
)


@pytest.fixture
def cgroup(tmp_path: Path) -> dict[str, Path]:
    """A fake cgroup v2 tree: ``/proc/self/cgroup`` names ``/job/step``, no ``cpu.max`` yet."""
    root = tmp_path / "cgroup"
    (root / "job" / "step").mkdir(parents=True)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/job/step\n")
    return {"cgroup_root": root, "proc_self_cgroup": proc}


@pytest.fixture
def restore_torch_threads(monkeypatch: pytest.MonkeyPatch):
    """Put torch's thread count back afterwards; the inter-op count can be set once per process,
    so its setter is replaced by a recorder (the calls are returned for checks)."""
    interop_calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_interop_threads", interop_calls.append)
    before = torch.get_num_threads()
    try:
        yield interop_calls
    finally:
        torch.set_num_threads(before)


def four_cpus() -> set[int]:
    return {0, 1, 2, 3}


def test_affinity_mask_counts_when_there_is_no_quota(cgroup):
    # 4 CPUs in the mask, no cpu.max anywhere, a machine of 64: the mask decides.
    assert available_cpus(affinity=four_cpus, cpu_count=lambda: 64, **cgroup) == (4, "affinity")


def test_cgroup_quota_rounds_up_and_lowers_the_affinity_count(cgroup):
    # 150000 / 100000 = 1.5 CPUs of quota -> 2 threads can use it; 2 < 4 CPUs in the mask.
    (cgroup["cgroup_root"] / "job" / "step" / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(affinity=four_cpus, **cgroup) == (2, "cgroup cpu.max")


def test_the_tightest_quota_on_the_path_wins_and_max_means_none(cgroup):
    # own cgroup: no limit ("max"); parent: 300000/100000 = 3 CPUs; the mask has 4 -> 3.
    (cgroup["cgroup_root"] / "job" / "step" / "cpu.max").write_text("max 100000\n")
    (cgroup["cgroup_root"] / "job" / "cpu.max").write_text("300000 100000\n")
    assert available_cpus(affinity=four_cpus, **cgroup) == (3, "cgroup cpu.max")


def test_a_quota_above_the_mask_changes_nothing(cgroup):
    # 800000/100000 = 8 CPUs of quota, but only 4 in the mask.
    (cgroup["cgroup_root"] / "job" / "cpu.max").write_text("800000 100000\n")
    assert available_cpus(affinity=four_cpus, **cgroup) == (4, "affinity")


def test_cpu_count_when_the_affinity_mask_cannot_be_read(cgroup):
    def no_affinity() -> set[int]:
        raise OSError("not supported here")

    assert available_cpus(affinity=no_affinity, cpu_count=lambda: 6, **cgroup) == (6, "os.cpu_count")
    # os.cpu_count() may return None: one CPU then.
    assert available_cpus(affinity=no_affinity, cpu_count=lambda: None, **cgroup) == (1, "os.cpu_count")


def test_no_cgroup_v2_at_all(tmp_path):
    # Neither /proc/self/cgroup nor a cgroup folder: the mask alone.
    missing = {"cgroup_root": tmp_path / "none", "proc_self_cgroup": tmp_path / "none" / "cgroup"}
    assert available_cpus(affinity=four_cpus, **missing) == (4, "affinity")


@pytest.mark.parametrize(
    ("requested", "env", "expected"),
    [
        (None, {}, ThreadChoice(4, 4, "available CPUs", "affinity")),
        (None, {"OMP_NUM_THREADS": "1"}, ThreadChoice(1, 4, "OMP_NUM_THREADS", "affinity")),
        # one count per nesting level: the first is the outer one, the one torch uses
        (None, {"OMP_NUM_THREADS": "3,1"}, ThreadChoice(3, 4, "OMP_NUM_THREADS", "affinity")),
        # explicit counts are honoured even above the CPUs available
        (None, {"OMP_NUM_THREADS": "8"}, ThreadChoice(8, 4, "OMP_NUM_THREADS", "affinity")),
        # not a positive number: ignored, as libgomp ignores it
        (None, {"OMP_NUM_THREADS": "0"}, ThreadChoice(4, 4, "available CPUs", "affinity")),
        (None, {"OMP_NUM_THREADS": "many"}, ThreadChoice(4, 4, "available CPUs", "affinity")),
        # a --threads-style request wins over the environment
        (2, {"OMP_NUM_THREADS": "1"}, ThreadChoice(2, 4, "requested", "affinity")),
    ],
)
def test_choose_threads_order_of_precedence(cgroup, requested, env, expected):
    assert choose_threads(requested, environ=env, affinity=four_cpus, **cgroup) == expected


def test_a_request_below_one_is_an_error(cgroup):
    with pytest.raises(ValueError, match="positive"):
        choose_threads(0, environ={}, affinity=four_cpus, **cgroup)


def test_describe_says_what_decided():
    assert ThreadChoice(2, 2, "available CPUs", "affinity").describe() == (
        "torch threads: 2 (2 CPUs available to this process)"
    )
    assert ThreadChoice(1, 2, "OMP_NUM_THREADS", "affinity").describe() == (
        "torch threads: 1 (OMP_NUM_THREADS; 2 CPUs available to this process)"
    )
    assert ThreadChoice(1, 1, "available CPUs", "cgroup cpu.max").describe() == (
        "torch threads: 1 (1 CPU available to this process by its cgroup CPU quota)"
    )


def test_configure_applies_and_logs_one_line(cgroup, restore_torch_threads):
    # 1.5 CPUs of quota on a 4-CPU mask -> 2 threads; chosen to differ from the count under test
    # runs (OMP_NUM_THREADS=1), so the assertion sees a change.
    (cgroup["cgroup_root"] / "job" / "step" / "cpu.max").write_text("150000 100000\n")
    lines: list[str] = []
    choice = configure_torch_threads(log=lines.append, environ={}, affinity=four_cpus, **cgroup)
    assert choice.threads == 2 and torch.get_num_threads() == 2
    assert restore_torch_threads == [2]
    assert lines == ["torch threads: 2 (2 CPUs available to this process by its cgroup CPU quota)"]


def test_configure_logs_on_rank_zero_only(cgroup, restore_torch_threads):
    lines: list[str] = []
    configure_torch_threads(log=lines.append, environ={"RANK": "1"}, affinity=lambda: {0}, **cgroup)
    assert lines == [] and torch.get_num_threads() == 1


def test_configure_survives_an_inter_op_count_that_is_already_fixed(cgroup, monkeypatch):
    # torch raises when the inter-op pool was set before or has started: the intra-op count still applies.
    def refuse(_: int) -> None:
        raise RuntimeError("cannot set number of interop threads after parallel work has started")

    monkeypatch.setattr(torch, "set_num_interop_threads", refuse)
    before = torch.get_num_threads()
    try:
        choice = configure_torch_threads(log=None, environ={"OMP_NUM_THREADS": "3"}, **cgroup)
        assert choice.threads == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


class _Stop(Exception):
    """Ends a script's ``main`` right after the step under test."""


def _record_and_stop(monkeypatch: pytest.MonkeyPatch, module, stop_at: str) -> list[str]:
    """Replace ``module.configure_torch_threads`` by a recorder and ``module.<stop_at>`` (the first
    data step) by :class:`_Stop`: the order of the calls shows threads are set before any work."""
    calls: list[str] = []

    def record(*args, **kwargs) -> ThreadChoice:
        calls.append("threads")
        return ThreadChoice(1, 1, "requested", "affinity")  # the scripts record the count it names

    monkeypatch.setattr(module, "configure_torch_threads", record)

    def stop(*args, **kwargs):
        calls.append(stop_at)
        raise _Stop

    monkeypatch.setattr(module, stop_at, stop)
    return calls


def test_clm_main_sets_threads_first(tmp_path, monkeypatch):
    calls = _record_and_stop(monkeypatch, clm, "load_corpus")
    with pytest.raises(_Stop):
        clm.main(["--output_dir", str(tmp_path), "--max_steps", "1"])
    assert calls == ["threads", "load_corpus"]


def test_finetune_main_sets_threads_first(tmp_path, monkeypatch):
    tiny_config("mixtral").save_pretrained(tmp_path / "ckpt")  # a checkpoint folder the flags accept
    calls = _record_and_stop(monkeypatch, finetune, "checkpoint_and_data")
    with pytest.raises(_Stop):
        finetune.main(["--model_name_or_path", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "out")])
    assert calls == ["threads", "checkpoint_and_data"]


def test_clm_main_applies_the_real_choice(tmp_path, monkeypatch, restore_torch_threads, capsys):
    # The real function, as main calls it: OMP_NUM_THREADS=1 is explicit, so 1 thread and its line.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("RANK", raising=False)
    torch.set_num_threads(2)

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(clm, "load_corpus", stop)
    with pytest.raises(_Stop):
        clm.main(["--output_dir", str(tmp_path), "--max_steps", "1"])
    assert torch.get_num_threads() == 1
    assert "torch threads: 1 (OMP_NUM_THREADS;" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# --threads: the scripts' flag
# --------------------------------------------------------------------------------------------


def _stop_and_record_threads(monkeypatch: pytest.MonkeyPatch, module, stop_at: str) -> list[int]:
    """Replace ``module.<stop_at>`` (the script's first data step, after the threads are set) by a
    recorder of ``torch.get_num_threads()`` that ends the run with :class:`_Stop`."""
    seen: list[int] = []

    def stop(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise _Stop

    monkeypatch.setattr(module, stop_at, stop)
    return seen


@pytest.mark.parametrize("script", ["clm", "finetune", "lora"])
def test_threads_flag_sets_torch_threads_over_omp_num_threads(
    script, tmp_path, monkeypatch, restore_torch_threads, capsys
):
    from hf_moe_routers.scripts import lora

    # 3: neither the test run's OMP_NUM_THREADS (1, set explicitly here: the flag must win over it)
    # nor this machine's CPU count, so only the flag can have set it.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("RANK", raising=False)
    torch.set_num_threads(1)
    module, stop_at = {
        "clm": (clm, "load_corpus"),
        "finetune": (finetune, "checkpoint_and_data"),
        "lora": (lora, "checkpoint_and_data"),
    }[script]
    seen = _stop_and_record_threads(monkeypatch, module, stop_at)
    argv = ["--threads", "3", "--output_dir", str(tmp_path / "out")]
    if script != "clm":
        tiny_config("mixtral").save_pretrained(tmp_path / "ckpt")
        argv += ["--model_name_or_path", str(tmp_path / "ckpt")]
    with pytest.raises(_Stop):
        module.main(argv)
    assert seen == [3]
    assert restore_torch_threads == [3]  # the inter-op pool too
    assert "torch threads: 3 (as requested; " in capsys.readouterr().out


def test_without_the_flag_omp_num_threads_still_decides(tmp_path, monkeypatch, restore_torch_threads):
    # threads.py's documented order: the flag, else an explicit OMP_NUM_THREADS, else the CPUs.
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    seen = _stop_and_record_threads(monkeypatch, clm, "load_corpus")
    with pytest.raises(_Stop):
        clm.main(["--output_dir", str(tmp_path)])
    assert seen == [3]


@pytest.mark.parametrize("command", ["train", "finetune"])
@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", ""])
def test_bad_threads_values_are_one_line_and_exit_2(command, value, tmp_path, capsys):
    from hf_moe_routers.cli import main

    argv = [command, "--threads", value, "--output_dir", str(tmp_path)]
    if command == "finetune":
        argv += ["--model_name_or_path", str(tmp_path)]  # not read: the flags fail first
    before = torch.get_num_threads()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"hf-moe-routers {command}: error: argument --threads: must be a positive integer "
        f"(the CPU threads torch uses, 1 or more); got {value!r}",
        f"run `hf-moe-routers {command} --help` for the options",
    ]
    assert torch.get_num_threads() == before  # rejected before anything was applied


def test_lora_script_rejects_a_bad_thread_count_in_one_line(monkeypatch, capsys):
    # examples/finetune_lora.py is run_script(lora.main): the same line and status as the CLI's.
    from hf_moe_routers.scripts import lora
    from hf_moe_routers.scripts.common import run_script

    monkeypatch.setattr("sys.argv", ["finetune_lora.py", "--model_name_or_path", "x", "--threads", "0"])
    with pytest.raises(SystemExit) as exit_info:
        run_script(lora.main, "examples/finetune_lora.py")
    assert exit_info.value.code == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first == (
        "examples/finetune_lora.py: error: argument --threads: must be a positive integer "
        "(the CPU threads torch uses, 1 or more); got '0'"
    )


def test_run_arguments_built_in_python_are_checked_too():
    from hf_moe_routers.scripts.common import RunArguments

    assert RunArguments().threads is None and RunArguments(threads=2).threads == 2
    for bad in (0, -4, True):
        with pytest.raises(ValueError, match="--threads must be a positive integer"):
            RunArguments(threads=bad)


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_help_lists_threads_in_our_run_group_before_the_inherited_options(command, capsys):
    from hf_moe_routers.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    run_group = out.index("\nrun:\n")
    inherited = out.index("training (inherited from transformers.TrainingArguments):")
    assert out.index("\ndata:") < run_group < out.index("--threads") < inherited
    assert out.count("--threads") == 1  # one option, not an inherited duplicate
