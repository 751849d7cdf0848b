"""Paging benchmark: a DeepSeek-V3-shaped model far larger than its GPU budget, against floors
that count only the bytes that must move, and llama.cpp with its experts on the CPU.

The model has DeepSeek-V3's shapes (hidden 7168, MLA, 256 routed experts of 2048 + 1 shared, top-8
in 4 of 8 groups, vocab 129280) and ``--layers`` MoE layers; NVFP4 experts and shared expert, BF16
attention / router / embedding / lm_head as in nvidia/DeepSeek-R1-FP4. Its tensors are random and
written as safetensors shards to ``--dir``; the page cache is dropped and the engine reads expert
units with O_DIRECT.

Measured in one run:
  ceilings   host → device copy rate (pinned, 1 GiB), device copy rate, and the disk rate of the
             engine's own reader (its I/O threads, O_DIRECT, unit-sized reads: the host-cache warm-up)
  routing    "random": the random weights' own router (near uniform); "replay": ids from a trace
             with the per-layer skew of DeepSeek-V3/R1 serving and the token-to-token reuse of
             DeepSeek-V2-Lite (routing_replay.py, docs/routing_data.md)
  cache      "bench": the 16 GiB plan of this short model; "full_depth": the expert cache cut to the
             share of experts a 61-layer DeepSeek-R1 gets in the same budget (the planner on its
             config), so the short model speaks for the full one
  floors     decode ("belady"): the misses of an optimal offline cache (Belady's MIN) over the
             routing the engine actually resolved (recorded by the store), with the same GPU slots,
             times the unit bytes over the measured H2D rate; prefill ("distinct"): each expert a
             layer's prompt uses, once; the SSD row: the larger of disk and bus time, the disk part
             the misses of an optimal host cache over the engine reader's rate
             (--cpu-experts: rows of the CPU lane also give hybrid_floor_ms, the same bytes consumed
             by the bus and the host's DRAM read rate, measured in the run, together)
  peers      llama.cpp `llama-bench -ngl 99 -ot exps=CPU` on a GGUF of the same shape (--llama-dir),
             and (optional) transformers + accelerate: BF16, the whole expert block copied from
             pageable memory at every forward (a reference point, not a target)
Per row: tok/s, ms per MoE layer, its floor, their ratio, bytes moved over the floor bytes, hit rate,
prediction accuracy (random routing only: under replay the router does not pick the ids), stall.

  python benchmarks/bench_paging.py --dir /tmp/v3 [--layers 6] [--memory-limit 16] [--llama-dir DIR]

Writes benchmarks/results/paging_<gpu>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import deepseek_fp4_plugin  # noqa: F401
from bench_common import commit, copy_bandwidth_gbs, dirty, gpu_slug, write_result
from deepseek_fp4_plugin._ext import _C
from deepseek_fp4_plugin.cache_floor import equivalent_capacity, min_misses_requests
from deepseek_fp4_plugin.checkpoint import CheckpointSource
from deepseek_fp4_plugin.config import DeepseekV3Config, RopeScaling
from deepseek_fp4_plugin.engine import Engine
from deepseek_fp4_plugin.loader import linear_shapes, other_tensor_shapes
from deepseek_fp4_plugin.memory_plan import PagingSettings, plan_memory
from deepseek_fp4_plugin.precision import PrecisionPolicy
from deepseek_fp4_plugin.replay import RoutingReplay

GiB = 1 << 30
R1_MOE_LAYERS = 58


def v3_config(layers: int, dense: int = 0) -> DeepseekV3Config:
    cfg = DeepseekV3Config(num_hidden_layers=layers, first_k_dense_replace=dense, max_position_embeddings=163840,
                           rope=RopeScaling(rope_type="yarn", theta=10000.0, factor=40.0,
                                            original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                                            mscale=1.0, mscale_all_dim=1.0))
    cfg.validate("bench_paging")
    return cfg


# ---------------------------------------------------------------------------------------
# the model on disk


def write_model(path: Path, cfg: DeepseekV3Config, seed: int = 0) -> float:
    """Random DeepSeek-V3-shaped NVFP4 checkpoint, one shard per layer. Returns GB written."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    if (path / "model.safetensors.index.json").exists():
        return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9
    g = torch.Generator(device="cuda").manual_seed(seed)
    gscale = torch.tensor(0.02 / (2.9 * 2.5), dtype=torch.float32)
    shapes = linear_shapes(cfg)
    others = other_tensor_shapes(cfg)
    weight_map = {}

    def fp4(t, name, n, k):
        t[name + ".weight"] = torch.randint(0, 256, (n, k // 2), generator=g, device="cuda", dtype=torch.uint8).cpu()
        s = torch.empty(n, k // 16, device="cuda").uniform_(1.0, 4.0, generator=g)
        t[name + ".weight_scale"] = s.to(torch.float8_e4m3fn).cpu()
        t[name + ".weight_scale_2"] = gscale.clone()

    def dense(t, name, shape, std):
        t[name] = (torch.randn(shape, generator=g, device="cuda") * std).to(torch.bfloat16).cpu()

    shards = [[] for _ in range(cfg.num_hidden_layers + 1)]
    for name in others:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else cfg.num_hidden_layers
        shards[layer].append(("other", name))
    for module in shapes:
        layer = int(module.split(".")[2]) if module.startswith("model.layers.") else cfg.num_hidden_layers
        shards[layer].append(("linear", module))
    total = 0
    for i, items in enumerate(shards):
        t = {}
        for kind, name in items:
            if kind == "other":
                shape = others[name]
                if name.endswith("e_score_correction_bias"):
                    t[name] = (torch.rand(shape, generator=g, device="cuda") * 0.01).cpu()
                elif name == "model.embed_tokens.weight":
                    dense(t, name, shape, 0.5)
                else:
                    t[name] = (1 + 0.05 * torch.randn(shape, generator=g, device="cuda")).to(torch.bfloat16).cpu()
            else:
                n, k = shapes[name]
                if ".mlp." in name and not name.endswith(".mlp.gate"):
                    fp4(t, name, n, k)
                else:
                    dense(t, name + ".weight", (n, k), 0.05 if name.endswith(".mlp.gate") else 0.02)
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tmp = path / (fname + ".tmp")
        save_file(t, str(tmp))
        os.replace(tmp, path / fname)
        total += (path / fname).stat().st_size
        weight_map.update({k: fname for k in t})
        del t
    (path / "config.json").write_text(json.dumps({**cfg.to_dict(), "model_type": "deepseek_v3"}))
    (path / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"},
         "quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head", "*self_attn*"]}}))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total / 1e9


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def h2d_gbs(nbytes: int = 1 << 30, reps: int = 10) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.random_()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for _ in range(2):
        dst.copy_(src, non_blocking=True)
    ms = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src, non_blocking=True)
        e.record()
        torch.cuda.synchronize()
        ms.append(s.elapsed_time(e))
    return nbytes / (statistics.median(ms) * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------
# the full-depth cache share


class ShapeSource(CheckpointSource):
    """Tensor names of a DeepSeek-R1-FP4-style checkpoint (NVFP4 MLPs and experts, BF16 attention),
    no data: enough for the planner, which reads only names and shapes."""

    def __init__(self, config: DeepseekV3Config):
        self.config = config
        names = set(other_tensor_shapes(config))
        for module in linear_shapes(config):
            nvfp4 = ".mlp." in module and not module.endswith(".mlp.gate")
            names.add(module + ".weight")
            if nvfp4:
                names.update((module + ".weight_scale", module + ".weight_scale_2", module + ".input_scale"))
        self._names = names

    def names(self):
        return self._names

    def _raw(self, name):
        raise RuntimeError("ShapeSource holds no data")


def full_depth_share(memory_limit: float, max_batch_size: int) -> Dict[str, float]:
    """The GPU expert cache a 61-layer DeepSeek-R1 (58 MoE layers) gets in ``memory_limit`` GiB,
    from the planner, as a share of its routed experts."""
    cfg = v3_config(61, dense=3)
    unit = _C.paging.expert_unit_layout(cfg.hidden_size, cfg.moe_intermediate_size)["bytes"]
    plan = plan_memory(ShapeSource(cfg), PrecisionPolicy(), torch.bfloat16, int(memory_limit * GiB), PagingSettings(),
                       max_batch_size=max_batch_size, max_seq_len=4096, prefill_chunk=2048, expert_unit_bytes=unit,
                       host_bytes=64 * GiB, experts_pageable=True, library_workspace=64 << 20)
    paged_bytes = sum(plan.layer_unit_bytes[layer] for layer in plan.paged_layers)
    return {"expert_slots": plan.expert_slots, "total_experts": plan.total_experts,
            "share": plan.expert_slots / plan.total_experts, "paged_layers": len(plan.paged_layers),
            "paged_layer_bytes_per_token": paged_bytes, "plan_notes": list(getattr(plan, "notes", []))}


# ---------------------------------------------------------------------------------------
# floors


def belady_misses(requests: Sequence[Tuple[int, Sequence[int]]], capacity: int, counted: Sequence[bool]) -> int:
    """Misses the optimal offline schedule cannot avoid over the recorded requests (cache_floor)."""
    return min_misses_requests([[(layer, int(e)) for e in ids] for layer, ids in requests], capacity, counted)


class Recorder:
    """The routing the store resolved, step by step, tagged timed or not."""

    def __init__(self, engine):
        self.store = engine.store.experts
        self.requests: List[Tuple[int, List[int]]] = []
        self.counted: List[bool] = []
        self.store.record_routing(True)
        self.store.take_routing()

    def take(self, counted: bool) -> List[Tuple[int, List[int]]]:
        got = self.store.take_routing()
        self.requests += got
        self.counted += [counted] * len(got)
        return got

    def stop(self) -> None:
        self.take(False)
        self.store.record_routing(False)


# ---------------------------------------------------------------------------------------
# measurements


def counters(engine) -> dict:
    return engine.store.counters()["experts"]


def delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in b if isinstance(b[k], (int, float))}


