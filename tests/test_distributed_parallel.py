"""Routed models on transformers' and accelerate's distributed engines, 2 CPU processes (gloo),
against the single-process model, for every router type.

- FSDP2 through ``from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))`` and through
  ``accelerate launch`` with ``examples/accelerate/fsdp2_cpu_2proc.yaml`` (Mixtral: its
  ``base_model_fsdp_plan`` wraps each decoder layer);
- tensor parallel (``tp_size=2``) and expert parallel (``tp_size=ep_size=2``) on Qwen3-MoE, whose
  config carries both plans (Mixtral, OLMoE, Qwen2-MoE have them too);
- ``MoERouterTrainer`` under FSDP2 (accelerate, and ``DistributedConfig``) and under EP, against a
  single-process Trainer on the same global batches; checkpoint and resume under accelerate's FSDP2
  (transformers' Trainer refuses checkpoints of models sharded by ``DistributedConfig``).

Each configuration is one launch that checks all four routers (tests/distributed/*_worker.py); the
routing matrices have their first rows scaled so that the two FSDP shards have different σ_max, and
a statistic computed on one rank's shard cannot pass for the whole matrix's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_model

import hf_moe_routers as H

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

HERE = Path(__file__).parent
WORKERS = HERE / "distributed"
FSDP_ACCELERATE_CONFIG = HERE.parent / "examples" / "accelerate" / "fsdp2_cpu_2proc.yaml"
LAUNCH_TIMEOUT = 420

ROUTER_CONFIGS = {
    "linear": H.LinearRouterConfig(),
    "sr_moe": H.SRMoEConfig(),
    # phi="tanh": a finite global Lipschitz bound, so it is compared too (affine_tanh's is inf).
    "l2r": H.L2RConfig(rank=8, num_anchors=2, phi="tanh"),
    "cosine": H.CosineRouterConfig(dim=8),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(workdir: Path, family: str) -> Path:
    """Patched tiny checkpoints of ``family`` for every router, one unpatched host checkpoint, inputs."""
    models = {}
    for router_type, config in ROUTER_CONFIGS.items():
        model = H.patch_moe_routers(tiny_model(family), config)
        with torch.no_grad():
            for _, router in model.routed_routers():
                matrix = router.base_scorer.routing_matrix()
                matrix[: matrix.shape[0] // 2] *= 2.5  # the two row shards get different σ_max
        model.save_pretrained(workdir / router_type)
        models[router_type] = str(workdir / router_type)
    tiny_model(family).save_pretrained(workdir / "host")
    ids = torch.randint(2, 64, (4, 8), generator=torch.Generator().manual_seed(1))
    torch.save({"input_ids": ids, "labels": ids.clone()}, workdir / "inputs.pt")
    (workdir / "spec.json").write_text(json.dumps({"models": models, "host": str(workdir / "host")}))
    return workdir


def _launch(launcher: str, script: str, *args: str) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(WORKERS), str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    if launcher == "torchrun":
        prefix = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
        ]
    else:
        prefix = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(FSDP_ACCELERATE_CONFIG),
            "--main_process_port",
            str(_free_port()),
        ]
    command = [*prefix, str(WORKERS / script), *args]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env, cwd=HERE
    )
    assert result.returncode == 0, result.stdout[-3000:] + "\n" + result.stderr[-6000:]


def _ranks(workdir: Path, mode: str) -> list[dict]:
    return [json.loads((workdir / f"{mode}_rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    return _prepare(tmp_path_factory.mktemp("mixtral"), "mixtral")


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    return _prepare(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe")


@pytest.fixture(scope="module")
def fsdp_results(mixtral_dir) -> list[dict]:
    _launch("torchrun", "parity_worker.py", "fsdp", str(mixtral_dir))
    return _ranks(mixtral_dir, "fsdp")


@pytest.fixture(scope="module")
def accelerate_fsdp_results(mixtral_dir) -> list[dict]:
    _launch("accelerate", "parity_worker.py", "accelerate_fsdp", str(mixtral_dir))
    return _ranks(mixtral_dir, "accelerate_fsdp")


@pytest.fixture(scope="module")
def tp_ep_results(qwen3_dir) -> dict[str, list[dict]]:
    _launch("torchrun", "parity_worker.py", "tp,ep", str(qwen3_dir))
    return {mode: _ranks(qwen3_dir, mode) for mode in ("tp", "ep")}


# ------------------------------------------------------------------------------------------------
# assertions on the workers' [distributed, reference] pairs
# ------------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _assert_pairs(tree, where: str, rel: float = 1e-4, abs_: float = 1e-6) -> None:
    """``tree`` holds ``[distributed, reference]`` pairs (see ``parity_worker._pair``)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            _assert_pairs(value, f"{where}.{key}", rel, abs_)
    elif len(tree) == 2 and all(_is_number(t) for t in tree):
        got, expected = tree
        assert got == pytest.approx(expected, rel=rel, abs=abs_), f"{where}: {got} != {expected}"
    elif len(tree) == 2 and all(isinstance(t, list) and all(_is_number(x) for x in t) for t in tree):
        assert tree[0] == tree[1], f"{where}: {tree[0]} != {tree[1]}"  # e.g. a token's top-k experts
    else:
        for i, item in enumerate(tree):
            _assert_pairs(item, f"{where}[{i}]", rel, abs_)


