"""Plugin fields built from real NVFP4 weights (shared by the CPU and GPU plugin tests)."""

from __future__ import annotations

import json
from typing import Dict, List, Tuple

import torch
from safetensors.torch import save_file

from deepseek_fp4_plugin import Fp4Weight
from deepseek_fp4_plugin._ext import _C
from trt_driver import Field, f32, i8, i32, i64, text


def gemm_weight(n: int, k: int, seed: int = 0, per_tile: bool = False) -> Fp4Weight:
    g = torch.Generator().manual_seed(seed)
    if per_tile:  # two parts with their own global scales: one scale per 16-row tile
        a = Fp4Weight.from_float(torch.randn(16 * (n // 32), k, generator=g) * 0.05)
        b = Fp4Weight.from_float(torch.randn(n - a.n, k, generator=g) * 0.5)
        return Fp4Weight.concat_rows([a, b])
    return Fp4Weight.from_float(torch.randn(n, k, generator=g) * 0.05)


def gemm_fields(w: Fp4Weight, weights_as_inputs: bool = False) -> Dict[str, Field]:
    f = {"n": i32(w.n), "k": i32(w.k)}
    if weights_as_inputs:
        f["weights_as_inputs"] = i32(1)
    else:
        f.update(qweight=i32(w.qweight.numpy()), qscale=i8(w.qscale.numpy()),
                 global_scale=f32(w.global_scale.reshape(-1).numpy()))
    return f


def routing_fields(e=16, g=4, tg=2, k=4, scale=2.5, norm=None) -> Dict[str, Field]:
    f = {"num_experts": i32(e), "n_group": i32(g), "topk_group": i32(tg), "top_k": i32(k),
         "routed_scaling_factor": f32(scale)}
    if norm is not None:
        f["norm_topk_prob"] = i32(norm)
    return f


class Experts:
    """E experts: gate_up [2I, H] (gate and up with their own global scales: per tile) and
    down [H, I], stacked like Fp4RoutedExperts; `modelopt` keeps the checkpoint tensors."""

    def __init__(self, e: int, hidden: int, inter: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.e, self.hidden, self.inter = e, hidden, inter
        gus, dns = [], []
        self.modelopt: List[List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []  # [e][gate, up, down]
        for i in range(e):
            q = [torch.ops.dsfp4.nvfp4_quantize(w) for w in (
                torch.randn(inter, hidden, generator=g) * 0.05 * (1 + i % 3),
                torch.randn(inter, hidden, generator=g) * 0.15,
                torch.randn(hidden, inter, generator=g) * 0.05)]
            self.modelopt.append(q)
            gate, up = Fp4Weight.from_modelopt(*q[0]), Fp4Weight.from_modelopt(*q[1])
            gus.append(Fp4Weight.concat_rows([gate, up]))
            dns.append(Fp4Weight.from_modelopt(*q[2]))
        tiles = -(-2 * inter // 16)
        self.gu_qw = torch.stack([w.qweight for w in gus])                                 # [E, words]
        self.gu_qs = torch.stack([w.qscale for w in gus])                                  # [E, bytes]
        self.gu_gs = torch.stack([w.global_scale.reshape(-1).expand(tiles) for w in gus]).contiguous()  # [E, tiles]
        self.dn_qw = torch.stack([w.qweight for w in dns])
        self.dn_qs = torch.stack([w.qscale for w in dns])
        self.dn_gs = torch.stack([w.global_scale.reshape(()) for w in dns])                # [E]

    def tensors(self) -> List[torch.Tensor]:
        return [self.gu_qw, self.gu_qs, self.gu_gs, self.dn_qw, self.dn_qs, self.dn_gs]

    def to(self, device) -> "Experts":
        for name in ("gu_qw", "gu_qs", "gu_gs", "dn_qw", "dn_qs", "dn_gs"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def base_fields(self, top_k: int, source: str) -> Dict[str, Field]:
        return {"num_experts": i32(self.e), "hidden": i32(self.hidden), "inter": i32(self.inter),
                "top_k": i32(top_k), "weight_source": text(source)}

    def fields(self, top_k: int) -> Dict[str, Field]:
        f = self.base_fields(top_k, "fields")
        c = lambda t: t.cpu().numpy()  # noqa: E731
        f.update(gate_up_qweight=i32(c(self.gu_qw)), gate_up_qscale=i8(c(self.gu_qs)),
                 gate_up_global_scale=f32(c(self.gu_gs)), down_qweight=i32(c(self.dn_qw)),
                 down_qscale=i8(c(self.dn_qs)), down_global_scale=f32(c(self.dn_gs)))
        return f

    def store_fields(self, top_k: int, handle: int, layer: int) -> Dict[str, Field]:
        f = self.base_fields(top_k, "store")
        f.update(store_handle=i64(handle), layer=i32(layer))
        return f

    def write_checkpoint(self, path, layer: int = 3) -> List[List[Tuple[int, int, int, str]]]:
        """Writes the experts as a ModelOpt NVFP4 safetensors file (the names of MoE layer
        `layer` of a DeepSeek-V3 checkpoint); returns, per expert, the 9 (file, offset, nbytes,
        name) ranges paging.ExpertStore reads: gate, up, down × weight, weight_scale, weight_scale_2."""
        tensors, names = {}, []
        for e, parts in enumerate(self.modelopt):
            for proj, (packed, scale, gs) in zip(("gate_proj", "up_proj", "down_proj"), parts):
                base = f"model.layers.{layer}.mlp.experts.{e}.{proj}."
                for suffix, t in (("weight", packed), ("weight_scale", scale), ("weight_scale_2", gs)):
                    tensors[base + suffix] = t.reshape(()) if suffix == "weight_scale_2" else t.contiguous()
                    names.append(base + suffix)
        save_file(tensors, str(path))
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        ranges = []
        for name in names:
            begin, end = header[name]["data_offsets"]
            ranges.append((0, 8 + n + begin, end - begin, name))
        return [ranges[9 * e:9 * e + 9] for e in range(self.e)]

    def reference(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The expert FFN composed from the torch ops (as the model runs it)."""
        t, k = ids.shape
        xp, offs, perm = torch.ops.dsfp4.moe_permute(x, ids, self.e)
        ge, go = torch.ops.dsfp4.moe_compact_groups(offs, min(self.e, t * k))
        gu = torch.ops.dsfp4.fp4_grouped_gemm(xp, go, ge, self.gu_qw, self.gu_qs, self.gu_gs, 2 * self.inter,
                                              self.hidden, t)
        h = torch.ops.dsfp4.silu_mul(gu)
        y = torch.ops.dsfp4.fp4_grouped_gemm(h, go, ge, self.dn_qw, self.dn_qs, self.dn_gs, self.hidden, self.inter, t)
        return torch.ops.dsfp4.moe_combine(y, perm, w, offs)


def expert_store(path, stored, ex: Experts, gpu_base: int, slots: int, host_slots: int, miss_mode: str,
                 on_device: bool):
    """A one-layer paging.ExpertStore over the checkpoint ex.write_checkpoint(path) wrote: `slots`
    expert slots at gpu_base (host memory when not on_device) and a host cache of host_slots units."""
    P = _C.paging
    opts = store_options(layers=1, experts=ex.e, hidden=ex.hidden, inter=ex.inter, gpu_slots=slots,
                         gpu_base=gpu_base, host_slots=host_slots, pinned=on_device, on_device=on_device,
                         gpu_policy=P.CachePolicy.lrfu, host_policy=P.CachePolicy.lru, lam=0.05,
                         miss_mode=getattr(P.MissMode, miss_mode), io_threads=2, repack_threads=1, direct_io=True,
                         async_copy=True, max_prefetch_units=-1, prefetch_min_accuracy=0.0)
    return P.ExpertStore(opts, P.CheckpointFiles([str(path)], True), stored)


def store_options(**fields):
    """paging.ExpertStoreOptions with the given fields (the rest keep their C++ defaults; an
    unknown field is an AttributeError)."""
    o = _C.paging.ExpertStoreOptions()
    for k, v in fields.items():
        setattr(o, k, v)
    return o


def shapes_of(ts) -> List[Tuple[int, ...]]:
    return [tuple(t.shape) for t in ts]
