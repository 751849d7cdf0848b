"""Routing replay: routed expert ids taken from a trace instead of the router.

For benchmarks and tests only, and off unless asked for (``Engine.set_routing_replay``). Random
weights route nearly uniformly, which says nothing about caches; a trace with the popularity and
token-to-token reuse of real routing (routing_replay.py derives one from public data) makes hit
rates, policies and floors mean something. Everything else runs as usual: the router still runs
(its top-k weights are kept, paired with the replayed ids), and the next layer's prediction
still comes from the router, so prediction accuracy under replay measures nothing real.

A decode step s uses ``decode[s % steps]`` (row b of the batch: ``[..., b % batch, :]``); a
prompt token at position p of batch row b uses ``prefill[:, (p + 7919·b) % tokens]``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor


class RoutingReplay:
    """Replays routed expert ids.

    Parameters
    ----------
    decode : int32 [steps, moe_layers, batch, top_k] expert ids of decode steps
    prefill : int32 [moe_layers, tokens, top_k] expert ids of prompt tokens (None: prompts use
        the decode trace, one token per step)
    """

    def __init__(self, decode: np.ndarray, prefill: Optional[np.ndarray] = None):
        decode = np.asarray(decode)
        if decode.ndim != 4 or decode.dtype.kind not in "iu" or decode.size == 0:
            raise ValueError(f"decode must be an integer array [steps, moe_layers, batch, top_k], got "
                             f"{decode.dtype} {decode.shape}")
        if prefill is not None:
            prefill = np.asarray(prefill)
            if prefill.ndim != 3 or prefill.dtype.kind not in "iu" or prefill.shape[1] == 0:
                raise ValueError(f"prefill must be an integer array [moe_layers, tokens, top_k], got "
                                 f"{prefill.dtype} {prefill.shape}")
            if prefill.shape[0] != decode.shape[1] or prefill.shape[2] != decode.shape[3]:
                raise ValueError(f"prefill {prefill.shape} and decode {decode.shape} disagree on layers or top_k")
        else:
            s, L, b, k = decode.shape
            prefill = decode.transpose(1, 0, 2, 3).reshape(L, s * b, k)
        self.decode = decode.astype(np.int32)
        self.prefill = prefill.astype(np.int32)
        self.step = 0
        self.decoding = False
        self._buf: Optional[Tensor] = None      # [moe_layers, rows, top_k] of the current decode step
        self._prefill_dev: Optional[Tensor] = None

    @property
    def moe_layers(self) -> int:
        return self.decode.shape[1]

    @property
    def top_k(self) -> int:
        return self.decode.shape[3]

    def bind(self, config, device: torch.device, max_rows: int) -> None:
        """Checks the trace against the model and allocates the step buffer (static: captured
        CUDA graphs read it)."""
        n_moe = sum(1 for layer in range(config.num_hidden_layers) if config.is_moe_layer(layer))
        if self.moe_layers != n_moe:
            raise ValueError(f"routing replay: the trace has {self.moe_layers} MoE layers, the model {n_moe}")
        if self.top_k != config.num_experts_per_tok:
            raise ValueError(f"routing replay: the trace routes top-{self.top_k}, the model top-"
                             f"{config.num_experts_per_tok}")
        E = config.n_routed_experts
        for name, a in (("decode", self.decode), ("prefill", self.prefill)):
            if a.min() < 0 or a.max() >= E:
                raise ValueError(f"routing replay: {name} ids must lie in [0, {E})")
        self._buf = torch.zeros(self.moe_layers, max_rows, self.top_k, dtype=torch.int32, device=device)
        self._prefill_dev = torch.from_numpy(self.prefill).to(device)
        self.step = 0

    def begin_decode(self, rows: int) -> None:
        """The next forward is decode step ``self.step`` over ``rows`` sequences."""
        s = self.decode[self.step % self.decode.shape[0]]                          # [L, batch, K]
        rows_idx = np.arange(rows) % s.shape[1]
        host = torch.from_numpy(np.ascontiguousarray(s[:, rows_idx]))
        self._buf[:, :rows].copy_(host, non_blocking=False)
        self.step += 1
        self.decoding = True

    def begin_prefill(self) -> None:
        self.decoding = False

    def ids(self, moe_index: int, positions: Tensor) -> Tensor:
        """int32 [N, K] expert ids for the N = B·T tokens of ``positions`` [B, T]."""
        B, T = positions.shape
        if self.decoding:
            return self._buf[moe_index, : B * T]
        tokens = self._prefill_dev.shape[1]
        rows = torch.arange(B, device=positions.device)[:, None] * 7919
        idx = ((positions + rows) % tokens).reshape(-1)                              # [N]
        return self._prefill_dev[moe_index].index_select(0, idx)