def decode_row(engine, batch: int, steps: int, h2d: float, n_moe: int, variant: str, routing: str, share: str,
               rec: Recorder, slots: int, disk: Optional[float] = None, host_slots: Optional[int] = None,
               prompt_len: int = 32, full_depth: Optional[dict] = None, dram: Optional[float] = None) -> dict:
    cfg = engine.config
    unit = engine.store.layout["bytes"]
    g = torch.Generator(device="cuda").manual_seed(100 + batch)
    tokens = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g, device="cuda")
    engine.set_use_cuda_graph(True)
    logits = engine.prefill(tokens, [prompt_len] * batch)
    pos = prompt_len
    nxt = logits.argmax(-1)
    for _ in range(3):   # warm-up: graph capture and the first steps
        logits = engine.decode_one_token(nxt, torch.full((batch,), pos, device="cuda"), pos + 1)
        nxt = logits.argmax(-1)
        pos += 1
    torch.cuda.synchronize()
    rec.take(False)
    times, repeat_times = [], []
    d = None
    for _ in range(steps):
        p = torch.full((batch,), pos, device="cuda")
        e0 = counters(engine)
        t0 = time.perf_counter()
        logits = engine.decode_one_token(nxt, p, pos + 1)
        nxt2 = logits.argmax(-1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        e1 = counters(engine)
        rec.take(True)
        # the same step again: every expert it needs is on the GPU now (stall = difference)
        if engine.model.routing_replay is not None:
            engine.model.routing_replay.step -= 1
        t0 = time.perf_counter()
        engine.decode_one_token(nxt, p, pos + 1).argmax(-1)
        torch.cuda.synchronize()
        repeat_times.append(time.perf_counter() - t0)
        rec.take(False)
        step = delta(e0, e1)
        d = step if d is None else {k: d[k] + step[k] for k in d}
        nxt = nxt2
        pos += 1
    moved = d["h2d_bytes"] + d["zero_copy_bytes"]
    misses = belady_misses(rec.requests, slots, rec.counted)
    floor_bytes = misses * unit
    floor_ms = floor_bytes / (h2d * 1e9) * 1e3 / steps / n_moe
    ssd_ms = None
    if disk is not None and host_slots is not None:
        host_misses = belady_misses(rec.requests, host_slots, rec.counted)
        ssd_ms = host_misses * unit / (disk * 1e9) * 1e3 / steps / n_moe
        floor_ms = max(floor_ms, ssd_ms)
    step_ms = statistics.fmean(times) * 1e3
    rep_ms = statistics.fmean(repeat_times) * 1e3
    moe_ms = step_ms / n_moe
    row = {"phase": "decode", "batch": batch, "prompt_len": prompt_len, "variant": variant, "routing": routing,
           "cache_share": share, "gpu_slots": slots, "floor_kind": "belady",
           "tok_s": batch / (step_ms * 1e-3), "step_ms": step_ms, "repeat_step_ms": rep_ms, "moe_layer_ms": moe_ms,
           "floor_ms": floor_ms, "ratio_to_floor": moe_ms / floor_ms if floor_ms else None,
           "moved_over_floor": moved / floor_bytes if floor_bytes else None, "belady_misses_per_step": misses / steps,
           "hit_rate": d["gpu_hits"] / max(1, d["requests"]),
           "prefetch_accuracy": (d["predicted_used"] / d["used_after_prediction"]
                                 if d["used_after_prediction"] and routing == "random" else None),
           "stall_ms": step_ms - rep_ms, "h2d_mb_per_step": moved / steps / 1e6,
           "ssd_mb_per_step": d["ssd_bytes"] / steps / 1e6,
           "wasted_mb_per_step": d["prefetch_wasted"] * unit / steps / 1e6,
           "zero_copy_units": d["zero_copy"], "copies": d["copies"], "disk_wait_ms": d["wait_ms"] / steps,
           "publish_to_ready_ms": d["publish_to_ready_ms"] / max(1, d["publishes"]),
           "skipped_per_step": d["skipped"] / steps}
    if ssd_ms is not None:
        row["ssd_floor_ms"] = ssd_ms
    if d.get("cpu_experts"):
        # the CPU lane: the bytes no cache can avoid, consumed by the bus and the host's DRAM
        # read rate (the most the CPU threads can stream) together
        row.update(cpu_experts_per_step=d["cpu_experts"] / steps, cpu_ms_per_step=d["cpu_ms"] / steps,
                   cpu_mb_per_step=d["cpu_bytes"] / steps / 1e6)
        if dram:
            hybrid_ms = floor_bytes / ((h2d + dram) * 1e9) * 1e3 / steps / n_moe
            row.update(hybrid_floor_ms=hybrid_ms, ratio_to_hybrid_floor=moe_ms / hybrid_ms if hybrid_ms else None)
    if share == "full_depth" and full_depth is not None:
        # 58 MoE layers at the measured per-layer time (conservative: the short step's lm_head is
        # counted in it), plus the per-layer weights the 16 GiB plan pages every token over the bus
        paged_s = full_depth["paged_layer_bytes_per_token"] / (h2d * 1e9)
        row["full_depth_tok_s"] = batch / (R1_MOE_LAYERS * moe_ms * 1e-3 + paged_s)
        row["full_depth_paged_layers_ms"] = paged_s * 1e3
    return row


def prefill_row(engine, prompt_len: int, h2d: float, n_moe: int, reps: int, routing: str, rec: Recorder) -> dict:
    cfg = engine.config
    unit = engine.store.layout["bytes"]
    g = torch.Generator(device="cuda").manual_seed(prompt_len)
    tokens = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g, device="cuda")
    engine.prefill(tokens[:, :64], [64])   # warm kernels
    torch.cuda.synchronize()
    rec.take(False)
    ms, rows = [], []
    for _ in range(reps):
        e0 = counters(engine)
        t0 = time.perf_counter()
        engine.prefill(tokens, [prompt_len])
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - t0) * 1e3)
        got = rec.take(False)
        distinct = sum(len(set().union(*[set(ids) for l, ids in got if l == layer] or [set()]))
                       for layer in range(n_moe))
        d = delta(e0, counters(engine))
        rows.append((distinct, d))
    med = statistics.median(ms)
    distinct, d = rows[len(rows) // 2]
    floor_ms = distinct * unit / (h2d * 1e9) * 1e3 / n_moe
    moved = d["h2d_bytes"] + d["zero_copy_bytes"]
    moe_ms = med / n_moe
    return {"phase": "prefill", "batch": 1, "prompt_len": prompt_len, "variant": "full", "routing": routing,
            "cache_share": "bench", "floor_kind": "distinct", "reps": reps, "ms_all": ms,
            "tok_s": prompt_len / (med * 1e-3), "moe_layer_ms": moe_ms, "floor_ms": floor_ms,
            "ratio_to_floor": moe_ms / floor_ms if floor_ms else None,
            "moved_over_floor": moved / (distinct * unit) if distinct else None,
            "hit_rate": d["gpu_hits"] / max(1, d["requests"]), "prefetch_accuracy": None, "stall_ms": None,
            "h2d_gb": moved / 1e9, "experts_per_layer": distinct / n_moe}


def profile_prefill(engine, prompt_len: int, out: Path) -> dict:
    """torch.profiler over one prefill: the time by kernel and the host's share."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator(device="cuda").manual_seed(7)
    tokens = torch.randint(0, engine.config.vocab_size, (1, prompt_len), generator=g, device="cuda")
    engine.prefill(tokens, [prompt_len])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.prefill(tokens, [prompt_len])
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    (out / "prefill_profile.txt").write_text(table)
    events = prof.key_averages()
    top = sorted(events, key=lambda e: e.device_time_total, reverse=True)[:12]
    return {"prompt_len": prompt_len, "wall_ms": wall,
            "top": [{"name": e.key[:80], "cuda_ms": e.device_time_total / 1e3, "cpu_ms": e.cpu_time_total / 1e3,
                     "calls": e.count} for e in top]}


# ---------------------------------------------------------------------------------------
# peers


def llama_cpp_peer(args) -> dict:
    """llama.cpp with its experts on the CPU (benchmarks/peers/llama_cpp.py, docs/peers.md), once the
    engine has freed its pinned host cache: the GGUF and llama.cpp's copy of the experts sit in RAM."""
    sys.path.insert(0, str(Path(__file__).parent / "peers"))
    from llama_cpp import run_peer

    args.llama_work.mkdir(parents=True, exist_ok=True)
    n = os.cpu_count() or 16
    threads = tuple(int(t) for t in args.llama_threads.split(",") if t) or (n, n // 2)
    return run_peer(args.llama_dir, args.llama_work, layers=args.llama_layers,
                    expert_types=tuple(args.llama_types.split(",")), threads=threads, prompts=(512, 2048),
                    gen=32, reps=args.llama_reps, repack=tuple(int(r) for r in args.llama_repack.split(",")))


def cpu_kernel_rows(cpu, batches: Sequence[int], gb: float = 2.2) -> Tuple[float, List[dict]]:
    """The CPU expert kernel alone with the lane's threads: GB/s of expert units (8 experts a call,
    each with the whole batch) over ~2 GB of pinned units, against those threads' DRAM read rate
    over the same units (bench_cpu_experts.py, the same measurement)."""
    from bench_cpu_experts import make_units, time_calls

    layout = dict(_C.paging.expert_unit_layout(cpu.hidden, cpu.inter))
    count = max(16, -(-int(gb * 1e9) // layout["bytes"]))
    units = make_units(layout, count, torch.cuda.is_available())
    dram = cpu.read_bandwidth(units.view(-1), 3)
    rows = []
    for b in batches:
        r = time_calls(cpu, units, b, 8, max(8, -(-2 * count // 8)), warmup=3, seed=b)
        rows.append({"batch": b, "gbs": r["gbs"], "dram_gbs": dram, "ratio": r["gbs"] / dram, "ms": r["ms"],
                     "isa": cpu.isa, "threads": cpu.threads})
        print(f"CPU kernel batch {b}: {r['gbs']:.1f} GB/s of {dram:.1f} GB/s DRAM ({cpu.isa}, {cpu.threads} threads)",
              flush=True)
    return dram, rows


def accelerate_moe_layer_ms(cfg: DeepseekV3Config, layers: int, steps: int = 3) -> dict:
    """transformers DeepseekV3ForCausalLM in BF16 with the routed experts offloaded by accelerate to
    pageable host memory (copied to the GPU at every forward): ms per MoE layer per token."""
    import accelerate
    import transformers
    from transformers import DeepseekV3Config as HFConfig, DeepseekV3ForCausalLM

    keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads",
            "n_shared_experts", "n_routed_experts", "routed_scaling_factor", "kv_lora_rank", "q_lora_rank",
            "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group", "num_experts_per_tok",
            "norm_topk_prob", "max_position_embeddings", "rms_norm_eps")
    hf = HFConfig(**{k: getattr(cfg, k) for k in keys}, num_hidden_layers=layers, first_k_dense_replace=0,
                  num_key_value_heads=cfg.num_attention_heads)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(hf).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    pattern = (torch.rand(1 << 25) * 0.04 - 0.02).to(torch.bfloat16)
    with torch.no_grad():
        for p in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            flat = p.view(-1)
            for i in range(0, flat.numel(), pattern.numel()):
                n = min(pattern.numel(), flat.numel() - i)
                flat[i:i + n].copy_(pattern[:n])
        model.model.rotary_emb.__init__(hf)
    model.eval()
    dmap = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    for i in range(layers):
        for part in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp.gate", "mlp.shared_experts"):
            dmap[f"model.layers.{i}.{part}"] = 0
        dmap[f"model.layers.{i}.mlp.experts"] = "cpu"
    model = accelerate.dispatch_model(model, device_map=dmap, main_device=0)
    ids = torch.randint(0, cfg.vocab_size, (1, 16), device="cuda")
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        ms = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(nxt, past_key_values=past, use_cache=True)
            torch.cuda.synchronize()
            ms.append((time.perf_counter() - t0) * 1e3)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    del model, out, past
    gc.collect()
    torch.cuda.empty_cache()
    step = statistics.median(ms)
    return {"what": "BF16, the whole routed-expert block copied from pageable host memory each forward",
            "step_ms": step, "moe_layer_ms": step / layers, "layers": layers,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}


# ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--memory-limit", type=float, default=16.0)
    ap.add_argument("--ssd-cache", type=float, default=16.0)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", default="2048,8192")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--llama-dir", type=Path, default=None, help="llama.cpp build with llama-bench (peer)")
    ap.add_argument("--llama-layers", type=int, default=3)
    ap.add_argument("--llama-work", type=Path, default=Path("/dev/shm/dsfp4_gguf"))
    ap.add_argument("--llama-types", default="q4_0,nvfp4", help="llama.cpp expert types to bench")
    ap.add_argument("--llama-threads", default="", help="llama.cpp thread counts (default: all cores, half)")
    ap.add_argument("--llama-reps", type=int, default=3)
    ap.add_argument("--llama-repack", default="1,0", help="llama.cpp --repack values")
    ap.add_argument("--baseline", action="store_true", help="also run transformers + accelerate")
    ap.add_argument("--skip-ssd", action="store_true")
    ap.add_argument("--skip-ablations", action="store_true")
    ap.add_argument("--cpu-experts", default="off",
                    help="off, auto or threads: adds full-depth decode rows with the CPU expert lane")
    ap.add_argument("--profile", type=Path, default=None, help="write a prefill profile summary here")
    ap.add_argument("--no-replay", action="store_true", help="random routing only (no trace)")
    ap.add_argument("--write-only", action="store_true", help="write the model to --dir and stop")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    cfg = v3_config(args.layers)
    n_moe = args.layers
    t0 = time.perf_counter()
    gb = write_model(args.dir, cfg)
    print(f"model: {gb:.1f} GB on disk in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.write_only:
        return 0
    dropped = drop_page_cache()
    copy = copy_bandwidth_gbs()
    h2d = h2d_gbs()
    result = {"gpu": torch.cuda.get_device_name(), "commit": commit(), "dirty": dirty(),
              "date": datetime.date.today().isoformat(), "h2d_gbs": h2d, "copy_gbs": copy,
              "page_cache_dropped": dropped, "memory_limit_gb": args.memory_limit, "model_gb_on_disk": gb,
              "moe_layers": n_moe, "rows": [], "peers": {}}
    print(f"ceilings: h2d {h2d:.1f} GB/s, copy {copy:.0f} GB/s", flush=True)

    share = full_depth_share(args.memory_limit, 8)
    result["full_depth"] = share
    print(f"full depth: DeepSeek-R1 in {args.memory_limit} GiB keeps {share['expert_slots']} of "
          f"{share['total_experts']} experts ({100 * share['share']:.2f}%)", flush=True)

    dec = pre = None
    if not args.no_replay:
        from deepseek_fp4_plugin.routing_replay import RoutingModel

        rm = RoutingModel.load()
        dec = rm.decode_trace(steps=64, batch=8, layers=n_moe, experts=cfg.n_routed_experts,
                              top_k=cfg.num_experts_per_tok, seed=1, layers_subset="representative")
        pre = rm.prefill_trace(tokens=8192, layers=n_moe, experts=cfg.n_routed_experts,
                               top_k=cfg.num_experts_per_tok, seed=2, layers_subset="representative")
        result["replay_trace"] = {"decode_shape": list(dec.shape), "prefill_shape": list(pre.shape)}

    def share_slots(batch: int) -> int:
        """GPU slots that leave each of the short model's layers the room a 61-layer R1 leaves each
        of its 58 (cache_floor.equivalent_capacity): the request being served holds its experts
        whatever the depth, so a plain share would leave a short model less room per layer."""
        if dec is not None:
            d = dec[:, :, :batch].reshape(dec.shape[0], n_moe, -1)
            ws = float(np.mean([len(np.unique(d[s_, l])) for s_ in range(d.shape[0]) for l in range(n_moe)]))
        else:
            ws = float(cfg.n_routed_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** batch))
        ws = min(ws, share["expert_slots"])
        return max(1, equivalent_capacity(share["expert_slots"], R1_MOE_LAYERS, n_moe, ws))

    kw = dict(device="cuda", memory_limit=args.memory_limit, max_batch_size=8,
              max_seq_len=max(int(p) for p in args.prompts.split(",")) + 128, prefill_chunk=2048, verbose=True)
    torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    eng = Engine.from_pretrained(args.dir, paging=dict(cpu_cache_size=float(
        cfg.n_routed_experts * n_moe * 24.78e6 / GiB + 0.5), cpu_experts=args.cpu_experts), **kw)
    result["plan"] = eng.memory_plan.as_dict()
    slots = eng.memory_plan.expert_slots
    ids = np.arange(cfg.n_routed_experts, dtype=np.int32)
    t1 = time.perf_counter()
    for i in range(n_moe):   # warm the host cache through the engine's own reader
        eng.store.experts.load_host(i, ids.ctypes.data, len(ids))
    warm_s = time.perf_counter() - t1
    disk = cfg.n_routed_experts * n_moe * eng.store.layout["bytes"] / warm_s / 1e9
    result["disk_gbs"] = disk
    result["disk_reader"] = {"io_threads": eng.paging.io_threads, "direct_io": eng.paging.direct_io,
                             "read": "one expert unit's 9 tensors per job", "seconds": warm_s}
    print(f"engine loaded in {t1 - t0:.0f} s; host cache warmed in {warm_s:.0f} s ({disk:.2f} GB/s, engine reader)",
          flush=True)

    rows = result["rows"]
    keys = ("prefetch_layers", "prefetch_min_accuracy", "cache_policy", "stream_priorities", "miss_mode",
            "expert_threshold", "expert_slots", "decode_pipeline", "cpu_experts")
    default = {k: getattr(eng.paging, k) for k in keys}
    default["cpu_experts"] = "off"   # the lane's rows turn it on

    out = args.out or Path(__file__).parent / "results" / f"paging_{gpu_slug()}.json"

    def run(change, fn):
        eng.reconfigure_paging(**{**default, **change})
        rec = Recorder(eng)
        try:
            r = fn(rec)
        finally:
            rec.stop()
        print(r, flush=True)
        rows.append(r)
        write_result({**result, "partial": True}, out)   # a run cut short keeps its rows
        return r

    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        result["prefill_profile"] = profile_prefill(eng, 2048, args.profile)
    # random routing (the weights' own router), the bench's cache
    for b in (1, 8):
        run({}, lambda rec, b=b: decode_row(eng, b, args.steps, h2d, n_moe, "full", "random", "bench", rec, slots))
    for p in (int(x) for x in args.prompts.split(",")):
        run({}, lambda rec, p=p: prefill_row(eng, p, h2d, n_moe, args.prefill_reps, "random", rec))
    # replay routing: the bench's cache, then the full-depth share
    eng.set_routing_replay(RoutingReplay(dec, pre) if dec is not None else None)
    routing = "replay" if dec is not None else "random"
    for b in (1, 8) if dec is not None else ():
        run({}, lambda rec, b=b: decode_row(eng, b, args.steps, h2d, n_moe, "full", "replay", "bench", rec, slots))
    if dec is not None:
        run({}, lambda rec: prefill_row(eng, 2048, h2d, n_moe, args.prefill_reps, "replay", rec))
    for b in (1, 4, 8):
        n = share_slots(b)
        run(dict(expert_slots=n), lambda rec, b=b, n=n: decode_row(eng, b, args.steps, h2d, n_moe, "full", routing,
                                                                    "full_depth", rec, n, full_depth=share))
    if args.cpu_experts != "off":   # the hybrid lane, same engine and routing
        from deepseek_fp4_plugin.cpu_experts import CpuExperts
        lane = eng.store.counters()["cpu_lane"]
        probe = CpuExperts(cfg.hidden_size, cfg.moe_intermediate_size, threads=lane["threads"],
                           reserved_cores=eng.memory_plan.cpu_reserved_cores)
        dram, result["cpu_kernel"] = cpu_kernel_rows(probe, (1, 4, 16))
        del probe
        result["host_dram_gbs"], result["cpu_lane"] = dram, lane
        for b in (1, 4, 8):
            n = share_slots(b)
            run(dict(expert_slots=n, cpu_experts=args.cpu_experts),
                lambda rec, b=b, n=n: decode_row(eng, b, args.steps, h2d, n_moe, "hybrid", routing, "full_depth",
                                                 rec, n, full_depth=share, dram=dram))
    n = share_slots(1)
    run(dict(expert_slots=n, decode_pipeline=False),
        lambda rec: decode_row(eng, 1, args.steps, h2d, n_moe, "no_pipeline", routing, "full_depth", rec, n,
                               full_depth=share))
    eng.set_routing_replay(None)
    if not args.skip_ablations:
        ablations = {"no_pipeline": dict(decode_pipeline=False), "no_prefetch": dict(prefetch_layers=0),
                     "prefetch_always": dict(prefetch_min_accuracy=0.0), "lru": dict(cache_policy="lru"),
                     "no_stream_priorities": dict(stream_priorities=False), "zero_copy": dict(miss_mode="zero_copy"),
                     "auto": dict(miss_mode="auto"), "threshold_0.1": dict(expert_threshold=0.1)}
        probe = torch.randint(0, cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(5)).tolist()
        exact = eng.logits(probe)
        for name, change in ablations.items():
            r = run(change, lambda rec, name=name: decode_row(eng, 1, args.steps, h2d, n_moe, name, "random", "bench",
                                                              rec, slots))
            if "expert_threshold" in change:
                approx = eng.logits(probe)
                r["logit_rel_err"] = ((approx - exact).norm() / exact.norm()).item()
                r["top1_agree"] = (approx.argmax(-1) == exact.argmax(-1)).float().mean().item()
    eng.reconfigure_paging(**default)
    torch.cuda.synchronize()
    result["peak_gpu_gb"] = (torch.cuda.max_memory_allocated() - base_alloc) / 1e9
    result["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    result["counters"] = {k: v for k, v in eng.store.counters().items() if k != "per_layer"}
    del eng
    gc.collect()
    torch.cuda.empty_cache()

    if args.llama_dir is not None:   # after the engine has freed its pinned host cache
        t0 = time.perf_counter()
        try:
            result["peers"]["llama_cpp"] = llama_cpp_peer(args)
        except Exception as e:   # the peer's failure must not lose our rows; it is reported
            result["peers"]["llama_cpp"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"llama.cpp: {json.dumps(result['peers']['llama_cpp'])[:600]} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        write_result({**result, "partial": True}, out)

    if not args.skip_ssd:
        drop_page_cache()
        eng = Engine.from_pretrained(args.dir, paging=dict(cpu_cache_size=args.ssd_cache), **kw)
        rec = Recorder(eng)
        r = decode_row(eng, 1, max(3, args.steps // 2), h2d, n_moe, "ssd", "random", "bench", rec,
                       eng.memory_plan.expert_slots, disk=disk, host_slots=eng.memory_plan.host_expert_slots)
        rec.stop()
        print(r, flush=True)
        rows.append(r)
        del eng
        gc.collect()

    if args.baseline:
        result["peers"]["accelerate"] = accelerate_moe_layer_ms(cfg, 1)

    write_result(result, out)
    print(f"\nPaging, {n_moe} MoE layers ({gb:.0f} GB), memory_limit {args.memory_limit} GiB, h2d {h2d:.1f} GB/s, "
          f"disk {disk:.2f} GB/s (engine reader); commit {result['commit'][:10]}{' (dirty)' if result['dirty'] else ''}")
    print(f"{'phase':7} {'b':>2} {'prompt':>6} {'variant':>20} {'routing':>7} {'cache':>10} {'tok/s':>8} "
          f"{'MoE ms':>7} {'floor':>7} {'ratio':>5} {'moved':>5} {'hit':>4} {'pred':>4}")
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        print(f"{r['phase']:7} {r['batch']:>2} {r['prompt_len']:>6} {r['variant']:>20} {r['routing']:>7} "
              f"{r['cache_share']:>10} {f(r['tok_s'], '8.2f')} {f(r['moe_layer_ms'], '7.2f')} {f(r['floor_ms'], '7.2f')} "
              f"{f(r['ratio_to_floor'], '5.2f')} {f(r['moved_over_floor'], '5.2f')} {f(r['hit_rate'], '4.2f')} "
              f"{f(r['prefetch_accuracy'], '4.2f')}")
    llama = result["peers"].get("llama_cpp", {}).get("phases", {})
    for phase, v in llama.items():
        if isinstance(v, dict):
            print(f"llama.cpp {phase}: {v.get('tok_s', 0):.2f} tok/s, {v.get('moe_layer_ms', 0):.2f} ms per MoE layer "
                  f"({v.get('expert_type', '?')})")
    print(f"peak GPU (engine) {result['peak_gpu_gb']:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
