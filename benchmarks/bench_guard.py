"""Cost of the numerical guard: sampling with and without the non-finite check, per step.

The engine turns a decode step's float32 logits [B, V] into next tokens read on the host. The
guard adds one reduction (a row sum, whose finiteness says whether every logit is finite) and
marks flagged rows in the token tensor that is copied to the host anyway; when sampling
(temperature > 0) flagged rows also get harmless logits (one elementwise pass) so that
multinomial never sees NaN. Measured:

  baseline   sample(logits).tolist()                       (what the engine did before)
  guarded    sample_checked(logits)                        (what it does now)
  reduction  torch.isfinite(logits.sum(-1)) alone

for V = 129280 (DeepSeek-V3) and several batch sizes, greedy and nucleus sampling. Medians
over --reps runs after warm-up, the three run in turn in every repetition, wall clock with a
device sync (the engine syncs here too).

  python benchmarks/bench_guard.py [--device cpu|cuda] [--batch 1,4,16] [--reps 200]

Writes benchmarks/results/guard_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

import deepseek_fp4_plugin  # noqa: F401
from bench_common import commit, gpu_slug, write_result
from deepseek_fp4_plugin.guard import sample_checked
from deepseek_fp4_plugin.sampling import SamplingParams, sample

VOCAB = 129280


def _medians_us(fns, device: torch.device, reps: int):
    """Median wall time of each function, run in turn within every repetition (so that load
    on a shared machine hits them alike)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(10):
        for fn in fns:
            fn()
    sync()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) * 1e6 for ts in times]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    modes = {"greedy": SamplingParams(), "top_p": SamplingParams(temperature=0.7, top_p=0.9, seed=0)}
    for b in [int(x) for x in args.batch.split(",")]:
        logits = torch.randn(b, VOCAB, device=device) * 4
        for mode, params in modes.items():
            def gens():
                return params.generators(b, device)

            base, guarded, red = _medians_us([lambda: sample(logits, params, gens()).tolist(),
                                              lambda: sample_checked(logits, params, gens()),
                                              lambda: torch.isfinite(logits.sum(dim=-1))], device, args.reps)
            rows.append({"batch": b, "mode": mode, "baseline_us": round(base, 1),
                         "guarded_us": round(guarded, 1), "overhead_us": round(guarded - base, 1),
                         "reduction_us": round(red, 1)})
    name = gpu_slug() if device.type == "cuda" else "cpu"
    result = {
        "benchmark": "guard", "commit": commit(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch_threads": torch.get_num_threads(), "vocab": VOCAB, "reps": args.reps, "rows": rows,
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"guard_{name}.json"
    write_result(result, out)
    print(f"{'batch':>5} {'mode':>7} {'baseline µs':>12} {'guarded µs':>11} {'overhead µs':>12} "
          f"{'reduction µs':>13}")
    for r in rows:
        print(f"{r['batch']:>5} {r['mode']:>7} {r['baseline_us']:>12} {r['guarded_us']:>11} "
              f"{r['overhead_us']:>12} {r['reduction_us']:>13}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
