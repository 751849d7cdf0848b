"""Continuous batching: many requests, one Engine.

``BatchScheduler`` owns the engine's generation loop in a thread of its own. Requests come from
any thread (``submit``) and wait in a bounded queue; at each step the loop

1. drops requests whose caller went away (``Ticket.cancel``): their cache rows are free again;
2. admits waiting requests into free cache rows (lowest first) and prefills them there
   (``Engine.prefill(..., rows=...)``) while the other rows keep their sequences;
3. runs one decode step (``Engine.decode_one_token``) over rows 0..R-1, R = the highest live
   row + 1, each row at its own position, with each request's own sampling parameters.

A request leaves as soon as it finishes; its row is reused at the next step.

Why rows 0..R-1 and not always max_batch_size rows: a decode step's cost grows with its rows
where it matters most. In a MoE layer every row routes to top-k experts: 8 rows of which one is
live would read (or page in over PCIe) up to 8× the expert bytes of that one. A free row below
R (a hole left by a finished request) is fed token 0 at position 0: it attends only to that
one slot of its own row, so every hole computes the same thing and routes to the same top-k
experts (at most top-k extra experts per layer, the same every step, so a paged store keeps
them cached); new requests take the lowest free row, so holes fill first. CUDA graphs are
captured per (R, attended length) as ``Engine.decode_one_token`` does: at most
max_batch_size × (number of length buckets) graphs.

Numbers: a request prefilled alone (``batch_prefill=False``, the default) gets bit-for-bit
the prefill ``Engine.generate`` runs for it (same shapes); its decode steps then differ from
``Engine.generate``'s only if the kernels' per-row results depend on the number of rows or on
the attended length (masked keys add exact zeros). ``batch_prefill=True`` prefills the
requests admitted together as one right-padded batch: faster when a paged store streams each
layer's experts once per prefill, but a row's numbers then depend on the padding (rounding
differences; see the README's Serving section for what was measured).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

import torch

from .guard import nonfinite_message, sample_checked_rows
from .requests import Completion, RequestPlan, SequenceState

log = logging.getLogger(__name__)

# finish reasons besides the Completion's own ("eos", "stop", "length", "error")
CANCELLED = "cancelled"  # the caller went away
ABORTED = "aborted"  # the scheduler shut down before the request finished
SHUTDOWN_MESSAGE = "the server shut down before the request finished"


class QueueFullError(RuntimeError):
    """The waiting queue is full; ``retry_after`` is an estimate in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(RuntimeError):
    """The scheduler no longer accepts requests."""


Sink = Callable[["Ticket", str, Optional[Completion]], None]


class Ticket:
    """One submitted request. The sink is called from the scheduler's thread with
    (ticket, new text, None) as text becomes safe to hand out, then once with
    (ticket, remaining text, Completion) when the request ends. ``cancel()`` from any thread
    frees its row at the next step."""

    _ids = itertools.count()

    def __init__(self, prompt: List[int], plan: RequestPlan, sink: Sink):
        self.id = next(Ticket._ids)
        self.prompt, self.plan, self.sink = prompt, plan, sink
        self.submitted_at = time.perf_counter()
        self.admitted_at: Optional[float] = None  # got a row
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.generated = 0  # tokens sampled (an ending EOS included)
        self.completion: Optional[Completion] = None
        self.cancelled = False
        # set by the scheduler while the request runs
        self.row = -1
        self.state: Optional[SequenceState] = None
        self.position = 0  # where the next token goes
        self.generator: Optional[torch.Generator] = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def done(self) -> bool:
        return self.completion is not None

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class SchedulerStats:
    """Counters of a BatchScheduler (read from any thread; written by its loop)."""

    submitted: int = 0
    rejected_queue_full: int = 0
    finished: Dict[str, int] = None  # finish reason → requests
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefills: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_rows: int = 0  # rows through decode steps (holes included)
    decode_live_rows: int = 0  # of which held a live request
    decode_s: float = 0.0
    engine_errors: int = 0

    def __post_init__(self):
        if self.finished is None:
            self.finished = collections.Counter()


