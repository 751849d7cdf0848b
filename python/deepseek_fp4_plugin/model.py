"""The DeepSeek-V3 forward, in one file.

    tokens → embed → N × [RMSNorm → MLA attention → + residual,
                          RMSNorm → dense MLP | MoE (routed experts + shared expert) → + residual]
           → RMSNorm → lm_head → logits

Every weight comes from a ``WeightStore`` (weights.py), one layer at a time, so the same forward
runs with everything resident or paged. Shapes use B batch, T new tokens, S cached tokens,
D hidden, H heads, C kv_lora_rank, R qk_rope_head_dim, Dn qk_nope_head_dim, Dv v_head_dim,
E routed experts, K experts per token, I expert intermediate size, V vocab.

MLA keeps one compressed latent per token in the KV cache: [C + R] = the normalised kv_a output
(shared by all heads) and the roped key part. Two equivalent ways to attend over it:
  naive (prefill)     expand the latents through kv_b_proj into per-head keys and values
  absorbed (decode)   fold kv_b_proj into the query and the output (q·W_ukᵀ, then ·W_uv), so the
                      cache is read once per step in its compressed form
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Generator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import moe_ops  # noqa: F401  (registers torch.ops.dsfp4 MoE ops)
from .config import DeepseekV3Config
from .weights import AttentionWeights, HostPoint, MlpWeights, MoeWeights, WeightStore, run_host_points

# q_a_layernorm and kv_a_layernorm use the RMSNorm default, not config.rms_norm_eps
LATENT_NORM_EPS = 1e-6


def rms_norm(x: Tensor, weight: Tensor, eps: float, dtype: Optional[torch.dtype] = None) -> Tensor:
    """x [..., d] · rsqrt(mean(x²) + eps) · weight, computed in float32, returned in ``dtype``
    (default x's dtype)."""
    dtype = dtype or x.dtype
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(dtype)).to(dtype)


