"""FP8 block GEMM benchmark: DeepSeek-V3 attention and expert shapes × M, against torch BF16
matmul and cuBLASLt FP8 (``torch._scaled_mm``, per-token × per-channel scales) in the same run,
with the HBM copy rate and the BF16 peak measured first.

Timing as bench_fp4_gemm.py: for M ≤ 128 per GEMM inside a CUDA graph of 20 back-to-back
launches (as the decode step runs them); larger M per launch with CUDA events, queued behind a
GPU sleep. Medians; weights rotate among enough copies that the 50 MB L2 cannot hold them;
random data throughout. The cuBLASLt row includes its own activation quantization (a per-token
amax and cast, as a W8A8 runtime must do), our blockscaled path includes its per-token-group one.

  python benchmarks/bench_fp8_gemm.py [--tune] [--shapes q_b,o,...] [--m 1,16,4096] [--quick]

Writes benchmarks/results/fp8_gemm_<gpu>.json (rows: name, N, K, M, fp8_ms, bf16_ms,
cublaslt_fp8_ms, speedup_vs_bf16, ...) and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import deepseek_fp4_plugin  # noqa: F401
from bench_common import commit, copy_bandwidth_gbs, gpu_slug, write_result
from bench_fp4_gemm import (GRAPH_MAX_M, ROTATE_BYTES, bf16_peak_tflops, tactic_list, time_in_graph,
                            time_launches)
from deepseek_fp4_plugin import Fp8Weight, _C

SHAPES = {  # name: (N, K), y = x·Wᵀ; MLA attention of one layer, then the routed expert
    "q_a": (1536, 7168),
    "kv_a": (576, 7168),
    "q_b": (24576, 1536),
    "kv_b": (32768, 512),
    "o": (7168, 16384),
    "expert_gate_up": (4096, 7168),
    "expert_down": (7168, 2048),
    "dense_gate_up": (36864, 7168),
}
DEFAULT_SHAPES = [s for s in SHAPES if s != "dense_gate_up"]   # attention and expert shapes
M_VALUES = [1, 2, 4, 8, 16, 64, 128, 512, 4096]
QUICK = dict(shapes=["q_b", "o", "expert_gate_up", "expert_down"], m=[1, 4, 16, 128, 4096])


def tree_dirty() -> bool:
    try:
        out = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                      cwd=Path(__file__).parent, stderr=subprocess.DEVNULL)
        return bool(out.strip())
    except Exception:
        return False


def scaled_mm_fn(x, w8_t, w_scale):
    """cuBLASLt FP8: x quantized per token (amax / 448), W per output channel."""
    def run(_i=0, w8_t=w8_t, w_scale=w_scale):
        sx = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / 448.0              # [M, 1]
        xq = (x.float() / sx).to(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, w8_t, scale_a=sx, scale_b=w_scale, out_dtype=torch.bfloat16)
    return run


def bench_shape(name, n, k, m_values, reps, tune, copy_bw):
    gen_w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    base = Fp8Weight.from_float(gen_w)
    fp8_bytes = base.nbytes
    n_fp8 = max(1, min(16, -(-ROTATE_BYTES // fp8_bytes)))
    fp8_copies = [base] + [Fp8Weight(base.weight.clone(), base.scale.clone()) for _ in range(n_fp8 - 1)]
    n_bf16 = max(1, min(8, -(-ROTATE_BYTES // (n * k * 2))))
    bf16_copies = [gen_w] + [gen_w.clone() for _ in range(n_bf16 - 1)]
    # cuBLASLt FP8 operands: W [N, K] e4m3 with one scale per output channel, passed as K×N column-major
    ch_scale = gen_w.float().abs().amax(dim=1).clamp_min(1e-12) / 448.0                      # [N]
    w8 = (gen_w.float() / ch_scale[:, None]).to(torch.float8_e4m3fn)
    lt_copies = [(w8.t(), ch_scale[None, :].contiguous())] + [(w8.clone().t(), ch_scale[None, :].clone())
                                                              for _ in range(n_fp8 - 1)]
    rows = []
    for m in m_values:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        default = _C.fp8_gemm_default_tactic(m, n, k)
        lt = [scaled_mm_fn(x, *c) for c in lt_copies]
        fp8_launch_ms = time_launches(lambda i: fp8_copies[i](x), n_fp8, reps)
        bf16_launch_ms = time_launches(lambda i: F.linear(x, bf16_copies[i]), n_bf16, reps)
        lt_launch_ms = time_launches(lambda i: lt[i](), len(lt), reps)
        if m <= GRAPH_MAX_M:
            fp8_ms = time_in_graph(lambda i: fp8_copies[i](x), n_fp8)
            bf16_ms = time_in_graph(lambda i: F.linear(x, bf16_copies[i]), n_bf16)
            lt_ms = time_in_graph(lambda i: lt[i](), len(lt))
        else:
            fp8_ms, bf16_ms, lt_ms = fp8_launch_ms, bf16_launch_ms, lt_launch_ms
        row = {
            "name": name, "N": n, "K": k, "M": m,
            "fp8_ms": fp8_ms, "bf16_ms": bf16_ms, "cublaslt_fp8_ms": lt_ms,
            "speedup_vs_bf16": bf16_ms / fp8_ms, "cublaslt_speedup_vs_bf16": bf16_ms / lt_ms,
            "weight_bytes": fp8_bytes,
            "fraction_of_copy_bw": fp8_bytes / (fp8_ms * 1e-3) / (copy_bw * 1e9),
            "tflops": 2 * m * n * k / (fp8_ms * 1e-3) / 1e12,
            "timing": "cuda_graph" if m <= GRAPH_MAX_M else "per_launch",
            "fp8_launch_ms": fp8_launch_ms, "bf16_launch_ms": bf16_launch_ms,
            "cublaslt_fp8_launch_ms": lt_launch_ms, "tactic": tactic_list(default),
        }
        if tune:
            best_ms, best_t = fp8_launch_ms, tactic_list(default)
            for t in _C.fp8_gemm_candidate_tactics(m, n, k):
                if m >= 512 and t.path == _C.Fp8GemmPath.fused and (t.tile_tokens < 64 or t.split_k > 1):
                    continue  # narrow tiles and split-K only pay at small M
                tl = tactic_list(t)
                ms = time_launches(lambda i: fp8_copies[i](x, tl), n_fp8, max(10, reps // 2))
                if ms < best_ms:
                    best_ms, best_t = ms, tl
            row["best_fp8_launch_ms"] = best_ms
            row["best_tactic"] = best_t
        rows.append(row)
        print(f"{name:15s} M={m:5d}  fp8 {fp8_ms * 1e3:9.1f} us  bf16 {bf16_ms * 1e3:9.1f} us  "
              f"cublasLt-fp8 {lt_ms * 1e3:9.1f} us  x{row['speedup_vs_bf16']:5.2f} "
              f"(lt x{row['cublaslt_speedup_vs_bf16']:4.2f})"
              f"  bw {row['fraction_of_copy_bw']:5.2f}  path {int(default.path)}"
              + (f"  best launch {row['best_fp8_launch_ms'] * 1e3:8.1f} us {row['best_tactic']}"
                 if "best_tactic" in row else ""),
              flush=True)
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None,
                    help=f"comma-separated shape names (default: {','.join(DEFAULT_SHAPES)})")
    ap.add_argument("--m", default=None, help="comma-separated M values")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help=f"fewer shapes and M ({QUICK})")
    ap.add_argument("--tune", action="store_true", help="also sweep every tactic and record the best")
    ap.add_argument("--out", default=None,
                    help="output JSON (default benchmarks/results/fp8_gemm_<gpu>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8_gemm: needs a CUDA GPU", file=sys.stderr)
        return 2
    names = args.shapes.split(",") if args.shapes else (QUICK["shapes"] if args.quick else DEFAULT_SHAPES)
    for s in names:
        if s not in SHAPES:
            print(f"bench_fp8_gemm: unknown shape {s!r} (known: {', '.join(SHAPES)})", file=sys.stderr)
            return 2
    m_values = [int(v) for v in args.m.split(",")] if args.m else (QUICK["m"] if args.quick else M_VALUES)
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
        "dirty": tree_dirty(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bw_gbs": copy_bw,
        "bf16_peak_tflops": peak,
        "timing": "M <= 128: per GEMM in a CUDA graph of 20 launches; larger M: per-launch CUDA events; "
                  "medians; weights rotated past L2; random data",
        "rows": rows,
    }
    out = write_result(result, Path(args.out) if args.out else
                       Path(__file__).parent / "results" / f"fp8_gemm_{gpu_slug()}.json")
    print(f"\nwrote {out}")
    for title, key in (("speedup vs bf16", "speedup_vs_bf16"),
                       ("cuBLASLt FP8 vs bf16", "cublaslt_speedup_vs_bf16"),
                       ("fraction of copy bandwidth", "fraction_of_copy_bw")):
        print(f"{'shape':15s} " + " ".join(f"{m:>6d}" for m in m_values) + f"   ({title})")
        for s in names:
            vals = {r["M"]: r[key] for r in rows if r["name"] == s}
            print(f"{s:15s} " + " ".join(f"{vals[m]:6.2f}" for m in m_values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
