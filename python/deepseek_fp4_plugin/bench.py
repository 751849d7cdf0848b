"""The standard workload of ``deepseek-fp4 bench`` and the tuner command's driver.

``run_bench`` loads a model (the built-in tiny one by default), measures this machine's
ceilings, runs ``requests`` prompts of ``prompt_tokens`` tokens with ``decode_tokens``
generated each (``batch`` at a time, after a warm-up) under a started PerfMonitor, and
writes ``bench.json`` (the run's identity, results, figures, verdict, suggestions and the
whole trace) and ``perf_report.html`` to ``out``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

GiB = 1 << 30
PRESETS = ("default", "single_task", "batch", "long_sequence")
_TEXT = (
    "The tiered store keeps the experts that tokens reuse on the GPU, the rest in pinned host memory and on "
    "disk. Each step routes every token to a few experts; the ones that miss the GPU cross the bus while the "
    "shared expert and the attention compute. A benchmark that reads real text routes like real use. "
)


def run_identity() -> Dict[str, Any]:
    """Commit (DSFP4_COMMIT overrides), whether the tree was dirty, date, host, versions."""
    here = Path(__file__).resolve().parent
    commit, dirty = os.environ.get("DSFP4_COMMIT"), None
    if not commit:
        try:
            commit = subprocess.check_output(
                ["git", "rev-parse", "HEAD"], cwd=here, stderr=subprocess.DEVNULL, text=True
            ).strip()
            dirty = bool(
                subprocess.check_output(
                    ["git", "status", "--porcelain", "--untracked-files=no"],
                    cwd=here,
                    stderr=subprocess.DEVNULL,
                    text=True,
                ).strip()
            )
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    out = {
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        try:
            import pynvml

            pynvml.nvmlInit()
            drv = pynvml.nvmlSystemGetDriverVersion()
            out["driver"] = drv.decode() if isinstance(drv, bytes) else drv
        except Exception:
            pass
    return out


def bench_prompts(tokenizer, n: int, length: int, vocab: int, seed: int = 0) -> List[List[int]]:
    """``n`` prompts of exactly ``length`` token ids: real text when there is a tokenizer
    (each prompt starts at a different place), else seeded random ids."""
    if tokenizer is not None:
        ids = tokenizer.encode(_TEXT * 4, add_bos=False)
        while len(ids) < length + 8 * n:
            ids = ids + ids
        return [ids[(7 * i) % (len(ids) - length) :][:length] for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (length,), generator=g).tolist() for _ in range(n)]


def open_model(
    model: Optional[str],
    device: str,
    memory_limit: Optional[float],
    max_seq_len: Optional[int],
    batch: int,
    preset: str,
    progress: bool,
    **engine_kwargs,
):
    from .inference import DeepseekInference

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if model is None:
        from .tiny import ensure_tiny

        model = str(ensure_tiny())
        print(f"(no --model: the built-in tiny random model at {model})", file=sys.stderr)
    inf = DeepseekInference(
        model,
        device=device,
        memory_limit=memory_limit,
        max_seq_len=max_seq_len,
        max_batch_size=batch,
        progress=progress,
        verbose=False,
        **engine_kwargs,
    )
    if preset != "default":
        getattr(inf, f"optimize_for_{preset}")()
        if inf.engine.max_batch_size != batch:
            inf.apply_config({"batch_size": batch})  # the workload's batch wins over the preset's
    return inf


def memory_limit_for(
    model: str,
    expert_share: float,
    device: str = "auto",
    max_seq_len: int = 512,
    batch: int = 1,
    prefill_chunk: int = 2048,
    dtype: Optional[str] = None,
) -> float:
    """The budget (GiB) whose plan keeps every layer resident and ``expert_share`` of the
    routed experts on the GPU (a paged workload of a chosen severity)."""
    from .engine import Engine

    kw = dict(
        device=device, max_seq_len=max_seq_len, max_batch_size=batch, prefill_chunk=prefill_chunk, dtype=dtype
    )
    plan = Engine.plan(model, memory_limit=1024, **kw)
    if plan is None:
        raise ValueError("no budget to plan on this device")
    base = sum(b for name, b, _ in plan.rows() if name != "expert cache")
    slots = max(1, int(plan.total_experts * expert_share))
    return (base + slots * plan.expert_unit_bytes + plan.expert_unit_bytes // 2) / GiB


def run_bench(
    model: Optional[str] = None,
    out: Optional[str] = "bench_out",
    preset: str = "default",
    device: str = "auto",
    memory_limit: Optional[float] = None,
    prompt_tokens: int = 128,
    decode_tokens: int = 32,
    requests: int = 4,
    batch: int = 1,
    use_cuda_graph: Optional[bool] = None,
    progress: bool = True,
    ceilings: Optional[Dict[str, Any]] = None,
    paging: Optional[Dict[str, Any]] = None,
    dtype: Optional[str] = None,
) -> Dict[str, Any]:
    """Runs the standard workload (see the module docstring); returns the JSON it writes.
    ``dtype``: the engine's compute dtype (None: its default; paging on the CPU needs "bfloat16")."""
    from .ceilings import measure_ceilings
    from .report import PerfVisualizer

    for name, v, lo in (
        ("prompt_tokens", prompt_tokens, 1),
        ("decode_tokens", decode_tokens, 2),
        ("requests", requests, 1),
        ("batch", batch, 1),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    kw = {"paging": paging} if paging else {}
    if dtype is not None:
        kw["dtype"] = dtype
    inf = open_model(
        model, device, memory_limit, prompt_tokens + decode_tokens + 1, batch, preset, progress, **kw
    )
    eng = inf.engine
    if use_cuda_graph is not None:
        inf.apply_config({"use_cuda_graph": use_cuda_graph})
    if ceilings is None:
        ceilings = measure_ceilings(eng.device, disk_path=inf.model_path)
    prompts = bench_prompts(eng.tokenizer, requests, prompt_tokens, eng.config.vocab_size)
    eng.generate(prompts[:batch], max_tokens=2, ignore_eos=True)  # warm-up: graphs, caches, allocator
    mon = inf.perf_monitor
    mon.ceilings = ceilings
    mon.label = (
        f"bench: {requests} × ({prompt_tokens} prompt + {decode_tokens} generated) tokens, batch {batch}"
    )
    per_request: List[float] = []
    mon.start()
    it = range(0, requests, batch)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="bench", unit="batch", total=(requests + batch - 1) // batch)
    for i in it:
        t = time.perf_counter()
        eng.generate(prompts[i : i + batch], max_tokens=decode_tokens, ignore_eos=True)
        per_request.append(time.perf_counter() - t)
    mon.stop()
    util = mon.get_utilization()
    analysis = mon.analyze_bottlenecks()
    suggestions = mon.get_optimization_suggestions()
    trace = mon.export()
    lat = util["latency"]
    result = {
        "identity": run_identity(),
        "model": str(inf.model_path),
        "device": str(eng.device),
        "preset": preset,
        "workload": {
            "requests": requests,
            "batch": batch,
            "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens,
            "use_cuda_graph": eng.use_cuda_graph,
        },
        "plan": eng.memory_plan.as_dict() if eng.memory_plan is not None else None,
        "results": {
            "prefill_tokens_per_s": lat["prefill_tokens_per_s"],
            "decode_tokens_per_s": lat["decode_tokens_per_s"],
            "decode_step_ms": lat["decode_step_ms"],
            "prefill_ms": lat["prefill_ms"],
            "seconds_per_batch_median": statistics.median(per_request),
        },
        "ceilings": ceilings,
        "utilization": util,
        "analysis": _jsonable(analysis),
        "suggestions": suggestions,
        "trace": trace,
    }
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / "bench.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, out_dir / "bench.json")
        vis = PerfVisualizer(
            f"deepseek-fp4 bench — {Path(inf.model_path).name} on {_device_name(eng.device)}"
        )
        vis.add_metrics(trace)
        vis.add_section("Benchmark", _bench_table(result))
        result["report"] = str(vis.generate_report(out_dir / "perf_report.html"))
    return result


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"


def _jsonable(a: Dict[str, Any]) -> Dict[str, Any]:
    h = a.get("headroom")
    return dict(a, headroom=None if h is None or h == float("inf") else h)


def _bench_table(r: Dict[str, Any]) -> str:
    import html

    w, res, ident = r["workload"], r["results"], r["identity"]
    rows = [
        ("model", r["model"]),
        ("device", r["device"]),
        ("preset", r["preset"]),
        (
            "workload",
            f"{w['requests']} requests × ({w['prompt_tokens']} + {w['decode_tokens']}) tokens, "
            f"batch {w['batch']}, CUDA graphs {'on' if w['use_cuda_graph'] else 'off'}",
        ),
        ("seconds per batch (median)", f"{res['seconds_per_batch_median']:.3f}"),
        ("commit", f"{ident['commit']}{' (dirty tree)' if ident.get('dirty') else ''}"),
        ("date", ident["date"]),
    ]
    if r.get("plan"):
        rows.append(("memory plan", "<pre style='margin:0'>" + html.escape(_plan_text(r["plan"])) + "</pre>"))
    return (
        "<table>"
        + "".join(
            f"<tr><th>{html.escape(k)}</th><td>{v if k == 'memory plan' else html.escape(str(v))}</td></tr>"
            for k, v in rows
        )
        + "</table>"
    )


def _plan_text(plan: Dict[str, Any]) -> str:
    return "\n".join(
        f"{row['part']:<46} {row['bytes'] / GiB:8.3f} GiB  {row['note']}" for row in plan["rows"]
    )


def print_table(r: Dict[str, Any], file=None) -> None:
    file = file or sys.stdout
    w, res, u = r["workload"], r["results"], r["utilization"]

    def f(v, fmt="{:.1f}"):
        return "—" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v))

    print(f"deepseek-fp4 bench: {r['model']} on {r['device']} (preset {r['preset']})", file=file)
    print(
        f"  {w['requests']} requests × ({w['prompt_tokens']} prompt + {w['decode_tokens']} generated) "
        f"tokens, batch {w['batch']}, CUDA graphs {'on' if w['use_cuda_graph'] else 'off'}",
        file=file,
    )
    print(
        f"  prefill      {f(res['prefill_tokens_per_s']):>10} tok/s   {f(res['prefill_ms'])} ms per request",
        file=file,
    )
    print(
        f"  decode       {f(res['decode_tokens_per_s']):>10} tok/s   "
        f"{f(res['decode_step_ms'], '{:.2f}')} ms per step",
        file=file,
    )
    print(f"  end to end   {f(res['seconds_per_batch_median'], '{:.3f}'):>10} s per batch", file=file)
    m = u["memory"]
    print(
        f"  hit rates    expert {f(m['expert_hit_rate_pct'])}%  host {f(m['host_hit_rate_pct'])}%  "
        f"layer {f(m['layer_hit_rate_pct'])}%  prefetch accuracy {f(m['prefetch_accuracy_pct'])}%",
        file=file,
    )
    g = u["gpu"]
    if g.get("available"):
        print(
            f"  GPU          utilization {f(g.get('utilization_pct'))}%  "
            f"SMs busy {f(g.get('sm_activity_pct'))}%  PCIe RX {f(g.get('pcie_rx_GBps'), '{:.2f}')} GB/s",
            file=file,
        )
    else:
        print(f"  GPU          {g.get('utilization_pct')}", file=file)
    print(f"  verdict      {r['analysis']['verdict']}", file=file)
    for s in r["suggestions"]:
        print(f"  suggest      {s['knob']} = {s['value']}: {s['expected_effect']}", file=file)
    if r.get("report"):
        print(f"  wrote        {Path(r['report']).parent / 'bench.json'}, {r['report']}", file=file)


