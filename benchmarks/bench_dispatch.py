"""Benchmark the hf_moe_routers MoE dispatch and experts layer against transformers' implementations.

GPU (CUDA + Triton), as docs/KERNELS.md section 5 prescribes:
    python benchmarks/bench_dispatch.py --device cuda
times with ``triton.testing.do_bench`` (median and p20 / p80), rotating input sets so that no call
reuses warm data or the same routing:
  * dispatch alone (routing metadata + permute + combine) for ours vs transformers' ``grouped_mm``
    dispatch steps (sort, gather, histc, cumsum / weight, inverse permute, reshape-sum), reported as
    ms and effective GB/s (bytes = 2 * T * H * b * (1 + K)) against a device-to-device copy measured
    in the same process;
  * the whole experts layer, forward and forward+backward, for ``hf_moe_routers`` vs ``eager``,
    ``grouped_mm`` and ``batched_mm`` (skipped where its per-pair weight gather would not fit),
    reported as ms and TFLOP/s (useful FLOPs: 2 * N * 3 * H * I forward, three times that for
    forward+backward) against a bf16 matmul rate measured in the same process;
at the Mixtral shape (E=8, K=2, H=4096, I=14336) and fine-grained shapes (E=64 and 128, K=8, H=2048,
I=768), T in {16, 1024, 16384}, bf16, routings "random" and "zipf" (skewed, with empty experts).

CPU (``--device cpu``): our torch path vs transformers' ``grouped_mm`` (and ``eager``,
``batched_mm``) at small shapes, fp32, one torch thread, timed with ``time.perf_counter`` with the
providers of a point interleaved in shuffled order over rotating inputs (the CPU may be shared).

Every speedup is a ratio of two timings from the same run. Results go to
``benchmarks/results/bench_dispatch_<device>.json`` (one record per series, after
linkedin/Liger-Kernel#1183) together with the command line, the device name and the ceilings.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import transformers
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import hf_moe_routers
from hf_moe_routers.kernels import (
    combine,
    permute,
    register_experts_implementation,
    routing_metadata,
    set_kernel_backend,
    triton_available,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUANTILES = [0.5, 0.2, 0.8]
IMPLEMENTATIONS = ("hf_moe_routers", "grouped_mm", "batched_mm", "eager")
OURS = "hf_moe_routers"
# On GPU our pure-torch path is timed too (provider "hf_moe_routers_torch"), to show what the Triton
# dispatch adds; it is not a baseline for the speedups.
OURS_TORCH = "hf_moe_routers_torch"
TRANSFORMERS_DISPATCH = "transformers_grouped_mm_dispatch"


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int


GPU_SHAPES = (
    Shape("mixtral-8x7b", 4096, 14336, 8, 2),
    Shape("olmoe-like-e64", 2048, 768, 64, 8),
    Shape("qwen3-30b-a3b-e128", 2048, 768, 128, 8),
)
# Same aspect ratios, scaled down so that the CPU run takes a few minutes on two cores.
CPU_SHAPES = (
    Shape("mixtral-like-small", 256, 896, 8, 2),
    Shape("fine-grained-small-e64", 256, 96, 64, 8),
)


# ------------------------------------------------------------------------------------------ timing


def _quantiles(times_ms: list[float]) -> list[float]:
    """[median, p20, p80]."""
    deciles = statistics.quantiles(times_ms, n=10, method="inclusive")
    return [statistics.median(times_ms), deciles[1], deciles[7]]


def do_bench_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None, args) -> list[float]:
    """[median, p20, p80] in ms on CUDA (do_bench clears the L2 before every timed call)."""
    import triton.testing

    return list(
        triton.testing.do_bench(
            fn, warmup=25, rep=args.rep_ms, grad_to_none=grad_to_none, quantiles=QUANTILES
        )
    )


def time_interleaved(fns: dict[str, Callable[[], object]], args) -> dict[str, list[float]]:
    """CPU timing that visits the functions round-robin, one call each per round.

    The CPU is shared (other processes, two cores), so load changes during a run; interleaving makes
    every provider see the same load, which keeps the ratios honest even when the absolute times move.
    """
    for fn in fns.values():
        for _ in range(2):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffler = random.Random(0)
    for _ in range(args.cpu_reps):
        shuffler.shuffle(order)  # no provider always runs first (after another's cache footprint)
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _quantiles(t) for name, t in times.items()}


@dataclass
class Case:
    """One timed function: what (dispatch | layer), provider, mode (forward | full)."""

    kind: str
    provider: str
    mode: str
    fn: Callable[[], object]
    grad_to_none: list[torch.Tensor] | None = None


class Rotating:
    """Cycles through prebuilt input sets, one per call, so that no timed call reuses the last."""

    def __init__(self, sets: list[tuple]) -> None:
        self.sets = sets
        self.calls = 0

    def next(self) -> tuple:
        self.calls += 1
        return self.sets[self.calls % len(self.sets)]


# ----------------------------------------------------------------------------------------- inputs


def make_routing(
    num_tokens: int, shape: Shape, kind: str, device: torch.device, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_k_index [T, K] int64, top_k_weights [T, K] fp32)`` for a routing kind.

    random: softmax-top-k of random logits (a router at random init, renormalised as in Mixtral);
    balanced: token t goes to experts t*K .. t*K+K-1 mod E; zipf: expert e drawn with p ~ 1/(e+1)^1.2,
    which leaves the tail experts nearly or entirely empty.
    """
    E, K = shape.num_experts, shape.top_k
    if kind == "balanced":
        index_TK = (torch.arange(num_tokens * K, device=device) % E).view(num_tokens, K)
    else:
        if kind == "zipf":
            bias_E = -1.2 * torch.log(torch.arange(1, E + 1, device=device, dtype=torch.float32)) * 4.0
        else:
            bias_E = torch.zeros(E, device=device)
        noise = torch.randn(num_tokens, E, device=device, generator=generator)
        index_TK = torch.topk(noise + bias_E, K, dim=-1).indices
    weights_TK = torch.rand(num_tokens, K, device=device, generator=generator) + 0.1
    return index_TK, weights_TK / weights_TK.sum(-1, keepdim=True)


