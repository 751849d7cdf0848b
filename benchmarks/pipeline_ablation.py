"""Decode step time of a small paged model with the decode pipeline on and off, eager and under
CUDA graphs, with the store's counters: where a paged decode step loses its time.

    python benchmarks/pipeline_ablation.py [--steps 40] [--out ablation.json]
"""

import argparse
import json
import tempfile
import time

import torch

from deepseek_fp4_plugin import Engine
from deepseek_fp4_plugin.tiny import make_tiny

from bench_common import commit, dirty


def run(model_dir, pipeline: bool, graph: bool, steps: int, batch: int) -> dict:
    kw = dict(device="cuda", max_batch_size=batch, max_seq_len=512, prefill_chunk=64, verbose=False)
    eng = Engine.from_pretrained(model_dir, memory_limit=0.125,
                                 paging=dict(cpu_cache_size=0.04, decode_pipeline=pipeline), **kw)
    eng.set_use_cuda_graph(graph)
    prompts = [list(range(3 + b, 40 + b)) for b in range(batch)]
    eng.generate(prompts, max_tokens=4, ignore_eos=True)            # warm-up (and graph capture)
    eng.store.reset_counters()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = eng.generate(prompts, max_tokens=steps, ignore_eos=True)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    c = eng.store.counters()
    e = c["experts"]
    row = dict(pipeline=pipeline, graph=graph, batch=batch, steps=steps, ms_per_token=1000 * dt / steps,
               pipeline_on=bool(getattr(eng.store, "pipeline", False)),
               pipeline_off_reason=getattr(eng.store, "pipeline_off_reason", None),
               expert_hit_rate=c["expert_hit_rate"], h2d_mb=c["h2d_bytes"] / 1e6,
               failed=e.get("failed"), publishes=e.get("publishes"),
               publish_to_ready_ms=e.get("publish_to_ready_ms"),
               finish=[o.finish_reason for o in out])
    del eng
    torch.cuda.synchronize()
    return row


def profile_copies(model_dir, steps: int = 6) -> dict:
    """Host→device copies of a pipelined, graph-captured decode at batch 1 under the torch
    profiler: are they slow on the bus, or late to start?"""
    from torch.profiler import ProfilerActivity, profile
    kw = dict(device="cuda", max_batch_size=1, max_seq_len=512, prefill_chunk=64, verbose=False)
    eng = Engine.from_pretrained(model_dir, memory_limit=0.125, paging=dict(cpu_cache_size=0.04), **kw)
    eng.set_use_cuda_graph(True)
    eng.generate([list(range(3, 40))], max_tokens=4, ignore_eos=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        eng.generate([list(range(5, 42))], max_tokens=steps, ignore_eos=True)
        torch.cuda.synchronize()
    copies = [e for e in prof.events() if "Memcpy HtoD" in e.name]
    big = [e for e in copies if getattr(e, "device_time", 0) > 20]
    kernels = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and "Memcpy" not in e.name:
            kernels[e.name[:60]] = kernels.get(e.name[:60], 0) + e.device_time
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:6]
    return dict(copies=len(copies), big_copies=len(big),
                big_copy_us_mean=sum(e.device_time for e in big) / max(1, len(big)),
                copy_us_total=sum(e.device_time for e in copies),
                top_kernels_us=[(k, round(v)) for k, v in top], steps=steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        make_tiny(d, seed=2, hidden_size=512, moe_intermediate_size=256, n_routed_experts=128, num_hidden_layers=6,
                  n_group=8, topk_group=4, num_experts_per_tok=6)
        for batch in (1, 4):
            for graph in (False, True):
                for pipeline in (False, True):
                    try:
                        r = run(d, pipeline, graph, a.steps, batch)
                    except Exception as e:   # keep the other cells
                        r = dict(pipeline=pipeline, graph=graph, batch=batch, error=f"{type(e).__name__}: {e}")
                    print(json.dumps(r), flush=True)
                    rows.append(r)
        try:
            prof = profile_copies(d)
        except Exception as e:
            prof = dict(error=f"{type(e).__name__}: {e}")
        print(json.dumps(dict(profile=prof)), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), commit=commit(), dirty=dirty(), rows=rows, profile=prof), f,
                      indent=1)


if __name__ == "__main__":
    main()
