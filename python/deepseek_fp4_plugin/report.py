"""PerfVisualizer: one self-contained HTML report of a run (no network, no script).

    visualizer = PerfVisualizer()
    visualizer.add_metrics(model.perf_monitor)          # a PerfMonitor, its trace, or get_utilization()
    visualizer.generate_report("perf_report.html")

The report holds a summary table with the bottleneck verdict and the suggestions, the
figures of the tuning guide, and plots over time drawn with matplotlib and inlined as SVG
images: tokens/s, hit rates, PCIe and GPU use, tier occupancy, time compute waited for
weights, and a per-layer expert hit-rate heat map.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .bottlenecks import LABELS, analyze, figures, suggest, utilization
from .monitor import COUNTERS, PerfMonitor, counter, per_layer_hit_rates

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d2330;
  background:#fff}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
.sub{color:#5a6475;font-size:13px}
.verdict{font-size:16px;padding:12px 16px;border-radius:6px;margin:14px 0;background:#eef4ff;
  border-left:5px solid #3567d6}
.verdict.bound{background:#fff3e8;border-left-color:#e0701c}
table{border-collapse:collapse;font-size:13px;margin:4px 0 8px}
td,th{border:1px solid #dde2ea;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f4f6fa;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:10px;background:#e0701c;vertical-align:middle;margin-right:6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px}
figure{margin:0;border:1px solid #e4e8ef;border-radius:6px;padding:8px}
figure img{width:100%;height:auto} figcaption{font-size:12px;color:#5a6475}
.cols{display:flex;gap:28px;flex-wrap:wrap}
"""


