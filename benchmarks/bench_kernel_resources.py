"""Static resource table of the Triton dispatch kernels at the benchmark shapes (no GPU needed).

    python benchmarks/bench_kernel_resources.py            # sm_90 (H100/H200), writes the JSON below
    python benchmarks/bench_kernel_resources.py --arch 80  # sm_80 (A100)
    hf-moe-routers bench kernel_resources --arch 90

For every launch of a dispatch forward and backward (top-k softmax, routing metadata, permute,
combine and their backward) at the shapes of ``bench_dispatch.py``, it records the grid, tile sizes
and ``num_warps`` our launchers choose, compiles the kernel with Triton to a cubin for the target
architecture and reports what ``ptxas`` says: registers per thread, spill bytes, stack, shared memory
and the theoretical occupancy. See ``hf_moe_routers/kernels/aot.py``.

This is not a timing: a spill-free, well-occupied kernel can still be slow. It is what can be known
about the GPU code on a machine without a GPU, and it is how the tile sizes in
``kernels/triton_ops.py`` were chosen where no GPU was available (the first version spilled at
E = 128 in the top-k backward and at K = 8 in the combine). Results go to
``benchmarks/results/kernel_resources_sm<arch>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JIT functions
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402

from hf_moe_routers.kernels import aot  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: (name, T, H, E, K): the shapes of bench_dispatch.py.
SHAPES = [
    ("mixtral", 1024, 4096, 8, 2),
    ("mixtral", 16384, 4096, 8, 2),
    ("fine_e64", 1024, 2048, 64, 8),
    ("fine_e64", 16384, 2048, 64, 8),
    ("fine_e128", 1024, 2048, 128, 8),
    ("fine_e128", 16384, 2048, 128, 8),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", type=int, default=90, choices=(80, 90), help="compute capability x10")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    records = []
    print(f"{'shape':<24} {'dtype':<5} {'op / kernel':<46} {'regs':>4} {'spill':>5} {'smem':>6} {'occ':>5}")
    for name, T, H, E, K in SHAPES:
        for dtype_name in args.dtypes:
            for launch in aot.dispatch_launches(T, H, E, K, DTYPES[dtype_name]):
                row = aot.compile_launch(launch, args.arch).as_dict()
                row.update(shape=name, T=T, H=H, E=E, K=K, dtype=dtype_name)
                records.append(row)
                print(
                    f"{f'{name} T={T}':<24} {dtype_name:<5} {row['op'] + ' / ' + row['kernel']:<46} "
                    f"{row['registers']:>4} {row['spill_store_bytes']:>5} {row['shared_bytes']:>6} "
                    f"{row['occupancy']:>5.2f}"
                )
    spilled = [r for r in records if r["spill_store_bytes"] or r["spill_load_bytes"]]
    summary = {
        "launches": len(records),
        "spilling_launches": len(spilled),
        "max_registers": max(r["registers"] for r in records),
        "min_occupancy": min(r["occupancy"] for r in records),
    }
    payload = {
        "benchmark": "kernel_resources",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "target": f"sm_{args.arch} (compiled ahead of time; no GPU was used)",
        "host": platform.node() or "unknown",
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
        },
        "note": "ptxas -v of the cubins Triton builds for our launches; occupancy = resident warps / 64 "
        "from registers and shared memory only. Not a timing.",
        "summary": summary,
        "records": records,
    }
    out = args.out or RESULTS_DIR / f"kernel_resources_sm{args.arch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(summary))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
