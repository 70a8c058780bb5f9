"""Two CPU processes under `accelerate launch` (gloo): routing metrics are reduced across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_moe_routers import metrics as M


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
        "29531",
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
