"""Whole-model benchmark: a few DeepSeek-V3 layers at their real sizes, every weight resident.

The model has DeepSeek-V3's shapes (hidden 7168, MLA with q LoRA 1536 / kv LoRA 512 / 128
heads, 256 routed experts of 2048 + 1 shared, top-8 in 4 of 8 groups, vocab 129280, YaRN) but
only ``--layers`` layers, the first ``--dense-layers`` of them dense. Its NVFP4 tensors are
random packed bytes with random E4M3 block scales in [1, 4) and one global scale, generated
on the GPU and served by a StateDictCheckpoint (no files); attention, router and lm_head are
BF16 as in NVIDIA's DeepSeek-R1-FP4 (``--attention fp4`` quantizes attention too, ``--attention
fp8`` converts the BF16 attention to FP8 blocks at load, as the memory plan does when it must).

Measured, per batch size:
  prefill      tok/s of engine.prefill over batch × --prompt-len tokens
  decode       ms per decode_one_token step and tok/s, eager and replayed from a CUDA graph
               (steps stay inside one attended-length bucket, so no capture is timed)
  split        per layer and step: attention / routing / experts / shared expert / dense MLP,
               from CUDA events around each part of an eager step (profiling mode; host
               overhead included), and each part replayed from its own CUDA graph, against the
               MoE layer's HBM floor (bytes of the experts the step touched, at the copy rate
               measured in this run)

Medians of CUDA-event times after warm-up. Needs about 30 GB of GPU memory for 3 layers.

  python benchmarks/bench_model.py --layers 3 [--batch 1,4,16] [--prompt-len 512] [--steps 32]

Writes benchmarks/results/model_<gpu>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

import deepseek_fp4_plugin  # noqa: F401
from bench_common import commit, copy_bandwidth_gbs, gpu_slug, write_result
from deepseek_fp4_plugin import ops
from deepseek_fp4_plugin.checkpoint import StateDictCheckpoint
from deepseek_fp4_plugin.config import DeepseekV3Config, RopeScaling
from deepseek_fp4_plugin.engine import Engine
from deepseek_fp4_plugin.loader import linear_shapes, other_tensor_shapes
from deepseek_fp4_plugin.precision import PrecisionPolicy
from deepseek_fp4_plugin.resident import ResidentWeightStore
from deepseek_fp4_plugin.weights import run_host_points

SECTIONS = ("attention", "routing", "experts", "shared_expert", "dense_mlp", "lm_head")


# ---------------------------------------------------------------------------------------
# the model


def v3_config(layers: int, dense_layers: int) -> DeepseekV3Config:
    cfg = DeepseekV3Config(num_hidden_layers=layers, first_k_dense_replace=dense_layers,
                           max_position_embeddings=163840,
                           rope=RopeScaling(rope_type="yarn", theta=10000.0, factor=40.0,
                                            original_max_position_embeddings=4096, beta_fast=32.0,
                                            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))
    cfg.validate("bench_model")
    return cfg


def random_checkpoint(cfg: DeepseekV3Config, fp4_attention: bool, seed: int = 0,
                      dev: str = "cuda") -> StateDictCheckpoint:
    """Random tensors on the GPU in checkpoint form: NVFP4 (ModelOpt layout) for MLPs, experts
    (and attention with ``fp4_attention``), BF16 for the rest."""
    g = torch.Generator(device=dev).manual_seed(seed)
    # E2M1 codes are uniform over ±{0 … 6} (rms ≈ 2.9) and block scales uniform in [1, 4):
    # this global scale gives weights of rms ≈ 0.02
    global_scale = torch.tensor(0.02 / (2.9 * 2.5), dtype=torch.float32, device=dev)
    t = {}
    for name, shape in other_tensor_shapes(cfg).items():
        if name.endswith("e_score_correction_bias"):
            t[name] = torch.rand(shape, generator=g, device=dev) * 0.01
        elif name == "model.embed_tokens.weight":
            t[name] = (torch.randn(shape, generator=g, device=dev) * 0.5).to(torch.bfloat16)
        else:
            t[name] = (1 + 0.05 * torch.randn(shape, generator=g, device=dev)).to(torch.bfloat16)
    for module, (n, k) in linear_shapes(cfg).items():
        fp4 = ".mlp." in module and not module.endswith(".mlp.gate")
        fp4 = fp4 or (fp4_attention and ".self_attn." in module)
        if fp4:
            t[module + ".weight"] = torch.randint(0, 256, (n, k // 2), generator=g, device=dev,
                                                  dtype=torch.uint8)
            scale = torch.empty(n, k // 16, device=dev).uniform_(1.0, 4.0, generator=g)
            t[module + ".weight_scale"] = scale.to(torch.float8_e4m3fn)
            t[module + ".weight_scale_2"] = global_scale.clone()
        else:
            std = 0.02 if not module.endswith(".mlp.gate") else 0.05
            t[module + ".weight"] = (torch.randn(n, k, generator=g, device=dev) * std).to(torch.bfloat16)
    return StateDictCheckpoint(cfg, t)


# ---------------------------------------------------------------------------------------
# timing


class EventProfiler:
    """``model.profiler``: CUDA events around each section of the forward."""

    def __init__(self):
        self.records = []

    @contextmanager
    def section(self, name: str):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        try:
            yield
        finally:
            e.record()
            self.records.append((name, s, e))

    def totals_ms(self):
        torch.cuda.synchronize()
        out = defaultdict(float)
        for name, s, e in self.records:
            out[name] += s.elapsed_time(e)
        self.records.clear()
        return out


def timed(fn, reps: int, warmup: int = 2):
    """Median milliseconds of fn() by CUDA events, each call synchronised."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ms.append(s.elapsed_time(e))
    return statistics.median(ms)