def make_experts(shape: Shape, dtype: torch.dtype, device: torch.device) -> MixtralExperts:
    config = MixtralConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
    )
    experts = MixtralExperts(config)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0.0, 0.02)
    return experts.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------- dispatch


def transformers_dispatch(
    x_TH: torch.Tensor, index_TK: torch.Tensor, weights_TK: torch.Tensor, E: int
) -> torch.Tensor:
    """The non-GEMM steps of transformers' ``grouped_mm`` experts forward, with identity experts."""
    K = index_TK.shape[1]
    ids_N = index_TK.reshape(-1)
    ids_sorted_N, perm_N = torch.sort(ids_N)
    x_NH = x_TH[perm_N // K]
    hist_input = ids_sorted_N.float() if x_TH.device.type == "cpu" else ids_sorted_N.int()
    counts_E = torch.histc(hist_input, bins=E, min=0, max=E - 1)
    torch.cumsum(counts_E, dim=0, dtype=torch.int32)
    y_NH = x_NH * weights_TK.reshape(-1)[perm_N].unsqueeze(-1)
    inv_perm_N = torch.empty_like(perm_N)
    inv_perm_N[perm_N] = torch.arange(perm_N.shape[0], device=x_TH.device)
    return y_NH[inv_perm_N].view(x_TH.shape[0], K, -1).sum(dim=1).to(x_TH.dtype)


def ours_dispatch(
    x_TH: torch.Tensor, index_TK: torch.Tensor, weights_TK: torch.Tensor, E: int, backend: str | None = None
) -> torch.Tensor:
    """Our routing metadata + permute + combine, with identity experts."""
    metadata = routing_metadata(index_TK, E, backend=backend)
    return combine(permute(x_TH, metadata, backend=backend), weights_TK, metadata, backend=backend)


# ------------------------------------------------------------------------------------------ runs


def batched_mm_fits(shape: Shape, num_tokens: int, dtype: torch.dtype, budget_bytes: float) -> bool:
    """batched_mm gathers one weight matrix per (token, slot) pair: N * 3 * H * I elements."""
    pair_weight_bytes = num_tokens * shape.top_k * 3 * shape.hidden * shape.intermediate * dtype.itemsize
    return pair_weight_bytes < budget_bytes


def record(name: str, provider: str, metric: str, unit: str, mode: str, shape: Shape, routing: str, dtype: str,
           tokens: list[int], values: list[list[float]], meta: dict) -> dict:  # fmt: skip
    return {
        "kernel_name": name,
        "kernel_provider": provider,
        "metric_name": metric,
        "metric_unit": unit,
        "gpu_name": meta["device_name"],
        "x_name": "T",
        "x_values": tokens,
        "y_values_50": [v[0] for v in values],
        "y_values_20": [v[1] for v in values],
        "y_values_80": [v[2] for v in values],
        "kernel_operation_mode": mode,
        "extra_benchmark_config": {**asdict(shape), "dtype": dtype, "routing": routing},
        **meta["versions"],
        "timestamp": meta["timestamp"],
    }


def _layer_call(experts: MixtralExperts, impl: str, rot: Rotating, backward: bool) -> Callable[[], None]:
    def call() -> None:
        # Set on every call: the cases of one point are timed interleaved.
        experts.config._experts_implementation = OURS if impl == OURS_TORCH else impl
        set_kernel_backend("torch" if impl == OURS_TORCH else None)
        x, index, weights, grad = rot.next()
        if backward:
            for leaf in (x, weights, *experts.parameters()):
                leaf.grad = None  # time a fresh backward, not a gradient accumulation
            experts(x, index, weights).backward(grad)
        else:
            with torch.no_grad():
                experts(x, index, weights)

    return call


def build_cases(experts: MixtralExperts, shape: Shape, num_tokens: int, sets: list[tuple], device: torch.device,
                dtype: torch.dtype, args) -> list[Case]:  # fmt: skip
    """All timed functions of one (shape, T, routing) point, after checking that the layers agree."""
    cases: list[Case] = []
    dispatchers = [(TRANSFORMERS_DISPATCH, None), (OURS, None)] + (
        [(OURS_TORCH, "torch")] if device.type == "cuda" else []
    )
    for provider, backend in dispatchers:
        fn = (
            transformers_dispatch
            if provider == TRANSFORMERS_DISPATCH
            else partial(ours_dispatch, backend=backend)
        )
        rot = Rotating(sets)
        call = torch.no_grad()(lambda fn=fn, rot=rot: fn(*rot.next()[:3], shape.num_experts))
        cases.append(Case("dispatch", provider, "forward", call))

    budget = args.batched_mm_budget_gb * 2**30
    providers = [
        p for p in IMPLEMENTATIONS if p != "batched_mm" or batched_mm_fits(shape, num_tokens, dtype, budget)
    ]
    providers += [OURS_TORCH] if device.type == "cuda" else []
    reference_out = None
    for impl in providers:
        experts.config._experts_implementation = OURS if impl == OURS_TORCH else impl
        set_kernel_backend("torch" if impl == OURS_TORCH else None)
        with torch.no_grad():
            out = experts(*sets[0][:3]).float()
        if reference_out is None:
            reference_out = out
        else:  # all implementations must agree before their timings mean anything
            err = ((out - reference_out).norm() / reference_out.norm().clamp_min(1e-12)).item()
            if err > (2e-2 if dtype != torch.float32 else 1e-4):
                raise RuntimeError(
                    f"{impl} disagrees with {providers[0]} at {shape.name}, T={num_tokens}: {err}"
                )
        cases.append(
            Case("layer", impl, "forward", _layer_call(experts, impl, Rotating(sets), backward=False))
        )
        full_sets = [(x.clone().requires_grad_(), i, w.clone().requires_grad_(), g) for x, i, w, g in sets]
        leaves = [t for s in full_sets for t in (s[0], s[2])] + list(experts.parameters())
        cases.append(
            Case(
                "layer", impl, "full", _layer_call(experts, impl, Rotating(full_sets), backward=True), leaves
            )
        )
    set_kernel_backend(None)
    return cases


def time_cases(cases: list[Case], device: torch.device, args) -> dict[tuple[str, str, str], list[float]]:
    """{(kind, provider, mode): [median, p20, p80] ms}; on CPU each (kind, mode) group is interleaved."""
    point: dict[tuple[str, str, str], list[float]] = {}
    if device.type == "cuda":
        for case in cases:
            point[(case.kind, case.provider, case.mode)] = do_bench_ms(case.fn, case.grad_to_none, args)
        return point
    groups: dict[tuple[str, str], dict[str, Callable[[], object]]] = {}
    for case in cases:
        groups.setdefault((case.kind, case.mode), {})[case.provider] = case.fn
    for (kind, mode), fns in groups.items():
        for provider, quantiles in time_interleaved(fns, args).items():
            point[(kind, provider, mode)] = quantiles
    return point


def work(kind: str, mode: str, shape: Shape, num_tokens: int, dtype: torch.dtype) -> tuple[str, str, float]:
    """(metric, unit, amount) of useful work: dispatch moves 2*T*H*b*(1+K) bytes (permute + combine,
    docs/KERNELS.md section 3); the layer does 2*N*3*H*I FLOPs forward and three times that forward+backward."""
    if kind == "dispatch":
        return "bandwidth", "GB/s", 2 * num_tokens * shape.hidden * dtype.itemsize * (1 + shape.top_k) / 1e6
    flops = (
        2 * num_tokens * shape.top_k * 3 * shape.hidden * shape.intermediate * (3 if mode == "full" else 1)
    )
    return "tflops", "TFLOP/s", flops / 1e9


def bench_shape(shape: Shape, tokens: list[int], routing: str, dtype: torch.dtype, device: torch.device, args,
                meta: dict, ceilings: dict) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Time every case at every T for one shape and routing; return (records, speedups)."""
    dtype_name = str(dtype).removeprefix("torch.")
    experts = make_experts(shape, dtype, device)
    generator = torch.Generator(device=device).manual_seed(0)
    series: dict[tuple[str, str, str], list[tuple[int, list[float]]]] = {}
    speedups: list[dict] = []
    for num_tokens in tokens:
        sets = []
        for _ in range(args.rotations):
            index_TK, weights_TK = make_routing(num_tokens, shape, routing, device, generator)
            x_TH = torch.randn(num_tokens, shape.hidden, device=device, dtype=dtype, generator=generator)
            grad_TH = torch.randn(num_tokens, shape.hidden, device=device, dtype=dtype, generator=generator)
            sets.append((x_TH, index_TK, weights_TK, grad_TH))
        point = time_cases(build_cases(experts, shape, num_tokens, sets, device, dtype, args), device, args)
        for key, quantiles in point.items():
            series.setdefault(key, []).append((num_tokens, quantiles))
        # Speedups are ratios of medians measured in this run, on this device.
        for kind, mode in (("dispatch", "forward"), ("layer", "forward"), ("layer", "full")):
            ours = point[(kind, OURS, mode)][0]
            baselines = {
                p: v[0]
                for (k, p, m), v in point.items()
                if (k, m) == (kind, mode) and p not in (OURS, OURS_TORCH)
            }
            best = min(baselines, key=baselines.get)
            grouped = TRANSFORMERS_DISPATCH if kind == "dispatch" else "grouped_mm"
            metric, unit, amount = work(kind, mode, shape, num_tokens, dtype)
            ceiling = ceilings.get("copy_gb_per_s" if kind == "dispatch" else "matmul_tflops")
            speedups.append({
                "shape": shape.name, "T": num_tokens, "routing": routing, "what": kind, "mode": mode,
                "ours_ms": ours, "baselines_ms": baselines, "best_baseline": best,
                "speedup_vs_best": baselines[best] / ours,
                "speedup_vs_grouped_mm": point[(kind, grouped, mode)][0] / ours,
                # The p20 ratio is less sensitive to other processes on a shared CPU.
                "speedup_vs_grouped_mm_p20": point[(kind, grouped, mode)][1] / point[(kind, OURS, mode)][1],
                f"ours_{unit}": amount / ours,
                f"ours_pct_of_measured_{'copy' if kind == 'dispatch' else 'matmul'}":
                    amount / ours / ceiling * 100 if ceiling else None,
            })  # fmt: skip
        print(f"  {shape.name} T={num_tokens} {routing}: " + ", ".join(
            f"{s['what']}/{s['mode']} {s['speedup_vs_grouped_mm']:.2f}x (p20 {s['speedup_vs_grouped_mm_p20']:.2f}x) "
            f"vs grouped_mm, {s['speedup_vs_best']:.2f}x vs best"
            for s in speedups[-3:]
        ), flush=True)  # fmt: skip

    records = []
    for (kind, provider, mode), points in series.items():
        xs = [t for t, _ in points]
        ms = [q for _, q in points]
        records.append(
            record(f"moe_{kind}", provider, "speed", "ms", mode, shape, routing, dtype_name, xs, ms, meta)
        )
        metric, unit, _ = work(kind, mode, shape, 1, dtype)
        rates = [[work(kind, mode, shape, t, dtype)[2] / v for v in q] for t, q in points]
        records.append(
            record(f"moe_{kind}", provider, metric, unit, mode, shape, routing, dtype_name, xs, rates, meta)
        )
    return records, speedups


def measure_ceilings(device: torch.device, args) -> dict:
    """Device-to-device copy bandwidth and bf16 matmul rate, measured in this process."""
    if device.type != "cuda":
        return {}
    src = torch.empty(2**29, dtype=torch.uint8, device=device)  # 512 MiB, far above L2
    dst = torch.empty_like(src)
    copy_ms = do_bench_ms(lambda: dst.copy_(src), None, args)[0]
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = do_bench_ms(lambda: a @ b, None, args)[0]
    return {"copy_gb_per_s": 2 * src.numel() / copy_ms / 1e6, "matmul_tflops": 2 * 8192**3 / mm_ms / 1e9}


def device_description(device: torch.device) -> tuple[str, str]:
    """(short name for the file, full name for the records)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        try:
            smi = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            smi = ""
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), f"{name} ({smi})" if smi else name
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return "cpu", f"{cpu}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument(
        "--tokens", type=int, nargs="*", default=None, help="T values (default: 1024 16384 on GPU)"
    )
    parser.add_argument("--routings", nargs="*", default=None, choices=("random", "balanced", "zipf"))
    parser.add_argument(
        "--shapes", nargs="*", default=None, help="shape names to run (default: all for the device)"
    )
    parser.add_argument("--rotations", type=int, default=4, help="independent input sets cycled through")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench rep time (GPU)")
    parser.add_argument("--cpu-reps", type=int, default=41, help="timed calls per point and provider (CPU)")
    parser.add_argument(
        "--batched-mm-budget-gb",
        type=float,
        default=None,
        help="skip batched_mm when its per-pair weight gather exceeds this (default 8 GPU, 0.25 CPU)",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default 1 on CPU: on a shared 2-core machine two threads gave bimodal timings)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu and not triton_available():
        sys.exit("the GPU benchmark needs Triton (pip install triton)")
    if args.batched_mm_budget_gb is None:
        args.batched_mm_budget_gb = 8.0 if on_gpu else 0.25
    if args.threads or not on_gpu:
        torch.set_num_threads(args.threads or 1)
    register_experts_implementation()
    torch.manual_seed(0)
    shapes = [s for s in (GPU_SHAPES if on_gpu else CPU_SHAPES) if not args.shapes or s.name in args.shapes]
    # T = 16 is the decode regime, the only one where batched_mm's per-pair weight gather fits.
    tokens = args.tokens or ([16, 1024, 16384] if on_gpu else [16, 128, 1024])
    routings = args.routings or ["random", "zipf"]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    short_name, device_name = device_description(device)
    meta = {
        "device_name": device_name,
        "versions": {
            "torch": torch.__version__,
            "triton": __import__("triton").__version__ if triton_available() else None,
            "transformers": transformers.__version__,
            "hf_moe_routers": hf_moe_routers.__version__,
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    ceilings = measure_ceilings(device, args)
    print(f"device: {device_name}; ceilings: {ceilings or 'n/a on CPU'}", flush=True)
    records, speedups = [], []
    for shape in shapes:
        for routing in routings:
            r, s = bench_shape(shape, tokens, routing, dtype, device, args, meta, ceilings)
            records += r
            speedups += s
    out = args.out or RESULTS_DIR / f"bench_dispatch_{short_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python " + " ".join(sys.argv),
        "device": device_name,
        "dtype": str(dtype),
        "ceilings": ceilings,
        "speedups": speedups,
        "records": records,
        **meta["versions"],
        "timestamp": meta["timestamp"],
    }
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
