"""The server's overhead: tokens/s and time to first token through ``deepseek-fp4 serve``
against the same workload through ``Engine.generate``, in one run, on one engine.

Workload, for each number of concurrent clients C (``--clients 1,4,8``): C clients each send
``--requests`` requests one after the other; a request is ``--prompt-len`` random token ids
and generates exactly ``--max-tokens`` tokens (greedy, EOS ignored).

  server   the engine behind the OpenAI-compatible server (continuous batching), on
           127.0.0.1; the clients are the official openai client (streaming completions,
           usage in the last chunk) in a separate process, so they do not take the server's
           interpreter. Time to first token: request sent → first text chunk received.
  engine   the same requests through ``Engine.generate``, C prompts per call (one batch, the
           ceiling the scheduler can reach), ``--requests`` calls in a row. Time to first
           token: the call's prefill and first sample (``last_stats.prefill_s``).

Both are warmed up first with the same workload (CUDA graphs are captured per batch size
and attended length on first use). tokens/s counts generated tokens over the wall time of
the whole workload.

  python benchmarks/bench_server.py                                  # CPU, the built-in tiny model
  python benchmarks/bench_server.py --model /tmp/dsfp4_v3 --device cuda --memory-limit 16 \\
      --use-cuda-graph --cpu-cache-size 40                           # the paged 6-layer model

A model folder without tokenizer.json (e.g. bench_paging.py's) is served through a folder of
links to its files plus a word-level tokenizer covering its vocabulary (one token, one word).

Writes benchmarks/results/server_<device>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import deepseek_fp4_plugin  # noqa: F401
import torch
from bench_common import commit, gpu_slug, write_result
from deepseek_fp4_plugin.engine import Engine


def tree_dirty() -> bool:
    try:
        out = subprocess.check_output(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent,
            stderr=subprocess.DEVNULL,
        )
        return bool(out.strip())
    except Exception:
        return False


def with_tokenizer(model: Path, vocab: int, tmp: Path) -> Path:
    """``model`` itself when it has a tokenizer, else a folder of links to its files plus a
    word-level tokenizer with one word per token id."""
    if (model / "tokenizer.json").exists():
        return model
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = tmp / model.name
    out.mkdir()
    for f in model.iterdir():
        (out / f.name).symlink_to(f.resolve())
    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    return out


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# ---- the clients (a separate process) ------------------------------------------------------


def run_clients(url: str, prompts, max_tokens: int, clients: int, requests: int) -> dict:
    """C threads, each sending its requests one after the other; timings per request."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=3600)
    ttft, tokens, errors = [], [], []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def one_client(c):
        start.wait()
        for r in range(requests):
            prompt = prompts[(c * requests + r) % len(prompts)]
            t0 = time.perf_counter()
            first, n = None, 0
            try:
                stream = client.completions.create(
                    model="bench",
                    prompt=prompt,
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.perf_counter() - t0
                    if chunk.usage is not None:
                        n = chunk.usage.completion_tokens
            except Exception as e:  # counted, reported
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                ttft.append(first if first is not None else float("nan"))
                tokens.append(n)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - t0, "ttft_s": ttft, "tokens": tokens, "errors": errors}


# ---- the two ways --------------------------------------------------------------------------------


def engine_rows(engine: Engine, prompts, max_tokens: int, clients: int, requests: int) -> dict:
    ttft, tokens = [], 0
    t0 = time.perf_counter()
    for r in range(requests):
        batch = [prompts[(c * requests + r) % len(prompts)] for c in range(clients)]
        out = engine.generate(batch, max_tokens=max_tokens, ignore_eos=True)
        tokens += sum(len(o.token_ids) for o in out)
        ttft.append(engine.last_stats.prefill_s)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_ms_median": 1e3 * statistics.median(ttft),
        "ttft_ms_p90": 1e3 * percentile(ttft, 0.9),
    }


