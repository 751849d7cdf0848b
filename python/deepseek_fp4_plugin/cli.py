"""The ``deepseek-fp4`` command.

    deepseek-fp4 generate [--model DIR] --prompt TEXT [--max-tokens N] [sampling options]
                          [--device D] [--dtype T] [--precision P] [--memory-limit GiB]
                          [--max-batch-size N] [--max-seq-len N] [--prefill-chunk N]
                          [--cpu-cache-size GiB] [--prefetch-layers N] [...] [--use-cuda-graph]
    deepseek-fp4 make-tiny DIR [--seed S] [--format nvfp4|fp8_block|bf16]
    deepseek-fp4 convert SRC DST [...]
    deepseek-fp4 bench [--model DIR] [--preset P] [--out DIR]
    deepseek-fp4 tune [--model DIR] [--target throughput] [--time-budget S] [--out FILE]
    deepseek-fp4 serve [--model DIR] [--host H] [--port P] [engine options] [--api-key KEY] [--max-queue N]
    deepseek-fp4 --version

Without --model, generate runs the built-in tiny random DeepSeek-V3 (written to the cache
folder on first use), so it works on a fresh machine with no download; its text is gibberish.

Each subcommand is one ``add_<name>_parser(subparsers)`` function listed in ``SUBCOMMANDS``;
the parser sets ``func``, which ``run_command`` calls. Library modules never import this one.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from . import __version__

# ---------------------------------------------------------------------------------------
# generate

# PagingSettings fields offered as options: (field, type, help)
_PAGING_OPTIONS = (
    ("cpu_cache_size", float, "GiB of pinned host memory for expert units (default: what the host "
                              "can spare)"),
    ("prefetch_layers", int, "layers (and predicted experts) brought in ahead; 0 disables prefetch "
                             "(default 1)"),
    ("max_gpu_layers", int, "most layers whose attention / dense weights are on the GPU at once"),
    ("expert_threshold", float, "opt-in approximation: skip a non-resident expert whose routing weight is "
                                "below this (default 0 = exact)"),
    ("miss_mode", str, "copy (default), zero_copy or auto: how a missed expert is read"),
    ("cache_policy", str, "lrfu (default) or lru"),
    ("gpu_memory_fraction", float, "without --memory-limit, the budget is this fraction of the card"),
    ("io_threads", int, "disk reader threads (default 8)"),
    ("cpu_experts", str, "off (default), auto or a number of threads: CPU threads compute missed experts "
                         "in decode steps while the bus brings others"),
)


def add_engine_options(p: argparse.ArgumentParser, batch_help: str) -> None:
    """The engine's memory and paging options (generate, serve); ``load_engine`` reads them."""
    p.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    e = p.add_argument_group("engine (see Engine.from_pretrained)")
    e.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA; paging needs bfloat16)")
    e.add_argument("--precision", default="default", choices=["default", "fp4", "bf16"],
                   help="which layers run in NVFP4 (see PrecisionPolicy; default: MLPs and experts)")
    e.add_argument("--memory-limit", type=float, default=None,
                   help="device memory budget in GiB; what does not fit is paged")
    e.add_argument("--max-batch-size", type=int, default=8, help=batch_help)
    e.add_argument("--max-seq-len", type=int, default=None, help="context length (prompt + generated)")
    e.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prompt tokens per prefill forward (default 2048)")
    e.add_argument("--use-cuda-graph", action="store_true", help="replay decode steps from CUDA graphs")
    g = p.add_argument_group("paging (see PagingSettings)")
    for name, kind, text in _PAGING_OPTIONS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text)


def load_engine(args, model):
    """Engine.from_pretrained with the options ``add_engine_options`` added; a paged plan goes
    to stderr (stdout may carry generated text)."""
    from .engine import Engine

    paging = {name: getattr(args, name) for name, _, _ in _PAGING_OPTIONS if getattr(args, name) is not None}
    engine = Engine.from_pretrained(model, device=args.device, memory_limit=args.memory_limit,
                                    dtype=args.dtype, precision=args.precision, max_seq_len=args.max_seq_len,
                                    max_batch_size=args.max_batch_size, prefill_chunk=args.prefill_chunk,
                                    use_cuda_graph=args.use_cuda_graph, paging=paging,
                                    progress=not args.no_progress, verbose=False)
    plan = getattr(engine, "memory_plan", None)
    if plan is not None and plan.paged:
        print(plan.table(), file=sys.stderr)
    return engine


def add_generate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate text, streamed to stdout",
                       description="Generate a continuation of --prompt, printed as it is produced.")
    p.add_argument("--model", help="model folder (default: the built-in tiny random model)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--stats", action="store_true", help="print prefill / decode speed to stderr")
    add_engine_options(p, batch_help="sequences the KV cache holds (default 8)")
    p.set_defaults(func=_run_generate)
    return p