def _assert_training_parity(ranks: list[dict], mode: str, *, replicated: bool) -> None:
    for rank, results in enumerate(ranks):
        for router_type in ROUTER_CONFIGS:
            r = results[router_type]
            where = f"{mode} rank {rank} {router_type}"
            assert r["world_size"] == 2
            _assert_pairs({"loss": r["loss"], "lm_loss": r["lm_loss"]}, where, rel=1e-5)
            assert r["logits_max_diff"] < 1e-4, where
            # what the scorer read inside forward is the whole matrix, and so are its penalties
            assert r["matrix_max_diff"] < 1e-6, where
            _assert_pairs(r["penalties"], f"{where} penalties", rel=1e-5)
            if router_type == "sr_moe":
                assert r["penalties"][0]["spectral"][1] > 0  # the spectral term is active
            assert r["grads"], where
            for name, grad in r["grads"].items():
                assert grad["max_diff"] <= 1e-6 + 1e-4 * grad["ref_max"], f"{where} grad {name}: {grad}"
                if replicated:
                    assert grad["replicated"], f"{where}: {name} is not replicated"
            # the Trainer's statistics (gathered whole parameters) equal the single-process ones
            _assert_pairs(r["trainer_statistics"], f"{where} trainer statistics")


def _assert_shards_differ(ranks: list[dict]) -> None:
    """The test can tell a shard's σ from the whole matrix's: the two shards' σ differ."""
    for router_type in ROUTER_CONFIGS:
        shard = [ranks[r][router_type]["shard_sigmas"] for r in range(2)]
        whole = [s["spectral_norm"][1] for s in ranks[0][router_type]["statistics"]]
        assert len(shard[0]) == len(whole), router_type  # the routing matrices are sharded
        for layer, sigma in enumerate(whole):
            # so at least one rank's shard σ is not the whole matrix's
            assert abs(shard[0][layer] - shard[1][layer]) > 0.1 * sigma, router_type


def _assert_statistics(ranks: list[dict], mode: str) -> None:
    """Penalties, σ_max, stable rank and Lipschitz bounds read outside forward, as a user would
    (``float`` of what the rank holds), are the whole matrix's on every rank."""
    for rank, results in enumerate(ranks):
        for router_type in ROUTER_CONFIGS:
            stats = results[router_type]["statistics"]
            _assert_pairs(stats, f"{mode} rank {rank} {router_type} statistics")


# ------------------------------------------------------------------------------------------------
# FSDP2
# ------------------------------------------------------------------------------------------------


def test_fsdp2_distributed_config_matches_single_process(fsdp_results):
    _assert_training_parity(fsdp_results, "fsdp", replicated=False)
    _assert_shards_differ(fsdp_results)


def test_fsdp2_distributed_config_statistics_are_whole_matrix(fsdp_results):
    _assert_statistics(fsdp_results, "fsdp")


