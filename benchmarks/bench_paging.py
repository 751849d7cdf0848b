"""Paging benchmark: a DeepSeek-V3-sized model far larger than its GPU budget.

The model has DeepSeek-V3's shapes (hidden 7168, MLA, 256 routed experts of 2048 + 1 shared,
top-8 in 4 of 8 groups, vocab 129280) and ``--layers`` MoE layers; NVFP4 experts and shared
expert, BF16 attention / router / embedding / lm_head as in nvidia/DeepSeek-R1-FP4. Its
tensors are random (generated on the GPU) and written as safetensors shards to ``--dir``;
the page cache is dropped afterwards and the engine reads expert units with O_DIRECT.

Measured in one run:
  ceilings     host → device copy rate (pinned), device copy rate, disk read rate (O_DIRECT)
  baseline     transformers + accelerate, same layer sizes in BF16, device_map="auto" with the
               same GPU budget (max_memory), decode time per MoE layer per token
  full         memory_limit (16 GiB), every expert in the pinned host cache (warmed): decode
               at batch 1 and 8 (CUDA graphs), prefill of 2048 and 8192 tokens
  ablations    decode at batch 1 with: no prefetch, LRU, no stream priorities, zero-copy,
               auto (copy what the policy keeps, zero-copy the rest)
  ssd          a host cache smaller than the experts (``--ssd-cache`` GiB): decode at batch 1
Per row: tok/s, ms per MoE layer, its floor (bytes moved host → device / the measured rate,
plus bytes read from disk / the disk rate), their ratio, GPU hit rate, prefetch accuracy
and stall time (a step minus the same step repeated, when every expert it needs is already
on the GPU). Random weights route nearly uniformly, so the hit rates are a lower bound.

  python benchmarks/bench_paging.py --dir /tmp/v3 [--layers 6] [--memory-limit 16]

Writes benchmarks/results/paging_<gpu>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import deepseek_fp4_plugin  # noqa: F401
from bench_common import commit, copy_bandwidth_gbs, gpu_slug, write_result
from deepseek_fp4_plugin._ext import _C
from deepseek_fp4_plugin.config import DeepseekV3Config, RopeScaling
from deepseek_fp4_plugin.engine import Engine
from deepseek_fp4_plugin.loader import linear_shapes, other_tensor_shapes

GiB = 1 << 30


def v3_config(layers: int) -> DeepseekV3Config:
    cfg = DeepseekV3Config(num_hidden_layers=layers, first_k_dense_replace=0, max_position_embeddings=163840,
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


# ---------------------------------------------------------------------------------------
# ceilings


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


def disk_gbs(path: Path, nbytes: int = 2 << 30) -> float:
    """O_DIRECT read rate of the largest shard, through the engine's own reader."""
    f = max(path.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    files = _C.paging.CheckpointFiles([str(f)], True)
    buf = torch.empty(64 << 20, dtype=torch.uint8)
    n = min(nbytes, f.stat().st_size - (64 << 20))
    t0 = time.perf_counter()
    off = 0
    while off < n:
        files.read(0, off, 64 << 20, "disk-rate probe", buf.data_ptr())
        off += 64 << 20
    return off / (time.perf_counter() - t0) / 1e9


# ---------------------------------------------------------------------------------------
# the accelerate baseline


def accelerate_moe_layer_ms(cfg: DeepseekV3Config, layers: int, budget_gib: float, steps: int = 3) -> dict:
    """transformers DeepseekV3ForCausalLM in BF16, dispatched by accelerate within the GPU
    budget (the MoE layers end up offloaded to host memory), ms per MoE layer per token."""
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
    pattern = (torch.rand(1 << 25) * 0.04 - 0.02).to(torch.bfloat16)   # tiled into every weight
    with torch.no_grad():
        for p in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            flat = p.view(-1)
            for i in range(0, flat.numel(), pattern.numel()):
                n = min(pattern.numel(), flat.numel() - i)
                flat[i:i + n].copy_(pattern[:n])
        model.model.rotary_emb.__init__(hf)   # recompute inv_freq (to_empty left it uninitialised)
    model.eval()
    # device_map="auto" reserves the largest block (one layer's 22.5 GB of BF16 experts) on the
    # GPU, which a 16 GiB budget cannot hold, and then runs everything on the CPU: map by hand
    # instead, the way a user would: the routed experts offloaded to host memory (moved to the GPU
    # at every forward by accelerate's hooks), everything else on the GPU
    dmap = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    for i in range(layers):
        for part in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp.gate", "mlp.shared_experts"):
            dmap[f"model.layers.{i}.{part}"] = 0
        dmap[f"model.layers.{i}.mlp.experts"] = "cpu"
    model = accelerate.dispatch_model(model, device_map=dmap, main_device=0)
    ids = torch.randint(0, cfg.vocab_size, (1, 16), device="cuda")
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        ms = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(nxt, past_key_values=past, use_cache=True)
            torch.cuda.synchronize()
            ms.append((time.perf_counter() - t0) * 1e3)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
    offloaded = sorted({str(v) for v in dmap.values()})
    del model, out, past
    gc.collect()
    torch.cuda.empty_cache()
    step = statistics.median(ms)
    return {"step_ms": step, "moe_layer_ms": step / layers, "layers": layers, "devices": offloaded,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}


# ---------------------------------------------------------------------------------------
# measurements


def counters(engine):
    return engine.store.counters()


def delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in b if isinstance(b[k], (int, float))}


