"""GPU figures from NVML (``nvidia-ml-py``), sampled on a background thread into a bounded ring.

Each sample holds GPU utilization (percent of the interval a kernel ran), memory-controller
utilization, memory used, the SM clock and, where the GPU has GPM counters (Hopper and newer),
the share of SMs busy, warp occupancy and DRAM bandwidth utilization. PCIe traffic comes from
the best source the GPU offers:

  counters     NVML_FI_DEV_PCIE_COUNT_{TX,RX}_BYTES: cumulative byte counters, exact over any
               window (read before and after)
  gpm          GPM PCIe rates between two GPM samples: exact over each sampling interval
  throughput   nvmlDeviceGetPcieThroughput: the rate over a 20 ms window ending at the call,
               scaled to the whole interval (an estimate: traffic between windows is unseen)

RX is what the GPU receives (host → device copies, kernels reading mapped host memory, and the
command buffers the GPU fetches); TX what it sends. The counters count PCIe packets, headers
included, so they read a few percent above the payload bytes the engine counts.

Without NVML or a GPU, ``GpuSampler.open`` returns None and a reason ("unavailable").
"""

from __future__ import annotations

import threading
import time
from typing import Any, Deque, Dict, Optional, Tuple

MiB = 1 << 20


def _nvml():
    import pynvml  # nvidia-ml-py

    return pynvml


