"""Run-time guards of the Engine: one generation at a time, and no sampling from broken logits.

One engine, one generation
--------------------------
An Engine owns one KV cache and (on CUDA) graphs with static buffers, so two generations on
it at once would overwrite each other's state. ``generate``, ``stream`` and ``logits`` hold the
engine while they run; a second call meanwhile — from another thread, or from the same thread
while a ``stream()`` is still open — raises ``EngineBusyError`` at once instead of waiting or
corrupting the open one. A stream holds the engine from its first item until it is exhausted,
closed (``close()``) or dropped (garbage collected). Use one Engine per concurrent caller, or
serialize calls.

Numerical guard
---------------
``sample_checked`` samples like ``sampling.sample`` and also reports which rows of the logits
hold NaN or ±inf, from one reduction over [B, V] whose result travels to the host inside the
sampled tokens (one copy, no extra synchronization). It runs on the logits a decode step
returns, outside any captured CUDA graph, and would be capturable itself (no host sync).
"""

from __future__ import annotations

import functools
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import Tensor

from .sampling import SamplingParams, sample

T = TypeVar("T")


class EngineBusyError(RuntimeError):
    """A generation was started on an Engine that is already running one."""


class GenerationError(RuntimeError):
    """Generation stopped on invalid numbers (a Completion with finish_reason "error"), raised by
    APIs that return plain text and so cannot carry the reason."""


def text_or_raise(completion):
    """completion.text, or GenerationError when it ended with finish_reason "error"."""
    if completion.finish_reason == "error":
        raise GenerationError(completion.error)
    return completion.text


def stream_or_raise(engine, pieces: Iterator[str]) -> Iterator[str]:
    """Yields ``pieces`` of ``engine.stream``; raises GenerationError after the last one when the
    stream ended with finish_reason "error"."""
    yield from pieces   # an exhausted stream has set last_completion
    text_or_raise(engine.last_completion)


class Occupancy:
    """Who holds an engine: at most one generation at a time (non-blocking)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: Optional[str] = None

    def _busy(self, what: str) -> EngineBusyError:
        holder = self._holder or "another call"
        hint = (" (iterate it to the end, close() it, or drop it first)" if holder.startswith("stream")
                else "")
        return EngineBusyError(
            f"Engine is busy: {what} was called while {holder} is running on this engine{hint}. "
            f"One Engine runs one generation at a time; use one Engine per concurrent caller or "
            f"serialize the calls")

    def acquire(self, what: str) -> None:
        if not self._lock.acquire(blocking=False):
            raise self._busy(what)
        self._holder = f"{what} (thread {threading.current_thread().name!r})"

    def release(self) -> None:
        self._holder = None
        self._lock.release()

    def check(self, what: str) -> None:
        """Raises now if the engine is held (a stream checks early, then holds it lazily)."""
        if self._lock.locked():
            raise self._busy(what)

    @property
    def busy(self) -> bool:
        return self._lock.locked()


def exclusive(method):
    """Engine method decorator: holds ``self._occupancy`` for the duration of the call."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        occupancy: Occupancy = self._occupancy
        occupancy.acquire(f"{method.__name__}()")
        try:
            return method(self, *args, **kwargs)
        finally:
            occupancy.release()
    return wrapper


def exclusive_iter(occupancy: Occupancy, what: str, items: Iterator[T]) -> Iterator[T]:
    """Iterates ``items`` holding ``occupancy`` from the first item until the iteration ends,
    is closed, or the generator is dropped (its finally runs on close / garbage collection)."""
    occupancy.acquire(what)
    try:
        yield from items
    finally:
        occupancy.release()


def nonfinite_message(step: int) -> str:
    return (f"non-finite logits (NaN or inf) at generated token {step}: the model produced invalid "
            f"numbers (corrupt weights or an overflow); generation of this sequence stopped")


def sample_checked(logits: Tensor, params: SamplingParams,
                   generators: Optional[Sequence[torch.Generator]] = None) -> Tuple[List[int], List[bool]]:
    """``sample`` with a numerical guard: (next token per row, whether that row's logits were all
    finite). Rows flagged False have no meaningful token.

    ``logits`` are the model's raw float32 logits [B, V], before any masking (a -inf there is
    an error too). A row's sum is finite exactly when every entry is (barring an overflow of
    the sum, which needs logits beyond 1e33: also an error), so the guard is one reduction.
    """
    finite = torch.isfinite(logits.sum(dim=-1))                                     # [B] bool
    if not params.greedy:
        # multinomial refuses NaN / inf probabilities: give flagged rows harmless logits
        logits = torch.where(finite[:, None], logits, 0.0)
    tokens = sample(logits, params, generators)                                     # [B] int64
    marked = torch.where(finite, tokens, -1).tolist()   # -1 marks a flagged row; one copy to the host
    return [max(t, 0) for t in marked], [t >= 0 for t in marked]


def sample_checked_rows(logits: Tensor, params: Sequence[Optional[SamplingParams]],
                        generators: Sequence[Optional[torch.Generator]]) -> Tuple[List[int], List[bool]]:
    """``sample_checked`` with sampling parameters per row (continuous batching): row b samples
    with ``params[b]`` and ``generators[b]`` (None: the global generator) exactly as
    ``sample_checked`` would sample it alone; rows whose params are None (unused batch rows)
    get a token that means nothing. Rows sharing temperature / top-k / top-p sample together;
    still one copy to the host."""
    finite = torch.isfinite(logits.sum(dim=-1))                                     # [B] bool
    tokens = logits.argmax(dim=-1)                                                  # [B] int64, greedy rows
    groups: Dict[Tuple[float, float, int, bool], List[int]] = {}
    for b, p in enumerate(params):
        if p is not None and not p.greedy:
            groups.setdefault((p.temperature, p.top_p, p.top_k, generators[b] is not None), []).append(b)
    for (temperature, top_p, top_k, seeded), rows in groups.items():
        idx = torch.tensor(rows, device=logits.device)
        sub = torch.where(finite[idx, None], logits[idx], 0.0)                     # [n, V]
        gens = [generators[b] for b in rows] if seeded else None
        tokens[idx] = sample(sub, SamplingParams(temperature, top_p, top_k), gens)
    marked = torch.where(finite, tokens, -1).tolist()
    return [max(t, 0) for t in marked], [t >= 0 for t in marked]
