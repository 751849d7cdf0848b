"""Ceilings of this machine: the rates the bottleneck analysis measures a run against.

``measure_ceilings()`` times, on this machine:

  h2d_GBps / d2h_GBps   pinned host ↔ device copies (256 MiB, CUDA events, median)
  hbm_GBps              device-to-device copy, bytes read + written
  disk_GBps             reading a file with O_DIRECT in 16 MiB blocks (the model's largest
                        shard when given, else a scratch file), bypassing the page cache
  host_read_GBps        summing a 512 MiB host buffer with every core

and caches them as JSON (``~/.cache/deepseek-fp4/ceilings.json``, one entry per machine, GPU
and disk), so later runs reuse them; ``refresh=True`` measures again. A figure that cannot be
measured here (no GPU) is None.
"""

from __future__ import annotations

import datetime
import json
import mmap
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

MiB = 1 << 20
_BLOCK = 16 * MiB
CEILING_KEYS = ("h2d_GBps", "d2h_GBps", "hbm_GBps", "disk_GBps", "host_read_GBps")
HOST_READ_BYTES = 512 * MiB
SCRATCH_BYTES = 256 * MiB  # the scratch file timed when no model file is given
DISK_READ_LIMIT = 512 * MiB  # most bytes read from a model file


def default_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "deepseek-fp4" / "ceilings.json"


def machine_key(device: torch.device, disk_path: Optional[Path]) -> str:
    """Host, GPU and the file system the disk figure is for."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    disk = "tmp"
    if disk_path is not None:
        try:
            disk = f"dev{os.stat(disk_path).st_dev}"
        except OSError:
            pass
    return f"{platform.node()}|{gpu}|{disk}"


def measure_ceilings(
    device: Union[None, str, torch.device] = None,
    disk_path: Union[None, str, Path] = None,
    cache: Union[None, str, Path] = None,
    refresh: bool = False,
) -> Dict[str, Any]:
    """This machine's ceilings (see the module docstring), from the cache when present.

    Parameters
    ----------
    device : the GPU to time ("cuda", "cuda:N"); None: the current CUDA device, or none
    disk_path : a file (or a folder: its largest .safetensors file) to time disk reads on
    cache : JSON file of cached ceilings (default ``default_cache_path()``); "" disables it
    refresh : measure even when cached
    """
    dev = (
        torch.device(device)
        if device is not None
        else (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    )
    disk_file = _disk_file(Path(disk_path)) if disk_path is not None else None
    key = machine_key(dev, disk_file)
    path = default_cache_path() if cache is None else (Path(cache) if cache != "" else None)
    store: Dict[str, Any] = {}
    if path is not None and path.is_file():
        try:
            store = json.loads(path.read_text())
        except (OSError, ValueError):
            store = {}  # a damaged cache is measured again
        if not refresh and isinstance(store.get(key), dict):
            return dict(store[key], cached=True)
    out: Dict[str, Any] = {k: None for k in CEILING_KEYS}
    if dev.type == "cuda":
        out["h2d_GBps"], out["d2h_GBps"] = _copy_rates(dev)
        out["hbm_GBps"] = _hbm_rate(dev)
    out["disk_GBps"], out["disk_method"] = _disk_rate(disk_file)
    out["host_read_GBps"] = _host_read_rate()
    out["host_cores"] = os.cpu_count()
    out["measured_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out["machine"] = key
    if path is not None:
        store[key] = out
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(store, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: the figures are still returned
    return dict(out, cached=False)


def _events_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ms.append(s.elapsed_time(e))
    return statistics.median(ms)


def _copy_rates(dev: torch.device, nbytes: int = 256 * MiB, reps: int = 5):
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        h2d = _events_ms(lambda: gpu.copy_(host, non_blocking=True), reps)
        d2h = _events_ms(lambda: host.copy_(gpu, non_blocking=True), reps)
    return nbytes / (h2d * 1e-3) / 1e9, nbytes / (d2h * 1e-3) / 1e9


def _hbm_rate(dev: torch.device, nbytes: int = 512 * MiB, reps: int = 5) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    with torch.cuda.device(dev):
        ms = _events_ms(lambda: b.copy_(a), reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _host_read_rate(reps: int = 3) -> float:
    nbytes = HOST_READ_BYTES
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best.append(time.perf_counter() - t)
    return nbytes / statistics.median(best) / 1e9


def _disk_file(p: Path) -> Optional[Path]:
    """The file to time (None: a scratch file); files under 64 MiB time the cache, not the disk."""
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"), key=lambda f: f.stat().st_size, reverse=True)
        p = files[0] if files else p
    return p if p.is_file() and p.stat().st_size >= 64 * MiB else None


def _disk_rate(path: Optional[Path]):
    """(GB/s, method): O_DIRECT reads of ``path`` (or a scratch file written and flushed)."""
    scratch = None
    if path is None:
        fd, name = tempfile.mkstemp(prefix="dsfp4-disk-", dir=os.environ.get("DSFP4_DISK_DIR"))
        scratch = Path(name)
        data = os.urandom(MiB)
        with os.fdopen(fd, "wb") as f:
            for _ in range(max(1, SCRATCH_BYTES // MiB)):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        path = scratch
    try:
        block = min(_BLOCK, SCRATCH_BYTES) if scratch is not None else _BLOCK
        size = min(path.stat().st_size, DISK_READ_LIMIT) // block * block
        if size == 0:
            return None, "file too small"
        buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
        method = "O_DIRECT"
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd = os.open(path, os.O_RDONLY)
            method = "buffered"
        try:
            if method == "buffered" and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            off = 0
            while off < size:
                try:
                    n = os.preadv(fd, [buf], off)
                except OSError:  # a file system that opens O_DIRECT but refuses the read
                    os.close(fd)
                    fd = os.open(path, os.O_RDONLY)
                    method = "buffered"
                    n = os.preadv(fd, [buf], off)
                if n <= 0:
                    break
                off += n
            dt = time.perf_counter() - t
        finally:
            os.close(fd)
            buf.close()
        return off / dt / 1e9, method
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)