class GpuSampler:
    """Reads one GPU's NVML figures; ``start`` samples them every ``interval_s`` into ``ring``."""

    def __init__(self, nv, handle, name: str, ring: Deque[Dict[str, Any]], interval_s: float):
        self.nv, self.handle, self.name = nv, handle, name
        self.ring = ring
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.pcie_source = self._pick_pcie_source()
        self._gpm_prev = None
        self.gpm = self._gpm_supported()
        self._last: Optional[Tuple[float, Optional[int], Optional[int]]] = None  # t, rx, tx (cumulative)
        self._rx_total = 0.0
        self._tx_total = 0.0

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(
        cls, device_index: int, ring: Deque[Dict[str, Any]], interval_s: float
    ) -> Tuple[Optional["GpuSampler"], str]:
        """(sampler, "") or (None, why NVML figures are unavailable)."""
        try:
            nv = _nvml()
        except ImportError:
            return None, "unavailable: nvidia-ml-py is not installed (pip install nvidia-ml-py)"
        try:
            nv.nvmlInit()
        except Exception as e:  # no driver (a CPU-only machine)
            return None, f"unavailable: NVML could not start ({_msg(e)})"
        try:
            handle = _handle_for(nv, device_index)
            name = nv.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
        except Exception as e:
            return None, f"unavailable: no NVML device for CUDA device {device_index} ({_msg(e)})"
        return cls(nv, handle, name, ring, interval_s), ""

    def _pick_pcie_source(self) -> str:
        nv = self.nv
        try:
            vals = nv.nvmlDeviceGetFieldValues(
                self.handle, [nv.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, nv.NVML_FI_DEV_PCIE_COUNT_TX_BYTES]
            )
            if all(v.nvmlReturn == nv.NVML_SUCCESS for v in vals):
                return "counters"
        except Exception:
            pass
        if self._gpm_supported():
            return "gpm"
        try:
            nv.nvmlDeviceGetPcieThroughput(self.handle, nv.NVML_PCIE_UTIL_RX_BYTES)
            return "throughput"
        except Exception:
            return "none"

    def _gpm_supported(self) -> bool:
        try:
            return bool(self.nv.nvmlGpmQueryDeviceSupport(self.handle).isSupportedDevice)
        except Exception:
            return False

    # ---- reading ---------------------------------------------------------------------------
    def _pcie_cumulative(self) -> Tuple[Optional[int], Optional[int]]:
        nv = self.nv
        vals = nv.nvmlDeviceGetFieldValues(
            self.handle, [nv.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, nv.NVML_FI_DEV_PCIE_COUNT_TX_BYTES]
        )
        return tuple(_field_int(nv, v) for v in vals)  # type: ignore[return-value]

    def _gpm_metrics(self) -> Dict[str, float]:
        nv = self.nv
        cur = nv.nvmlGpmSampleAlloc()
        nv.nvmlGpmSampleGet(self.handle, cur)
        prev, self._gpm_prev = self._gpm_prev, cur
        if prev is None:
            return {}
        ids = {
            "sm_util": nv.NVML_GPM_METRIC_SM_UTIL,
            "sm_occupancy": nv.NVML_GPM_METRIC_SM_OCCUPANCY,
            "dram_bw_util": nv.NVML_GPM_METRIC_DRAM_BW_UTIL,
            "pcie_rx_MiBps": nv.NVML_GPM_METRIC_PCIE_RX_PER_SEC,
            "pcie_tx_MiBps": nv.NVML_GPM_METRIC_PCIE_TX_PER_SEC,
        }
        mg = nv.c_nvmlGpmMetricsGet_t()
        mg.version = nv.NVML_GPM_METRICS_GET_VERSION
        mg.numMetrics = len(ids)
        mg.sample1, mg.sample2 = prev, cur
        for i, mid in enumerate(ids.values()):
            mg.metrics[i].metricId = mid
        out: Dict[str, float] = {}
        try:
            nv.nvmlGpmMetricsGet(mg)
            for i, key in enumerate(ids):
                if mg.metrics[i].nvmlReturn == nv.NVML_SUCCESS:
                    out[key] = float(mg.metrics[i].value)
        finally:
            nv.nvmlGpmSampleFree(prev)
        return out

    def read(self) -> Dict[str, Any]:
        """One sample (times in seconds since the sampler opened; rates over the interval since
        the previous sample)."""
        nv, h = self.nv, self.handle
        with self._lock:
            t = time.perf_counter() - self.t0
            s: Dict[str, Any] = {"t": t}
            s.update(_try(lambda: _util(nv, h)))
            s.update(_try(lambda: _mem(nv, h)))
            s.update(_try(lambda: {"sm_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)}))
            gpm = _try(self._gpm_metrics) if self.gpm else {}
            s.update({k: v for k, v in gpm.items() if not k.startswith("pcie")})
            rx = tx = None
            if self.pcie_source == "counters":
                rx, tx = _try_tuple(self._pcie_cumulative)
            prev = self._last
            dt = t - prev[0] if prev is not None else None
            rx_b = tx_b = None
            if self.pcie_source == "counters" and prev is not None and rx is not None and prev[1] is not None:
                rx_b, tx_b = _wrap_delta(rx, prev[1]), _wrap_delta(tx, prev[2])
            elif self.pcie_source == "gpm" and dt and "pcie_rx_MiBps" in gpm:
                rx_b, tx_b = gpm["pcie_rx_MiBps"] * MiB * dt, gpm.get("pcie_tx_MiBps", 0.0) * MiB * dt
            elif self.pcie_source == "throughput" and dt:
                kbps = _try(
                    lambda: {
                        "rx": nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES),
                        "tx": nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_TX_BYTES),
                    }
                )
                if kbps:
                    rx_b, tx_b = kbps["rx"] * 1e3 * dt, kbps["tx"] * 1e3 * dt
            if rx_b is not None and dt:
                self._rx_total += rx_b
                self._tx_total += tx_b or 0.0
                s["pcie_rx_Bps"], s["pcie_tx_Bps"] = rx_b / dt, (tx_b or 0.0) / dt
            s["pcie_rx_bytes"], s["pcie_tx_bytes"] = self._rx_total, self._tx_total
            self._last = (t, rx, tx)
            return s

    def pcie_totals(self) -> Tuple[float, float]:
        """(RX, TX) bytes since the sampler opened, read now (exact with the counters source)."""
        self.ring.append(self.read())
        return self._rx_total, self._tx_total

    # ---- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self.ring.append(self.read())
        self._thread = threading.Thread(target=self._loop, name="dsfp4-nvml", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.ring.append(self.read())
            except Exception:  # a transient NVML error loses one sample, not the monitor
                pass

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.ring.append(self.read())

    def close(self) -> None:
        self.stop()
        if self._gpm_prev is not None:
            _try(lambda: self.nv.nvmlGpmSampleFree(self._gpm_prev))
            self._gpm_prev = None


def _handle_for(nv, device_index: int):
    """The NVML handle of CUDA device ``device_index`` (by UUID: CUDA and NVML may number
    devices differently under CUDA_VISIBLE_DEVICES)."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        return nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
    except Exception:
        return nv.nvmlDeviceGetHandleByIndex(device_index)


def _util(nv, h) -> Dict[str, float]:
    u = nv.nvmlDeviceGetUtilizationRates(h)
    return {"gpu_util": float(u.gpu), "mem_util": float(u.memory)}


def _mem(nv, h) -> Dict[str, float]:
    m = nv.nvmlDeviceGetMemoryInfo(h)
    return {"mem_used": int(m.used), "mem_total": int(m.total)}


def _field_int(nv, v) -> Optional[int]:
    if v.nvmlReturn != nv.NVML_SUCCESS:
        return None
    member = {
        nv.NVML_VALUE_TYPE_DOUBLE: "dVal",
        nv.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
        nv.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
        nv.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
        nv.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    }.get(v.valueType, "ullVal")
    return int(getattr(v.value, member))


def _wrap_delta(now: Optional[int], before: Optional[int]) -> Optional[float]:
    if now is None or before is None:
        return None
    return float(now - before if now >= before else now + (1 << 64) - before)


def _try(fn) -> Dict[str, Any]:
    try:
        return fn() or {}
    except Exception:
        return {}


def _try_tuple(fn):
    try:
        return fn()
    except Exception:
        return None, None


def _msg(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
