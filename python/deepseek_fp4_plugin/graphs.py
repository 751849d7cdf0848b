"""CUDA-graph decode: decode_one_token captured once per (batch size, attended-length bucket).

Buckets are powers of two from 128 up to ``max_seq_len``, so a step attends over at most twice
the live length; eager decode uses the same buckets, so both compute the same thing.

With a store that yields host points (a paged layer to bring in) the step is a sequence of
graphs, one per stretch of GPU work between two points; replay runs them in order and does the
host's part at each point in between. A point may carry per-capture state (``snapshot`` /
``restore``: e.g. the rows a point was captured for), since one point object serves the graphs
of every batch size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
from torch import Tensor

from .weights import HostPoint

if TYPE_CHECKING:
    from .engine import Engine

MIN_BUCKET = 128


def bucket(kv_len: int, cap: int) -> int:
    """The attended length a step over ``kv_len`` cache slots runs with (≤ cap)."""
    b = MIN_BUCKET
    while b < kv_len:
        b *= 2
    return min(b, cap)


class DecodeGraph:
    """decode_one_token captured for one batch size and attended length, replayed with new
    tokens and positions copied into its static buffers."""

    def __init__(self, engine: "Engine", batch: int, kv_len: int, tokens: Tensor, positions: Tensor, pool):
        self.store = engine.store
        self.batch = batch
        self.tokens = tokens.clone()          # int64 [B] static
        self.positions = positions.clone()    # int64 [B] static
        # warm-up runs the real step (same tokens and positions), so its cache writes are the
        # ones the replay makes again; one side stream per engine: each stream that runs a
        # matmul gets its own cuBLAS workspace
        side = engine.side_stream()
        side.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(side):
            self.store.begin_step(batch, decode=True)
            engine.decode_eager(self.tokens, self.positions, kv_len)
            self.store.end_step()
        torch.cuda.current_stream(engine.device).wait_stream(side)
        steps = engine.decode_steps(self.tokens, self.positions, kv_len)
        self.segments: List[Tuple[torch.cuda.CUDAGraph, Optional[HostPoint], object]] = []
        while True:
            graph = torch.cuda.CUDAGraph()
            point, done = None, False
            # thread_local: the paged store's threads may touch CUDA events meanwhile
            with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                try:
                    point = next(steps)
                except StopIteration as end:
                    self.logits = end.value                                       # [B, V] static
                    done = True
            self.segments.append((graph, point, None if point is None else point.snapshot()))
            if done:
                break
        self.mode = self.store.decode_mode   # what the store decoded with while capturing

    def replay(self, tokens: Tensor, positions: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.store.begin_step(self.batch, decode=True)
        for graph, point, state in self.segments:
            graph.replay()
            if point is not None:
                point.restore(state)
                self.store.resolve(point)
        return self.logits