def _run_generate(args) -> int:
    model = args.model
    if model is None:
        from .tiny import ensure_tiny

        model = ensure_tiny()
        print(f"(no --model: using the built-in tiny random model at {model}; its output is gibberish)",
              file=sys.stderr)
    engine = load_engine(args, model)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")   # a terminal that cannot show a character gets '?'
    pieces = engine.stream(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                           top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop, chat=args.chat)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    done = engine.last_completion
    if done is not None and done.finish_reason == "error":
        print(f"deepseek-fp4 generate: error: {done.error}", file=sys.stderr)
        return 1
    if args.stats:
        s = engine.last_stats
        print(f"prompt {s.prompt_tokens} tokens, {s.prefill_tokens_per_s:.1f} tok/s prefill; "
              f"generated {s.generated_tokens} tokens, {s.decode_tokens_per_s:.1f} tok/s decode",
              file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------
# make-tiny


def add_make_tiny_parser(sub) -> argparse.ArgumentParser:
    from .tiny import FORMATS

    p = sub.add_parser("make-tiny", help="write a small random DeepSeek-V3 checkpoint with a tokenizer",
                       description="Write the built-in tiny random DeepSeek-V3 (with a tokenizer) to DIR.")
    p.add_argument("dir", help="output folder (new or empty)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--format", choices=FORMATS, default="nvfp4", help="weight format (default nvfp4)")
    p.set_defaults(func=_run_make_tiny)
    return p


def _run_make_tiny(args) -> int:
    from .tiny import make_tiny

    print(f"wrote {make_tiny(args.dir, seed=args.seed, format=args.format)}")
    return 0


# ---------------------------------------------------------------------------------------
# convert


def add_convert_parser(sub) -> argparse.ArgumentParser:
    from .convert import DEFAULT_EXCLUDE

    p = sub.add_parser("convert", help="convert a checkpoint to NVFP4 (ModelOpt layout)",
                       description="Convert a DeepSeek-V3/R1 checkpoint folder (BF16/FP16/FP32, FP8 block or "
                                   "NVFP4) to NVFP4 in the NVIDIA ModelOpt layout. Resumable: run the same "
                                   "command again after an interruption.")
    p.add_argument("src", help="source model folder")
    p.add_argument("dst", help="destination folder (new, empty, or an unfinished conversion to resume)")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="module-name pattern to keep unquantized (repeatable; default: "
                        f"{' '.join(DEFAULT_EXCLUDE)})")
    p.add_argument("--fp8", action="append", metavar="PATTERN",
                   help="module-name pattern to write as DeepSeek FP8 blocks (128x128 scales) instead of "
                        "NVFP4, e.g. 'model.layers.*.self_attn.*' (repeatable)")
    p.add_argument("--input-scale", type=float, default=1.0,
                   help="input_scale written for each quantized layer (uncalibrated; default 1.0)")
    p.add_argument("--device", default="cpu", help="device to quantize on (cpu or cuda)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_convert)
    return p


def _run_convert(args) -> int:
    from .convert import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, exclude=args.exclude, progress=not args.no_progress,
                             input_scale=args.input_scale, device=args.device, fp8=args.fp8)
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------
# bench, tune


def add_bench_parser(sub) -> argparse.ArgumentParser:
    from .bench import PRESETS

    p = sub.add_parser("bench", help="standard prefill + decode workload, table, JSON and HTML report",
                       description="Runs a standard prefill + decode workload under the performance "
                                   "monitor; prints a short table and writes bench.json and "
                                   "perf_report.html to --out.")
    p.add_argument("--model", help="model folder (default: the built-in tiny random model)")
    p.add_argument("--preset", default="default", choices=PRESETS,
                   help="a tuning-guide scenario (default: none)")
    p.add_argument("--out", default="bench_out", help="output folder (default ./bench_out)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--memory-limit", type=float, default=None, help="device memory budget in GiB")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    p.add_argument("--requests", type=int, default=4, help="requests (default 4)")
    p.add_argument("--batch", type=int, default=1, help="requests run together (default 1)")
    p.add_argument("--cpu-cache-size", type=float, default=None,
                   help="host expert cache in GiB (paged models)")
    p.add_argument("--use-cuda-graph", choices=["on", "off"], default=None,
                   help="CUDA-graph decode (default: the preset's choice, else off)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA; paging needs bfloat16)")
    p.add_argument("--cpu-experts", default=None,
                   help="off, auto or a number of threads: the CPU expert lane of a paged model")
    p.set_defaults(func=_run_bench)
    return p


def _run_bench(args) -> int:
    from .bench import print_table, run_bench

    graphs = None if args.use_cuda_graph is None else args.use_cuda_graph == "on"
    paging = {k: v for k, v in (("cpu_cache_size", args.cpu_cache_size), ("cpu_experts", args.cpu_experts))
              if v is not None} or None
    r = run_bench(args.model, args.out, preset=args.preset, device=args.device,
                  memory_limit=args.memory_limit, prompt_tokens=args.prompt_tokens,
                  decode_tokens=args.decode_tokens, requests=args.requests, batch=args.batch,
                  use_cuda_graph=graphs, paging=paging, dtype=args.dtype)
    print_table(r)
    return 0


