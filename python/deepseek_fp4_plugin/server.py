"""``deepseek-fp4 serve``: an OpenAI-compatible HTTP server over one Engine (FastAPI + uvicorn).

    POST /v1/chat/completions   the model's chat template; "stream": true → server-sent events
    POST /v1/completions        a text prompt or token ids
    GET  /v1/models             the one model served
    GET  /health                open even with an API key; 503 while shutting down
    GET  /metrics               Prometheus text: requests, tokens, batch occupancy, latencies,
                                and each metric source's counters (the store's by default)

Many clients share the engine through a ``BatchScheduler`` (batching.py): a request joins the
running batch at the next decode step when a row is free, else waits in a bounded queue (full:
429 with Retry-After). A client that goes away frees its row at the next step. Errors use the
OpenAI error body; a sequence whose logits turn NaN or inf ends with an error (an error event
when streaming), the others go on.

Shutdown (SIGINT / SIGTERM): no new connections or requests; waiting requests end at once,
running ones get ``shutdown_grace`` seconds to finish, then end with an error event (streams)
or a 503; then the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import time
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import ABORTED, CANCELLED, BatchScheduler, QueueFullError, ShuttingDownError, Ticket
from .requests import Completion
from .server_protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Reply,
    error_body,
    validation_error,
)

log = logging.getLogger(__name__)

MetricSource = Callable[[], Mapping[str, Any]]
OPEN_PATHS = ("/health",)
_PARAM_NAMES = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


# ---------------------------------------------------------------------------------------
# the app


class _Pipe:
    """Carries a ticket's updates from the scheduler's thread to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, ticket: Ticket, delta: str, done: Optional[Completion]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (delta, done))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            ticket.cancel()


