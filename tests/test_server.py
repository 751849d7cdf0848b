"""deepseek-fp4 serve: the official openai client against a server the test starts on 127.0.0.1.

The tiny model's greedy output through the server equals ``Engine.generate``'s for the same
request, also with other requests joining and leaving the batch mid-way; bad input is a 400
naming the field; a full queue a 429 with Retry-After; a disconnect frees the row; non-finite
logits end that request with an error while the others finish; a load test leaks nothing; a
SIGINT with requests in flight ends them with an error event and the process exits 0.
"""

import gc
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from deepseek_fp4_plugin import Engine
from deepseek_fp4_plugin.batching import BatchScheduler
from deepseek_fp4_plugin.server import make_server
from deepseek_fp4_plugin.tiny import make_tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SLOTS, MAX_QUEUE, CONTEXT = 4, 4, 256
PROMPTS = [
    "The sea",
    "Good morning to all of you",
    "1, 2, 3,",
    "A mixture of experts splits the layer",
    "Four-bit weights",
    "Numbers appear in text",
    "When it writes, it writes nonsense",
    "Hello",
]
LONG = dict(max_tokens=CONTEXT - 16, extra_body={"ignore_eos": True})  # runs until cancelled


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, headers=None):
    """(status, headers, parsed JSON body) of a raw HTTP request; ``body`` bytes are sent as is."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode()
    return r.status, dict(r.getheaders()), parsed


def wait_until(cond, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def one_thread():
    # tiny matmuls: one intra-op thread is fastest, and a shared CPU can't oversubscribe it
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("serve") / "tiny", seed=3)


@pytest.fixture(scope="module")
def engine(tiny_dir, one_thread):
    return Engine.from_pretrained(tiny_dir, device="cpu", max_batch_size=SLOTS, max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def ref(tiny_dir, one_thread):
    """Engine.generate's answer to a request, from a second engine on the same folder (the
    server's engine is held by its scheduler)."""
    engine = Engine.from_pretrained(tiny_dir, device="cpu", max_batch_size=SLOTS, max_seq_len=CONTEXT)
    cache, lock = {}, threading.Lock()

    def get(prompt, max_tokens, chat=False, **kw):
        key = (json.dumps(prompt), max_tokens, chat, tuple(sorted(kw.items())))
        with lock:
            if key not in cache:
                msgs = [{"role": "user", "content": prompt}] if chat else prompt
                cache[key] = engine.generate(msgs, max_tokens=max_tokens, chat=chat, **kw)
            return cache[key]

    return get


@pytest.fixture(scope="module")
def server(engine):
    port = free_port()
    srv = make_server(
        engine, port=port, model_name="tiny", max_queue=MAX_QUEUE, shutdown_grace=1.0, log_level="warning"
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, 60, "the server to start")
    srv.port = port
    yield srv
    srv.should_exit = True
    thread.join(30)
    assert not thread.is_alive()


@pytest.fixture
def client(server):
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=120
    )


def wait_idle(server):
    sched = server.config.app.state.server.scheduler
    wait_until(lambda: sched.running == 0 and sched.waiting == 0, 30, "the server to go idle")


def chat_text(stream):
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def completion_text(stream):
    return "".join(c.choices[0].text for c in stream if c.choices)


