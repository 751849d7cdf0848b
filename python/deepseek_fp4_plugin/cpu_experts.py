"""Routed experts computed on the CPU, straight from expert units in host memory.

A thin wrapper over the C++ pool (cpu_experts.h): worker threads pinned to cores and kept warm,
one call per MoE layer running several experts, split over 16-row weight tiles. Numerics match
the GPU expert path: gate_up summed in float32 and rounded to bf16, SiLU·mul rounded to bf16,
down summed in float32 and rounded to bf16.

Example::

    cpu = CpuExperts(hidden, inter, reserved_cores=[0])
    cpu.run(layer, x, [CpuExpertJob(expert=e, unit=addr, rows=rows_e, y=y_e), ...])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ._ext import _C

_M = _C.cpu_experts


def cpu_features() -> dict:
    """cpuid/XCR0 features of this CPU (avx2, fma, avx512f, avx512bw, avx512vl, avx512_bf16, amx_*...)."""
    return dict(_M.features())


def resolve_isa(name: str = "auto", features: dict | None = None) -> str:
    """Instruction set a pool would use for ``name`` ("auto", "avx512_bf16", "avx512", "avx2").

    Raises NotImplementedError naming the missing features when the CPU (or the given feature
    dict) cannot run it, e.g. without AVX2 and FMA.
    """
    return _M.resolve_isa(name, features)


@dataclass
class CpuExpertJob:
    """One expert of a call.

    expert: id for error messages. unit: host address (int) of the expert unit or a uint8 tensor
    holding it. rows: int32 [tokens], rows of the call's x (None: rows 0..tokens-1, with tokens
    taken from y). y: bf16 [tokens, hidden] output, unit stride along hidden.
    """

    expert: int
    unit: int | Tensor
    rows: Tensor | None
    y: Tensor


def _addr(unit: int | Tensor) -> int:
    if isinstance(unit, Tensor):
        if unit.device.type != "cpu" or unit.dtype != torch.uint8:
            raise ValueError("cpu experts: a unit tensor must be uint8 on the CPU")
        return unit.data_ptr()
    return int(unit)


class CpuExpertsCall:
    """A submitted call: ``wait()`` returns its stats or raises naming the failed layer/expert."""

    def __init__(self, handle, keep: tuple):
        self._handle = handle
        self._keep = keep  # the tensors the workers read and write, alive until the call is done

    def done(self) -> bool:
        return bool(self._handle.done())

    def wait(self) -> dict:
        try:
            return dict(self._handle.wait())
        finally:
            self._keep = ()


class CpuExperts:
    """A pool of pinned CPU worker threads computing routed experts of one unit layout.

    Parameters
    ----------
    hidden, inter: expert shape (multiples of 16); the layout is the paging store's
        (``paging.expert_unit_layout``) unless ``layout`` is given.
    isa: "auto", "avx512_bf16", "avx512" or "avx2" (NotImplementedError if the CPU lacks it).
    threads: worker threads, 0 for one per core of ``cores``.
    cores: cores to pin to; default the cores this process may use minus ``reserved_cores``.
    reserved_cores: cores kept free (the GPU-driving and I/O threads).
    spin_us: how long idle workers spin before sleeping.
    prefetch_bytes, prefetch_l2: software prefetch distance in the weight stream, and whether it
        fills L2 only; None: the C++ defaults (CpuExpertsOptions).
    gate_up_tiles, down_tiles: 16-row tiles per work item; None: the C++ defaults.
    """

    def __init__(self, hidden: int, inter: int, *, layout: dict | None = None, isa: str = "auto",
                 threads: int = 0, cores: Sequence[int] | None = None, reserved_cores: Sequence[int] = (),
                 pin: bool = True, spin_us: int = 500, prefetch_bytes: int | None = None,
                 prefetch_l2: bool | None = None, gate_up_tiles: int | None = None, down_tiles: int | None = None):
        self.layout = dict(layout) if layout is not None else dict(_C.paging.expert_unit_layout(hidden, inter))
        if self.layout["hidden"] != hidden or self.layout["inter"] != inter:
            raise ValueError(f"cpu experts: layout is for [{self.layout['hidden']}, {self.layout['inter']}], "
                             f"expected [{hidden}, {inter}]")
        self.hidden, self.inter = hidden, inter
        tuning = {k: v for k, v in (("prefetch_bytes", prefetch_bytes), ("prefetch_l2", prefetch_l2),
                                    ("gate_up_tiles", gate_up_tiles), ("down_tiles", down_tiles)) if v is not None}
        self._pool = _M.Pool(isa=isa, threads=threads, cores=list(cores or []), reserved_cores=list(reserved_cores),
                             pin=pin, spin_us=spin_us, **tuning)

    @property
    def isa(self) -> str:
        return self._pool.isa

    @property
    def threads(self) -> int:
        return self._pool.threads

    @property
    def cores(self) -> list[int]:
        return list(self._pool.cores)

    def _args(self, x: Tensor, jobs: Sequence[CpuExpertJob]):
        if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"cpu experts: x must be a CPU bfloat16 [rows, {self.hidden}] tensor, got "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}")
        if x.stride(1) != 1:
            raise ValueError("cpu experts: x must have unit stride along hidden")
        tuples, keep = [], [x]
        for i, j in enumerate(jobs):
            y = j.y
            if y.device.type != "cpu" or y.dtype != torch.bfloat16 or y.dim() != 2 or y.shape[1] != self.hidden \
                    or y.stride(1) != 1:
                raise ValueError(f"cpu experts: job {i} (expert {j.expert}): y must be a CPU bfloat16 "
                                 f"[tokens, {self.hidden}] tensor with unit stride along hidden")
            tokens = y.shape[0]
            rows = 0
            if j.rows is not None:
                r = j.rows
                if r.device.type != "cpu" or r.dtype != torch.int32 or r.dim() != 1 or not r.is_contiguous() \
                        or r.numel() != tokens:
                    raise ValueError(f"cpu experts: job {i} (expert {j.expert}): rows must be a contiguous CPU "
                                     f"int32 [{tokens}] tensor")
                rows = r.data_ptr()
                keep.append(r)
            keep += [y, j.unit]
            tuples.append((int(j.expert), _addr(j.unit), rows, tokens, y.data_ptr(), y.stride(0)))
        return tuples, tuple(keep)

    def submit(self, layer: int, x: Tensor, jobs: Sequence[CpuExpertJob],
               on_done: Callable[[str], None] | None = None) -> CpuExpertsCall:
        """Queues one MoE layer's CPU experts and returns at once.

        x: bf16 [rows, hidden] (the layer's input rows on the host). on_done(message) runs on a
        worker thread when the call has finished (message empty on success).
        """
        tuples, keep = self._args(x, jobs)
        h = self._pool.submit(layer, self.layout, x.data_ptr(), x.shape[0], x.stride(0), tuples, on_done)
        return CpuExpertsCall(h, keep)

    def run(self, layer: int, x: Tensor, jobs: Sequence[CpuExpertJob]) -> dict:
        """submit() and wait(): returns {experts, weight_bytes, start_ms, run_ms}."""
        tuples, _ = self._args(x, jobs)
        return dict(self._pool.run(layer, self.layout, x.data_ptr(), x.shape[0], x.stride(0), tuples))

    def read_bandwidth(self, buf: Tensor, reps: int = 3) -> float:
        """Host memory read rate (GB/s, best of ``reps``) of the pool's threads over ``buf``."""
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise ValueError("cpu experts: read_bandwidth needs a contiguous CPU tensor")
        return float(self._pool.read_bandwidth(buf.data_ptr(), buf.numel() * buf.element_size(), reps))

    def inject_fault(self, layer: int, expert: int) -> None:
        """Tests: the next job of (layer, expert) fails as if its unit were corrupt."""
        self._pool.inject_fault(layer, expert)


def expert_reference(layout: dict, unit: int | Tensor, x: Tensor) -> Tensor:
    """The C++ reference (moe_experts_units_cpu) of one expert: x bf16 [tokens, hidden] → y."""
    x = x.contiguous()
    y = torch.empty_like(x)
    _M.reference(layout, _addr(unit), x.data_ptr(), x.shape[0], y.data_ptr())
    return y
