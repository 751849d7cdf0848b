"""llama.cpp as a peer: ``llama-bench`` with every layer on the GPU except the routed experts.

The command is what a user of a DeepSeek-V3/R1 GGUF on one GPU runs (``-ngl 99 -ot exps=CPU``),
plus the settings that give that setup its best figures:

  -lm none       load into llama.cpp's own buffers rather than an mmap of the file: its loader
                 advises it when tensors are overridden to the CPU, and repacked weights are copied
                 out of the mapping anyway
  -b/-ub N       one micro-batch for the whole prompt (N = the longest prompt): with op offload a
                 prefill copies the CPU-held expert weights to the GPU once per micro-batch
  --repack 1,0   both: repacked Q4_0/Q4_K weights (AVX-512 kernels) decode faster on the CPU, but
                 a repacked buffer is not host memory to the scheduler, so large batches are no
                 longer offloaded to the GPU; the best of the two is reported per phase
  -fa auto       llama-bench's default (FlashAttention where the GPU build has it)

Per MoE layer: decode ``1000 / tok_s / layers`` ms (one token's step over the MoE layers);
prefill ``1000 * n_prompt / tok_s / layers`` ms (the whole prompt's time over the MoE layers).
Both include the step's non-MoE work (attention, embedding, output head), as bench_paging.py's
rows do. llama-bench decodes from an empty context (``-n`` after no prompt).

  python benchmarks/peers/llama_cpp.py --bin .deps/llama-cuda/bin --gguf /dev/shm/v3.gguf \
      --layers 3 [--threads 16] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _expert_and_dense_types(gguf_path: Path) -> dict:
    """Tensor types of the experts and the rest, read from the GGUF header (None if unreadable)."""
    sys.path.insert(0, str(ROOT / ".deps" / "llama.cpp" / "gguf-py"))
    try:
        from gguf import GGUFReader
    except ImportError:
        return {"experts": None, "attention": None}
    finally:
        sys.path.pop(0)
    reader = GGUFReader(str(gguf_path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return {"experts": types.get("blk.0.ffn_up_exps.weight"),
            "attention": types.get("blk.0.attn_q_b.weight"),
            "shared_expert": types.get("blk.0.ffn_up_shexp.weight"),
            "embedding": types.get("token_embd.weight")}


def _phase_name(row: dict) -> str:
    return "decode" if row["n_prompt"] == 0 else f"prefill_{row['n_prompt']}"


def _phase(row: dict, layers: int) -> dict:
    tok_s = float(row["avg_ts"])
    n = int(row["n_prompt"]) or int(row["n_gen"])
    tok_per_step = 1 if row["n_prompt"] == 0 else n
    samples = [float(x) for x in row.get("samples_ts", [])] or [tok_s]
    return {
        "tok_s": round(tok_s, 3),
        "tok_s_median": round(statistics.median(samples), 3),
        "tok_s_stdev": round(float(row.get("stddev_ts", 0.0)), 3),
        "moe_layer_ms": round(1000.0 * tok_per_step / tok_s / layers, 4),
        "n_tokens": n,
        "reps": len(samples),
    }


def run_llama_bench(binary_dir, gguf, layers: int, threads=None, prompts=(512, 2048),
                    gen: int = 32, reps: int = 3, repack=(1, 0), extra_args=(), timeout: float = 1800,
                    env: dict | None = None) -> dict:
    """Runs llama-bench on ``gguf`` with the experts on the CPU and the rest on the GPU.

    Parameters
    ----------
    binary_dir : folder holding ``llama-bench`` and its libraries (and ggml backend modules)
    gguf : the model (e.g. from make_gguf.py), ``layers`` MoE layers deep
    threads : CPU threads, an int or several to try (default: all of this machine's)
    prompts, gen : prefill lengths, and tokens generated one at a time for the decode figure
    reps : timed repetitions of each test (llama-bench adds one warm-up run)
    repack : ``--repack`` values to run (each loads the model once)
    The best setting (repack, threads) is kept per phase.

    Returns
    -------
    dict with ``build`` (llama.cpp commit and build number, backends, CPU and GPU), ``commit``,
    ``quant_types``, ``threads``, ``args``, ``phases`` (per phase: tok_s, moe_layer_ms and the
    repack and thread settings that gave it), ``configs`` (every setting's phases) and ``raw``
    (llama-bench's JSON rows).
    """
    # absolute: llama-bench runs in its own folder (where it looks for backend modules)
    binary = Path(binary_dir).resolve() / "llama-bench"
    gguf = Path(gguf).resolve()
    if not binary.is_file():
        raise FileNotFoundError(f"llama_cpp: no llama-bench at {binary}: build it with "
                                f"benchmarks/peers/build_llama_cpp.sh (see docs/peers.md)")
    if not os.access(binary, os.X_OK):
        raise PermissionError(f"llama_cpp: {binary} is not executable")
    if not gguf.is_file():
        raise FileNotFoundError(f"llama_cpp: no model at {gguf}: write one with "
                                f"benchmarks/peers/make_gguf.py")
    if layers < 1:
        raise ValueError(f"llama_cpp: layers must be >= 1 (got {layers})")
    threads = [threads] if isinstance(threads, int) else list(threads or [os.cpu_count()])
    batch = max([*prompts, 1])
    args = ["-ngl", "99", "-ot", "exps=CPU", "-lm", "none", "-b", str(batch), "-ub", str(batch),
            "-t", ",".join(str(t) for t in threads), "-r", str(reps),
            "--repack", ",".join(str(int(r)) for r in repack), *extra_args]
    cmd = [str(binary), "-m", str(gguf), "-p", ",".join(str(p) for p in prompts), "-n", str(gen),
           "-o", "json", *args]
    run_env = dict(os.environ if env is None else env)
    # its own folder first (the C++ runtime it was built with), then the CUDA 13 runtime and cuBLAS
    run_env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(binary.parent), run_env.get("LD_LIBRARY_PATH", ""), cuda_library_path()) if p)
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                              env=run_env, cwd=str(binary.parent))
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"llama_cpp: llama-bench ran past {timeout:.0f} s: {' '.join(cmd)}") from e
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"llama_cpp: llama-bench failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    try:
        rows = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise RuntimeError(f"llama_cpp: llama-bench printed no JSON: {proc.stdout[-2000:]}") from e
    if not rows:
        raise RuntimeError(f"llama_cpp: llama-bench ran no test: {' '.join(cmd)}\n{proc.stderr[-2000:]}")

    configs: dict[tuple, dict] = {}
    for row in rows:
        key = (int(bool(row.get("repack", True))), int(row.get("n_threads", threads[0])))
        configs.setdefault(key, {})[_phase_name(row)] = _phase(row, layers)
    phases: dict[str, dict] = {}
    for (rp, nt), cfg in configs.items():
        for name, ph in cfg.items():
            if name not in phases or ph["tok_s"] > phases[name]["tok_s"]:
                phases[name] = {**ph, "repack": rp, "threads": nt}
    first = rows[0]
    return {
        "build": {"llama_cpp_commit": first.get("build_commit"), "build_number": first.get("build_number"),
                  "backends": first.get("backends"), "cpu_info": first.get("cpu_info"),
                  "gpu_info": first.get("gpu_info"), "flash_attn": first.get("flash_attn"),
                  "binary": str(binary)},
        "commit": first.get("build_commit"),
        "model": {"path": str(gguf), "bytes": gguf.stat().st_size, "layers": layers,
                  "model_type": first.get("model_type"), "n_params": first.get("model_n_params")},
        "quant_types": _expert_and_dense_types(gguf),
        "threads": threads,
        "args": args,
        "phases": phases,
        "configs": [{"repack": rp, "threads": nt, "phases": cfg}
                    for (rp, nt), cfg in sorted(configs.items(), reverse=True)],
        "raw": rows,
    }


def cuda_library_path() -> str:
    """Folders holding the CUDA 13 runtime and cuBLAS (toolkit, else the pip wheels torch uses)."""
    import glob
    import site

    found = []
    roots = [*glob.glob("/usr/local/cuda*/lib64"), *glob.glob("/usr/local/cuda*/targets/*/lib")]
    for sp in [*site.getsitepackages(), site.getusersitepackages()]:
        roots += glob.glob(os.path.join(sp, "nvidia", "*", "lib"))
    for lib in ("libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13"):
        for r in roots:
            if os.path.exists(os.path.join(r, lib)):
                if r not in found:
                    found.append(r)
                break
    return os.pathsep.join(found)


def check_logits(binary_dir, gguf, threads: int | None = None, n_prompt: int = 64, n_gen: int = 4,
                 timeout: float = 900) -> dict:
    """Runs ``check_logits`` (built with llama-bench): a prefill and a few decode steps of ``gguf``
    with the experts on the CPU; ``ok`` is False if any logit is non-finite or all are equal."""
    exe = Path(binary_dir).resolve() / "check_logits"
    if not exe.is_file():
        raise FileNotFoundError(f"llama_cpp: no check_logits in {binary_dir} (build_llama_cpp.sh builds it)")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(exe.parent), env.get("LD_LIBRARY_PATH", ""), cuda_library_path()) if p)
    cmd = [str(exe), str(Path(gguf).resolve()), str(n_prompt), str(n_gen), str(threads or 0)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=str(exe.parent))
    except subprocess.TimeoutExpired:
        return {"ok": False, "output": f"timed out after {timeout:.0f} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith(("prefill", "decode", "ok", "FAILED"))]
    return {"ok": proc.returncode == 0 and proc.stdout.strip().endswith("ok"),
            "output": "\n".join(lines or proc.stderr.strip().splitlines()[-10:])}


def run_peer(binary_dir, gguf_dir, layers: int, expert_types=("q4_0", "nvfp4"), dense_type: str = "q8_0",
             threads=None, prompts=(512, 2048), gen: int = 32, reps: int = 3, repack=(1, 0),
             keep: bool = False, check: bool = False, tiny: bool = False, log=print) -> dict:
    """Writes a GGUF per expert type into ``gguf_dir``, benches it and deletes it (unless ``keep``).
    With ``check``, first runs :func:`check_logits` on it (its result goes in the run's entry);
    ``tiny`` writes make_gguf's reduced shape instead of DeepSeek-V3's (for trying it out on a CPU).

    Returns ``{"build", "commit", "threads", "layers", "runs": {expert type: run_llama_bench(...)},
    "phases": {phase: the best run's tok_s and moe_layer_ms, with its expert type and repack}}``:
    the form of the paging benchmark's ``peers.llama_cpp`` entry.
    """
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_gguf

    if not (Path(binary_dir) / "llama-bench").is_file():  # fail before writing tens of GB
        raise FileNotFoundError(f"llama_cpp: no llama-bench in {binary_dir}: build it with "
                                f"benchmarks/peers/build_llama_cpp.sh (see docs/peers.md)")
    runs = {}
    for et in expert_types:
        path = Path(gguf_dir) / f"v3_{layers}l_{et}.gguf"
        t0 = time.perf_counter()
        shape = make_gguf.TINY if tiny else make_gguf.V3
        info = make_gguf.write_gguf(path, layers, et, dense_type, shape, log=lambda *_: None)
        log(f"llama.cpp peer: wrote {path} ({info['bytes'] / 1e9:.1f} GB, {info['seconds']:.0f} s)")
        try:
            checked = None
            if check:
                t1 = time.perf_counter()
                nt = threads if isinstance(threads, int) else next(iter(threads or [None]))
                checked = check_logits(binary_dir, path, nt)
                verdict = "ok" if checked["ok"] else "FAILED"
                log(f"check_logits: {verdict} ({time.perf_counter() - t1:.0f} s)\n{checked['output']}")
            t1 = time.perf_counter()
            res = run_llama_bench(binary_dir, path, layers, threads, prompts, gen, reps, repack)
            res["check_logits"] = checked
        finally:
            if not keep:
                path.unlink(missing_ok=True)
        res["gguf_write_s"] = info["seconds"]
        res["bench_s"] = round(time.perf_counter() - t1, 1)
        runs[et] = res
        log(format_table(res) + f"\n({time.perf_counter() - t0:.0f} s)")
    phases: dict[str, dict] = {}
    for et, res in runs.items():
        for name, ph in res["phases"].items():
            if name not in phases or ph["tok_s"] > phases[name]["tok_s"]:
                phases[name] = {**ph, "expert_type": res["quant_types"].get("experts") or et}
    first = next(iter(runs.values()))
    return {"build": first["build"], "commit": first["commit"], "threads": first["threads"], "layers": layers,
            "dense_type": dense_type, "runs": runs, "phases": phases}


def format_table(result: dict) -> str:
    q = result["quant_types"]
    b = result["build"]
    head = (f"llama.cpp {result['commit']} ({b['backends']}), experts {q.get('experts')} on the CPU, "
            f"attention {q.get('attention')} on {b['gpu_info'] or 'no GPU'}")
    lines = [head, f"{'phase':<14}{'repack':>7}{'threads':>8}{'tok/s':>11}{'ms/MoE layer':>14}"]
    for cfg in result["configs"]:
        for name, ph in cfg["phases"].items():
            lines.append(f"{name:<14}{cfg['repack']:>7}{cfg['threads']:>8}{ph['tok_s']:>11.2f}"
                         f"{ph['moe_layer_ms']:>14.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=ROOT / ".deps" / "llama-cuda" / "bin",
                    help="folder of llama-bench")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", type=Path, help="an existing model")
    src.add_argument("--make", type=Path, metavar="DIR",
                     help="write a model per --expert-types into DIR (e.g. /dev/shm), bench it, delete it")
    ap.add_argument("--expert-types", default="q4_0,nvfp4", help="with --make")
    ap.add_argument("--keep", action="store_true", help="with --make: keep the GGUFs")
    ap.add_argument("--check", action="store_true", help="with --make: check_logits on each model first")
    ap.add_argument("--tiny", action="store_true", help="with --make: make_gguf's reduced shape")
    ap.add_argument("--layers", type=int, required=True, help="MoE layers in the GGUF")
    ap.add_argument("--threads", default=None, help="CPU threads, e.g. 16 or 16,8 (default: all)")
    ap.add_argument("--prompts", default="512,2048")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--repack", default="1,0", help="--repack values to run, e.g. 1 or 1,0")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    a = ap.parse_args(argv)
    prompts = tuple(int(p) for p in a.prompts.split(","))
    repack = tuple(int(r) for r in a.repack.split(","))
    threads = tuple(int(t) for t in a.threads.split(",")) if a.threads else None
    try:
        if a.make:
            res = run_peer(a.bin, a.make, a.layers, tuple(a.expert_types.split(",")), threads=threads,
                           prompts=prompts, gen=a.gen, reps=a.reps, repack=repack, keep=a.keep, check=a.check,
                           tiny=a.tiny)
        else:
            res = run_llama_bench(a.bin, a.gguf, a.layers, threads, prompts, a.gen, a.reps, repack)
            print(format_table(res))
    except (FileNotFoundError, PermissionError, RuntimeError, ValueError, OSError) as e:
        print(e, file=sys.stderr)
        return 1
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