def run_tune(
    model: Optional[str],
    out: str,
    device: str = "auto",
    memory_limit: Optional[float] = None,
    target: str = "throughput",
    time_budget_s: float = 120.0,
    prompts: Optional[Sequence[Any]] = None,
    max_tokens: int = 32,
    approximate: bool = False,
    batch: int = 1,
    preset: str = "default",
    progress: bool = True,
    dtype: Optional[str] = None,
) -> Dict[str, Any]:
    """Runs the AutoTuner on a model and writes its result (the config and every trial)."""
    from .tuner import DEFAULT_PROMPTS, AutoTuner

    dev = device
    if memory_limit is None and torch.cuda.is_available() and device != "cpu":
        # reloads plan against this fixed budget (the free memory shrinks while a model is loaded)
        free, _ = torch.cuda.mem_get_info()
        memory_limit = round(0.9 * free / GiB, 2)
    prompts = list(prompts or DEFAULT_PROMPTS)
    kw = {"dtype": dtype} if dtype is not None else {}
    inf = open_model(model, dev, memory_limit, None, batch, preset, False, **kw)  # the bar is the trials
    if inf.engine.tokenizer is None and any(isinstance(p, str) for p in prompts):
        prompts = bench_prompts(None, len(prompts), 64, inf.engine.config.vocab_size)
    tuner = AutoTuner(inf, prompts=prompts, max_tokens=max_tokens, allow_approximation=approximate)
    tuner.optimize(target_metric=target, time_budget_s=time_budget_s, progress=progress)
    tuner.save(out)
    return tuner.result  # type: ignore[return-value]