def test_fsdp2_accelerate_launch_matches_single_process(accelerate_fsdp_results):
    _assert_training_parity(accelerate_fsdp_results, "accelerate_fsdp", replicated=False)
    _assert_shards_differ(accelerate_fsdp_results)
    _assert_statistics(accelerate_fsdp_results, "accelerate_fsdp")


# ------------------------------------------------------------------------------------------------
# tensor and expert parallel
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_tensor_and_expert_parallel_match_single_process_router_replicated(tp_ep_results, mode):
    ranks = tp_ep_results[mode]
    _assert_training_parity(ranks, mode, replicated=True)
    _assert_statistics(ranks, mode)


@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_patching_a_distributed_model_says_patch_first(tp_ep_results, mode):
    for results in tp_ep_results[mode]:
        outcome = results["patch_after_distributing"]
        assert outcome["raised"], outcome
        assert "Patch first, then distribute" in outcome["message"]
        assert not outcome["patched"]


def test_patching_an_fsdp2_model_says_patch_first(fsdp_results):
    for results in fsdp_results:
        outcome = results["patch_after_distributing"]
        assert outcome["raised"] and "FSDP2" in outcome["message"], outcome
        assert "Patch first, then distribute" in outcome["message"]


# ------------------------------------------------------------------------------------------------
# MoERouterTrainer
# ------------------------------------------------------------------------------------------------


def _reference_training(workdir: Path, per_device: int, accumulation: int, resume: bool) -> dict:
    # The worker module sets one thread at import, like the ranks; the reference runs with it too,
    # and the suite's own count comes back afterwards (later tests compare bit for bit with
    # subprocesses that use the default count).
    threads = torch.get_num_threads()
    sys.path.insert(0, str(WORKERS))
    try:
        from trainer_worker import run_training
    finally:
        sys.path.remove(str(WORKERS))
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    try:
        out = {}
        for router_type in ROUTER_CONFIGS:
            path = workdir / router_type
            out[router_type] = run_training(
                lambda path=path: AutoModelForCausalLM.from_pretrained(path),
                str(workdir / f"reference_{per_device}x{accumulation}_{router_type}"),
                per_device,
                accumulation,
                resume=resume,
            )
    finally:
        torch.set_num_threads(threads)
    return out


# Costly metrics taken on each rank's last micro-batch of inputs (then averaged) legitimately differ
# from one process's last micro-batch; everything else must be equal.
INPUT_SAMPLED = ("flip_rate", "query_concentration", "drift", "lipschitz_bound")


def _assert_logs_match(got: list[dict], expected: list[dict], where: str, data_parallel: bool) -> None:
    got = [h for h in got if "loss" in h]
    expected = [h for h in expected if "loss" in h]
    assert [h["step"] for h in got] == [h["step"] for h in expected] == [1, 2, 3], where
    for a, b in zip(got, expected):
        keys = [k for k in b if k == "loss" or k.startswith("router/")]
        assert any(k.startswith("router/spectral_norm") for k in keys), where
        for key in keys:
            name = key.split("/")[1] if key.startswith("router/") else key
            if data_parallel and name in INPUT_SAMPLED:
                continue
            # Expert parallelism sums the experts' outputs in another float32 order; three optimizer
            # steps at lr 0.05 carry that into the router inputs (~1e-4 relative by step 3, larger
            # where cosines cancel). A per-rank value instead of the global one is off by far more.
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), f"{where} step {b['step']} {key}"


@pytest.fixture(scope="module")
def mixtral_trainer_reference(mixtral_dir) -> dict:
    # 2 ranks × 2 sequences per step = 2 accumulated micro-batches of 2 in one process
    return _reference_training(mixtral_dir, 2, 2, resume=True)


@pytest.fixture(scope="module")
def trainer_fsdp_results(mixtral_dir, mixtral_trainer_reference) -> tuple[dict, dict]:
    _launch("accelerate", "trainer_worker.py", "accelerate_fsdp", str(mixtral_dir))
    got = json.loads((mixtral_dir / "trainer_accelerate_fsdp.json").read_text())
    return got, mixtral_trainer_reference


