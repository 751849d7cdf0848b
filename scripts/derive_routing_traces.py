#!/usr/bin/env python3
"""Derives the routing model (benchmarks/data/routing/routing_model.npz) from local copies of the
public routing data; see docs/routing_data.md.

The sources state no license, so the derived model is not committed: run this once where the
sources can be fetched, then carry the .npz to the machine that runs the benchmark.

  git clone https://github.com/GeneratedRandomly/SGLang-reproduce /tmp/sglang-reproduce
  git clone https://github.com/ngavhane/moe-beyond /tmp/moe-beyond     # ~1 GB with its checkpoints
  python scripts/derive_routing_traces.py --sglang /tmp/sglang-reproduce --v2-lite /tmp/moe-beyond

Either path may be a checkout, a bare git repository (read at --*-commit, default HEAD, with
``git archive``: only the needed folder is extracted), or a folder holding the files themselves.
Needs numpy only: the package is loaded without its torch extension.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "sglang": {"repo": "GeneratedRandomly/SGLang-reproduce", "folder": "attachment_ep_statistics",
               "commit": "c79682c8cf0f4de9b642dbd99ad12cef60fcfb32",
               "license": "none stated (no LICENSE file)",
               "what": "DeepSeek-V3/R1 per-layer expert counts from serving (logical_count, 61 x 256), "
                       "4 decode and 8 prefill workloads"},
    "v2_lite": {"repo": "ngavhane/moe-beyond", "folder": "expert_activation_scripts/training_data_eamc",
                "commit": "4dca2eacb7bc0a3086770a4de7a57cc0b81479bd",
                "license": "none stated (README: 'TODO: Add license here')",
                "what": "DeepSeek-V2-Lite-Chat per-token routed expert ids (26 MoE layers, 64 experts, "
                        "top-6), one prompt per file, prompts 1001-2000"},
}


def load_routing_modules():
    """routing_fit and routing_replay without the package's __init__ (which loads torch and the
    compiled extension): a bare namespace over the package folder."""
    name = "_dsfp4_routing"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(ROOT / "python" / "deepseek_fp4_plugin")]
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.routing_fit"), importlib.import_module(f"{name}.routing_replay")


def _git(path: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def is_git_repo(path: Path) -> bool:
    try:
        return _git(path, "rev-parse", "--git-dir") != ""
    except (subprocess.CalledProcessError, FileNotFoundError):
        return False


def materialize(path: Path, folder: str, commit: str, tmp: Path, key: str):
    """(folder with the source files, commit or None). A work tree with the folder is read in place;
    otherwise a git repository's folder is extracted at ``commit``."""
    if (path / folder).is_dir():
        return path / folder, (_git(path, "rev-parse", "HEAD") if is_git_repo(path) else None)
    if not is_git_repo(path):
        return path, None  # the files themselves
    rev = _git(path, "rev-parse", f"{commit}^{{commit}}")
    out = tmp / key
    out.mkdir()
    archive = tmp / f"{key}.tar"
    subprocess.run(["git", "-C", str(path), "archive", "-o", str(archive), rev, folder], check=True)
    with tarfile.open(archive) as tf:
        tf.extractall(out, filter="data")
    return out / folder, rev


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sglang", type=Path, required=True,
                    help="SGLang-reproduce: checkout, git repo or folder")
    ap.add_argument("--v2-lite", type=Path, required=True, help="moe-beyond: checkout, git repo or folder")
    ap.add_argument("--sglang-commit", default="HEAD")
    ap.add_argument("--v2-lite-commit", default="HEAD")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/data/routing/routing_model.npz")
    ap.add_argument("--stats", type=Path, default=None,
                    help="also write the statistics JSON here (default: routing_stats.json beside --out)")
    ap.add_argument("--cache-eval-steps", type=int, default=1000,
                    help="steps of the cache evaluation in the statistics (0: skip it)")
    ap.add_argument("--top-k", type=int, default=8, help="experts per token of the serving counts' model")
    ap.add_argument("--v2-lite-experts", type=int, default=64, help="routed experts of the per-token model")
    args = ap.parse_args(argv)
    rf, rr = load_routing_modules()
    t0 = time.time()

    def progress(msg):
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        dirs, meta = {}, {"sources": {}}
        for key, path, commit in (("sglang", args.sglang, args.sglang_commit),
                                  ("v2_lite", args.v2_lite, args.v2_lite_commit)):
            src = SOURCES[key]
            dirs[key], rev = materialize(path.expanduser().resolve(), src["folder"], commit, Path(tmp), key)
            if rev is not None and rev != src["commit"]:
                print(f"note: {src['repo']} at {rev}, docs/routing_data.md describes {src['commit']}")
            meta["sources"][key] = {**src, "commit": rev or "unknown (not a git repository)"}
        meta["fit"] = {"v2_lite_fit_files": "even prompt numbers", "v2_lite_eval_files": "odd prompt numbers",
                       "r1_popularity": "mean over each phase's files of the normalized counts"}
        model = rf.fit_routing_model(dirs["sglang"], dirs["v2_lite"], meta=meta, top_k=args.top_k,
                                     v2_experts=args.v2_lite_experts, progress=progress)
    model.save(args.out)
    progress(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")

    report = {"meta": model.meta.get("sources"), "source_stats": model.meta["source_stats"],
              "generator_stats": model.meta["generator_stats"]}
    if args.cache_eval_steps > 0:
        report["cache_eval"] = rf.cache_evaluation(model, steps=args.cache_eval_steps, progress=progress)
    stats_path = args.stats or args.out.with_name("routing_stats.json")
    stats_path.write_text(json.dumps(report, indent=1))
    print(rf.summary_table(model, report.get("cache_eval")))
    progress(f"wrote {stats_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
