"""Benchmark the routed router forward (and backward) against the host family's own router.

    python benchmarks/bench_router.py                 # CPU, one torch thread
    python benchmarks/bench_router.py --device cuda   # the routed softmax routers then run the
                                                      # fused Triton top-k (kernels.topk_softmax)

The routed softmax-top-k routers (Mixtral, Qwen2/3-MoE, OLMoE) compute their weights through
``kernels.topk_softmax``; on CPU that is the host's own formula, so the routed linear router should
cost what the host router costs. The other routers add their scorer's work (SR-MoE, L2R, cosine).
Each point times the host ``MixtralTopKRouter`` and the routed routers of one shape with the
providers interleaved in shuffled order over rotating inputs (the CPU may be shared), and reports
the median and each routed router's ratio to the host router from the same run. Results go to
``benchmarks/results/bench_router_<device>.json`` with the command line and the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

import hf_moe_routers as H
from hf_moe_routers.families import FAMILIES
from hf_moe_routers.modeling.base import convert_to_routed

ROUTERS = {
    "linear": H.LinearRouterConfig(),
    "sr_moe": H.SRMoEConfig(),
    "l2r": H.L2RConfig(rank=16, num_anchors=4),
    "cosine": H.CosineRouterConfig(),
}
#: (tokens, hidden size, experts, top-k): a small Mixtral-like and a fine-grained shape.
SHAPES = ((4096, 512, 8, 2), (4096, 512, 64, 8))


def _routers(hidden: int, experts: int, top_k: int, device: torch.device) -> dict[str, torch.nn.Module]:
    """The host router and one routed router per type, all from the same gate weight."""
    config = MixtralConfig(hidden_size=hidden, num_local_experts=experts, num_experts_per_tok=top_k)
    torch.manual_seed(0)
    host = MixtralTopKRouter(config).to(device)
    torch.nn.init.normal_(host.weight, std=0.02)
    routers = {"host": host}
    for name, router_config in ROUTERS.items():
        # convert_to_routed works on a model; a holder module with the router as a child is enough.
        holder = torch.nn.Module()
        holder.config = config
        holder.mlp = copy.deepcopy(host)
        convert_to_routed(holder, FAMILIES["mixtral"], router_config, from_dense=True)
        routers[name] = holder.mlp
    return routers


def _time(
    routers: dict[str, torch.nn.Module], inputs: list[torch.Tensor], backward: bool, repeats: int
) -> dict:
    times: dict[str, list[float]] = {name: [] for name in routers}
    sync = torch.cuda.synchronize if inputs[0].is_cuda else (lambda: None)
    for step in range(repeats):
        order = list(routers)
        random.shuffle(order)
        x = inputs[step % len(inputs)]
        for name in order:
            router = routers[name]
            router.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            logits, weights, _ = router(x)
            if backward:
                (weights.float().sum() + logits.float().square().mean()).backward()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values[repeats // 5 :]) for name, values in times.items()}


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/bench_router_<device>.json)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    device = torch.device(args.device)
    records = []
    for tokens, hidden, experts, top_k in SHAPES:
        routers = _routers(hidden, experts, top_k, device)
        generator = torch.Generator().manual_seed(1)
        inputs = [torch.randn(tokens, hidden, generator=generator).to(device) for _ in range(4)]
        for backward in (False, True):
            medians = _time(routers, inputs, backward, args.repeats)
            record = {
                "tokens": tokens,
                "hidden_size": hidden,
                "experts": experts,
                "top_k": top_k,
                "pass": "forward+backward" if backward else "forward",
                "median_ms": medians,
                "ratio_to_host": {name: medians[name] / medians["host"] for name in ROUTERS},
            }
            records.append(record)
            ratios = ", ".join(f"{name} {value:.2f}x" for name, value in record["ratio_to_host"].items())
            print(
                f"T={tokens} H={hidden} E={experts} K={top_k} {record['pass']}: host "
                f"{medians['host']:.3f} ms; {ratios}"
            )
    out = (
        Path(args.out) if args.out else Path(__file__).parent / "results" / f"bench_router_{device.type}.json"
    )
    out.write_text(
        json.dumps(
            {
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": _machine(device),
                "torch": torch.__version__,
                "records": records,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