# ---------------------------------------------------------------------------------------
# rotary embedding (default or YaRN)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class Rope:
    """Rotary embedding of the R rope dims, tables for positions [0, max_positions).

    YaRN (``rope_type == "yarn"``): frequencies blend interpolation (÷ factor) and extrapolation
    with a linear ramp between the dims that rotate ``beta_fast`` and ``beta_slow`` times over
    the original context; cos/sin carry the attention factor mscale(factor, mscale) /
    mscale(factor, mscale_all_dim) (mscale(factor) when either is unset).
    With ``rope_interleave`` the rotated pairs are (x0, x1), (x2, x3), …; otherwise
    (x_i, x_{i+R/2}). Either way the output is laid out [first of each pair | second of each
    pair] — q and k get the same layout, so their dot product is the rotated one.
    """

    def __init__(self, config: DeepseekV3Config, device: torch.device,
                 max_positions: Optional[int] = None):
        r = config.rope
        dim = config.qk_rope_head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim          # [R/2]
        attention_factor = 1.0
        if r.rope_type == "yarn":
            orig = r.original_max_position_embeddings or config.max_position_embeddings
            beta_fast, beta_slow = r.beta_fast or 32.0, r.beta_slow or 1.0

            def correction_dim(rotations: float) -> float:
                return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(r.theta))

            low = max(math.floor(correction_dim(beta_fast)), 0)
            high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
            if low == high:
                high += 0.001
            ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)
            ramp = ramp.clamp(0, 1)                                             # [R/2]
            pos_freqs = r.theta ** exponents
            extrapolate = 1 - ramp
            inv_freq = (1.0 / (r.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
            if r.mscale and r.mscale_all_dim:
                attention_factor = yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim)
            else:
                attention_factor = yarn_mscale(r.factor)
        else:
            inv_freq = 1.0 / (r.theta ** exponents)                             # [R/2]
        n = max_positions or config.max_position_embeddings
        freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq        # [P, R/2]
        self.cos = (freqs.cos() * attention_factor).to(device)                  # [P, R/2] f32
        self.sin = (freqs.sin() * attention_factor).to(device)                  # [P, R/2] f32
        self.interleave = config.rope_interleave
        self.max_positions = n

    def __call__(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [B, T, R] or [B, T, H, R], positions [B, T] → rotated, same shape and dtype."""
        cos, sin = self.cos[positions], self.sin[positions]                     # [B, T, R/2]
        if x.dim() == 4:
            cos, sin = cos[:, :, None], sin[:, :, None]                         # [B, T, 1, R/2]
        xf = x.float()
        if self.interleave:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]                               # [..., R/2] each
        else:
            x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def softmax_scale(config: DeepseekV3Config) -> float:
    """1/sqrt(Dn + R), times mscale(factor, mscale_all_dim)² under YaRN."""
    scale = config.qk_head_dim ** -0.5
    r = config.rope
    if r.rope_type != "default" and r.mscale_all_dim:
        m = yarn_mscale(r.factor, r.mscale_all_dim)
        scale = scale * m * m
    return scale


# ---------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Compressed MLA cache: kv [L, B, S_max, C + R], slot s holds position s of each sequence.

    Each sequence writes its tokens at their positions, so sequences of different lengths share
    one batch without shifting; attention masks keys by position (key ≤ query).
    """

    def __init__(self, config: DeepseekV3Config, batch: int, max_len: int, device: torch.device,
                 dtype: torch.dtype):
        dim = config.kv_lora_rank + config.qk_rope_head_dim
        self.kv = torch.zeros(config.num_hidden_layers, batch, max_len, dim, dtype=dtype, device=device)
        self.batch, self.max_len = batch, max_len
        self._rows = torch.arange(batch, device=device)[:, None]                          # [B, 1]

    def write(self, layer: int, positions: Tensor, latent: Tensor) -> None:
        """latent [b, T, C+R] of positions [b, T] into rows 0..b-1."""
        b = latent.shape[0]
        self.kv[layer][self._rows[:b], positions] = latent

    def read(self, layer: int, batch: int, kv_len: int) -> Tensor:
        """[b, kv_len, C+R] view of the first ``batch`` sequences."""
        return self.kv[layer, :batch, :kv_len]

    def rows(self, rows: Sequence[int]) -> "KVCacheRows":
        """The cache seen through rows ``rows`` (sequence b of a forward ↔ cache row rows[b]),
        so a prefill can fill free rows while other rows hold live sequences."""
        return KVCacheRows(self, rows)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @staticmethod
    def bytes_for(config: DeepseekV3Config, batch: int, max_len: int, element_size: int) -> int:
        dim = config.kv_lora_rank + config.qk_rope_head_dim
        return config.num_hidden_layers * batch * max_len * dim * element_size


class KVCacheRows:
    """A KVCache restricted to some of its rows, with the KVCache write / read interface."""

    def __init__(self, cache: KVCache, rows: Sequence[int]):
        rows = list(rows)
        if not rows or len(set(rows)) != len(rows) or not all(0 <= r < cache.batch for r in rows):
            raise ValueError(f"rows must be distinct cache rows in [0, {cache.batch}), got {rows!r}")
        self.cache, self.batch, self.max_len = cache, len(rows), cache.max_len
        # consecutive rows read as a view; others gather (a copy of the rows read)
        self._span = rows[0] if rows == list(range(rows[0], rows[0] + len(rows))) else None
        self._rows = torch.tensor(rows, device=cache.kv.device)[:, None]                 # [b, 1]

    def write(self, layer: int, positions: Tensor, latent: Tensor) -> None:
        """latent [b, T, C+R] of positions [b, T] into rows rows[0..b-1]."""
        b = latent.shape[0]
        self.cache.kv[layer][self._rows[:b], positions] = latent

    def read(self, layer: int, batch: int, kv_len: int) -> Tensor:
        """[b, kv_len, C+R] of rows rows[0..batch-1]."""
        if self._span is not None:
            return self.cache.kv[layer, self._span:self._span + batch, :kv_len]
        return self.cache.kv[layer][self._rows[:batch, 0], :kv_len]


# ---------------------------------------------------------------------------------------
# the model


class DeepseekV3:
    """The forward pass over weights held by ``store``.

    ``profiler``: None, or an object with ``section(name)`` returning a context manager; the
    forward wraps attention, routing, experts, shared expert, dense MLP and lm_head in it.
    ``routing_trace``: None, or a list to which every MoE layer appends (layer, expert ids
    int32 [N, K]) — for measuring expert reuse and prefetch accuracy, and for tests.
    """

    def __init__(self, store: WeightStore, max_positions: Optional[int] = None):
        self.store = store
        self.config = c = store.config
        self.device, self.dtype = store.device, store.compute_dtype
        self.rope = Rope(c, self.device, max_positions)
        self.softmax_scale = softmax_scale(c)
        self.profiler = None
        self.routing_trace: Optional[list] = None
        self.routing_replay = None   # replay.RoutingReplay: routed ids from a trace (benchmarks, tests)
        self._moe_index = {layer: i for i, layer in enumerate(
            layer for layer in range(c.num_hidden_layers) if c.is_moe_layer(layer))}
        # dimension names used in the shape comments
        self.H, self.C, self.R = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
        self.Dn, self.Dv = c.qk_nope_head_dim, c.v_head_dim

    def _section(self, name: str):
        return nullcontext() if self.profiler is None else self.profiler.section(name)

    # ---- full model ----------------------------------------------------------------------
    def forward(self, tokens: Tensor, positions: Tensor, cache: Optional[KVCache] = None,
                kv_len: Optional[int] = None, absorbed: bool = False, causal: bool = False) -> Tensor:
        """Hidden states after the final norm.

        Parameters
        ----------
        tokens : int64 [B, T]
        positions : int64 [B, T], position of each token (its cache slot)
        cache : KVCache written at ``positions``; None attends over ``tokens`` only
        kv_len : with a cache, attend over slots [0, kv_len) (≥ max position + 1)
        absorbed : attend in the absorbed form (decode) instead of the naive one (prefill)
        causal : the caller promises that every row's positions are 0..T-1 and the keys are
            exactly those T tokens, so the mask is the plain causal one (lets the naive form use
            a fused causal attention kernel instead of a materialised mask)

        Returns
        -------
        Tensor [B, T, D] in the compute dtype
        """
        return run_host_points(self.forward_steps(tokens, positions, cache, kv_len, absorbed, causal), self.store)

    def forward_steps(self, tokens: Tensor, positions: Tensor, cache: Optional[KVCache] = None,
                      kv_len: Optional[int] = None, absorbed: bool = False, causal: bool = False
                      ) -> Generator[HostPoint, None, Tensor]:
        """``forward`` as a generator: yields the store's host points (weights.HostPoint; none
        for a resident store) and returns the hidden states. Between two points everything is
        GPU work, so each stretch can be captured in a CUDA graph."""
        store, dt, eps = self.store, self.dtype, self.config.rms_norm_eps
        # the residual stream stays in float32: 61 layers of bf16 rounding would add up
        x = store.embedding()[tokens].float()                                   # [B, T, D] f32
        for layer in range(self.config.num_hidden_layers):
            x = yield from self.layer_steps(layer, x, positions, cache, kv_len, absorbed, causal)
        return rms_norm(x, store.final_norm(), eps, dt)                         # [B, T, D]

    def layer_steps(self, layer: int, x: Tensor, positions: Tensor, cache: Optional[KVCache],
                    kv_len: Optional[int], absorbed: bool, causal: bool) -> Generator[HostPoint, None, Tensor]:
        """One decoder layer on the float32 residual x [B, T, D] (a generator, as forward_steps)."""
        store, dt, eps = self.store, self.dtype, self.config.rms_norm_eps
        yield from store.layer_points(layer)
        w = store.acquire_layer(layer)
        if layer + 1 < self.config.num_hidden_layers:
            store.prefetch(layer + 1)
        with self._section("attention"):
            h = rms_norm(x, w.input_norm, eps, dt)                              # [B, T, D]
            x = x + self.attention(layer, w.attn, h, positions, cache, kv_len, absorbed, causal)
        h = rms_norm(x, w.post_attention_norm, eps, dt)                         # [B, T, D]
        if w.moe is None:
            with self._section("dense_mlp"):
                x = x + self.mlp(w.mlp, h)
        else:
            x = x + (yield from self.moe(w.moe, h, layer, positions))
        store.release_layer(layer)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., D] → float32 logits [..., V]."""
        with self._section("lm_head"):
            return self.store.lm_head()(hidden).float()

    # ---- MLA attention -------------------------------------------------------------------
    def attention(self, layer: int, w: AttentionWeights, x: Tensor, positions: Tensor,
                  cache: Optional[KVCache], kv_len: Optional[int], absorbed: bool,
                  causal: bool = False) -> Tensor:
        """x [B, T, D] → [B, T, D]; writes the T latents to ``cache`` when given."""
        H, C, R, Dn, Dv = self.H, self.C, self.R, self.Dn, self.Dv
        B, T, _ = x.shape

        if w.qkv_a is not None:   # q LoRA: q_a and kv_a read the same x, one fused GEMM
            q_lat, kv_lat = w.qkv_a(x).split([self.config.q_lora_rank, C + R], dim=-1)
            q = w.q_b(rms_norm(q_lat, w.q_a_norm, LATENT_NORM_EPS))            # [B, T, H·(Dn+R)]
        else:
            q, kv_lat = w.q(x), w.kv_a(x)                                       # [B, T, H·(Dn+R)]
        q_nope, q_rope = q.view(B, T, H, Dn + R).split([Dn, R], dim=-1)        # [B, T, H, Dn | R]
        q_rope = self.rope(q_rope, positions)                                   # [B, T, H, R]

        kv_c, k_rope = kv_lat.split([C, R], dim=-1)                             # [B, T, C], [B, T, R]
        kv_c = rms_norm(kv_c, w.kv_a_norm, LATENT_NORM_EPS)                     # [B, T, C]
        latent = torch.cat([kv_c, self.rope(k_rope, positions)], dim=-1)        # [B, T, C+R]
        latent = latent.to(self.dtype)

        if cache is not None:
            cache.write(layer, positions, latent)
            latent = cache.read(layer, B, kv_len)                               # [B, S, C+R]
            key_pos = torch.arange(kv_len, device=x.device).expand(B, kv_len)   # [B, S]
        else:
            key_pos = positions                                                 # [B, S=T]
        # a key is visible to a query when its position is not later (keys are never padding:
        # every slot up to a query's position holds that sequence's own token)
        mask = None
        if absorbed or not causal:
            mask = key_pos[:, None, :] <= positions[:, :, None]                 # [B, T, S] bool

        if absorbed:
            out = self._attend_absorbed(w, q_nope, q_rope, latent, mask)        # [B, T, H, Dv]
        else:
            out = self._attend_naive(w, q_nope, q_rope, latent, mask)           # [B, T, H, Dv]
        return w.o(out.reshape(B, T, H * Dv))                                   # [B, T, D]

    def _attend_naive(self, w: AttentionWeights, q_nope: Tensor, q_rope: Tensor, latent: Tensor,
                      mask: Optional[Tensor]) -> Tensor:
        """Expands the latents into per-head keys and values. mask None: plain causal (T == S)."""
        H, C, R, Dn, Dv = self.H, self.C, self.R, self.Dn, self.Dv
        B, S, _ = latent.shape
        kv = w.kv_b(latent[..., :C]).view(B, S, H, Dn + Dv)                     # [B, S, H, Dn+Dv]
        k_nope, v = kv.split([Dn, Dv], dim=-1)                                  # [B, S, H, Dn | Dv]
        k_rope = latent[..., None, C:].expand(B, S, H, R).to(k_nope.dtype)      # [B, S, H, R] shared
        k = torch.cat([k_nope, k_rope], dim=-1)                                 # [B, S, H, Dn+R]
        q = torch.cat([q_nope, q_rope], dim=-1).to(k.dtype)                     # [B, T, H, Dn+R]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)       # heads first
        if mask is None:
            # fused causal kernels want one head size for q, k and v: zero-pad v (exact)
            v = F.pad(v, (0, Dn + R - Dv))                                      # [B, H, S, Dn+R]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
            out = out[..., :Dv]                                                 # [B, H, T, Dv]
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                                 scale=self.softmax_scale)      # [B, H, T, Dv]
        return out.transpose(1, 2)                                              # [B, T, H, Dv]

    def _attend_absorbed(self, w: AttentionWeights, q_nope: Tensor, q_rope: Tensor, latent: Tensor,
                         mask: Tensor) -> Tensor:
        """Attends in the latent space: W_uk folded into q, W_uv applied after (per-head FP8
        GEMMs when kv_b is FP8: w_uk / w_uv are then None)."""
        C = self.C
        fp8 = w.w_uk is None
        dt = self.dtype if fp8 else w.w_uk.dtype
        kv_c, k_rope = latent[..., :C].to(dt), latent[..., C:].to(dt)           # [B, S, C], [B, S, R]
        if fp8:
            q_c = w.kv_b.q_to_latent(q_nope).to(dt)                             # [B, T, H, C]
        else:
            q_c = torch.einsum("bthd,hdc->bthc", q_nope.to(dt), w.w_uk)         # [B, T, H, C]
        scores = (torch.einsum("bthc,bsc->bths", q_c, kv_c)
                  + torch.einsum("bthr,bsr->bths", q_rope.to(dt), k_rope))      # [B, T, H, S]
        scores = scores.float() * self.softmax_scale
        scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
        p = scores.softmax(dim=-1).to(dt)                                       # [B, T, H, S]
        o_c = torch.einsum("bths,bsc->bthc", p, kv_c)                           # [B, T, H, C]
        if fp8:
            return w.kv_b.latent_to_v(o_c)                                      # [B, T, H, Dv]
        return torch.einsum("bthc,hvc->bthv", o_c, w.w_uv)                      # [B, T, H, Dv]

    # ---- feed-forward --------------------------------------------------------------------
    def mlp(self, w: MlpWeights, x: Tensor) -> Tensor:
        """SiLU-gated MLP, x [..., D] → [..., D]."""
        gate_up = w.gate_up(x)                                                  # [..., 2I]
        h = torch.ops.dsfp4.silu_mul(gate_up.reshape(-1, gate_up.shape[-1]))    # [N, I]
        return w.down(h).view(x.shape).to(x.dtype)                              # [..., D]

    def moe(self, w: MoeWeights, x: Tensor, layer: int = -1, positions: Optional[Tensor] = None
            ) -> Generator[HostPoint, None, Tensor]:
        """Routed experts (noaux_tc top-K of E) + shared expert, x [B, T, D] → [B, T, D].
        A generator: paged experts yield a host point after routing (see forward_steps)."""
        c = self.config
        xt = x.reshape(-1, x.shape[-1])                                         # [N, D]
        n_tok = xt.shape[0]
        with self._section("routing"):
            router_logits = F.linear(xt.float(), w.router)                      # [N, E] f32
            weights, ids = torch.ops.dsfp4.moe_route(
                router_logits, w.correction_bias, c.num_experts_per_tok, c.n_group, c.topk_group,
                c.routed_scaling_factor, c.norm_topk_prob)                      # [N, K] f32, [N, K] i32
            if self.routing_replay is not None and positions is not None:
                ids = self.routing_replay.ids(self._moe_index[layer], positions)   # [N, K] i32 from a trace
            weights, ids, point = w.experts.route_point(layer, xt, weights, ids)
        shared = None
        if w.shared is not None:   # independent of the routing: runs while the host resolves it
            with self._section("shared_expert"):
                shared = self.mlp(w.shared, xt)                                 # [N, D]
        if point is not None:
            yield point                           # the host makes the selected experts readable
        with self._section("routing"):
            # rows grouped by expert: x_perm [N·K, D], offsets [E+1], perm [N·K]
            x_perm, offsets, perm = torch.ops.dsfp4.moe_permute(xt, ids, c.n_routed_experts)
        if self.routing_trace is not None:
            self.routing_trace.append((layer, ids))
        with self._section("experts"):
            y_perm = w.experts.run(x_perm, offsets, n_tok)                      # [N·K, D]
            y = torch.ops.dsfp4.moe_combine(y_perm, perm, weights, offsets)     # [N, D]
            y = y.to(x.dtype)
        if shared is not None:
            y = y + shared                                                      # [N, D]
        return y.view(x.shape)                                                  # [B, T, D]