class _ApiKey:
    """ASGI middleware: every path but OPEN_PATHS needs ``Authorization: Bearer <key>``."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                e = APIError(
                    401,
                    "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await _error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class ServerState:
    """What the routes share: the engine, its scheduler, the metrics."""

    def __init__(
        self,
        engine,
        scheduler: BatchScheduler,
        model_name: str,
        metric_sources: Optional[Mapping[str, MetricSource]],
    ):
        self.engine, self.scheduler, self.model_name = engine, scheduler, model_name
        self.created = int(time.time())
        sources = {"store": engine.store.counters} if metric_sources is None else dict(metric_sources)
        self.metric_sources: Dict[str, MetricSource] = sources
        self.rejected: Dict[str, int] = {"invalid": 0}
        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram(
            "dsfp4_time_to_first_token_seconds",
            "Submission to first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "dsfp4_request_duration_seconds",
            "Submission to the last token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "dsfp4_request_queue_seconds",
            "Submission to getting a batch row",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._snapshot: Dict[str, Any] = {}
        self.registry.register(_Collector(self))

    def observe(self, t: Ticket) -> None:
        if t.admitted_at is not None:
            self.queue_time.observe(t.admitted_at - t.submitted_at)
        if t.first_token_at is not None:
            self.ttft.observe(t.first_token_at - t.submitted_at)
        if t.finished_at is not None and t.completion is not None and t.completion.finish_reason != CANCELLED:
            self.latency.observe(t.finished_at - t.submitted_at)

    async def metrics_text(self) -> bytes:
        sources = self.metric_sources
        fut = self.scheduler.between_steps(lambda: {name: fn() for name, fn in sources.items()})
        self._snapshot = await asyncio.wait_for(asyncio.wrap_future(fut), timeout=60)
        return generate_latest(self.registry)


def create_app(
    engine,
    scheduler: BatchScheduler,
    model_name: str = "deepseek-fp4",
    api_key: Optional[str] = None,
    metric_sources: Optional[Mapping[str, MetricSource]] = None,
) -> FastAPI:
    """The ASGI app. ``scheduler`` (over ``engine``) is started with the app and stopped with
    it. ``metric_sources``: name → function returning a (nested) dict of numbers, exported
    under ``dsfp4_<name>_…`` by /metrics and read between two engine steps (default
    ``{"store": engine.store.counters}``; a PerfMonitor's counters plug in here)."""
    if engine.tokenizer is None:
        raise ValueError("the server needs a tokenizer (the model folder has no tokenizer.json)")
    state = ServerState(engine, scheduler, model_name, metric_sources)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if scheduler._thread is None:
            scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop, 0.0)

    app = FastAPI(
        title="deepseek-fp4",
        lifespan=lifespan,
        docs_url=None if api_key else "/docs",
        redoc_url=None,
        openapi_url=None if api_key else "/openapi.json",
    )
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        if e.status == 400:
            state.rejected["invalid"] += 1
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        state.rejected["invalid"] += 1
        return _error_response(validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(f"{e.detail}: {request.method} {request.url.path}", kind),
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    @app.get("/health")
    async def health():
        if not scheduler.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "running": scheduler.running, "waiting": scheduler.waiting}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "deepseek-fp4",
                    "max_model_len": engine.max_seq_len,
                }
            ],
        }

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(
            await state.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        body.check_supported()
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        # off the event loop: a long prompt or chat template must not stall the other streams
        ids = await asyncio.to_thread(_tokenize, engine, messages, True, "messages")
        return await _generate(state, request, body, ids, Reply(True, model_name), default_max=None)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.check_supported()
        ids = await asyncio.to_thread(_tokenize, engine, body.prompt, False, "prompt")
        return await _generate(state, request, body, ids, Reply(False, model_name), default_max=16)

    if api_key is not None:
        app.add_middleware(_ApiKey, key=api_key)
    return app


# ---------------------------------------------------------------------------------------
# one request


def _tokenize(engine, prompt, chat: bool, param: str) -> List[int]:
    try:
        _, ids = engine.requests.prompts(prompt, chat, None)
    except ValueError as e:
        msg = " ".join(str(e).split())
        if "max_seq_len" in msg:  # the prompt does not fit the context
            n = re.search(r"has (\d+) tokens", msg)
            msg = (
                f"This model's maximum context length is {engine.max_seq_len} tokens, but the "
                f"{'messages' if chat else 'prompt'} take {n.group(1) if n else 'more'} tokens "
                f"(at least one must be left for the completion)."
            )
        raise APIError(400, msg, param, code="context_length_exceeded" if "context length" in msg else None)
    return ids[0]


def _plan(engine, body, ids: List[int], default_max: Optional[int]):
    room = engine.max_seq_len - len(ids)
    name = body.max_tokens_param()
    want = body.requested_max_tokens()
    if want is None:
        max_tokens = room if default_max is None else min(default_max, room)
    elif want < 1:
        raise APIError(400, f"{name} must be at least 1, got {want}.", name)
    elif want > room:
        raise APIError(
            400,
            f"This model's maximum context length is {engine.max_seq_len} tokens: the prompt's "
            f"{len(ids)} tokens plus {name} = {want} do not fit (at most {room}).",
            name,
            code="context_length_exceeded",
        )
    else:
        max_tokens = want
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    try:
        return engine.requests.plan(
            [ids],
            max_tokens,
            1.0 if body.temperature is None else body.temperature,
            1.0 if body.top_p is None else body.top_p,
            top_k,
            body.seed,
            body.stop,
            body.stop_token_ids,
            bool(body.ignore_eos),
        )
    except ValueError as e:
        msg = " ".join(str(e).split())
        word = re.match(r"[a-z_]+", msg)
        param = next((p for p in _PARAM_NAMES if word and word.group(0) == p), None) or (
            "stop" if msg.startswith("stop strings") else None
        )
        raise APIError(400, msg, param)


async def _generate(
    state: ServerState, request: Request, body, ids: List[int], reply: Reply, default_max: Optional[int]
):
    plan = _plan(state.engine, body, ids, default_max)
    pipe = _Pipe(asyncio.get_running_loop())
    try:
        ticket = state.scheduler.submit(ids, plan, pipe)
    except QueueFullError as e:
        raise APIError(
            429,
            f"The server is busy: {e}. Retry after {e.retry_after} s.",
            type="rate_limit_exceeded",
            code="queue_full",
            headers={"Retry-After": str(e.retry_after)},
        )
    except ShuttingDownError as e:
        raise APIError(503, f"The server is shutting down ({e}).", type="server_error", code="shutting_down")
    if body.stream:
        return StreamingResponse(
            _events(state, ticket, pipe, reply, body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _collect(state, request, ticket, pipe, reply)


def _end_error(c: Completion) -> Optional[APIError]:
    """The error a request's end is answered with (None: it finished)."""
    if c.finish_reason == "error":
        kind = "nonfinite_logits" if "non-finite" in (c.error or "") else "generation_failed"
        return APIError(
            500,
            f"Generation failed: {c.error}",
            type="server_error",
            code=kind,
            headers={"x-should-retry": "false"},
        )
    if c.finish_reason == ABORTED:
        return APIError(
            503,
            "The server shut down before this request finished.",
            type="server_error",
            code="shutting_down",
        )
    return None


async def _collect(state: ServerState, request: Request, ticket: Ticket, pipe: _Pipe, reply: Reply):
    """A non-streaming answer; a client that goes away cancels the request."""
    watch = asyncio.ensure_future(_disconnected(request))
    parts: List[str] = []
    try:
        while True:
            get = asyncio.ensure_future(pipe.queue.get())
            done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                state.scheduler.cancel(ticket)
                return JSONResponse(error_body("client disconnected"), status_code=499)
            delta, c = get.result()
            parts.append(delta)
            if c is not None:
                break
    finally:
        watch.cancel()
        if not ticket.done:
            state.scheduler.cancel(ticket)
    state.observe(ticket)
    err = _end_error(c)
    if err is not None:
        raise err
    return reply.full("".join(parts), c.finish_reason, ticket.prompt_tokens, ticket.generated)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(obj: Union[str, Dict[str, Any]]) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(
    state: ServerState, ticket: Ticket, pipe: _Pipe, reply: Reply, usage: bool
) -> AsyncIterator[str]:
    """The server-sent events of a streaming request. Starlette cancels this generator when the
    client disconnects; the finally then frees the request's row."""
    try:
        if reply.chat:
            yield _sse(reply.chunk("", first=True))
        while True:
            delta, c = await pipe.queue.get()
            if delta:
                yield _sse(reply.chunk(delta))
            if c is not None:
                break
        state.observe(ticket)
        err = _end_error(c)
        if err is not None:
            yield _sse(err.body())
        else:
            yield _sse(reply.chunk(None if reply.chat else "", c.finish_reason))
            if usage:
                yield _sse(reply.usage_chunk(ticket.prompt_tokens, ticket.generated))
        yield _sse("[DONE]")
    finally:
        if not ticket.done:
            state.scheduler.cancel(ticket)


# ---------------------------------------------------------------------------------------
# /metrics


class _Collector:
    """Prometheus metrics from the scheduler's counters and the metric sources' snapshot."""

    def __init__(self, state: ServerState):
        self.state = state

    def collect(self) -> Iterator[Any]:
        st = self.state
        s = st.scheduler.stats
        counters = (
            ("requests_submitted", "Requests accepted into the queue", s.submitted),
            ("prompt_tokens", "Prompt tokens prefilled", s.prompt_tokens),
            ("generation_tokens", "Tokens generated", s.generated_tokens),
            ("prefills", "Prefill forwards", s.prefills),
            ("prefill_seconds", "Time in prefill forwards and their sampling", s.prefill_s),
            ("decode_steps", "Decode steps", s.decode_steps),
            (
                "decode_rows",
                "Batch rows through decode steps (free rows below the highest live one included)",
                s.decode_rows,
            ),
            ("decode_live_rows", "Batch rows through decode steps that held a request", s.decode_live_rows),
            ("decode_seconds", "Time in decode steps and their sampling", s.decode_s),
            ("engine_errors", "Forwards that raised (their requests ended with an error)", s.engine_errors),
        )
        for name, text, value in counters:
            yield CounterMetricFamily(f"dsfp4_{name}", text, value=value)
        finished = CounterMetricFamily(
            "dsfp4_requests_finished", "Requests ended, by finish reason", labels=["finish_reason"]
        )
        for reason in ("eos", "stop", "length", "error", CANCELLED, ABORTED):
            finished.add_metric([reason], s.finished.get(reason, 0))
        yield finished
        rejected = CounterMetricFamily(
            "dsfp4_requests_rejected", "Requests refused before queueing", labels=["reason"]
        )
        rejected.add_metric(["queue_full"], s.rejected_queue_full)
        rejected.add_metric(["invalid"], st.rejected["invalid"])
        yield rejected
        sched = st.scheduler
        for name, text, value in (
            ("requests_running", "Requests holding a batch row", sched.running),
            ("requests_waiting", "Requests waiting for a row", sched.waiting),
            ("batch_slots", "Batch rows (max_batch_size)", sched.slots),
            ("queue_capacity", "Most requests waiting (max_queue)", sched.max_queue),
        ):
            yield GaugeMetricFamily(f"dsfp4_{name}", text, value=value)
        for source, snap in st._snapshot.items():
            yield from _source_metrics(f"dsfp4_{_name(source)}", snap)


def _name(s: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", str(s))


def _source_metrics(prefix: str, snap: Mapping[str, Any]) -> Iterator[GaugeMetricFamily]:
    """A nested dict of numbers as gauges: dict keys join the name, list items get a label
    ``index`` (e.g. per-layer counters); None and non-numbers are left out."""
    series: Dict[str, List[Tuple[Tuple[str, ...], float]]] = {}

    def walk(name: str, v: Any, index: Tuple[str, ...]) -> None:
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, float)):
            if math.isfinite(v):
                series.setdefault(name, []).append((index, float(v)))
        elif isinstance(v, Mapping):
            for k, x in v.items():
                walk(f"{name}_{_name(k)}", x, index)
        elif isinstance(v, (list, tuple)) and not index:
            for i, x in enumerate(v):
                walk(name, x, (str(i),))

    walk(prefix, snap, ())
    for name, points in series.items():
        labelled = any(ix for ix, _ in points)
        g = GaugeMetricFamily(
            name, f"{name[len('dsfp4_') :]} (metric source counter)", labels=["index"] if labelled else None
        )
        for ix, value in points:
            g.add_metric(list(ix) if labelled else [], value)
        yield g


# ---------------------------------------------------------------------------------------
# running it


class Server(uvicorn.Server):
    """uvicorn's server, with the scheduler's graceful shutdown started as soon as uvicorn
    begins its own (stop accepting), so open streams end within the grace period."""

    def __init__(self, config: uvicorn.Config, scheduler: BatchScheduler, shutdown_grace: float):
        super().__init__(config)
        self.scheduler, self.shutdown_grace = scheduler, shutdown_grace

    async def shutdown(self, sockets=None) -> None:
        self.scheduler.shutdown(self.shutdown_grace)
        await super().shutdown(sockets)


def make_server(
    engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "deepseek-fp4",
    api_key: Optional[str] = None,
    max_queue: int = 64,
    shutdown_grace: float = 5.0,
    batch_prefill: bool = False,
    metric_sources: Optional[Mapping[str, MetricSource]] = None,
    log_level: str = "info",
) -> Server:
    """A ready-to-run server over ``engine`` (``.run()`` blocks until SIGINT / SIGTERM)."""
    scheduler = BatchScheduler(engine, max_queue=max_queue, batch_prefill=batch_prefill)
    app = create_app(engine, scheduler, model_name, api_key, metric_sources)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=shutdown_grace + 30,
    )
    return Server(config, scheduler, shutdown_grace)