# ---- what the server answers ------------------------------------------------------------------


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, _, body = request(server.port, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    status, headers, text = request(server.port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["dsfp4_requests_submitted_total"] >= 1
    assert values["dsfp4_generation_tokens_total"] >= 1 and values["dsfp4_batch_slots"] == SLOTS
    assert values['dsfp4_requests_finished_total{finish_reason="length"}'] >= 1
    assert values["dsfp4_time_to_first_token_seconds_count"] >= 1
    assert "dsfp4_store_h2d_bytes" in values  # the store's counters (a resident store: 0)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_generate(server, client, ref, stream):
    for i in (0, 3):
        want = ref(PROMPTS[i], 6 + 3 * i, chat=True)
        kw = dict(
            model="tiny",
            messages=[{"role": "user", "content": PROMPTS[i]}],
            max_tokens=6 + 3 * i,
            temperature=0,
        )
        if stream:
            got = chat_text(client.chat.completions.create(stream=True, **kw))
        else:
            r = client.chat.completions.create(**kw)
            got = r.choices[0].message.content
            assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[want.finish_reason]
            assert r.usage.prompt_tokens == want.prompt_tokens
            assert r.usage.completion_tokens == len(want.token_ids) + (want.finish_reason == "eos")
        assert got == want.text


@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_generate(server, client, ref, stream):
    for i in (1, 2):
        want = ref(PROMPTS[i], 6 + 3 * i)
        kw = dict(model="tiny", prompt=PROMPTS[i], max_tokens=6 + 3 * i, temperature=0)
        if stream:
            got = completion_text(client.completions.create(stream=True, **kw))
        else:
            got = client.completions.create(**kw).choices[0].text
        assert got == want.text


def test_eight_concurrent_streams(server, client, ref):
    """8 clients on 4 rows: half wait, then join the batch as rows free up mid-way (different
    lengths); every one gets Engine.generate's text, greedy or seeded."""
    jobs = [(PROMPTS[i], 6 + 3 * i, {}) for i in range(7)]
    jobs.append((PROMPTS[2], 20, dict(temperature=0.8, top_k=40, seed=7)))
    start = threading.Barrier(len(jobs))

    def run(job):
        prompt, n, kw = job
        chat = n % 2 == 0
        start.wait()
        extra = {"top_k": kw["top_k"]} if "top_k" in kw else None
        args = dict(
            model="tiny",
            max_tokens=n,
            temperature=kw.get("temperature", 0),
            seed=kw.get("seed"),
            extra_body=extra,
            stream=True,
        )
        if chat:
            return chat_text(
                client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **args)
            )
        return completion_text(client.completions.create(prompt=prompt, **args))

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    for (prompt, n, kw), text in zip(jobs, got):
        assert text == ref(prompt, n, chat=n % 2 == 0, **kw).text, (prompt, n, kw)
    wait_idle(server)


def open_long_streams(client, n):
    streams = [
        client.completions.create(model="tiny", prompt=PROMPTS[i % 8], stream=True, temperature=0, **LONG)
        for i in range(n)
    ]
    return streams


def test_full_queue_answers_429(server, client):
    sched = server.config.app.state.server.scheduler
    streams = open_long_streams(client, SLOTS + MAX_QUEUE)
    try:
        wait_until(lambda: sched.running == SLOTS and sched.waiting == MAX_QUEUE, what="full rows and queue")
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="tiny", prompt="Hello", max_tokens=2)
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["code"] == "queue_full"
    finally:
        for s in streams:
            s.close()
    wait_idle(server)  # the disconnects freed every row


def test_disconnect_frees_the_row(server, client):
    sched = server.config.app.state.server.scheduler
    streams = open_long_streams(client, SLOTS)
    try:
        for s in streams:
            next(iter(s))  # all rows generating
        queued = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hello"}],
            stream=True,
            temperature=0,
            max_tokens=5,
        )
        wait_until(lambda: sched.waiting == 1, what="the fifth request to queue")
        streams[1].close()  # the client goes away
        assert chat_text(queued)  # the queued request got the row and finished
        assert sched.running == SLOTS - 1  # the other long streams still run
    finally:
        for s in streams:
            s.close()
    wait_idle(server)


def test_disconnect_without_streaming_frees_the_row(server):
    sched = server.config.app.state.server.scheduler
    cancelled = sched.stats.finished["cancelled"]
    body = json.dumps({"prompt": "The sea", "temperature": 0, "max_tokens": CONTEXT - 16, "ignore_eos": True})
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    wait_until(lambda: sched.running == 1, what="the request to start")
    sock.close()
    wait_until(lambda: sched.running == 0, 10, "the row to be freed")
    assert sched.stats.finished["cancelled"] == cancelled + 1


