"""CPU expert kernel: GB/s of expert weights read, against the host DRAM read rate of the same run.

Units of the paging store's layout (DeepSeek-V3 experts by default: hidden 7168, inter 2048,
24.8 MB each) fill at least --gb of host memory (pinned when CUDA is present, as the paging
store's host cache is) with random codes and scales, so no call finds its experts in cache.
Each call runs --experts (8, as at decode) experts, every one with all `batch` tokens; calls
rotate through the units. The ceiling is the pool's own read probe (the same threads, each
streaming contiguous shares) over the same units, measured in the same run.

  gbs       = unit bytes of the call's experts / median wall time of a call (submit to return)
  dram_gbs  = best of --reps reads of all the units by the pool's threads

Also (unless --quick): batch 1 with each instruction set this CPU has (same threads), and a
sweep of the software prefetch distance at batch 1.

  python benchmarks/bench_cpu_experts.py [--batches 1,4,16] [--gb 2.2] [--reserved-cores 0]

Writes benchmarks/results/cpu_experts_<cpu>.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from bench_common import commit, write_result
from deepseek_fp4_plugin import cpu_experts as ce
from deepseek_fp4_plugin._ext import _C


def tree_dirty() -> bool | None:
    if os.environ.get("DSFP4_DIRTY") is not None:
        return os.environ["DSFP4_DIRTY"] not in ("0", "", "false")
    try:
        out = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                      cwd=Path(__file__).parent, stderr=subprocess.DEVNULL)
        return bool(out.strip())
    except Exception:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_units(layout: dict, count: int, pinned: bool, seed: int = 0) -> torch.Tensor:
    """count units [count, bytes]: random E2M1 codes, e4m3 block scales in [2^-3, 1.875] (normal,
    no NaN), global scales 1/64. One random unit is copied to all (timing does not depend on the
    values, only on their not being zero or subnormal) and each copy is then perturbed."""
    nbytes = layout["bytes"]
    g = torch.Generator().manual_seed(seed)
    hidden, inter = layout["hidden"], layout["inter"]
    u = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    for part, (n, k) in {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}.items():
        kb = -(-k // 64)  # k-blocks of 64 columns, scales in chunks of 8 k-blocks per 16-row tile
        sbytes = -(-n // 16) * -(-kb // 8) * 512
        off = layout[f"{part}_qscale"]
        u[off:off + sbytes] = torch.randint(0x20, 0x40, (sbytes,), dtype=torch.uint8, generator=g)
        off = layout[f"{part}_scale"]
        u[off:off + 4 * -(-n // 16)].view(torch.float32).fill_(1.0 / 64)
    units = torch.empty(count, nbytes, dtype=torch.uint8, pin_memory=pinned)
    units.copy_(u.expand(count, nbytes))
    units[:, :4096] = torch.randint(0, 256, (count, 4096), dtype=torch.uint8, generator=g)
    return units


def time_calls(cpu: ce.CpuExperts, units: torch.Tensor, batch: int, experts: int, calls: int,
               warmup: int, seed: int) -> dict:
    hidden = cpu.hidden
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, hidden, generator=g).to(torch.bfloat16)
    ys = [torch.empty(batch, hidden, dtype=torch.bfloat16) for _ in range(experts)]
    n = units.shape[0]
    unit_bytes = units.shape[1]
    walls, runs = [], []
    start = 0
    for c in range(warmup + calls):
        jobs = [ce.CpuExpertJob(expert=(start + e) % n, unit=units[(start + e) % n].data_ptr(), rows=None, y=ys[e])
                for e in range(experts)]
        start = (start + experts) % n
        t0 = time.perf_counter()
        st = cpu.run(0, x, jobs)
        wall = time.perf_counter() - t0
        if c >= warmup:
            walls.append(wall)
            runs.append(st["run_ms"] * 1e-3)
    wall = statistics.median(walls)
    run = statistics.median(runs)
    nbytes = experts * unit_bytes
    return {"batch": batch, "ms": wall * 1e3, "ms_run": run * 1e3, "gbs": nbytes / wall / 1e9,
            "gbs_run": nbytes / run / 1e9, "calls": calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--experts", type=int, default=8, help="experts per call")
    ap.add_argument("--gb", type=float, default=2.2, help="host memory filled with units")
    ap.add_argument("--calls", type=int, default=0, help="timed calls per batch (0: two passes over the units)")
    ap.add_argument("--reps", type=int, default=5, help="reads of the units for the DRAM rate")
    ap.add_argument("--isa", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reserved-cores", default="0", help="cores kept free, comma separated ('' for none)")
    ap.add_argument("--prefetch", type=int, default=-1, help="prefetch bytes (-1: the pool's default)")
    ap.add_argument("--prefetch-l2", type=int, choices=(-1, 0, 1), default=-1, help="prefetch into L2 only (-1: default)")
    ap.add_argument("--spin-us", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="skip the ISA comparison and the prefetch sweep")
    ap.add_argument("--pinned", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    reserved = [int(c) for c in args.reserved_cores.split(",") if c.strip()]
    pinned = torch.cuda.is_available() if args.pinned == "auto" else args.pinned == "yes"
    layout = dict(_C.paging.expert_unit_layout(args.hidden, args.inter))
    unit_bytes = layout["bytes"]
    count = max(args.experts * 2, -(-int(args.gb * 1e9) // unit_bytes))
    t0 = time.perf_counter()
    units = make_units(layout, count, pinned)
    print(f"{count} units of {unit_bytes / 1e6:.1f} MB ({count * unit_bytes / 1e9:.2f} GB, "
          f"{'pinned' if pinned else 'pageable'}) built in {time.perf_counter() - t0:.1f} s")
    calls = args.calls or max(8, -(-2 * count // args.experts))
    batches = [int(b) for b in args.batches.split(",")]

    def pool(isa: str, prefetch: int | None = None, l2: bool | None = None) -> ce.CpuExperts:
        kw = {} if prefetch is None else {"prefetch_bytes": prefetch}
        if l2 is not None:
            kw["prefetch_l2"] = l2
        elif args.prefetch_l2 >= 0:
            kw["prefetch_l2"] = bool(args.prefetch_l2)
        return ce.CpuExperts(args.hidden, args.inter, isa=isa, threads=args.threads, reserved_cores=reserved,
                             spin_us=args.spin_us, **kw)

    cpu = pool(args.isa, None if args.prefetch < 0 else args.prefetch)
    flat = units.view(-1)
    dram = cpu.read_bandwidth(flat, args.reps)
    print(f"isa {cpu.isa}, {cpu.threads} threads on cores {cpu.cores}; DRAM read {dram:.1f} GB/s")
    rows = []
    for b in batches:
        r = time_calls(cpu, units, b, args.experts, calls, warmup=3, seed=b)
        r.update({"dram_gbs": dram, "isa": cpu.isa, "threads": cpu.threads, "ratio": r["gbs"] / dram})
        rows.append(r)

    isa_rows, sweep = [], []
    if not args.quick:
        for name in ("avx512_bf16", "avx512", "avx2"):
            try:
                ce.resolve_isa(name)
            except NotImplementedError:
                continue
            p = pool(name)
            r = time_calls(p, units, 1, args.experts, calls, warmup=3, seed=1)
            r.update({"isa": name, "threads": p.threads, "dram_gbs": dram, "ratio": r["gbs"] / dram})
            isa_rows.append(r)
            del p
        for l2, pf in ((False, 0), (False, 2048), (False, 8192), (True, 8192), (True, 32768)):
            p = pool(args.isa, pf, l2)
            r = time_calls(p, units, 1, args.experts, calls, warmup=3, seed=1)
            r.update({"prefetch_bytes": pf, "prefetch_l2": l2, "isa": p.isa, "ratio": r["gbs"] / dram})
            sweep.append(r)
            del p
        dram_after = cpu.read_bandwidth(flat, args.reps)
    else:
        dram_after = None

    result = {
        "bench": "cpu_experts",
        "commit": commit(),
        "dirty": tree_dirty(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores_online": os.cpu_count(),
        "features": ce.cpu_features(),
        "hidden": args.hidden,
        "inter": args.inter,
        "unit_bytes": unit_bytes,
        "units": count,
        "units_gb": count * unit_bytes / 1e9,
        "pinned": pinned,
        "experts_per_call": args.experts,
        "tokens_per_expert": "batch (every expert gets all the batch's tokens)",
        "reserved_cores": reserved,
        "dram_gbs": dram,
        "dram_gbs_after": dram_after,
        "cpu_kernel": [{k: r[k] for k in ("batch", "gbs", "dram_gbs", "isa", "threads", "ratio", "ms", "ms_run",
                                           "gbs_run")} for r in rows],
        "isa_compare": isa_rows,
        "prefetch_sweep": sweep,
        "target": "batch 1 >= 0.75 x dram_gbs",
    }
    slug = cpu.isa
    out = args.out or Path(__file__).parent / "results" / f"cpu_experts_{slug}.json"
    write_result(result, out)

    print(f"\n{'batch':>5} {'isa':>12} {'thr':>4} {'ms/call':>8} {'GB/s':>7} {'DRAM':>7} {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {r['isa']:>12} {r['threads']:>4} {r['ms']:>8.2f} {r['gbs']:>7.1f} "
              f"{r['dram_gbs']:>7.1f} {r['ratio']:>6.2f}")
    for r in isa_rows:
        print(f"isa {r['isa']:>12}: batch 1 {r['gbs']:.1f} GB/s ({r['ratio']:.2f} of DRAM)")
    for r in sweep:
        print(f"prefetch {r['prefetch_bytes']:>5} B {'L2' if r['prefetch_l2'] else 'L1'}: batch 1 {r['gbs']:.1f} GB/s "
              f"({r['ratio']:.2f} of DRAM)")
    if dram_after is not None:
        print(f"DRAM read at the end: {dram_after:.1f} GB/s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