def add_tune_parser(sub) -> argparse.ArgumentParser:
    from .tuner import METRICS

    p = sub.add_parser("tune", help="search knob settings by short measured trials; write the best config",
                       description="Runs the AutoTuner on your prompts within a time budget and writes "
                                   "the best configuration (and every trial) as JSON; "
                                   "DeepseekInference.apply_config takes its 'config'.")
    p.add_argument("--model", help="model folder (default: the built-in tiny random model)")
    p.add_argument("--out", default="tuned_config.json", help="result file (default ./tuned_config.json)")
    p.add_argument("--target", default="throughput", choices=list(METRICS), help="what to optimize")
    p.add_argument("--time-budget", type=float, default=120.0, help="seconds for all trials (default 120)")
    p.add_argument("--prompts", help="text file, one prompt per line (default: built-in prompts)")
    p.add_argument("--max-tokens", type=int, default=32,
                   help="tokens generated per prompt per trial (default 32)")
    p.add_argument("--approximate", action="store_true",
                   help="also search expert_threshold (changes outputs)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--memory-limit", type=float, default=None, help="device memory budget in GiB")
    p.add_argument("--batch", type=int, default=1, help="starting batch size (default 1)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA; paging needs bfloat16)")
    p.set_defaults(func=_run_tune)
    return p


def _run_tune(args) -> int:
    from pathlib import Path

    from .bench import run_tune

    prompts = None
    if args.prompts:
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        prompts = [x for x in lines if x.strip()]
        if not prompts:
            raise ValueError(f"{args.prompts}: no prompts (one per line)")
    r = run_tune(args.model, args.out, device=args.device, memory_limit=args.memory_limit, target=args.target,
                 time_budget_s=args.time_budget, prompts=prompts, max_tokens=args.max_tokens,
                 approximate=args.approximate, batch=args.batch, dtype=args.dtype)
    base = r["baseline"]["value"]
    print(f"tuned {r['target_metric']} ({r['metric_key']}): {base if base is None else round(base, 3)} → "
          f"{r['value'] if r['value'] is None else round(r['value'], 3)} in {len(r['trials'])} trials, "
          f"{r['elapsed_s']:.0f} s ({r['stopped']}); {len(r['skipped'])} configurations did not fit")
    print(f"config: {r['config']}")
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------
# serve


def _port(text: str) -> int:
    v = int(text)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in [0, 65535], got {v}")
    return v


def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions,"
                                   " /v1/completions, /v1/models, /health, /metrics). Many clients share one"
                                   " engine: requests join the running batch at the next decode step.")
    p.add_argument("--model", help="model folder (default: the built-in tiny random model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("DEEPSEEK_FP4_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $DEEPSEEK_FP4_API_KEY, else no key)")
    p.add_argument("--served-model-name", default=None,
                   help="model id in the API (default: the folder's name)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a batch row; more get 429 (default 64)")
    p.add_argument("--shutdown-grace", type=float, default=5.0,
                   help="seconds running requests may finish after SIGINT / SIGTERM (default 5)")
    p.add_argument("--batch-prefill", action="store_true",
                   help="prefill requests that arrive together as one padded batch (faster with paged "
                        "experts; rows' numbers then depend on the padding)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_options(p, batch_help="batch rows: requests generating at once (default 8)")
    p.set_defaults(func=_run_serve)
    return p


def _run_serve(args) -> int:
    from pathlib import Path

    try:
        from .server import make_server
    except ImportError as e:
        missing = e.name or "fastapi and uvicorn"
        raise ValueError(f"serving needs {missing}: pip install 'deepseek-fp4[serve]'") from e

    model = args.model
    if model is None:
        from .tiny import ensure_tiny

        model = ensure_tiny()
        print(f"(no --model: serving the built-in tiny random model at {model}; its output is gibberish)",
              file=sys.stderr)
    engine = load_engine(args, model)
    name = args.served_model_name or Path(model).resolve().name
    server = make_server(engine, args.host, args.port, name, args.api_key, args.max_queue,
                         args.shutdown_grace, args.batch_prefill, log_level=args.log_level)
    key = ", API key required" if args.api_key else ""
    print(f"serving {name} at http://{args.host}:{args.port}/v1 ({engine.max_batch_size} batch rows, "
          f"context {engine.max_seq_len}{key}); Ctrl-C stops", file=sys.stderr)
    try:
        server.run()
    except KeyboardInterrupt:   # uvicorn shut down gracefully, then re-raised the Ctrl-C
        pass
    print("deepseek-fp4 serve: stopped", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------

SUBCOMMANDS = (add_generate_parser, add_make_tiny_parser, add_convert_parser, add_bench_parser,
               add_tune_parser, add_serve_parser)


def _version() -> str:
    import torch

    from ._ext import has_cuda_kernels

    return (f"deepseek-fp4 {__version__} (torch {torch.__version__}, CUDA kernels "
            f"{'built' if has_cuda_kernels() else 'not built'})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek-fp4",
                                     description="DeepSeek-V3/R1 inference with NVFP4 weights.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(args, args.command)


def run_command(args, command: str) -> int:
    """Runs ``args.func(args)``; errors become one line on stderr and exit status 2."""
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:
        # one line, naming what failed (OSError messages carry the path)
        print(f"deepseek-fp4 {command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deepseek-fp4 {command}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    raise SystemExit(main())