def decode_row(engine, batch: int, steps: int, h2d: float, disk: float, variant: str, n_moe: int,
               prompt_len: int = 32) -> dict:
    cfg = engine.config
    g = torch.Generator(device="cuda").manual_seed(100 + batch)
    tokens = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g, device="cuda")
    engine.set_use_cuda_graph(True)
    logits = engine.prefill(tokens, [prompt_len] * batch)
    unit = engine.store.layout["bytes"]
    pos = prompt_len
    nxt = logits.argmax(-1)
    # warm-up: graph capture and the first steps
    for _ in range(3):
        logits = engine.decode_one_token(nxt, torch.full((batch,), pos, device="cuda"), pos + 1)
        nxt = logits.argmax(-1)
        pos += 1
    torch.cuda.synchronize()
    times, repeat_times = [], []
    moved = ssd = repeat_moved = 0
    d = None
    for _ in range(steps):
        p = torch.full((batch,), pos, device="cuda")
        e0 = counters(engine)["experts"]
        t0 = time.perf_counter()
        logits = engine.decode_one_token(nxt, p, pos + 1)
        nxt2 = logits.argmax(-1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        e1 = counters(engine)["experts"]
        # the same step again: every expert it needs is on the GPU now (stall = difference)
        t0 = time.perf_counter()
        engine.decode_one_token(nxt, p, pos + 1).argmax(-1)
        torch.cuda.synchronize()
        repeat_times.append(time.perf_counter() - t0)
        e2 = counters(engine)["experts"]
        step = delta(e0, e1)
        d = step if d is None else {k: d[k] + step[k] for k in d}
        moved += step["h2d_bytes"] + step["zero_copy_bytes"]
        ssd += step["ssd_bytes"]
        rep = delta(e1, e2)
        repeat_moved += rep["h2d_bytes"] + rep["zero_copy_bytes"]
        nxt = nxt2
        pos += 1
    step_ms = statistics.fmean(times) * 1e3
    rep_ms = statistics.fmean(repeat_times) * 1e3
    floor_ms = (moved / (h2d * 1e9) + ssd / (disk * 1e9)) * 1e3 / steps / n_moe
    moe_ms = step_ms / n_moe
    return {"phase": "decode", "batch": batch, "prompt_len": prompt_len, "variant": variant,
            "tok_s": batch / (step_ms * 1e-3), "step_ms": step_ms, "repeat_step_ms": rep_ms,
            "moe_layer_ms": moe_ms, "floor_ms": floor_ms, "ratio_to_floor": moe_ms / floor_ms if floor_ms else None,
            "hit_rate": d["gpu_hits"] / max(1, d["requests"]),
            "prefetch_accuracy": d["predicted_used"] / d["used_after_prediction"] if d["used_after_prediction"] else None,
            "stall_ms": step_ms - rep_ms, "h2d_mb_per_step": moved / steps / 1e6, "ssd_mb_per_step": ssd / steps / 1e6,
            "wasted_mb_per_step": d["prefetch_wasted"] * unit / steps / 1e6,
            "repeat_h2d_mb_per_step": repeat_moved / steps / 1e6,
            "zero_copy_units": d["zero_copy"], "copies": d["copies"], "disk_wait_ms": d["wait_ms"] / steps,
            "skipped_per_step": d["skipped"] / steps}


def prefill_row(engine, prompt_len: int, h2d: float, disk: float, n_moe: int) -> dict:
    cfg = engine.config
    g = torch.Generator(device="cuda").manual_seed(prompt_len)
    tokens = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g, device="cuda")
    engine.prefill(tokens[:, :64], [64])   # warm kernels
    torch.cuda.synchronize()
    e0 = counters(engine)["experts"]
    l0 = counters(engine)["layers"]
    t0 = time.perf_counter()
    engine.prefill(tokens, [prompt_len])
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    d = delta(e0, counters(engine)["experts"])
    moved = d["h2d_bytes"] + d["zero_copy_bytes"]
    floor_ms = (moved / (h2d * 1e9) + d["ssd_bytes"] / (disk * 1e9)) * 1e3 / n_moe
    moe_ms = ms / n_moe
    return {"phase": "prefill", "batch": 1, "prompt_len": prompt_len, "variant": "full",
            "tok_s": prompt_len / (ms * 1e-3), "moe_layer_ms": moe_ms, "floor_ms": floor_ms,
            "ratio_to_floor": moe_ms / floor_ms if floor_ms else None, "hit_rate": d["gpu_hits"] / max(1, d["requests"]),
            "prefetch_accuracy": d["predicted_used"] / d["used_after_prediction"] if d["used_after_prediction"] else None,
            "stall_ms": None, "h2d_gb": moved / 1e9, "experts_moved_per_layer": (d["copies"] + d["zero_copy"]) / n_moe}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--memory-limit", type=float, default=16.0)
    ap.add_argument("--ssd-cache", type=float, default=16.0)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--baseline-layers", type=int, default=1)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-ssd", action="store_true")
    ap.add_argument("--prompts", default="2048,8192")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    cfg = v3_config(args.layers)
    n_moe = args.layers
    t0 = time.perf_counter()
    gb = write_model(args.dir, cfg)
    print(f"model: {gb:.1f} GB on disk in {time.perf_counter() - t0:.0f} s", flush=True)
    dropped = drop_page_cache()
    copy = copy_bandwidth_gbs()
    h2d = h2d_gbs()
    disk = disk_gbs(args.dir)
    drop_page_cache()
    print(f"ceilings: h2d {h2d:.1f} GB/s, copy {copy:.0f} GB/s, disk {disk:.2f} GB/s (page cache dropped: {dropped})",
          flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "commit": commit(), "date": datetime.date.today().isoformat(),
              "h2d_gbs": h2d, "copy_gbs": copy, "disk_gbs": disk, "page_cache_dropped": dropped,
              "memory_limit_gb": args.memory_limit, "model_gb_on_disk": gb, "moe_layers": n_moe, "rows": []}

    if not args.skip_baseline:
        t0 = time.perf_counter()
        base = accelerate_moe_layer_ms(cfg, args.baseline_layers, args.memory_limit)
        result["accelerate"] = base
        result["accelerate_moe_layer_ms"] = base["moe_layer_ms"]
        print(f"accelerate: {base['moe_layer_ms']:.0f} ms per MoE layer per token ({time.perf_counter() - t0:.0f} s)",
              flush=True)

    kw = dict(device="cuda", memory_limit=args.memory_limit, max_batch_size=8,
              max_seq_len=max(int(p) for p in args.prompts.split(",")) + 128, prefill_chunk=2048, verbose=True)
    torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    eng = Engine.from_pretrained(args.dir, paging=dict(cpu_cache_size=float(cfg.n_routed_experts * n_moe * 24.78e6 / GiB + 0.5)),
                                 **kw)
    result["plan"] = eng.memory_plan.as_dict()
    # warm the host cache: every expert read once from disk
    import numpy as np
    ids = np.arange(cfg.n_routed_experts, dtype=np.int32)
    t1 = time.perf_counter()
    for i in range(n_moe):
        eng.store.experts.load_host(i, ids.ctypes.data, len(ids))
    warm_s = time.perf_counter() - t1
    result["host_warm_s"] = warm_s
    result["host_warm_gbs"] = cfg.n_routed_experts * n_moe * eng.store.layout["bytes"] / warm_s / 1e9
    print(f"engine loaded in {t1 - t0:.0f} s; host cache warmed in {warm_s:.0f} s "
          f"({result['host_warm_gbs']:.2f} GB/s from disk)", flush=True)

    rows = result["rows"]
    for b in (1, 8):
        rows.append(decode_row(eng, b, args.steps, h2d, disk, "full", n_moe))
        print(rows[-1], flush=True)
    for p in (int(x) for x in args.prompts.split(",")):
        rows.append(prefill_row(eng, p, h2d, disk, n_moe))
        print(rows[-1], flush=True)
    ablations = {"no_prefetch": dict(prefetch_layers=0), "prefetch_always": dict(prefetch_min_accuracy=0.0),
                 "lru": dict(cache_policy="lru"), "no_stream_priorities": dict(stream_priorities=False),
                 "zero_copy": dict(miss_mode="zero_copy"), "auto": dict(miss_mode="auto"),
                 "threshold_0.1": dict(expert_threshold=0.1)}
    keys = ("prefetch_layers", "prefetch_min_accuracy", "cache_policy", "stream_priorities", "miss_mode",
            "expert_threshold")
    default = {k: getattr(eng.paging, k) for k in keys}
    probe = torch.randint(0, cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    exact = eng.logits(probe)
    for name, change in ablations.items():
        eng.reconfigure_paging(**{**default, **change})
        rows.append(decode_row(eng, 1, args.steps, h2d, disk, name, n_moe))
        if "expert_threshold" in change:
            approx = eng.logits(probe)
            rows[-1]["logit_rel_err"] = ((approx - exact).norm() / exact.norm()).item()
            rows[-1]["top1_agree"] = (approx.argmax(-1) == exact.argmax(-1)).float().mean().item()
        print(rows[-1], flush=True)
    eng.reconfigure_paging(**default)
    torch.cuda.synchronize()
    result["peak_gpu_gb"] = (torch.cuda.max_memory_allocated() - base_alloc) / 1e9
    result["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    result["counters"] = {k: v for k, v in counters(eng).items() if k != "per_layer"}
    del eng
    gc.collect()
    torch.cuda.empty_cache()

    if not args.skip_ssd:
        drop_page_cache()
        eng = Engine.from_pretrained(args.dir, paging=dict(cpu_cache_size=args.ssd_cache), **kw)
        rows.append(decode_row(eng, 1, max(3, args.steps // 2), h2d, disk, "ssd", n_moe))
        print(rows[-1], flush=True)
        del eng
        gc.collect()

    full1 = next(r for r in rows if r["phase"] == "decode" and r["batch"] == 1 and r["variant"] == "full")
    if "accelerate_moe_layer_ms" in result:
        result["speedup_vs_accelerate"] = result["accelerate_moe_layer_ms"] / full1["moe_layer_ms"]
    out = args.out or Path(__file__).parent / "results" / f"paging_{gpu_slug()}.json"
    write_result(result, out)

    print(f"\nPaging, {n_moe} MoE layers ({gb:.0f} GB), memory_limit {args.memory_limit} GiB, "
          f"h2d {h2d:.1f} GB/s, disk {disk:.2f} GB/s")
    print(f"{'phase':8} {'batch':>5} {'prompt':>6} {'variant':>22} {'tok/s':>9} {'MoE ms':>8} {'floor':>8} "
          f"{'ratio':>6} {'hit':>5} {'pred':>5} {'stall':>7}")
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        print(f"{r['phase']:8} {r['batch']:>5} {r['prompt_len']:>6} {r['variant']:>22} {f(r['tok_s'], '9.2f')} "
              f"{f(r['moe_layer_ms'], '8.2f')} {f(r['floor_ms'], '8.2f')} {f(r['ratio_to_floor'], '6.2f')} "
              f"{f(r['hit_rate'], '5.2f')} {f(r['prefetch_accuracy'], '5.2f')} {f(r['stall_ms'], '7.2f')}")
    if "speedup_vs_accelerate" in result:
        print(f"accelerate: {result['accelerate_moe_layer_ms']:.0f} ms per MoE layer per token; paged "
              f"{full1['moe_layer_ms']:.2f} ms: {result['speedup_vs_accelerate']:.0f}x")
    print(f"peak GPU (engine) {result['peak_gpu_gb']:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