def _fmt(v: Any, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞"
        v = round(v, digits)
    if isinstance(v, int) and abs(v) >= 10**6 and unit == "B":
        return f"{v / 1e9:.3f} GB"
    return f"{v}{(' ' + unit) if unit else ''}"


def _table(rows: Sequence[Sequence[Any]], head: Optional[Sequence[str]] = None) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        cells = []
        for c in r:
            if isinstance(c, tuple) and c and c[0] == "raw":
                cells.append(f"<td>{c[1]}</td>")
            else:
                cls = ' class="num"' if isinstance(c, (int, float)) and not isinstance(c, bool) else ""
                cells.append(f"<td{cls}>{html.escape(_fmt(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


# ---------------------------------------------------------------------------------------
# time series from a trace


def series(trace: Dict[str, Any]) -> Dict[str, Any]:
    """Time series of a trace: per step, per NVML sample and per counter-snapshot interval."""
    steps = trace.get("steps") or []
    samples = trace.get("samples") or []
    snaps = [s for s in trace.get("snapshots") or [] if "flat" in s]
    plan = (trace.get("config") or {}).get("plan") or {}
    dec = [s for s in steps if s["stage"] == "decode" and s["seconds"] > 0]
    pre = [s for s in steps if s["stage"] == "prefill" and s["seconds"] > 0]
    out: Dict[str, Any] = {
        "decode": ([s["t"] for s in dec], [s["rows"] / s["seconds"] for s in dec]),
        "prefill": ([s["t"] for s in pre], [s["rows"] / s["seconds"] for s in pre]),
        "samples": samples,
    }
    t, hit, host, layer, acc, bus, wait, disk_wait, gpu_fill, host_fill, heat = ([] for _ in range(11))
    for a, b in zip(snaps, snaps[1:]):
        dt = b["t"] - a["t"]
        if dt <= 0:
            continue
        d = {m: _delta(a, b, m) for m in COUNTERS}
        t.append(b["t"])
        req = d["expert_requests"]
        hit.append(d["expert_gpu_hits"] / req if req else None)
        host.append((d["expert_gpu_hits"] + d["expert_host_hits"]) / req if req else None)
        layer.append(d["layer_hits"] / d["layer_requests"] if d["layer_requests"] else None)
        acc.append(d["predicted_used"] / d["used_after_prediction"] if d["used_after_prediction"] else None)
        bus.append((d["h2d_bytes"] + d["zero_copy_bytes"]) / dt / 1e9)
        wait.append(d["weight_wait_ms"] / dt if counter(b["flat"], "weight_wait_ms") is not None else None)
        disk_wait.append(d["disk_wait_ms"] / dt)
        cum = lambda m: counter(b["flat"], m) or 0  # noqa: E731
        slots, hslots = plan.get("expert_slots"), plan.get("host_expert_slots")
        gpu_fill.append(min(1.0, (cum("expert_copies") - cum("expert_evictions")) / slots) if slots else None)
        host_fill.append(min(1.0, cum("ssd_reads") / hslots) if hslots else None)
        heat.append(per_layer_hit_rates(a, b))
    out.update(
        t=t,
        expert_hit=hit,
        host_hit=host,
        layer_hit=layer,
        prefetch_acc=acc,
        bus_GBps=bus,
        weight_wait=wait,
        disk_wait=disk_wait,
        gpu_fill=gpu_fill,
        host_fill=host_fill,
        heat=heat,
    )
    return out


def _delta(a: Dict[str, Any], b: Dict[str, Any], m: str) -> float:
    x, y = counter(a["flat"], m), counter(b["flat"], m)
    return 0.0 if x is None or y is None else y - x


# ---------------------------------------------------------------------------------------
# plots


def _svg(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def _new_fig(h: float = 3.0):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(7.2, h), dpi=100)
    return fig, fig.add_subplot(1, 1, 1)


def _line(ax, x, y, label, **kw) -> bool:
    pts = [(a, b) for a, b in zip(x, y) if b is not None]
    if not pts:
        return False
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **kw)
    return True


def _finish(ax, ylabel: str, any_data: bool, empty: str) -> None:
    ax.set_xlabel("time (s)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if any_data:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="#777")


def plots(trace: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """(id, caption, data URI) of every plot of the report."""
    s = series(trace)
    out = []
    smp = s["samples"]
    ts = [x["t"] for x in smp]

    fig, ax = _new_fig()
    ok = _line(ax, *s["decode"], "decode (rows / step time)", marker=".", lw=1)
    if s["prefill"][0]:
        ax.scatter(*s["prefill"], color="#e0701c", label="prefill (prompt tokens / s)", zorder=3)
        ok = True
    _finish(ax, "tokens / s", ok, "no generation in the window")
    out.append(("tokens", "Tokens per second, per step", _svg(fig)))

    fig, ax = _new_fig()
    ok = False
    for key, label in (
        ("expert_hit", "expert GPU hit rate"),
        ("host_hit", "expert host hit rate"),
        ("layer_hit", "layer hit rate"),
        ("prefetch_acc", "prefetch accuracy"),
    ):
        ok |= _line(ax, s["t"], s[key], label, marker=".", lw=1)
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, "rate", ok, "nothing paged: every weight is resident")
    out.append(("hits", "Hit rates and prefetch accuracy per sampling interval", _svg(fig)))

    fig, ax = _new_fig()
    ok = _line(ax, s["t"], s["bus_GBps"], "engine: host → device (copies + in-place reads)", lw=1.5)
    ok |= _line(
        ax, ts, [x.get("pcie_rx_Bps", None) and x["pcie_rx_Bps"] / 1e9 for x in smp], "NVML PCIe RX", lw=1
    )
    ok |= _line(
        ax, ts, [x.get("pcie_tx_Bps", None) and x["pcie_tx_Bps"] / 1e9 for x in smp], "NVML PCIe TX", lw=1
    )
    ceil = (trace.get("ceilings") or {}).get("h2d_GBps")
    if ceil:
        ax.axhline(ceil, color="#c33", ls="--", lw=1, label=f"measured H2D ceiling {ceil:.1f} GB/s")
    _finish(ax, "GB/s", ok, "no PCIe traffic recorded")
    out.append(("pcie", "PCIe traffic: the engine's counters and NVML", _svg(fig)))

    fig, ax = _new_fig()
    ok = False
    for key, label in (
        ("gpu_util", "GPU utilization (kernel active)"),
        ("sm_util", "SMs busy (GPM)"),
        ("dram_bw_util", "DRAM bandwidth (GPM)"),
        ("mem_util", "memory controller"),
    ):
        ok |= _line(ax, ts, [x.get(key) for x in smp], label, lw=1)
    ax.set_ylim(-2, 102)
    _finish(ax, "%", ok, (trace.get("device") or {}).get("nvml_reason") or "NVML unavailable")
    out.append(("gpu", "GPU use (NVML)", _svg(fig)))

    fig, ax = _new_fig()
    ok = _line(ax, s["t"], s["gpu_fill"], "GPU expert slots filled (copies − evictions)", lw=1.5)
    ok |= _line(ax, s["t"], s["host_fill"], "host expert cache filled (units read from disk)", lw=1.5)
    ok |= _line(
        ax,
        ts,
        [x["mem_used"] / x["mem_total"] if x.get("mem_total") else None for x in smp],
        "device memory used (NVML)",
        lw=1,
    )
    ax.set_ylim(-0.02, 1.05)
    _finish(ax, "fraction", ok, "no tiers recorded")
    out.append(("tiers", "Tier occupancy (estimated from the counters)", _svg(fig)))

    fig, ax = _new_fig()
    ok = _line(ax, s["t"], s["weight_wait"], "compute waited for weights", lw=1.5)
    ok |= _line(ax, s["t"], s["disk_wait"], "host waited for disk reads", lw=1.5)
    _finish(ax, "ms waited per second", ok, "no waits recorded")
    out.append(("stall", "Stall time", _svg(fig)))

    heat = s["heat"]
    nl = max((len(h) for h in heat), default=0)
    fig, ax = _new_fig(h=max(2.4, min(6.0, 0.18 * nl + 1.6)))
    if nl and s["t"]:
        import numpy as np

        grid = np.full((nl, len(heat)), np.nan)
        for j, h in enumerate(heat):
            for i, v in enumerate(h):
                if v is not None:
                    grid[i, j] = v
        t0 = s["t"][0] - (s["t"][1] - s["t"][0] if len(s["t"]) > 1 else 1.0)
        im = ax.imshow(
            grid,
            aspect="auto",
            origin="lower",
            vmin=0,
            vmax=1,
            cmap="viridis",
            interpolation="nearest",
            extent=(t0, s["t"][-1], -0.5, nl - 0.5),
        )
        fig.colorbar(im, ax=ax, label="expert GPU hit rate")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("MoE layer")
    else:
        ax.text(
            0.5, 0.5, "no expert requests (nothing paged)", ha="center", va="center", transform=ax.transAxes
        )
        ax.set_axis_off()
    out.append(("heatmap", "Per-layer expert hit rate over time (blank: no requests)", _svg(fig)))
    return out


def _points_plot(points: List[Dict[str, Any]]) -> Optional[Tuple[str, str, str]]:
    """Figures of utilization dicts added one by one (x: the order they were added)."""
    if len(points) < 2:
        return None
    fig, ax = _new_fig()
    x = list(range(1, len(points) + 1))
    ok = False
    for path, label in (
        (("latency", "decode_tokens_per_s"), "decode tokens/s"),
        (("memory", "expert_hit_rate_pct"), "expert hit rate %"),
        (("gpu", "utilization_pct"), "GPU utilization %"),
    ):
        ys = [p.get(path[0], {}).get(path[1]) for p in points]
        ok |= _line(ax, x, [y if isinstance(y, (int, float)) else None for y in ys], label, marker="o")
    ax.set_xlabel("metrics added")
    ax.grid(True, alpha=0.3)
    if ok:
        ax.legend(fontsize=8)
    return ("points", "Metrics as added", _svg(fig))


# ---------------------------------------------------------------------------------------
# the report


class PerfVisualizer:
    """Collects runs and writes the HTML report (see the module docstring)."""

    def __init__(self, title: str = "deepseek-fp4 performance report"):
        self.title = title
        self.traces: List[Dict[str, Any]] = []
        self.points: List[Dict[str, Any]] = []
        self.extra: List[Tuple[str, str]] = []  # (heading, html) sections a caller adds

    def add_metrics(self, metrics: Union[PerfMonitor, Dict[str, Any]]) -> None:
        """A PerfMonitor (its whole window), a trace (``PerfMonitor.export()``), or one
        ``get_utilization()`` dict (a point; several plot as a series)."""
        if isinstance(metrics, PerfMonitor):
            self.traces.append(metrics.export())
        elif isinstance(metrics, dict) and "version" in metrics and "steps" in metrics:
            self.traces.append(metrics)
        elif isinstance(metrics, dict) and {"gpu", "memory", "latency"} <= set(metrics):
            self.points.append(metrics)
        else:
            raise ValueError(
                "add_metrics takes a PerfMonitor, a trace from PerfMonitor.export(), or a dict from "
                "get_utilization()"
            )

    def add_section(self, heading: str, body_html: str) -> None:
        """An extra section (trusted HTML, e.g. a results table)."""
        self.extra.append((heading, body_html))

    def generate_report(self, path: Union[str, Path] = "perf_report.html") -> Path:
        """Writes the report (atomically) and returns its path."""
        if not self.traces and not self.points:
            raise ValueError("generate_report: nothing to report (call add_metrics first)")
        body = self._body()
        doc = (
            f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>{body}</body></html>"
        )
        path = Path(path)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(doc, encoding="utf-8")
        os.replace(tmp, path)
        return path

    def _body(self) -> str:
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        parts = [f"<h1>{html.escape(self.title)}</h1>"]
        trace = self.traces[-1] if self.traces else None
        if trace is not None:
            f = figures(trace)
            a = analyze(f)
            dev = trace.get("device") or {}
            cfg = trace.get("config") or {}
            parts.append(
                f"<div class='sub'>{html.escape(trace.get('label') or '')} · recorded "
                f"{html.escape(str(trace.get('recorded_at', now)))} · device "
                f"{html.escape(str(dev.get('name') or dev.get('type', '?')))} · window "
                f"{f['active_s']:.2f} s active</div>"
            )
            cls = "verdict bound" if a["bound"] else "verdict"
            parts.append(f"<div class='{cls}'><b>Bottleneck:</b> {html.escape(a['verdict'])}</div>")
            parts.append(self._summary(f, a, cfg))
            parts.append("<h2>Plots</h2><div class='grid'>")
            for pid, cap, uri in plots(trace):
                parts.append(
                    f"<figure id='plot-{pid}'><img alt='{html.escape(cap)}' src='{uri}'>"
                    f"<figcaption>{html.escape(cap)}</figcaption></figure>"
                )
            parts.append("</div>")
        if self.points:
            pp = _points_plot(self.points)
            if pp is not None:
                parts.append(
                    f"<h2>Metrics as added</h2><figure id='plot-{pp[0]}'><img alt='{pp[1]}' src='{pp[2]}'>"
                    f"<figcaption>{pp[1]}</figcaption></figure>"
                )
            parts.append("<h2>Latest metrics</h2>" + _nested_table(self.points[-1]))
        for heading, body in self.extra:
            parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
        parts.append(
            f"<p class='sub'>Generated {now} by deepseek-fp4 (report.py). Ceilings are measured on the "
            f"machine that ran; plots are matplotlib SVG inlined in this file.</p>"
        )
        return "".join(parts)

    def _summary(self, f: Dict[str, Any], a: Dict[str, Any], cfg: Dict[str, Any]) -> str:
        u = utilization(f)
        lat, mem, gpu, host = u["latency"], u["memory"], u["gpu"], u["host"]
        rows = [
            ("decode tokens/s", lat["decode_tokens_per_s"]),
            ("prefill tokens/s", lat["prefill_tokens_per_s"]),
            ("decode step (ms, median)", lat["decode_step_ms"]),
            ("prefill (ms per request)", lat["prefill_ms"]),
            ("end to end (ms per request)", lat["end_to_end_ms"]),
            ("compute waited for weights (ms per step)", lat["prefetch_wait_ms"]),
            ("expert GPU hit rate (%)", mem["expert_hit_rate_pct"]),
            ("expert host hit rate (%)", mem["host_hit_rate_pct"]),
            ("layer hit rate (%)", mem["layer_hit_rate_pct"]),
            ("prefetch accuracy (%)", mem["prefetch_accuracy_pct"]),
            ("host → device (GB)", f["pcie_bytes"] / 1e9),
            ("read from disk (GB)", f["ssd_bytes"] / 1e9),
            ("wasted prefetch (GB)", f["wasted_bytes"] / 1e9),
            ("GPU utilization (%)", gpu.get("utilization_pct")),
            ("SMs busy (%)", gpu.get("sm_activity_pct")),
            ("PCIe RX (GB/s, NVML)", gpu.get("pcie_rx_GBps")),
            ("device memory used (%)", gpu.get("memory_used_pct")),
            ("allocator fragmentation (%)", mem["fragmentation_pct"]),
            ("generating thread busy (%)", host["generating_thread_busy_pct"]),
        ]
        res_rows = []
        for k in ("pcie", "disk", "hbm", "gpu_compute", "host_cpu"):
            r = a["resources"][k]
            b = r["busy"]
            bar = (
                "raw",
                f"<span class='bar' style='width:{int(120 * min(1.0, b))}px'></span>{100 * b:.0f}%"
                if b is not None
                else "—",
            )
            res_rows.append((LABELS[k], bar, r["measured"], r["basis"]))
        sug = suggest(f, a)
        sug_rows = [
            (s["knob"], str(s["value"]), str(s["current"]), s["expected_effect"], s["reason"]) for s in sug
        ]
        ceil = f["ceilings"]
        ceil_rows = [
            (k, ceil.get(k)) for k in ("h2d_GBps", "d2h_GBps", "hbm_GBps", "disk_GBps", "host_read_GBps")
        ]
        plan = cfg.get("plan") or {}
        conf_rows = [
            ("batch size", cfg.get("max_batch_size")),
            ("CUDA graphs", cfg.get("use_cuda_graph")),
            ("pages", cfg.get("pages")),
        ]
        paging = cfg.get("paging") or {}
        for k in ("prefetch_layers", "max_gpu_layers", "cpu_cache_size", "miss_mode", "expert_threshold"):
            if k in paging:
                conf_rows.append((k, paging[k]))
        if plan:
            conf_rows += [
                ("budget (GiB)", plan["budget"] / (1 << 30)),
                ("GPU expert slots", f"{plan['expert_slots']} of {plan['total_experts']}"),
                ("host expert slots", plan["host_expert_slots"]),
                ("paged layers", len(plan["paged_layers"])),
            ]
        return (
            "<div class='cols'><div><h2>Summary</h2>" + _table(rows, ("figure", "value")) + "</div>"
            "<div><h2>Resources</h2>"
            + _table(res_rows, ("resource", "busy", "measured", "basis"))
            + "<h2>Configuration</h2>"
            + _table(conf_rows, ("knob", "value"))
            + "<h2>Ceilings of this machine</h2>"
            + _table(ceil_rows, ("path", "GB/s"))
            + "</div></div>"
            + "<h2>Suggestions</h2>"
            + (
                _table(sug_rows, ("knob", "value", "now", "expected effect", "why"))
                if sug_rows
                else "<p>No change suggested for this run.</p>"
            )
        )


def _nested_table(d: Dict[str, Any]) -> str:
    rows = []
    for sec, vals in d.items():
        if isinstance(vals, dict):
            for k, v in vals.items():
                if isinstance(v, (dict, list)):
                    continue
                rows.append((f"{sec}.{k}", v))
        else:
            rows.append((sec, vals))
    return _table(rows, ("metric", "value"))


def generate_report(
    source: Union[PerfMonitor, Dict[str, Any]],
    path: Union[str, Path] = "perf_report.html",
    title: str = "deepseek-fp4 performance report",
) -> Path:
    """One-call form: ``generate_report(monitor, "perf_report.html")``."""
    v = PerfVisualizer(title)
    v.add_metrics(source)
    return v.generate_report(path)
