"""FP4 GEMM benchmark: DeepSeek-V3 shapes × M, against the HBM copy rate and torch BF16
matmul measured in the same run.

Timing: for M ≤ 128 (decode and small batches) the reported times are per GEMM inside a CUDA
graph of 20 back-to-back launches, as the decode step runs; larger M, and the *_launch_ms
fields, use CUDA events around single launches queued behind a GPU sleep (host overhead stays
out). Medians; weights rotate among enough copies that the 50 MB L2 cannot hold them; random
data throughout. FP4 and BF16 are timed the same way in the same run.

  python benchmarks/bench_fp4_gemm.py [--tune] [--shapes expert_gate_up,...] [--m 1,16,4096]

Writes benchmarks/results/fp4_gemm_<gpu>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import deepseek_fp4_plugin  # noqa: F401
from bench_common import commit, copy_bandwidth_gbs, gpu_slug, write_result
from deepseek_fp4_plugin import Fp4Weight, _C

SHAPES = {  # name: (N, K), y = x·Wᵀ
    "expert_gate_up": (4096, 7168),
    "expert_down": (7168, 2048),
    "dense_gate_up": (36864, 7168),
    "dense_down": (7168, 18432),
    "q_a": (1536, 7168),
    "q_b": (24576, 1536),
    "kv_a": (576, 7168),
    "kv_b": (32768, 512),
    "o": (7168, 16384),
    "lm_head": (129280, 7168),
}
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128, 512, 4096]
ROTATE_BYTES = 256 << 20
GRAPH_MAX_M = 128


def time_launches(fn, n_buffers: int, reps: int, warmup: int = 5) -> float:
    """Median milliseconds of fn(i) over reps launches, i rotating over n_buffers."""
    for i in range(warmup):
        fn(i % n_buffers)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time while the host queues the launches
    for i in range(reps):
        starts[i].record()
        fn(i % n_buffers)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_in_graph(fn, n_buffers: int, launches: int = 20, reps: int = 10) -> float:
    """Median milliseconds per fn(i) when `launches` calls run back to back in one CUDA graph,
    as the decode step runs them; launch latency is amortized the same way for every path."""
    for i in range(3):
        fn(i % n_buffers)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            fn(i % n_buffers)
    graph.replay()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / launches
    del graph
    return ms


def bf16_peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_launches(lambda i: a @ b, 1, 10)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def tactic_list(t) -> list:
    return [int(t.path), t.tile_tokens, t.warps_n, t.warps_k, t.split_k]


def bench_shape(name, n, k, m_values, reps, tune, copy_bw):
    gen_w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    base = Fp4Weight.from_float(gen_w)
    fp4_bytes = base.qweight.numel() * 4 + base.qscale.numel()
    n_fp4 = max(1, min(16, -(-ROTATE_BYTES // fp4_bytes)))
    fp4_copies = [base] + [Fp4Weight(base.qweight.clone(), base.qscale.clone(), base.global_scale.clone(), n, k)
                           for _ in range(n_fp4 - 1)]
    n_bf16 = max(1, min(8, -(-ROTATE_BYTES // (n * k * 2))))
    bf16_copies = [gen_w] + [gen_w.clone() for _ in range(n_bf16 - 1)]
    logical_bytes = n * k // 2 + n * k // 16  # packed E2M1 + one e4m3 scale per 16
    rows = []
    for m in m_values:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        default = _C.fp4_gemm_default_tactic(m, n, k)
        fp4_launch_ms = time_launches(lambda i: fp4_copies[i](x), n_fp4, reps)
        bf16_launch_ms = time_launches(lambda i: F.linear(x, bf16_copies[i]), n_bf16, reps)
        if m <= GRAPH_MAX_M:  # decode-sized: time as the CUDA-graph decode step runs them
            fp4_ms = time_in_graph(lambda i: fp4_copies[i](x), n_fp4)
            bf16_ms = time_in_graph(lambda i: F.linear(x, bf16_copies[i]), n_bf16)
        else:
            fp4_ms, bf16_ms = fp4_launch_ms, bf16_launch_ms
        row = {
            "name": name, "N": n, "K": k, "M": m,
            "fp4_ms": fp4_ms, "bf16_ms": bf16_ms, "speedup_vs_bf16": bf16_ms / fp4_ms,
            "weight_bytes": logical_bytes,
            "fraction_of_copy_bw": logical_bytes / (fp4_ms * 1e-3) / (copy_bw * 1e9),
            "timing": "cuda_graph" if m <= GRAPH_MAX_M else "per_launch",
            "fp4_launch_ms": fp4_launch_ms, "bf16_launch_ms": bf16_launch_ms,
            "tactic": tactic_list(default),
        }
        if tune and m <= 128:
            best_ms, best_t = fp4_launch_ms, tactic_list(default)
            for t in _C.fp4_gemm_candidate_tactics(m, n, k):
                if m >= 512 and t.path == _C.Fp4GemmPath.fused and (t.tile_tokens < 64 or t.split_k > 1):
                    continue  # narrow tiles and split-K only pay at small M
                tl = tactic_list(t)
                ms = time_launches(lambda i: fp4_copies[i](x, tl), n_fp4, max(10, reps // 2))
                if ms < best_ms:
                    best_ms, best_t = ms, tl
            row["best_fp4_launch_ms"] = best_ms
            row["best_tactic"] = best_t
        rows.append(row)
        print(f"{name:15s} M={m:5d}  fp4 {fp4_ms * 1e3:9.1f} us  bf16 {bf16_ms * 1e3:9.1f} us  "
              f"x{row['speedup_vs_bf16']:5.2f}  bw {row['fraction_of_copy_bw']:5.2f}"
              + (f"  launch {fp4_launch_ms * 1e3:8.1f} us" if m <= GRAPH_MAX_M else "")
              + (f"  best launch {row['best_fp4_launch_ms'] * 1e3:8.1f} us {row['best_tactic']}"
                 if "best_tactic" in row else ""),
              flush=True)
        del x
    del fp4_copies, bf16_copies, base, gen_w
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shape names")
    ap.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma-separated M values")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--tune", action="store_true", help="also sweep every tactic and record the best")
    ap.add_argument("--out", default=None, help="output JSON (default benchmarks/results/fp4_gemm_<gpu>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp4_gemm: needs a CUDA GPU", file=sys.stderr)
        return 2
    names = [s for s in args.shapes.split(",") if s]
    for s in names:
        if s not in SHAPES:
            print(f"bench_fp4_gemm: unknown shape {s!r} (known: {', '.join(SHAPES)})", file=sys.stderr)
            return 2
    m_values = [int(v) for v in args.m.split(",") if v]
    torch.manual_seed(0)
    copy_bw = copy_bandwidth_gbs()
    peak = bf16_peak_tflops()
    print(f"copy {copy_bw:.0f} GB/s (read+write), bf16 8192^3 {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for s in names:
        rows += bench_shape(s, *SHAPES[s], m_values, args.reps, args.tune, copy_bw)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "driver": torch.version.cuda,
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bw_gbs": copy_bw,
        "bf16_peak_tflops": peak,
        "timing": "M <= 128: per GEMM in a CUDA graph of 20 launches; larger M: per-launch CUDA events; "
                  "medians; weights rotated past L2; random data",
        "rows": rows,
    }
    out = write_result(result, Path(args.out) if args.out else
                       Path(__file__).parent / "results" / f"fp4_gemm_{gpu_slug()}.json")
    print(f"\nwrote {out}")
    print(f"{'shape':15s} " + " ".join(f"{m:>6d}" for m in m_values) + "   (speedup vs bf16)")
    for s in names:
        vals = {r["M"]: r["speedup_vs_bf16"] for r in rows if r["name"] == s}
        print(f"{s:15s} " + " ".join(f"{vals[m]:6.2f}" for m in m_values))
    print(f"{'shape':15s} " + " ".join(f"{m:>6d}" for m in m_values) + "   (fraction of copy bandwidth)")
    for s in names:
        vals = {r["M"]: r["fraction_of_copy_bw"] for r in rows if r["name"] == s}
        print(f"{s:15s} " + " ".join(f"{vals[m]:6.2f}" for m in m_values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
