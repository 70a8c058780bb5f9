"""The Triton kernels compile for real GPUs (sm_80, sm_90) at the launches our ops make, without a GPU.

The interpreter tests (test_kernels.py) check what the kernels compute; the interpreter accepts
programs the compiler rejects and knows nothing of registers. Here every launch of a forward and
backward dispatch is recorded at the benchmark shapes and compiled by Triton down to a cubin; on
sm_90 (H100/H200, the cards the benchmark targets) none may spill registers.

The compile runs in a subprocess: this process may have set TRITON_INTERPRET=1 (test_kernels.py),
which makes every kernel an interpreter function.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from hf_moe_routers.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# (T, H, E, K): Mixtral and the fine-grained shapes of benchmarks/bench_dispatch.py, plus a
# ragged small case (T not a multiple of any tile, H not a power of two).
SHAPES = [(1024, 4096, 8, 2), (16384, 2048, 128, 8), (1024, 2048, 64, 8), (37, 2880, 32, 4)]
DTYPES = ["bfloat16", "float16", "float32"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    script = textwrap.dedent(
        f"""
        import json, torch
        from hf_moe_routers.kernels import aot
        records = []
        for shape in {SHAPES!r}:
            for dtype in {DTYPES!r}:
                for launch in aot.dispatch_launches(*shape, getattr(torch, dtype)):
                    for arch in ((80, 90) if dtype == "bfloat16" else (90,)):
                        row = aot.compile_launch(launch, arch).as_dict()
                        row.update(shape=list(shape), dtype=dtype)
                        records.append(row)
        print(json.dumps(records))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences Triton 3.9's notice; fusion is its default
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # CI's home may be read-only
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_launch_compiles_for_sm80_and_sm90(compiled):
    ops = {
        "topk_softmax",
        "topk_softmax_backward",
        "routing_metadata",
        "permute",
        "permute_backward",
        "combine",
        "combine_backward",
    }
    for shape in SHAPES:
        for dtype in DTYPES:
            rows = [
                r
                for r in compiled
                if r["shape"] == list(shape) and r["dtype"] == dtype and r["arch"] == "sm_90"
            ]
            assert {r["op"] for r in rows} == ops
            # histogram, scan over chunks, prefix over buckets, ranked scatter: no sort, no host sync
            assert [r["kernel"] for r in rows if r["op"] == "routing_metadata"] == [
                "chunk_histogram_kernel",
                "chunk_scan_kernel",
                "expert_offsets_kernel",
                "rank_scatter_kernel",
            ]
    assert {r["arch"] for r in compiled if r["dtype"] == "bfloat16"} == {"sm_80", "sm_90"}
    assert all(0 < r["registers"] <= 255 for r in compiled)


def test_grids_cover_every_token_and_column(compiled):
    for r in compiled:
        T, H, E, K = r["shape"]
        c, grid = r["constexprs"], r["grid"]
        if "BLOCK_H" in c and len(grid) == 2:
            assert grid[0] * c["BLOCK_T"] >= T > (grid[0] - 1) * c["BLOCK_T"]
            assert grid[1] * c["BLOCK_H"] >= H > (grid[1] - 1) * c["BLOCK_H"]
        elif "BLOCK_T" in c:  # 1-D row grids: top-k kernels, combine backward (walks H inside)
            assert grid == [-(-T // c["BLOCK_T"])]
        elif r["kernel"] in ("chunk_histogram_kernel", "rank_scatter_kernel"):
            assert grid == [-(-T * K // c["BLOCK_N"])]
        if "BLOCK_E" in c:
            assert c["BLOCK_E"] >= E
        if "B" in c:  # experts, the sentinel bucket and the spare bucket of masked lanes
            assert c["B"] >= E + 2 and c["B"] & (c["B"] - 1) == 0


def test_no_launch_spills_registers_on_sm90(compiled):
    spilled = [
        f"{r['op']}/{r['kernel']} {r['dtype']} {r['shape']}: {r['spill_store_bytes']} B spilled, {r['registers']} regs"
        for r in compiled
        if r["arch"] == "sm_90" and (r["spill_store_bytes"] or r["spill_load_bytes"])
    ]
    assert not spilled, "tile sizes in kernels/triton_ops.py make ptxas spill:\n" + "\n".join(spilled)


def test_occupancy_by_hand():
    from hf_moe_routers.kernels.aot import occupancy

    # 255 registers round up to 256 per thread, 8192 per warp: 65536 / (8192 * 4 warps) = 2 blocks,
    # 8 of 64 warps.
    assert occupancy(255, 0, num_warps=4) == 8 / 64
    # 32 registers: 16 blocks of 4 warps fit by registers, the 64-warp limit allows 16 too.
    assert occupancy(32, 0, num_warps=4) == 1.0
    # 100 KiB of shared memory per block: two blocks in 228 KiB (sm_90), one in 164 KiB (sm_80).
    assert occupancy(32, 100 * 1024, num_warps=4, arch=90) == 8 / 64
    assert occupancy(32, 100 * 1024, num_warps=4, arch=80) == 4 / 64


def test_recording_refuses_interpreted_kernels(monkeypatch):
    from hf_moe_routers.kernels import aot

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with aot.recording_launches():
            pass
