"""One rank of a 2-process CPU (gloo) parity run; launched by tests/test_distributed_parallel.py.

Usage: ``parity_worker.py MODES WORKDIR`` under ``torchrun --nproc_per_node 2`` (MODES a comma-separated
list of ``fsdp``, ``tp``, ``ep``) or ``accelerate launch`` with examples/accelerate/fsdp2_cpu_2proc.yaml
(MODES ``accelerate_fsdp``). Under ``DistributedConfig`` modes it also records what
``patch_moe_routers`` does with an unpatched model that is already distributed (``spec["host"]``).

For every routed checkpoint listed in ``WORKDIR/spec.json`` it loads the model twice: distributed
(``from_pretrained(distributed_config=...)`` or ``Accelerator.prepare``) and as a plain
single-process reference, runs one training forward/backward on each (LM loss plus the routers'
parameter-only penalties captured inside forward, exactly as ``MoERouterTrainer`` does), and reads
the routers' statistics outside forward. Each rank writes ``WORKDIR/<MODE>_rank<r>.json`` with pairs
``[distributed, reference]``; the test asserts on them. Under data parallelism (FSDP2) each rank
takes its own half of the batch and the reference is the mean of the two halves' losses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor, Partial  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.distributed.configuration_utils import DistributedConfig  # noqa: E402

import hf_moe_routers  # noqa: E402, F401  (registers the routed model types)
from hf_moe_routers.modeling.base import RoutedRouterMixin  # noqa: E402
from hf_moe_routers.reporting.collector import RouterCollector  # noqa: E402
from hf_moe_routers.scripts.launch import ends_distributed  # noqa: E402
from hf_moe_routers.sharding import gathered_router_parameters  # noqa: E402

DISTRIBUTED_CONFIGS = {
    "fsdp": lambda: DistributedConfig(fsdp_size=2),
    "tp": lambda: DistributedConfig(tp_size=2),
    "ep": lambda: DistributedConfig(tp_size=2, ep_size=2),
}
DATA_PARALLEL = {"fsdp": True, "accelerate_fsdp": True, "tp": False, "ep": False}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds: the local tensor of a DTensor (a ``Partial`` one is a wrong value here,
    which the comparison with the reference then shows), else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _number(tensor: torch.Tensor) -> float:
    return float(_local(tensor).detach().float().reshape(()))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, RoutedRouterMixin)]


def _train_step(model, ids, labels) -> dict:
    """Loss = LM loss + Σ weighted penalty terms captured inside the scorers' forward; backward."""
    collector = RouterCollector(model)
    model.train()
    collector.start()
    try:
        out = model(input_ids=ids, labels=labels)
    finally:
        captures = collector.stop()
        collector.remove()
    loss = out.loss
    penalties = []
    for info, capture in zip(collector.routers, captures):
        terms = capture.penalty_terms or {}
        weights = info.scorer.regularization_weights()
        penalties.append({k: _number(v) for k, v in terms.items()})
        for name, value in terms.items():
            if weights.get(name):
                loss = loss + weights[name] * value.float()
    loss.backward()
    return {
        "lm_loss": _number(out.loss),
        "loss": _number(loss),
        "logits": _local(out.logits).detach().float(),
        "penalties": penalties,
        "matrices": [_local(c.routing_matrix).float() for c in captures],
    }


def _statistics(model) -> list[dict[str, float]]:
    """The routers' parameter statistics read outside forward, as a caller would."""
    stats = []
    for router in _routers(model):
        scorer = router.base_scorer
        terms = router.regularization_terms()
        entry = {f"term/{k}": _number(v) for k, v in terms.items()}
        entry["regularization_loss"] = _number(router.regularization_loss())
        entry["lipschitz_bound"] = _number(router.lipschitz_bound())
        entry["spectral_norm"] = _number(scorer.spectral_norm())
        entry["stable_rank"] = _number(scorer.stable_rank())
        entry["partial"] = float(
            any(
                isinstance(v, DTensor) and any(isinstance(p, Partial) for p in v.placements)
                for v in [
                    *terms.values(),
                    router.lipschitz_bound(),
                    scorer.spectral_norm(),
                    scorer.stable_rank(),
                ]
            )
        )
        stats.append(entry)
    return stats


def _trainer_statistics(model) -> list[dict[str, float]]:
    """What MoERouterTrainer's costly metrics read: the whole matrices, gathered under FSDP2."""
    from hf_moe_routers import metrics as M

    collector = RouterCollector(model)
    collector.remove()
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    out = []
    with gathered_router_parameters(model):
        for info in collector.routers:
            matrix = info.gate_matrix()
            out.append(
                {
                    "spectral_norm": float(M.spectral_norm(matrix.float())),
                    "stable_rank": float(M.stable_rank(matrix.float())),
                    "lipschitz_bound_global": float(info.lipschitz_bound()),
                    "local_lipschitz_bound": float(info.local_lipschitz_bound(x)),
                    "route": info.route(x).tolist(),
                }
            )
    return out


