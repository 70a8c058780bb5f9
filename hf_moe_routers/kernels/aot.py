"""Compile the dispatch kernels ahead of time for an NVIDIA architecture, without a GPU.

The CPU test suite runs the Triton kernels in Triton's interpreter, which accepts programs that the
real compiler rejects (and says nothing about registers). This module closes that gap on machines
with no GPU: it records the exact launches our ops would make for given shapes (grid, argument
types, compile-time constants, ``num_warps``), compiles each with Triton's own pipeline down to a
cubin for the target architecture (``ptxas`` ships inside the Triton wheel; no CUDA driver is
needed), and reads the registers, spills and shared memory that ``ptxas`` reports.

Used by ``tests/test_kernels_aot.py`` (every launch compiles for sm_80 and sm_90) and by
``benchmarks/bench_kernel_resources.py`` (the resource table at the benchmark shapes).

The specialisation follows what Triton's JIT does at a launch: integer arguments equal to 1 become
constants, and pointers / integers divisible by 16 carry a divisibility hint. What this cannot tell
is speed: a clean, spill-free compile is necessary for a fast kernel, not proof of one.

The kernels must be real ``JITFunction``s: run it in a process where ``TRITON_INTERPRET`` is unset.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from hf_moe_routers.kernels._backend import load_triton_ops, triton_interpreting

#: torch dtype -> Triton pointer element type, for the dtypes our launchers pass.
_POINTER_TYPES: dict[torch.dtype, str] = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
}

#: Per-SM limits used for the theoretical occupancy (identical on A100 and H100/H200).
_REGISTERS_PER_SM = 65536
_MAX_WARPS_PER_SM = {80: 64, 90: 64}
_SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}


@dataclass
class KernelLaunch:
    """One kernel launch as our op would issue it: the kernel, the grid and typed arguments."""

    op: str
    kernel: str
    grid: tuple[int, ...]
    signature: dict[str, str]
    constexprs: dict[str, Any]
    divisible_by_16: list[str] = field(default_factory=list)
    num_warps: int = 4

    def describe(self) -> str:
        consts = ", ".join(f"{k}={_constant_repr(v)}" for k, v in self.constexprs.items())
        return f"{self.op}/{self.kernel}[{'x'.join(map(str, self.grid))}] warps={self.num_warps} {consts}"


@dataclass
class KernelResources:
    """Per-thread registers, spills and stack frame of one compiled launch (from ``ptxas -v``), its
    shared memory per block, and the theoretical occupancy those allow."""

    launch: KernelLaunch
    arch: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int

    @property
    def occupancy(self) -> float:
        return occupancy(self.registers, self.shared_bytes, self.launch.num_warps, self.arch)

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": self.launch.op,
            "kernel": self.launch.kernel,
            "grid": list(self.launch.grid),
            "num_warps": self.launch.num_warps,
            "constexprs": {k: _constant_repr(v) for k, v in self.launch.constexprs.items()},
            "arch": f"sm_{self.arch}",
            "registers": self.registers,
            "spill_store_bytes": self.spill_store_bytes,
            "spill_load_bytes": self.spill_load_bytes,
            "stack_bytes": self.stack_bytes,
            "shared_bytes": self.shared_bytes,
            "occupancy": round(self.occupancy, 4),
        }


def _constant_repr(value: Any) -> Any:
    return str(value) if not isinstance(value, (bool, int, float, str)) else value


def _argument_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _POINTER_TYPES:
            raise TypeError(f"no Triton pointer type for {value.dtype}")
        return "*" + _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type a kernel argument of type {type(value).__name__}")


def _divisible_by_16(value: Any) -> bool:
    """The JIT's alignment specialisation: pointers 16-byte aligned, integers multiples of 16."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return type(value) is int and value % 16 == 0


class _Recorder:
    """Stands in for a ``JITFunction``: ``kernel[grid](*args, **meta)`` is recorded, not run."""

    def __init__(self, name: str, fn: Any, sink: list[KernelLaunch], op: Callable[[], str]) -> None:
        self.name, self.fn, self.sink, self.op = name, fn, sink, op

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            num_warps = int(kwargs.pop("num_warps", 4))
            names = list(self.fn.arg_names)
            bound = dict(zip(names, args, strict=False)) | kwargs
            missing = [n for n in names if n not in bound]
            if missing:
                raise TypeError(f"{self.name}: launch is missing arguments {missing}")
            declared = {names[p.num] for p in self.fn.params if p.is_constexpr}
            # Triton's JIT turns integer arguments equal to 1 into constants (unit strides matter:
            # they let loads vectorise), so the static compile does the same.
            constant = {n for n in names if n in declared or (type(bound[n]) is int and bound[n] == 1)}
            self.sink.append(
                KernelLaunch(
                    op=self.op(),
                    kernel=self.name,
                    grid=tuple(int(g) for g in (grid if isinstance(grid, tuple) else (grid,))),
                    signature={n: "constexpr" if n in constant else _argument_type(bound[n]) for n in names},
                    constexprs={n: bound[n] for n in names if n in constant},
                    divisible_by_16=[n for n in names if n not in constant and _divisible_by_16(bound[n])],
                    num_warps=num_warps,
                )
            )

        return launch


