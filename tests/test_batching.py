"""Continuous batching without HTTP: prefill into chosen cache rows, per-row sampling, the
BatchScheduler's admission, cancellation, errors and shutdown, resident and paged stores."""

import threading
import time

import pytest
import torch
from deepseek_fp4_plugin import Engine, EngineBusyError
from deepseek_fp4_plugin.batching import ABORTED, CANCELLED, BatchScheduler, QueueFullError, ShuttingDownError
from deepseek_fp4_plugin.guard import sample_checked, sample_checked_rows
from deepseek_fp4_plugin.paged import PagedWeightStore
from deepseek_fp4_plugin.sampling import SamplingParams
from deepseek_fp4_plugin.tiny import make_tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
PROMPTS = ["The sea", "Good morning to all of you", "1, 2, 3,", "A mixture of experts", "Four-bit", "Hello"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("batching") / "tiny", seed=3)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine.from_pretrained(tiny_dir, device="cpu", max_batch_size=4, max_seq_len=128)


class Collector:
    """A sink: text and Completion per ticket, and an event per finished ticket."""

    def __init__(self):
        self.text, self.done, self.lock = {}, {}, threading.Lock()
        self.first = threading.Event()

    def __call__(self, ticket, delta, completion):
        with self.lock:
            self.text[ticket.id] = self.text.get(ticket.id, "") + delta
            if delta:
                self.first.set()
            if completion is not None:
                self.done[ticket.id] = completion

    def wait(self, tickets, timeout=60):
        end = time.monotonic() + timeout
        while not all(t.done for t in tickets):
            assert time.monotonic() < end, "requests did not finish"
            time.sleep(0.01)


def submit(sched, engine, prompt, sink, max_tokens, **kw):
    ids = engine.requests.prompts(prompt, False, None)[1]
    plan = engine.requests.plan(
        ids,
        max_tokens,
        kw.get("temperature", 0.0),
        1.0,
        kw.get("top_k", 0),
        kw.get("seed"),
        None,
        None,
        kw.get("ignore_eos", True),
    )
    return sched.submit(ids[0], plan, sink)


# ---- pieces ---------------------------------------------------------------------------------


def test_sample_checked_rows_equals_each_row_alone():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    logits[2, 5] = float("nan")
    params = [
        SamplingParams(),
        SamplingParams(0.8, seed=3),
        SamplingParams(0.8, seed=4),
        None,
        SamplingParams(1.2, 0.9, 20, seed=5),
        SamplingParams(0.8, seed=6),
    ]

    def gens():
        return [None if p is None else (p.generators(1, torch.device("cpu")) or [None])[0] for p in params]

    tokens, finite = sample_checked_rows(logits, params, gens())
    assert finite == [True, True, False, True, True, True]
    for b, (p, g) in enumerate(zip(params, gens())):
        if p is not None and finite[b]:
            want, _ = sample_checked(logits[b : b + 1], p, None if g is None else [g])
            assert tokens[b] == want[0], b


def test_prefill_into_rows(engine):
    ids = [engine.tokenizer.encode(p) for p in PROMPTS[:3]]
    alone = [engine.prefill(torch.tensor([x]), [len(x)]) for x in ids]
    engine.prefill(torch.tensor([ids[0]]), [len(ids[0])], rows=[0])
    row0 = engine.cache.kv[:, 0].clone()
    T = max(len(x) for x in ids[1:])
    padded = torch.zeros(2, T, dtype=torch.long)
    for i, x in enumerate(ids[1:]):
        padded[i, : len(x)] = torch.tensor(x)
    both = engine.prefill(padded, [len(x) for x in ids[1:]], rows=[3, 1])  # not consecutive
    assert torch.equal(engine.cache.kv[:, 0], row0)  # row 0 untouched
    for i, row in ((1, 3), (2, 1)):
        assert torch.allclose(both[i - 1], alone[i][0], atol=1e-4)
        n = len(ids[i])
        single = engine.prefill(torch.tensor([ids[i]]), [n], rows=[2])
        assert torch.equal(single[0], alone[i][0])  # bit-identical alone
        assert torch.allclose(engine.cache.kv[:, row, :n], engine.cache.kv[:, 2, :n], atol=1e-5)
    for rows in ([0, 0], [4, 1], [1], [-1, 2]):
        with pytest.raises(ValueError, match="rows must be 2 distinct cache rows"):
            engine.prefill(padded, [3, 3], rows=rows)