def server_rows(pool, url: str, prompts, max_tokens: int, clients: int, requests: int) -> dict:
    res = pool.submit(run_clients, url, prompts, max_tokens, clients, requests).result()
    if res["errors"]:
        raise RuntimeError(f"{len(res['errors'])} failed requests, first: {res['errors'][0]}")
    tokens = sum(res["tokens"])
    return {
        "wall_s": res["wall_s"],
        "tokens": tokens,
        "tokens_per_s": tokens / res["wall_s"],
        "ttft_ms_median": 1e3 * statistics.median(res["ttft_s"]),
        "ttft_ms_p90": 1e3 * percentile(res["ttft_s"], 0.9),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", type=Path, default=None, help="model folder (default: the built-in tiny model)"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--memory-limit", type=float, default=None)
    ap.add_argument(
        "--cpu-cache-size", type=float, default=None, help="paging: GiB of pinned host expert cache"
    )
    ap.add_argument("--use-cuda-graph", action="store_true")
    ap.add_argument("--batch-prefill", action="store_true", help="the server prefills arrivals together")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]

    from deepseek_fp4_plugin.server import make_server

    tmp = tempfile.TemporaryDirectory()
    if args.model is None:
        from deepseek_fp4_plugin.tiny import ensure_tiny

        model = ensure_tiny()
    else:
        vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
        model = with_tokenizer(args.model, vocab, Path(tmp.name))
    paging = {"cpu_cache_size": args.cpu_cache_size} if args.cpu_cache_size is not None else None
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(
        model,
        device=args.device,
        dtype=args.dtype,
        memory_limit=args.memory_limit,
        max_batch_size=max(clients),
        max_seq_len=args.prompt_len + args.max_tokens + 8,
        use_cuda_graph=args.use_cuda_graph,
        paging=paging,
        verbose=True,
    )
    load_s = time.perf_counter() - t0
    dev = engine.device
    g = torch.Generator().manual_seed(0)
    vocab = engine.config.vocab_size
    n_prompts = max(clients) * args.requests
    prompts = [torch.randint(4, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(n_prompts)]
    name = gpu_slug() if dev.type == "cuda" else "cpu"
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "commit": commit(),
        "dirty": tree_dirty(),
        "date": datetime.date.today().isoformat(),
        "model": str(args.model or "built-in tiny"),
        "layers": engine.config.num_hidden_layers,
        "paged": engine.store.pages,
        "memory_limit_gib": args.memory_limit,
        "cuda_graph": engine.use_cuda_graph,
        "batch_prefill": args.batch_prefill,
        "torch_threads": torch.get_num_threads(),
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests,
        "load_s": load_s,
        "rows": [],
    }
    print(
        f"model loaded in {load_s:.1f} s ({'paged' if engine.store.pages else 'resident'}, {dev})", flush=True
    )

    base = {}
    for c in clients:
        engine_rows(engine, prompts, args.max_tokens, c, args.requests)  # warm-up
        base[c] = engine_rows(engine, prompts, args.max_tokens, c, args.requests)
        print(f"engine  C={c}: {base[c]}", flush=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = make_server(
        engine,
        port=port,
        model_name="bench",
        max_queue=max(clients),
        batch_prefill=args.batch_prefill,
        log_level="warning",
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1"
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        for c in clients:
            server_rows(pool, url, prompts, args.max_tokens, c, args.requests)  # warm-up
            row = server_rows(pool, url, prompts, args.max_tokens, c, args.requests)
            print(f"server  C={c}: {row}", flush=True)
            for mode, r in (("engine", base[c]), ("server", row)):
                result["rows"].append({"clients": c, "mode": mode, **r})
    stats = server.config.app.state.server.scheduler.stats
    result["server_stats"] = {
        "decode_steps": stats.decode_steps,
        "decode_rows": stats.decode_rows,
        "decode_live_rows": stats.decode_live_rows,
        "prefills": stats.prefills,
    }
    server.should_exit = True
    thread.join(60)

    out = args.out or Path(__file__).parent / "results" / f"server_{name}.json"
    write_result(result, out)
    print(
        f"\n{result['device']}, {result['layers']} layers, {'paged' if result['paged'] else 'resident'}, "
        f"CUDA graphs {result['cuda_graph']}; prompt {args.prompt_len}, {args.max_tokens} tokens, "
        f"{args.requests} requests per client"
    )
    print(
        f"{'clients':>7} {'engine tok/s':>13} {'server tok/s':>13} {'ratio':>6} {'engine TTFT ms':>15} "
        f"{'server TTFT ms (p50 / p90)':>27}"
    )
    for c in clients:
        e = next(r for r in result["rows"] if r["clients"] == c and r["mode"] == "engine")
        s = next(r for r in result["rows"] if r["clients"] == c and r["mode"] == "server")
        ratio = s["tokens_per_s"] / e["tokens_per_s"]
        print(
            f"{c:>7} {e['tokens_per_s']:>13.1f} {s['tokens_per_s']:>13.1f} {ratio:>6.2f} "
            f"{e['ttft_ms_median']:>15.1f} {s['ttft_ms_median']:>14.1f} / {s['ttft_ms_p90']:<10.1f}"
        )
    print(f"wrote {out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