def test_trainer_under_fsdp2_matches_single_process_and_resumes(trainer_fsdp_results):
    got, reference = trainer_fsdp_results
    for router_type in ROUTER_CONFIGS:
        g, r = got[router_type], reference[router_type]
        _assert_logs_match(g["first"], r["first"], f"accelerate fsdp {router_type}", data_parallel=True)
        # resumed from the step-2 checkpoint: the same third step
        resumed = [h for h in g["resumed"] if "loss" in h and h["step"] == 3]
        first = [h for h in g["first"] if "loss" in h and h["step"] == 3]
        assert resumed[0]["loss"] == pytest.approx(first[0]["loss"], rel=1e-6), router_type
        assert resumed[0]["router/load_entropy"] == pytest.approx(first[0]["router/load_entropy"], rel=1e-6)
        # each rank saw half the micro-batches; the logged window is their sum, counted once
        local = g["last_local_counts"]
        assert local[0] == local[1] == [1.0, 1.0], router_type
        assert g["last_window_counts"] == r["last_window_counts"] == [2.0, 2.0], router_type


def test_trainer_under_fsdp2_distributed_config_matches_single_process(
    mixtral_dir, mixtral_trainer_reference
):
    _launch("torchrun", "trainer_worker.py", "fsdp", str(mixtral_dir))
    got = json.loads((mixtral_dir / "trainer_fsdp.json").read_text())
    for router_type in ROUTER_CONFIGS:
        g, r = got[router_type], mixtral_trainer_reference[router_type]
        _assert_logs_match(g["first"], r["first"], f"fsdp {router_type}", data_parallel=True)
        assert g["last_local_counts"][0] == g["last_local_counts"][1] == [1.0, 1.0], router_type
        assert g["last_window_counts"] == r["last_window_counts"] == [2.0, 2.0], router_type


@pytest.fixture(scope="module")
def trainer_ep_results(qwen3_dir) -> tuple[dict, dict]:
    _launch("torchrun", "trainer_worker.py", "ep", str(qwen3_dir))
    got = json.loads((qwen3_dir / "trainer_ep.json").read_text())
    return got, _reference_training(qwen3_dir, 4, 1, resume=False)


def test_trainer_under_expert_parallel_matches_single_process(trainer_ep_results):
    got, reference = trainer_ep_results
    for router_type in ROUTER_CONFIGS:
        g, r = got[router_type], reference[router_type]
        _assert_logs_match(g["first"], r["first"], f"ep {router_type}", data_parallel=False)
        # both ranks ran the same batch: it is counted once, not once per rank
        assert g["last_local_counts"][0] == g["last_local_counts"][1] == [1.0, 1.0], router_type
        assert g["last_window_counts"] == r["last_window_counts"] == [1.0, 1.0], router_type


# ------------------------------------------------------------------------------------------------
# single process: the checks behind the distributed ones
# ------------------------------------------------------------------------------------------------


def test_patch_refuses_a_model_marked_distributed():
    from transformers.distributed.configuration_utils import DistributedConfig

    model = tiny_model("mixtral")
    model.config.distributed_config = DistributedConfig()
    with pytest.raises(ValueError, match="Patch first, then distribute"):
        H.patch_moe_routers(model, H.SRMoEConfig())
    model = tiny_model("mixtral")
    model._tp_size = 2
    with pytest.raises(ValueError, match="tensor parallel"):
        H.patch_moe_routers(model, H.SRMoEConfig())
    # an ordinary model still patches
    assert H.patch_moe_routers(tiny_model("mixtral"), H.SRMoEConfig()).config.model_type == "routed_mixtral"


def test_gathering_router_parameters_without_fsdp_changes_nothing():
    from hf_moe_routers.trainers import gathered_router_parameters

    model = H.patch_moe_routers(tiny_model("olmoe"), H.L2RConfig(rank=8, num_anchors=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with gathered_router_parameters(model):
        sigma = [float(r.base_scorer.spectral_norm()) for _, r in model.routed_routers()]
    assert all(s > 0 for s in sigma)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