def _pair(a, b):
    if isinstance(a, dict):
        return {k: _pair(a[k], b[k]) for k in a}
    if isinstance(a, list) and a and isinstance(a[0], (dict, list)):
        return [_pair(x, y) for x, y in zip(a, b)]
    return [a, b]


def _load(mode: str, path: str):
    if mode in DISTRIBUTED_CONFIGS:
        return AutoModelForCausalLM.from_pretrained(path, distributed_config=DISTRIBUTED_CONFIGS[mode]())
    from accelerate import Accelerator
    from accelerate_cpu_fsdp import force_fsdp_on_cpu

    accelerator = Accelerator(cpu=True)
    force_fsdp_on_cpu(accelerator)
    model = AutoModelForCausalLM.from_pretrained(path)
    return accelerator.prepare(model)


def check_router(mode: str, path: str, inputs: dict, rank: int) -> dict:
    model = _load(mode, path)
    reference = AutoModelForCausalLM.from_pretrained(path)
    ids, labels = inputs["input_ids"], inputs["labels"]
    half = ids.shape[0] // 2
    rows = slice(rank * half, (rank + 1) * half) if DATA_PARALLEL[mode] else slice(None)

    dist_step = _train_step(model, ids[rows], labels[rows])
    if DATA_PARALLEL[mode]:
        # FSDP2 averages gradients over the ranks: the reference loss is the mean of both halves'.
        steps = [
            _train_step(reference, ids[r * half : (r + 1) * half], labels[r * half : (r + 1) * half])
            for r in (0, 1)
        ]
        for param in reference.parameters():
            if param.grad is not None:
                param.grad /= 2
        ref_step = steps[rank]
    else:
        ref_step = _train_step(reference, ids, labels)

    result: dict = {"world_size": dist.get_world_size()}
    result["lm_loss"] = [dist_step["lm_loss"], ref_step["lm_loss"]]
    result["loss"] = [dist_step["loss"], ref_step["loss"]]
    result["logits_max_diff"] = float((dist_step["logits"] - ref_step["logits"]).abs().max())
    result["penalties"] = _pair(dist_step["penalties"], ref_step["penalties"])
    result["matrix_max_diff"] = max(
        float((a - b).abs().max()) for a, b in zip(dist_step["matrices"], ref_step["matrices"])
    )
    # Router gradients (the whole tensor on every rank) against the reference's.
    grads = {}
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        name = name.removeprefix("_fsdp_wrapped_module.").replace("._checkpoint_wrapped_module", "")
        if ".scorer." not in name:
            continue
        assert param.grad is not None, f"no gradient for {name} on rank {rank}"
        grad = _full(param.grad).float()
        ref = ref_params[name].grad.float()
        grads[name] = {
            "max_diff": float((grad - ref).abs().max()),
            "ref_max": float(ref.abs().max()),
            "replicated": not isinstance(param, DTensor),
        }
    result["grads"] = grads
    result["statistics"] = _pair(_statistics(model), _statistics(reference))
    result["trainer_statistics"] = _pair(_trainer_statistics(model), _trainer_statistics(reference))
    # The routing matrices' per-rank shards really differ (so a σ of a shard would be caught).
    result["shard_sigmas"] = []
    for router in _routers(model):
        scorer = router.base_scorer
        # the parameter behind routing_matrix() (which itself may return the gathered whole)
        matrix = next(
            getattr(scorer, n) for n in ("weight", "prototypes", "query_proj", "proj") if hasattr(scorer, n)
        )
        if isinstance(matrix, DTensor):
            local = matrix.to_local().detach().float()
            result["shard_sigmas"].append(
                float(torch.linalg.matrix_norm(local, ord=2)) if local.numel() else 0.0
            )
    del model
    return result


def check_patch_refused(mode: str, host_path: str) -> dict:
    """``patch_moe_routers`` on a model that transformers already distributed must refuse clearly."""
    model = AutoModelForCausalLM.from_pretrained(host_path, distributed_config=DISTRIBUTED_CONFIGS[mode]())
    try:
        hf_moe_routers.patch_moe_routers(model, hf_moe_routers.SRMoEConfig())
    except ValueError as error:
        return {"raised": True, "message": str(error), "patched": False}
    patched = any(isinstance(m, RoutedRouterMixin) for m in model.modules())
    return {"raised": False, "message": "", "patched": patched}


@ends_distributed
def main() -> None:
    modes, workdir = sys.argv[1].split(","), Path(sys.argv[2])
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    spec = json.loads((workdir / "spec.json").read_text())
    inputs = torch.load(workdir / "inputs.pt")
    for mode in modes:
        results = {}
        for router_type, path in spec["models"].items():
            results[router_type] = check_router(mode, path, inputs, rank)
            dist.barrier()
        if mode in DISTRIBUTED_CONFIGS:
            results["patch_after_distributing"] = check_patch_refused(mode, spec["host"])
        (workdir / f"{mode}_rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