# ---- the scheduler ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_prefill", [False, True])
def test_join_and_leave_equals_generate(engine, batch_prefill):
    """Requests of different lengths arrive while others decode, two at once (a batched
    prefill), and leave when done; each gets Engine.generate's tokens (greedy or seeded)."""
    jobs = [(p, 8 + 5 * i, {}) for i, p in enumerate(PROMPTS)]
    jobs[2] = (PROMPTS[2], 20, dict(temperature=0.9, top_k=30, seed=11))
    want = [engine.generate(p, max_tokens=n, ignore_eos=True, **kw) for p, n, kw in jobs]
    sink = Collector()
    sched = BatchScheduler(engine, max_queue=8, batch_prefill=batch_prefill).start()
    try:
        with pytest.raises(EngineBusyError):
            engine.generate("x", max_tokens=2)
        tickets = []
        for i, (p, n, kw) in enumerate(jobs):
            tickets.append(submit(sched, engine, p, sink, n, **kw))
            if i % 2:
                sink.first.clear()
                sink.first.wait(30)  # the next ones join a running batch
        sink.wait(tickets)
    finally:
        sched.stop()
    for t, w in zip(tickets, want):
        c = sink.done[t.id]
        assert (c.token_ids, c.finish_reason, sink.text[t.id]) == (w.token_ids, w.finish_reason, w.text)
    assert sched.stats.decode_steps > 0 and sched.stats.finished["length"] == len(jobs)
    assert engine.generate("x", max_tokens=2).finish_reason  # the engine is free again


def test_queue_cancel_error_and_shutdown(engine):
    sink = Collector()
    sched = BatchScheduler(engine, max_queue=1).start()
    try:
        running = [submit(sched, engine, p, sink, 100) for p in PROMPTS[:4]]
        queued = submit(sched, engine, PROMPTS[4], sink, 3)
        with pytest.raises(QueueFullError, match="max_queue = 1") as e:
            submit(sched, engine, PROMPTS[5], sink, 3)
        assert e.value.retry_after >= 1
        time.sleep(0.2)
        assert not queued.done and sched.waiting == 1
        sched.cancel(running[0])  # its row goes to the queued request
        sink.wait([running[0], queued])
        assert sink.done[running[0].id].finish_reason == CANCELLED
        assert sink.done[queued.id].finish_reason == "length" and not any(t.done for t in running[1:])

        calls = [0]
        real = engine.decode_one_token

        def broken(*a, **k):  # one failing step: its requests end, others go on
            calls[0] += 1
            if calls[0] == 1:
                raise OSError("reading model-00001.safetensors: Input/output error")
            return real(*a, **k)

        engine.decode_one_token = broken
        try:
            sink.wait(running[1:])
        finally:
            del engine.decode_one_token
        for t in running[1:]:
            c = sink.done[t.id]
            assert c.finish_reason == "error" and "Input/output error" in c.error
        after = submit(sched, engine, PROMPTS[0], sink, 4)
        sink.wait([after])
        assert sink.done[after.id].finish_reason == "length"

        late = [submit(sched, engine, p, sink, 100) for p in PROMPTS[:5]]
        sched.shutdown(grace=0.0)
        sink.wait(late)
        assert {sink.done[t.id].finish_reason for t in late} == {ABORTED}
        with pytest.raises(ShuttingDownError):
            submit(sched, engine, PROMPTS[0], sink, 3)
    finally:
        sched.stop(timeout=30)
    assert not sched._thread.is_alive()
    assert engine.generate("x", max_tokens=2).finish_reason


def test_paged_store(tiny_dir):
    """The same through a paged store (experts paged from the checkpoint): rows join and leave."""
    eng = Engine.from_pretrained(
        tiny_dir,
        device="cpu",
        dtype="bfloat16",
        memory_limit=0.0195,
        max_batch_size=3,
        max_seq_len=128,
        prefill_chunk=32,
        paging={"cpu_cache_size": 0.01},
        verbose=False,
    )
    assert isinstance(eng.store, PagedWeightStore)
    jobs = [(PROMPTS[0], 6), (PROMPTS[1], 10), (PROMPTS[3], 5), (PROMPTS[5], 7)]
    want = [eng.generate(p, max_tokens=n, ignore_eos=True) for p, n in jobs]
    sink = Collector()
    sched = BatchScheduler(eng, max_queue=4).start()
    eng.store.reset_counters()
    try:
        tickets = [submit(sched, eng, p, sink, n) for p, n in jobs[:2]]
        sink.first.wait(60)
        tickets += [submit(sched, eng, p, sink, n) for p, n in jobs[2:]]
        sink.wait(tickets, 120)
    finally:
        sched.stop()
    for t, w in zip(tickets, want):
        assert sink.done[t.id].token_ids == w.token_ids and sink.text[t.id] == w.text
    assert sched.stats.decode_rows > sched.stats.decode_steps  # batched steps happened
    experts = eng.store.counters()["experts"]
    assert experts["requests"] > experts["gpu_hits"] > 0  # and experts were paged in
