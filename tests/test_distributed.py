"""Two CPU processes under `accelerate launch` (gloo): routing metrics are reduced across ranks."""

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


def test_two_process_run_reduces_router_metrics_across_ranks(tmp_path):
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
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=here)
    assert result.returncode == 0, result.stderr[-4000:]
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