class BatchScheduler:
    """Continuous batching over one Engine (see the module docstring).

    Parameters
    ----------
    engine : the Engine; the scheduler holds it from ``start()`` to ``stop()`` (meanwhile its
        ``generate`` / ``stream`` raise EngineBusyError)
    max_queue : most requests waiting for a row; beyond it ``submit`` raises QueueFullError
    batch_prefill : prefill the requests admitted at one step as one right-padded batch
        (default: one by one, bit-identical to ``Engine.generate``'s prefill)
    """

    def __init__(self, engine, max_queue: int = 64, batch_prefill: bool = False):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.engine = engine
        self.slots = engine.max_batch_size
        self.max_queue = max_queue
        self.batch_prefill = bool(batch_prefill)
        self.stats = SchedulerStats()
        self._cond = threading.Condition()
        self._waiting: Deque[Ticket] = collections.deque()
        self._live: Dict[int, Ticket] = {}  # row → ticket (loop thread only)
        self._calls: List[tuple] = []  # (fn, Future) to run between steps
        self._accepting = True
        self._deadline: Optional[float] = None  # abort running requests after it
        self._thread: Optional[threading.Thread] = None
        self._stopped = threading.Event()
        self._service_s = 1.0  # running mean of a request's time in a row

    # ---- any thread -------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self._live)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def accepting(self) -> bool:
        return self._accepting and not self._stopped.is_set()

    def start(self) -> "BatchScheduler":
        if self._thread is not None:
            raise RuntimeError("the scheduler was already started")
        started = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(started,), name="dsfp4-batch", daemon=True)
        self._thread.start()
        started.result()  # raises EngineBusyError when the engine is in use
        return self

    def submit(self, prompt: Sequence[int], plan: RequestPlan, sink: Sink) -> Ticket:
        """Queues a request (prompt token ids, a plan from ``engine.requests.plan``)."""
        ticket = Ticket(list(prompt), plan, sink)
        with self._cond:
            if not self.accepting:
                raise ShuttingDownError("the server is shutting down")
            # rows are taken by the loop: requests not yet admitted count as waiting
            if len(self._live) + len(self._waiting) >= self.slots + self.max_queue:
                self.stats.rejected_queue_full += 1
                raise QueueFullError(
                    f"all {self.slots} batch slots are busy and {len(self._waiting)} "
                    f"requests are waiting (max_queue = {self.max_queue})",
                    self.retry_after(),
                )
            self._waiting.append(ticket)
            self.stats.submitted += 1
            self._cond.notify_all()
        return ticket

    def retry_after(self) -> int:
        """Seconds until a queued request would likely get a row (≥ 1)."""
        rounds = (len(self._waiting) + 1) / max(1, self.slots)
        return max(1, min(60, math.ceil(rounds * self._service_s)))

    def cancel(self, ticket: Ticket) -> None:
        ticket.cancel()
        with self._cond:
            self._cond.notify_all()

    def between_steps(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Runs ``fn()`` in the scheduler's thread between two steps (nothing runs on the
        engine meanwhile: e.g. reading a store's counters); a Future of its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._thread is None or self._stopped.is_set():
                run_now = True
            else:
                run_now = False
                self._calls.append((fn, fut))
                self._cond.notify_all()
        if run_now:
            _run_call(fn, fut)
        return fut

    def shutdown(self, grace: float = 0.0) -> None:
        """Stops taking requests: waiting ones end now (finish reason "aborted"), running ones
        may finish within ``grace`` seconds, then end too. Returns at once."""
        with self._cond:
            self._accepting = False
            deadline = time.monotonic() + max(0.0, grace)
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            self._cond.notify_all()

    def stop(self, grace: float = 0.0, timeout: Optional[float] = None) -> None:
        """``shutdown(grace)``, then waits for the loop to end and release the engine."""
        self.shutdown(grace)
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the loop (its own thread) -------------------------------------------------------------
    def _main(self, started: concurrent.futures.Future) -> None:
        occupancy = self.engine._occupancy  # one generation at a time: this loop is it
        try:
            occupancy.acquire("the batch scheduler")
        except BaseException as e:
            started.set_exception(e)
            self._stopped.set()
            return
        started.set_result(None)
        try:
            self._loop()
        except BaseException:  # a bug here must not leave callers waiting forever
            log.exception("batch scheduler stopped on an unexpected error")
            raise
        finally:
            with self._cond:
                self._stopped.set()
                self._accepting = False
                left = list(self._live.values()) + list(self._waiting)
                self._live.clear()
                self._waiting.clear()
                calls, self._calls = self._calls, []
            for t in left:
                self._end(t, ABORTED, SHUTDOWN_MESSAGE)
            for fn, fut in calls:
                _run_call(fn, fut)
            occupancy.release()

    def _loop(self) -> None:
        free = list(range(self.slots))
        while self._step(free):
            pass

    def _step(self, free: List[int]) -> bool:
        """One step: waits for work, then admits, prefills and decodes; False once shut down.
        (A method of its own, so no finished request stays referenced while the loop waits.)"""
        with self._cond:
            while not (self._waiting or self._live or self._calls or self._deadline is not None):
                self._cond.wait()
            calls, self._calls = self._calls, []
            closing = self._deadline is not None
            dropped = [t for t in self._waiting if t.cancelled or closing]
            if dropped:
                self._waiting = collections.deque(t for t in self._waiting if not (t.cancelled or closing))
            admitted = []
            if not closing:
                free.sort()
                while self._waiting and free:
                    t = self._waiting.popleft()
                    t.row = free.pop(0)
                    t.admitted_at = time.perf_counter()
                    self._live[t.row] = t
                    admitted.append(t)
            past_deadline = closing and time.monotonic() >= self._deadline
        for fn, fut in calls:
            _run_call(fn, fut)
        for t in dropped:
            self._drop(t)
        for t in list(self._live.values()):
            if t.cancelled or past_deadline:
                self._release(t, free)
                self._drop(t)
        if closing and not self._live:
            return False
        if admitted:
            self._prefill([t for t in admitted if not t.cancelled], free)
        if self._live:
            self._decode(free)
        return True

    def _prefill(self, tickets: List[Ticket], free: List[int]) -> None:
        groups = [tickets] if self.batch_prefill else [[t] for t in tickets]
        eng = self.engine
        for group in groups:
            if not group:
                continue
            lengths = [t.prompt_tokens for t in group]
            tokens = torch.zeros(len(group), max(lengths), dtype=torch.long)  # [b, T]
            for i, t in enumerate(group):
                tokens[i, : len(t.prompt)] = torch.tensor(t.prompt)
                t.state = SequenceState(t.id, len(t.prompt), eng._decoder(), t.plan)
                gens = t.plan.params.generators(1, eng.device)
                t.generator = gens[0] if gens else None
                t.position = len(t.prompt)
            t0 = time.perf_counter()
            try:
                logits = eng.prefill(tokens.to(eng.device), lengths, rows=[t.row for t in group])  # [b, V]
            except Exception as e:  # e.g. a paged store's read error: these requests fail, others go on
                self._engine_error(group, e, free)
                continue
            self.stats.prefills += 1
            self.stats.prompt_tokens += sum(lengths)
            self._sample(logits, group, range(len(group)), free)
            self.stats.prefill_s += time.perf_counter() - t0

    def _decode(self, free: List[int]) -> None:
        eng = self.engine
        live = list(self._live.values())
        rows = max(self._live) + 1
        feed, pos = [0] * rows, [0] * rows  # holes: token 0 at position 0 (see the module docstring)
        for t in live:
            feed[t.row] = t.state.last_token
            pos[t.row] = min(t.position, eng.max_seq_len - 1)
        t0 = time.perf_counter()
        try:
            logits = eng.decode_one_token(
                torch.tensor(feed, dtype=torch.long, device=eng.device),
                torch.tensor(pos, dtype=torch.long, device=eng.device),
                kv_len=max(pos) + 1,
            )  # [rows, V]
        except Exception as e:
            self._engine_error(live, e, free)
            return
        for t in live:
            t.position += 1
        self._sample(logits, live, [t.row for t in live], free)
        self.stats.decode_steps += 1
        self.stats.decode_rows += rows
        self.stats.decode_live_rows += len(live)
        self.stats.decode_s += time.perf_counter() - t0

    def _sample(
        self, logits: torch.Tensor, tickets: List[Ticket], rows: Sequence[int], free: List[int]
    ) -> None:
        """Samples the next token of each ticket (its logits: row rows[i] of tickets[i]) and
        hands out the new text; finished tickets leave their cache row."""
        params: List[Any] = [None] * logits.shape[0]
        gens: List[Optional[torch.Generator]] = [None] * logits.shape[0]
        for t, r in zip(tickets, rows):
            params[r], gens[r] = t.plan.params, t.generator
        tokens, finite = sample_checked_rows(logits, params, gens)
        now = time.perf_counter()
        for t, r in zip(tickets, rows):
            s = t.state
            if finite[r]:
                t.generated += 1
                delta = s.accept(tokens[r], room=self.engine.max_seq_len - t.position)
            else:
                delta = s.fail(nonfinite_message(len(s.tokens)))
            if t.first_token_at is None:
                t.first_token_at = now
            if s.done:
                self._release(t, free)
                self._finish(t, s.completion(), delta)
            elif delta:
                self._emit(t, delta, None)

    def _engine_error(self, tickets: List[Ticket], e: Exception, free: List[int]) -> None:
        log.error("generation step failed for %d request(s): %s", len(tickets), e, exc_info=True)
        self.stats.engine_errors += 1
        for t in tickets:
            self._release(t, free)
            self._end(t, "error", f"{type(e).__name__}: {' '.join(str(e).split())}")

    def _release(self, t: Ticket, free: List[int]) -> None:
        if self._live.get(t.row) is t:
            del self._live[t.row]
            free.append(t.row)
            if t.first_token_at is not None:
                self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - t.first_token_at)

    def _drop(self, t: Ticket) -> None:
        if t.cancelled:
            self._end(t, CANCELLED, "the client went away")
        else:
            self._end(t, ABORTED, SHUTDOWN_MESSAGE)

    def _end(self, t: Ticket, reason: str, message: str) -> None:
        """Ends a request that did not finish by itself ("error", cancelled or aborted): the
        text it holds back goes out with the Completion."""
        delta = ""
        if t.state is not None:
            if not t.state.done:
                delta = t.state.fail(message)
            c = t.state.completion()
        else:
            c = Completion("", [], reason, t.prompt_tokens)
        c.finish_reason, c.error = reason, message
        self._finish(t, c, delta)

    def _finish(self, t: Ticket, c: Completion, delta: str) -> None:
        if t.done:
            return
        t.completion = c
        t.finished_at = time.perf_counter()
        self.stats.finished[c.finish_reason] += 1
        self.stats.generated_tokens += t.generated
        self._emit(t, delta, c)

    def _emit(self, t: Ticket, delta: str, done: Optional[Completion]) -> None:
        try:
            t.sink(t, delta, done)
        except Exception:  # a broken consumer must not stop the other requests
            log.exception("request %d: the result consumer failed", t.id)
            t.cancel()


def _run_call(fn: Callable[[], Any], fut: concurrent.futures.Future) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn())
    except BaseException as e:
        fut.set_exception(e)
