"""Helpers shared by the benchmark scripts: run identity, the copy-rate ceiling, JSON output."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

import torch


def gpu_slug() -> str:
    """Short GPU name for result file names (h100, h200, ...)."""
    name = torch.cuda.get_device_name().lower()
    for key in ("h100", "h200", "a100", "l40", "b200"):
        if key in name:
            return key
    return name.replace(" ", "_")


def commit() -> str:
    if os.environ.get("DSFP4_COMMIT"):  # copies of the tree without .git (e.g. a GPU machine)
        return os.environ["DSFP4_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return "unknown"


def dirty() -> bool:
    """Whether the measured tree differed from its commit (DSFP4_DIRTY=0/1 where there is no .git)."""
    if os.environ.get("DSFP4_DIRTY") in ("0", "1"):
        return os.environ["DSFP4_DIRTY"] == "1"
    try:
        out = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                      cwd=Path(__file__).parent, stderr=subprocess.DEVNULL).decode()
        return bool(out.strip())
    except Exception:
        return True


def copy_bandwidth_gbs(nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy rate, bytes read plus written: the HBM ceiling of this run."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ms = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        ms.append(s.elapsed_time(e))
    del a, b
    return 2 * nbytes / (statistics.median(ms) * 1e-3) / 1e9


def write_result(result: dict, out: Path) -> Path:
    """Writes the JSON atomically (temp file, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    return out
