"""The HTML report, rendered in headless Chromium: it loads with no network, every plot is
drawn, nothing is logged to the console, and a screenshot is taken. A page with a script error
and a remote image shows the checks can fail."""

import json
import os

import pytest

from deepseek_fp4_plugin import PerfVisualizer, generate_report
from deepseek_fp4_plugin.monitor import PerfMonitor
from headless_browser import chromium_path, render
from monitor_traces import make_trace, pcie_bound

PLOTS = ["plot-tokens", "plot-hits", "plot-pcie", "plot-gpu", "plot-tiers", "plot-stall", "plot-heatmap"]


def _browser():
    if chromium_path() is None:
        if os.environ.get("DSFP4_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is required here (DSFP4_REQUIRE_BROWSER=1) but was not found")
        pytest.skip("chromium not installed (apt-get install chromium)")
    pytest.importorskip("websocket", reason="websocket-client not installed")


def test_report_renders_in_a_browser(tmp_path):
    _browser()
    trace = pcie_bound(frag=0.3, reserved=8 << 30)
    trace["label"] = "<script>alert(1)</script> escaped"  # text from a run never becomes markup
    path = generate_report(PerfMonitor.from_trace(trace), tmp_path / "out" / "perf_report.html")
    text = path.read_text()
    assert "<script>alert" not in text and "http://" not in text and "https://" not in text
    shot = tmp_path / "perf_report.png"
    info = render(path, shot)
    assert info["console_errors"] == [] and info["exceptions"] == [] and info["requests"] == []
    assert info["figures"] == PLOTS
    assert info["images"] == len(PLOTS) and info["images_drawn"] == len(PLOTS)
    assert info["verdict"].startswith("Bottleneck: PCIe-bound")
    assert info["tables"] >= 4
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    assert info["height"] > 1500  # the whole page, not one viewport


def test_the_checks_catch_a_broken_page(tmp_path):
    _browser()
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>x</title></head><body>"
        "<img src='http://127.0.0.1:9/nothing.png'>"
        "<script>console.error('boom'); undefinedFunction();</script></body></html>"
    )
    info = render(page)
    assert any("boom" in e for e in info["console_errors"])
    assert any("undefinedFunction" in e for e in info["exceptions"])
    assert info["requests"] == ["http://127.0.0.1:9/nothing.png"]
    assert info["images_drawn"] == 0


def test_metrics_points_and_a_cpu_run(tmp_path):
    _browser()
    v = PerfVisualizer("points")
    from deepseek_fp4_plugin.bottlenecks import figures, utilization

    for busy in (0.2, 0.5, 0.9):
        v.add_metrics(utilization(figures(make_trace(device="cpu", thread_busy=busy))))
    v.add_metrics(make_trace(device="cpu", thread_busy=0.9, nvml=None))
    info = render(v.generate_report(tmp_path / "p.html"))
    assert info["console_errors"] == [] and info["exceptions"] == []
    assert "plot-points" in info["figures"] and info["images_drawn"] == info["images"] == len(PLOTS) + 1


def test_add_metrics_refuses_other_things(tmp_path):
    v = PerfVisualizer()
    with pytest.raises(ValueError, match="add_metrics takes"):
        v.add_metrics({"a": 1})
    with pytest.raises(ValueError, match="nothing to report"):
        v.generate_report(tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()
    # a trace survives JSON and renders the same verdict
    trace = json.loads(json.dumps(pcie_bound()))
    v.add_metrics(trace)
    assert "PCIe-bound" in v.generate_report(tmp_path / "y.html").read_text()
