"""One engine, many callers: a second generation while one is running gets EngineBusyError at
once (never a shared KV cache), from the same thread or others, and every way a stream ends
releases the engine."""

import gc
import threading
import time

import pytest
import torch

from deepseek_fp4_plugin import Engine, EngineBusyError
from deepseek_fp4_plugin.tiny import make_tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
KW = dict(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine.from_pretrained(make_tiny(tmp_path_factory.mktemp("conc") / "tiny", seed=3), device="cpu")


@pytest.fixture(scope="module")
def reference(engine):
    return {p: engine.generate(p, **KW) for p in ("The sea", "Good morning")}


def assert_free(engine, reference):
    assert engine.generate("Good morning", **KW) == reference["Good morning"]


def test_second_call_while_stream_open(engine, reference):
    s = engine.stream("The sea", **KW)
    first = next(s)
    for call in (lambda: engine.generate("Good morning", **KW),
                 lambda: next(engine.stream("Good morning", **KW)),
                 lambda: engine.logits([5, 6, 7])):
        with pytest.raises(EngineBusyError, match=r"stream\(\) .* is running on this engine .*close\(\)"):
            call()
    rest = "".join(s)
    assert first + rest == reference["The sea"].text     # the open stream was not disturbed
    assert engine.last_completion.token_ids == reference["The sea"].token_ids
    assert_free(engine, reference)


def test_abandoned_stream_releases(engine, reference):
    s = engine.stream("The sea", **KW)
    next(s)
    del s
    gc.collect()
    assert_free(engine, reference)


def test_closed_stream_releases(engine, reference):
    s = engine.stream("The sea", **KW)
    next(s)
    s.close()
    assert_free(engine, reference)


def test_break_keeps_the_stream_open_until_closed(engine, reference):
    s = engine.stream("The sea", **KW)
    for _ in s:
        break
    with pytest.raises(EngineBusyError):
        engine.generate("Good morning", **KW)
    s.close()
    assert_free(engine, reference)


def test_unstarted_stream_holds_nothing(engine, reference):
    s = engine.stream("The sea", **KW)          # not iterated yet: nothing runs, nothing is held
    assert_free(engine, reference)
    assert "".join(s) == reference["The sea"].text


def test_errors_release_the_engine(engine, reference):
    with pytest.raises(ValueError, match="top_p"):
        engine.generate("Good morning", top_p=0.0)
    with pytest.raises(ValueError, match="token_ids"):
        engine.logits(None)
    with pytest.raises(ValueError):
        list(engine.stream(["a", "b"]))
    assert_free(engine, reference)


def test_failure_inside_generation_releases(engine, reference, monkeypatch):
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "decode_one_token", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate("The sea", **KW)
    s = engine.stream("The sea", **KW)
    with pytest.raises(RuntimeError, match="device lost"):
        "".join(s)
    assert len(calls) == 2
    monkeypatch.undo()
    assert_free(engine, reference)


def test_generate_inside_stream_loop_refused(engine, reference):
    pieces = []
    with pytest.raises(EngineBusyError):
        for piece in engine.stream("The sea", **KW):
            pieces.append(piece)
            engine.generate("Good morning", **KW)
    assert len(pieces) == 1
    gc.collect()
    assert_free(engine, reference)


def test_other_threads_refused_while_a_stream_is_open(engine, reference):
    opened, finish = threading.Event(), threading.Event()
    result = {}

    def streamer():
        s = engine.stream("The sea", **KW)
        result["text"] = next(s)
        opened.set()
        finish.wait(30)
        result["text"] += "".join(s)

    def caller(i):
        try:
            if i % 3 == 0:
                engine.generate("Good morning", **KW)
            elif i % 3 == 1:
                "".join(engine.stream("Good morning", **KW))
            else:
                engine.logits([5, 6])
            result[i] = "ran"
        except EngineBusyError as e:
            result[i] = e

    t = threading.Thread(target=streamer)
    t.start()
    assert opened.wait(60)
    callers = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for c in callers:
        c.start()
    for c in callers:
        c.join(60)
    finish.set()
    t.join(60)
    assert all(isinstance(result[i], EngineBusyError) for i in range(6)), result
    assert result["text"] == reference["The sea"].text
    assert_free(engine, reference)


def test_concurrent_generate_calls(engine, reference, monkeypatch):
    """Threads released together: exactly one runs (its prefill is slowed so the others arrive
    while it holds the engine), the rest get EngineBusyError, and no output is disturbed."""
    real_prefill = engine.prefill

    def slow_prefill(*a, **k):
        time.sleep(0.5)
        return real_prefill(*a, **k)

    monkeypatch.setattr(engine, "prefill", slow_prefill)
    n = 5
    barrier = threading.Barrier(n)
    results = [None] * n

    def worker(i):
        barrier.wait()
        if i:
            time.sleep(0.1)   # let worker 0 take the engine first
        try:
            results[i] = engine.generate("The sea", **KW)
        except EngineBusyError as e:
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    ran = [r for r in results if not isinstance(r, EngineBusyError)]
    assert len(ran) == 1 and ran[0] == reference["The sea"], results
    monkeypatch.undo()
    assert_free(engine, reference)


def test_two_engines_interleave(tmp_path):
    """The limit is per engine: streams on two engines, advanced in turn, do not interfere."""
    d = make_tiny(tmp_path / "t", seed=3)
    a, b = Engine.from_pretrained(d, device="cpu"), Engine.from_pretrained(d, device="cpu")
    want_a, want_b = a.generate("The sea", **KW).text, b.generate("Good morning", **KW).text
    streams = {"a": a.stream("The sea", **KW), "b": b.stream("Good morning", **KW)}
    got = {"a": "", "b": ""}
    while streams:
        for k in list(streams):
            try:
                got[k] += next(streams[k])
            except StopIteration:
                del streams[k]
    assert got == {"a": want_a, "b": want_b}
    assert torch.equal(a.logits([5, 6]), b.logits([5, 6]))
