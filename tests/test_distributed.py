"""Two CPU processes under `accelerate launch` (gloo): routing metrics are reduced across ranks; the
global-batch balance loss and the expert-bias counts are those of one process on the concatenated batch."""

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

from hf_moe_routers import metrics as M
from hf_moe_routers.scripts.launch import ends_distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(*args: str) -> None:
    """``tests/distributed_train.py *args`` in two gloo processes under ``accelerate launch``."""
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": str(here), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    config = here.parent / "examples" / "accelerate" / "cpu_2proc.yaml"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--main_process_port",
        str(_free_port()),
        str(here / "distributed_train.py"),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=here)
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_process_run_reduces_router_metrics_across_ranks(tmp_path):
    _launch_two_processes(str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    logs = next(
        h for h in json.loads((tmp_path / "log_history.json").read_text()) if "router/load_entropy" in h
    )
    for layer in range(2):
        local = [torch.tensor(r["loads"][layer], dtype=torch.float64) for r in ranks]
        assert not torch.equal(local[0], local[1])  # the ranks saw different data
        total = local[0] + local[1]
        expected = float(M.load_entropy(total / total.sum()))
        assert logs[f"router/load_entropy/layer_{layer}"] == pytest.approx(expected, rel=1e-9)
        # and it is not what either rank alone would report
        alone = float(M.load_entropy(local[0] / local[0].sum()))
        assert abs(alone - expected) > 1e-6
    assert sum(r["counts"][0] for r in ranks) == 4  # 2 micro-batches per rank over the window


@pytest.mark.parametrize("raises", [False, True])
def test_script_entry_points_destroy_the_process_group(tmp_path, raises):
    # Leaving a gloo group alive until interpreter exit can abort the process (SIGABRT).
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")

    @ends_distributed
    def main() -> int:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        assert dist.is_initialized()
        if raises:
            raise RuntimeError("boom")
        return 7

    if raises:
        with pytest.raises(RuntimeError, match="boom"):
            main()
    else:
        assert main() == 7
    assert not dist.is_initialized()


class Rows(torch.utils.data.Dataset):
    """The rows of a dict of ``[N, S]`` tensors, in order."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def test_global_batch_balance_and_expert_bias_of_two_processes_are_one_process_on_the_joint_batch(
    tmp_path, monkeypatch
):
    """Each run: one optimizer step, 2 sequences per rank with different real-token counts. One
    process replays the ranks' sequences as one batch of 4 with the same arguments: the router
    gradients (the data-parallel average) and the expert biases after the step (updated from the
    counts summed over the ranks) must be the same. With the micro-batch loss the gradients differ:
    each rank's f and P are its own."""
    import distributed_train as worker

    from hf_moe_routers.trainers import trainer as trainer_module

    _launch_two_processes(str(tmp_path), "balance")
    for name, kind, granularity in worker.BALANCE_RUNS:
        ranks = [json.loads((tmp_path / f"{name}_rank{r}.json").read_text()) for r in range(2)]
        assert all(r["world_size"] == 2 for r in ranks)
        assert all(len(r["seen"]) == 1 and len(r["balance_losses"]) == 1 for r in ranks)
        real = [sum(map(sum, r["seen"][0]["attention_mask"])) for r in ranks]
        assert real[0] != real[1]  # the ranks' padding differs
        joint = {
            k: torch.tensor(ranks[0]["seen"][0][k] + ranks[1]["seen"][0][k])
            for k in ("input_ids", "attention_mask", "labels")
        }

        one_losses: list[float] = []
        monkeypatch.setattr(
            trainer_module, "balance_loss", worker.recording(worker.original_balance_loss, one_losses)
        )
        model = worker.balance_model()
        trainer = worker.RecordingTrainer(
            model=model,
            args=worker.balance_arguments(tmp_path / f"{name}_one", 4, kind, granularity),
            train_dataset=Rows(joint),
        )
        trainer.train()
        assert torch.equal(torch.tensor(trainer.seen[0]["input_ids"]), joint["input_ids"])
        # Both ranks hold the same biases (the counts were summed before the update) ...
        assert ranks[0]["biases"] == ranks[1]["biases"]
        one_bias = worker.expert_biases(model)
        for router, values in one_bias.items():
            # ... and they are the one-process biases: the counts of the joint batch.
            torch.testing.assert_close(
                torch.tensor(ranks[0]["biases"][router]), torch.tensor(values), rtol=0, atol=1e-7
            )
            assert max(map(abs, values)) > 0
        assert len(trainer.router_grads) == 2  # the two routers' weights
        for param, grad in trainer.router_grads.items():
            two = torch.tensor(ranks[0]["router_grads"][param], dtype=torch.float64)
            assert torch.equal(two, torch.tensor(ranks[1]["router_grads"][param], dtype=torch.float64))
            one = torch.tensor(grad, dtype=torch.float64)
            if granularity == "global_batch":
                torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-8, msg=f"{name} {param}")
            else:
                assert (two - one).abs().max() > 1e-5, (name, param)
        if granularity == "global_batch":
            # The mean of the ranks' losses is the one-process loss over the joint batch.
            mean = sum(r["balance_losses"][0] for r in ranks) / 2
            assert len(one_losses) == 1 and mean == pytest.approx(one_losses[0], rel=1e-5)