BAD = [
    (b'{"model": "tiny", "prompt": "x", ', "/v1/completions", None, "invalid_json"),
    ({"prompt": "x", "temperature": "0.5"}, "/v1/completions", "temperature"),
    ({"prompt": "x", "max_tokens": 1.5}, "/v1/completions", "max_tokens"),
    ({"prompt": "x", "stream": "yes"}, "/v1/completions", "stream"),
    ({"prompt": "x", "top_k": True}, "/v1/completions", "top_k"),
    ({"prompt": "x", "seed": -1}, "/v1/completions", "seed"),
    ({"prompt": "x", "stop": 5}, "/v1/completions", "stop"),
    ({"prompt": {"text": "x"}}, "/v1/completions", "prompt"),
    ({"prompt": ["x", "y"]}, "/v1/completions", "prompt"),
    ({"messages": "hello"}, "/v1/chat/completions", "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "/v1/chat/completions", "messages[0].content"),
    ({"messages": [{"content": "hi"}]}, "/v1/chat/completions", "messages[0].role"),
    ({"prompt": "x", "max_tokens": 0}, "/v1/completions", "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, "/v1/completions", "max_tokens"),
    ({"prompt": "x", "max_tokens": CONTEXT}, "/v1/completions", "max_tokens", "context_length_exceeded"),
    (
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        "/v1/chat/completions",
        "max_completion_tokens",
    ),
    ({"prompt": "x", "temperature": -0.1}, "/v1/completions", "temperature"),
    ({"prompt": "x", "temperature": 2.5}, "/v1/completions", "temperature"),
    ({"prompt": "x", "top_p": 0}, "/v1/completions", "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "/v1/completions", "top_p"),
    ({"messages": []}, "/v1/chat/completions", "messages"),
    ({}, "/v1/chat/completions", "messages"),
    ({"prompt": "word " * CONTEXT}, "/v1/completions", "prompt", "context_length_exceeded"),
    (
        {"messages": [{"role": "user", "content": "word " * CONTEXT}]},
        "/v1/chat/completions",
        "messages",
        "context_length_exceeded",
    ),
    ({"prompt": [1, 2, 100000]}, "/v1/completions", "prompt"),
    ({"prompt": "x", "n": 2}, "/v1/completions", "n"),
    ({"prompt": "x", "stop": ["ok", ""]}, "/v1/completions", "stop"),
]


@pytest.mark.parametrize("case", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_400_naming_the_field(server, case):
    body, path, param = case[:3]
    status, _, out = request(server.port, "POST", path, body)
    assert status == 400, out
    err = out["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert (param or "JSON").split("[")[0] in err["message"]
    assert err["code"] == (case[3] if len(case) > 3 else None)


def test_unknown_route_and_method(server):
    status, _, out = request(server.port, "GET", "/v1/nothing")
    assert status == 404 and "error" in out
    status, _, out = request(server.port, "GET", "/v1/completions")
    assert status == 405 and "error" in out


def test_nonfinite_logits_end_one_request(server, client, engine, ref):
    """A NaN embedding row poisons only the request whose prompt holds that token: it ends with
    an error (an error event when streaming, a 500 otherwise); the others finish unchanged."""
    good = [(PROMPTS[i], 16) for i in (0, 4)]
    used = set()
    for p, n in good:
        c = ref(p, n, ignore_eos=True)
        used |= set(engine.tokenizer.encode(p)) | set(c.token_ids)
    bad = max(set(range(4, engine.config.vocab_size)) - used)
    emb = engine.store.embedding()
    saved = emb[bad].clone()
    emb[bad] = float("nan")
    try:
        streams = [
            client.completions.create(
                model="tiny",
                prompt=p,
                max_tokens=n,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for p, n in good
        ]
        first = [next(iter(s)).choices[0].text for s in streams]
        with pytest.raises(openai.APIError, match="non-finite logits"):
            completion_text(
                client.completions.create(model="tiny", prompt=[5, 6, bad], max_tokens=8, stream=True)
            )
        with pytest.raises(openai.InternalServerError, match="non-finite logits") as e:
            client.completions.create(model="tiny", prompt=[7, bad], max_tokens=8)
        assert e.value.response.headers["x-should-retry"] == "false"
        for (p, n), s, head in zip(good, streams, first):
            assert head + completion_text(s) == ref(p, n, ignore_eos=True).text
    finally:
        emb[bad] = saved
    wait_idle(server)


def test_load_no_failure_no_growth(server, client, ref):
    """48 requests from 8 threads (chat and completion, streaming or not); every answer right.
    Bounds: no request's state outlives it (weak references to every Ticket die), and Python
    allocations grow by < 256 KiB over the 48 (tracemalloc, after a warm-up round of 32; what
    remains is torch's and the HTTP stack's caches filling: ~40 KiB, then ~5 KiB a round).
    Device memory cannot grow: the KV cache is allocated once for max_batch_size rows."""
    sched: BatchScheduler = server.config.app.state.server.scheduler
    tickets = weakref.WeakSet()
    submit = sched.submit

    def tracking_submit(*a, **k):
        t = submit(*a, **k)
        tickets.add(t)
        return t

    def one(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        chat, stream = i % 2 == 0, (i // 2) % 2 == 0
        if chat:
            kw = dict(
                model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=10, temperature=0
            )
            r = client.chat.completions.create(stream=stream, **kw)
            text = chat_text(r) if stream else r.choices[0].message.content
        else:
            r = client.completions.create(
                model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=stream
            )
            text = completion_text(r) if stream else r.choices[0].text
        assert text == ref(prompt, 10 if chat else 12, chat=chat).text
        return True

    def round_(n):
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(one, range(n)))
        wait_idle(server)

    round_(32)  # warm-up: lazy allocations, caches
    failed = dict(sched.stats.finished)
    sched.submit = tracking_submit
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        t0 = time.monotonic()
        round_(48)
        elapsed = time.monotonic() - t0
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
        del sched.submit
    assert elapsed < 60
    assert len(tickets) == 0
    growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert growth < 256 * 1024, f"{growth} bytes more after 48 requests"
    for reason in ("error", "aborted", "cancelled"):
        assert sched.stats.finished[reason] == failed.get(reason, 0), reason


# ---- the command: API key, shutdown with requests in flight ------------------------------------


def test_serve_command_api_key_and_shutdown(tiny_dir):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parent.parent / "python"
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deepseek_fp4_plugin.cli",
            "serve",
            "--model",
            str(tiny_dir),
            "--device",
            "cpu",
            "--port",
            str(port),
            "--max-batch-size",
            "2",
            "--max-seq-len",
            str(CONTEXT),
            "--api-key",
            "s3cret",
            "--shutdown-grace",
            "0.5",
            "--no-progress",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def up():
            try:
                return request(port, "GET", "/health")[0] == 200
            except OSError:
                assert proc.poll() is None, proc.communicate()
                return False

        wait_until(up, 120, "deepseek-fp4 serve to start")
        assert request(port, "GET", "/v1/models")[0] == 401
        status, headers, body = request(port, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert request(port, "POST", "/v1/completions", b"{not json")[0] == 401  # the key is checked first
        assert request(port, "GET", "/metrics")[0] == 401

        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert c.models.list().data[0].id == "tiny"
        streams = [
            c.completions.create(model="tiny", prompt=p, stream=True, temperature=0, **LONG)
            for p in PROMPTS[:3]
        ]  # 2 rows: two run, one waits
        heads = [next(iter(s)) for s in streams[:2]]
        assert all(h.choices[0].text is not None for h in heads)
        proc.send_signal(signal.SIGINT)
        for s in streams:  # each ends with the server's error event
            with pytest.raises(openai.APIError, match="shut down"):
                completion_text(s)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
