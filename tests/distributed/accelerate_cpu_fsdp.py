"""Run accelerate's FSDP2 path on CPU processes (gloo), for the tests.

accelerate 1.16 turns ``distributed_type: FSDP`` on only for GPU-like devices; on CPU processes it
falls back to plain multi-CPU data parallelism. ``force_fsdp_on_cpu`` switches the shared
``AcceleratorState`` to FSDP with the plugin the launch config describes (``FSDP_*`` variables), so
``Accelerator.prepare`` wraps the model with ``fully_shard`` exactly as it does on GPUs.
"""

from __future__ import annotations

import os


def force_fsdp_on_cpu(accelerator) -> None:  # noqa: ANN001 - accelerate.Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"expected a multi-CPU accelerate state; got {state.distributed_type}")
    plugin = FullyShardedDataParallelPlugin()
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    from accelerate.state import AcceleratorState, PartialState

    for shared in (AcceleratorState._shared_state, PartialState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


def make_trainers_use_fsdp_on_cpu() -> None:
    """Every ``transformers.Trainer`` created afterwards gets an ``Accelerator`` forced to FSDP."""
    import transformers.trainer
    from accelerate import Accelerator

    class CPUFSDPAccelerator(Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            force_fsdp_on_cpu(self)

    transformers.trainer.Accelerator = CPUFSDPAccelerator


def allow_parallelism_config_on_cpu() -> None:
    """accelerate 1.16 refuses a ``ParallelismConfig`` (which the Trainer builds for a model loaded
    with ``DistributedConfig(tp_size=...)``) on CPU processes; skip only that device check."""
    from accelerate.parallelism_config import ParallelismConfig

    original = ParallelismConfig._validate_accelerator
    if getattr(original, "_cpu_allowed", False):
        return

    def validate(self, accelerator):  # noqa: ANN001, ANN202
        try:
            return original(self, accelerator)
        except ValueError as error:
            if "MULTI_CPU" not in str(error):
                raise

    validate._cpu_allowed = True
    ParallelismConfig._validate_accelerator = validate