@contextmanager
def recording_launches() -> Iterator[tuple[list[KernelLaunch], Callable[[str], None]]]:
    """Within the block, every Triton launch of ``triton_ops`` is recorded instead of run.

    Yields ``(launches, set_op)``: call ``set_op(name)`` before an op to label its launches.
    Tensors may live on the CPU (their contents are never read).
    """
    if triton_interpreting():
        raise RuntimeError(
            "kernels.aot compiles real Triton kernels: unset TRITON_INTERPRET for this process"
        )
    ops = load_triton_ops()
    real = ops.kernels
    launches: list[KernelLaunch] = []
    current = {"op": "?"}
    names = [n for n in dir(real) if n.endswith("_kernel")]
    ops.kernels = SimpleNamespace(
        **{n: _Recorder(n, getattr(real, n), launches, lambda: current["op"]) for n in names}
    )
    try:
        yield launches, lambda name: current.__setitem__("op", name)
    finally:
        ops.kernels = real


def dispatch_launches(
    num_tokens: int,
    hidden: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    *,
    renormalize: bool = True,
) -> list[KernelLaunch]:
    """The launches of a full dispatch forward and backward at these shapes, in call order.

    Ops: topk_softmax (+ backward), routing_metadata, permute (+ backward), combine (+ backward).
    """
    ops = load_triton_ops()
    T, H, E, K = num_tokens, hidden, num_experts, top_k
    empty = torch.empty  # contents are never read: only shapes, dtypes and strides
    with recording_launches() as (launches, set_op):
        logits_TE = empty(T, E, dtype=dtype)
        set_op("topk_softmax")
        ops.topk_softmax_op._init_fn(logits_TE, K, renormalize)
        weights_TK = empty(T, K, dtype=torch.float32)
        index_TK = empty(T, K, dtype=torch.int64)
        set_op("topk_softmax_backward")
        ops.topk_softmax_backward_op._init_fn(logits_TE, weights_TK, index_TK, weights_TK, renormalize)
        set_op("routing_metadata")
        offsets_E1, _sorted, pos_N = ops.routing_metadata_op._init_fn(index_TK, E)
        x_TH = empty(T, H, dtype=dtype)
        set_op("permute")
        ops.permute_op._init_fn(x_TH, pos_N, offsets_E1, K)
        y_NH = empty(T * K, H, dtype=dtype)
        set_op("permute_backward")
        ops.permute_backward_op._init_fn(y_NH, pos_N, offsets_E1, K)
        set_op("combine")
        ops.combine_op._init_fn(y_NH, weights_TK, pos_N, offsets_E1)
        set_op("combine_backward")
        ops.combine_backward_op._init_fn(x_TH, y_NH, weights_TK, pos_N, offsets_E1)
    return launches


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for ``sm_<arch>`` (the wheel bundles one per architecture range)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spill stores / loads and stack frame per thread, as ``ptxas -v`` reports them.

    Triton already ran ptxas to build the cubin but keeps its log only on failure, so the PTX is
    assembled once more, with the same register-allocation flag Triton passes.
    """
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "kernel.ptx")
        source.write_text(ptx)
        result = subprocess.run(
            [_ptxas(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{suffix}", str(source),
             "-o", str(Path(tmp, "kernel.cubin"))],
            capture_output=True,
            text=True,
        )  # fmt: skip
    log = result.stderr + result.stdout
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed on the PTX Triton generated:\n{log[-2000:]}")

    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        if match is None:
            raise RuntimeError(f"ptxas -v printed nothing matching {pattern!r}:\n{log[-2000:]}")
        return int(match.group(1))

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_store_bytes": number(r"(\d+) bytes spill stores"),
        "spill_load_bytes": number(r"(\d+) bytes spill loads"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
    }


def occupancy(registers: int, shared_bytes: int, num_warps: int, arch: int = 90) -> float:
    """Theoretical occupancy (resident warps / maximum warps per SM) from registers and shared memory.

    Registers are allocated per warp in units of 256; shared memory per block as reported.
    """
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = _REGISTERS_PER_SM // (per_warp * num_warps)
    by_shared = _SHARED_PER_SM[arch] // shared_bytes if shared_bytes else by_registers
    max_warps = _MAX_WARPS_PER_SM[arch]
    blocks = min(by_registers, by_shared, max_warps // num_warps)
    return blocks * num_warps / max_warps


def compile_launch(launch: KernelLaunch, arch: int = 90) -> KernelResources:
    """Compile one recorded launch to a cubin for ``sm_<arch>`` and report its resources.

    Raises whatever Triton's compiler raises when the kernel does not compile for real.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(load_triton_ops().kernels, launch.kernel)
    names = list(fn.arg_names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in launch.divisible_by_16}
    source = ASTSource(
        fn=fn, signature=dict(launch.signature), constexprs=dict(launch.constexprs), attrs=attrs
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.num_warps}
    )
    report = _ptxas_report(compiled.asm["ptx"], arch)
    return KernelResources(
        launch=launch,
        arch=arch,
        shared_bytes=int(compiled.metadata.shared),
        **report,
    )