def expert_bytes(cfg: DeepseekV3Config) -> int:
    """Tiled NVFP4 bytes of one routed expert (gate+up and down)."""
    gu = ops.tiled_sizes(2 * cfg.moe_intermediate_size, cfg.hidden_size)
    dn = ops.tiled_sizes(cfg.hidden_size, cfg.moe_intermediate_size)
    return gu[0] * 4 + gu[1] + dn[0] * 4 + dn[1]


def graph_ms(fn, reps: int = 20) -> float:
    """Median ms of fn captured alone in a CUDA graph and replayed (no host overhead)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = timed(graph.replay, reps)
    del graph
    return ms


@torch.inference_mode()
def graph_split(engine: Engine, batch: int, prompt_len: int, g: torch.Generator) -> dict:
    """Decode-step parts of one layer, each replayed from its own CUDA graph: what the step
    costs on the GPU once launch overhead is gone (the eager split includes the host)."""
    cfg, model, store = engine.config, engine.model, engine.store
    dev = engine.device
    h = (torch.randn(batch, 1, cfg.hidden_size, generator=g, device=dev) * 0.5).to(engine.dtype)
    positions = torch.full((batch, 1), prompt_len, dtype=torch.long, device=dev)
    out = {}
    moe_layer = next((i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)), None)
    layer = moe_layer if moe_layer is not None else 0
    w = store.acquire_layer(layer)
    out["attention_ms"] = graph_ms(lambda: model.attention(layer, w.attn, h, positions, engine.cache,
                                                           prompt_len + 1, True))
    if w.moe is not None:
        out["moe_layer_ms"] = graph_ms(lambda: run_host_points(model.moe(w.moe, h, layer), store))
        if w.moe.shared is not None:
            out["shared_expert_ms"] = graph_ms(lambda: model.mlp(w.moe.shared, h.view(batch, -1)))
    store.release_layer(layer)
    if cfg.first_k_dense_replace > 0:
        w0 = store.acquire_layer(0)
        out["dense_mlp_ms"] = graph_ms(lambda: model.mlp(w0.mlp, h))
        store.release_layer(0)
    out["lm_head_ms"] = graph_ms(lambda: model.logits(h))
    return out


def bench_batch(engine: Engine, batch: int, prompt_len: int, steps: int, reps: int, copy_bw: float) -> dict:
    cfg = engine.config
    dev = engine.device
    g = torch.Generator(device=dev).manual_seed(batch)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    n_dense = cfg.num_hidden_layers - n_moe
    row = {"batch": batch, "prompt_len": prompt_len, "decode_steps": steps}

    tokens = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g, device=dev)
    lengths = [prompt_len] * batch
    engine.set_use_cuda_graph(False)
    prefill_ms = timed(lambda: engine.prefill(tokens, lengths), reps=max(3, reps // 4), warmup=1)
    row.update(prefill_ms=prefill_ms, prefill_tok_s=batch * prompt_len / (prefill_ms * 1e-3))

    # decode: positions prompt_len … prompt_len + steps - 1 stay inside one attended-length bucket
    feed = [torch.randint(0, cfg.vocab_size, (batch,), generator=g, device=dev) for _ in range(steps)]
    pos = [torch.full((batch,), prompt_len + i, dtype=torch.long, device=dev) for i in range(steps)]

    def decode_run():
        for i in range(steps):
            engine.decode_one_token(feed[i], pos[i], prompt_len + i + 1)

    for mode in ("eager", "graph"):
        engine.set_use_cuda_graph(mode == "graph")
        run_ms = timed(decode_run, reps=max(3, reps // 8), warmup=1)
        row[f"decode_{mode}_ms"] = run_ms / steps
        row[f"decode_{mode}_tok_s"] = batch / (run_ms / steps * 1e-3)
    engine.set_use_cuda_graph(False)

    # split by CUDA events in an eager step and in prefill
    prof = EventProfiler()
    engine.model.profiler = prof
    engine.model.routing_trace = []
    for i in range(3):
        engine.decode_one_token(feed[i], pos[i], prompt_len + i + 1)
    trace = [ids for layer, ids in engine.model.routing_trace[-n_moe:]] if n_moe else []
    engine.model.routing_trace = None
    dec = {k: v / 3 for k, v in prof.totals_ms().items()}
    engine.prefill(tokens, lengths)
    pre = prof.totals_ms()
    engine.model.profiler = None
    def per_layer(totals):
        return {
            "attention_ms": totals.get("attention", 0.0) / cfg.num_hidden_layers,
            "routing_ms": totals.get("routing", 0.0) / max(n_moe, 1),
            "experts_ms": totals.get("experts", 0.0) / max(n_moe, 1),
            "shared_expert_ms": totals.get("shared_expert", 0.0) / max(n_moe, 1),
            "dense_mlp_ms": totals.get("dense_mlp", 0.0) / max(n_dense, 1),
            "lm_head_ms": totals.get("lm_head", 0.0),
        }

    row["decode_split_per_layer"] = per_layer(dec)
    row["prefill_split_per_layer"] = per_layer(pre)
    row["decode_split_graph"] = graph_split(engine, batch, prompt_len, g)
    if trace:
        distinct = statistics.mean(int(torch.unique(ids).numel()) for ids in trace)
        moe_bytes = (distinct + cfg.n_shared_experts) * expert_bytes(cfg)
        floor_ms = moe_bytes / (copy_bw * 1e9) * 1e3
        split = row["decode_split_per_layer"]
        moe_ms = split["routing_ms"] + split["experts_ms"] + split["shared_expert_ms"]
        row.update(distinct_experts_per_layer=distinct, moe_layer_bytes=moe_bytes,
                   moe_layer_floor_ms=floor_ms, moe_layer_ms=moe_ms, moe_layer_vs_floor=moe_ms / floor_ms)
        gms = row["decode_split_graph"].get("moe_layer_ms")
        if gms:
            row["moe_layer_graph_vs_floor"] = gms / floor_ms
    print(f"batch {batch:3d}: prefill {row['prefill_tok_s']:9.0f} tok/s | decode eager "
          f"{row['decode_eager_ms']:7.2f} ms  graph {row['decode_graph_ms']:7.2f} ms "
          f"({row['decode_graph_tok_s']:8.1f} tok/s)", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3, help="decoder layers (default 3)")
    ap.add_argument("--dense-layers", type=int, default=1, help="leading dense layers (default 1)")
    ap.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per sequence (default 512)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed run (default 32)")
    ap.add_argument("--reps", type=int, default=24)
    ap.add_argument("--attention", choices=["bf16", "fp4", "fp8"], default="bf16", help="attention weights")
    ap.add_argument("--out", default=None, help="output JSON (default benchmarks/results/model_<gpu>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_model: needs a CUDA GPU", file=sys.stderr)
        return 2
    if not 1 <= args.dense_layers < args.layers:
        print("bench_model: need 1 <= --dense-layers < --layers (at least one dense and one MoE layer)",
              file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batch.split(",") if b]
    if args.prompt_len < 1 or args.steps < 3 or any(b < 1 for b in batches):
        print("bench_model: --prompt-len, --steps (>= 3) and batch sizes must be positive", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    copy_bw = copy_bandwidth_gbs()
    cfg = v3_config(args.layers, args.dense_layers)
    t0 = datetime.datetime.now()
    source = random_checkpoint(cfg, args.attention == "fp4")
    policy = PrecisionPolicy().with_fp8("attention") if args.attention == "fp8" else None
    store = ResidentWeightStore(source, "cuda", torch.bfloat16, policy)
    del source
    torch.cuda.empty_cache()
    load_s = (datetime.datetime.now() - t0).total_seconds()
    engine = Engine(store, None, max_seq_len=args.prompt_len + args.steps + 1, max_batch_size=max(batches),
                    prefill_chunk=max(args.prompt_len, 1))
    mem = store.memory_report()
    print(f"{torch.cuda.get_device_name()}: copy {copy_bw:.0f} GB/s; {args.layers} layers "
          f"({args.dense_layers} dense) built in {load_s:.1f} s, weights {mem['total'] / 2**30:.2f} GiB",
          flush=True)

    rows = []
    with torch.inference_mode():
        for b in batches:
            rows.append(bench_batch(engine, b, args.prompt_len, args.steps, args.reps, copy_bw))
            torch.cuda.empty_cache()
    result = {
        "gpu": torch.cuda.get_device_name(),
        "driver": torch.version.cuda,
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bw_gbs": copy_bw,
        "model": {"layers": cfg.num_hidden_layers, "dense_layers": cfg.first_k_dense_replace,
                  "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads, "q_lora": cfg.q_lora_rank,
                  "kv_lora": cfg.kv_lora_rank, "routed_experts": cfg.n_routed_experts,
                  "experts_per_token": cfg.num_experts_per_tok, "expert_inter": cfg.moe_intermediate_size,
                  "dense_inter": cfg.intermediate_size, "vocab": cfg.vocab_size, "attention": args.attention},
        "weights_bytes": mem,
        "max_memory_allocated": torch.cuda.max_memory_allocated(),
        "timing": "CUDA events, medians after warm-up; decode = decode_one_token (model step incl. lm_head, "
                  "no sampling); decode_split_per_layer from events around each part of eager steps (host "
                  "overhead included); decode_split_graph from each part replayed from its own CUDA graph",
        "rows": rows,
    }
    out = write_result(result, Path(args.out) if args.out else
                       Path(__file__).parent / "results" / f"model_{gpu_slug()}.json")
    print(f"\nwrote {out}")
    print(f"{'batch':>5s} {'prefill tok/s':>13s} {'eager ms':>9s} {'graph ms':>9s} {'graph tok/s':>11s} "
          f"{'attn ms':>8s} {'route ms':>8s} {'experts ms':>10s} {'shared ms':>9s} {'moe/floor':>9s}")
    for r in rows:
        s = r["decode_split_per_layer"]
        vs_floor = r.get("moe_layer_vs_floor", float("nan"))
        print(f"{r['batch']:5d} {r['prefill_tok_s']:13.0f} {r['decode_eager_ms']:9.2f} "
              f"{r['decode_graph_ms']:9.2f} {r['decode_graph_tok_s']:11.1f} {s['attention_ms']:8.3f} "
              f"{s['routing_ms']:8.3f} {s['experts_ms']:10.3f} {s['shared_expert_ms']:9.3f} {vs_floor:9.2f}")
    print("\ndecode parts replayed from their own CUDA graphs (ms per layer; no host overhead)")
    print(f"{'batch':>5s} {'attention':>9s} {'moe layer':>9s} {'shared':>8s} {'dense mlp':>9s} {'lm_head':>8s} "
          f"{'moe floor':>9s} {'moe/floor':>9s}")
    for r in rows:
        gs = r["decode_split_graph"]
        print(f"{r['batch']:5d} {gs.get('attention_ms', float('nan')):9.3f} {gs.get('moe_layer_ms', float('nan')):9.3f} "
              f"{gs.get('shared_expert_ms', float('nan')):8.3f} {gs.get('dense_mlp_ms', float('nan')):9.3f} "
              f"{gs.get('lm_head_ms', float('nan')):8.3f} {r.get('moe_layer_floor_ms', float('nan')):9.3f} "
              f"{r.get('moe_layer_graph_vs_floor', float('nan')):9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
