"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), seeded per sequence."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    Parameters
    ----------
    temperature : 0 picks the most likely token (greedy); > 0 samples from softmax(logits / T)
    top_p : keep the smallest set of most likely tokens whose probability reaches top_p, (0, 1]
    top_k : keep the k most likely tokens; 0 keeps all
    seed : seeds each sequence's generator (sequence i of a batch uses seed + i); None draws
        from torch's global generator state
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None

    def __post_init__(self):
        t, p, k, s = self.temperature, self.top_p, self.top_k, self.seed
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not _is_real(p) or not (0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if not _is_int(k) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {k!r}")
        if s is not None and (not _is_int(s) or not (0 <= s < 2 ** 63)):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generators(self, batch: int, device: torch.device) -> Optional[List[torch.Generator]]:
        """One generator per sequence (seed + i), or None when unseeded."""
        if self.seed is None or self.greedy:
            return None
        return [torch.Generator(device=device).manual_seed(self.seed + i) for i in range(batch)]


def filter_logits(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Scaled and filtered float32 logits [B, V]: tokens outside top-k / top-p set to -inf."""
    logits = logits.float() / temperature                                              # [B, V]
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        top = logits.topk(top_k, dim=-1)                                               # [B, k]
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, top.indices, top.values)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)                    # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample(logits: Tensor, params: SamplingParams,
           generators: Optional[Sequence[torch.Generator]] = None) -> Tensor:
    """Next tokens int64 [B] from logits [B, V]."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params.temperature, params.top_k, params.top_p).softmax(dim=-1)  # [B, V]
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {probs.shape[0]}")
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
