"""Expert-cache simulations over a routing trace: the optimal offline floor and the engine's policies.

A decode trace ``[steps, layers, batch, top_k]`` is replayed as one request per (step, layer): the
distinct experts of that layer's batch, which must all be resident at once. Keys are
``(layer, expert)`` and every layer shares one cache of ``capacity`` slots, as the GPU expert cache
does. Pinned keys occupy slots, are always resident and never count as misses (the engine's
``SlotCache`` pins the same way).

``belady_misses`` is Belady's MIN: on a miss with the cache full, evict the resident key (neither
pinned nor part of the current request) whose next use is furthest away. With whole requests that
must be co-resident this is still optimal: the current request's keys are needed now, sooner than
any other key, so MIN would never choose them anyway. ``lru_misses`` and ``lrfu_misses`` mirror
``SlotCache`` (time ticks once per step; ties go to the smaller key, ``layer · experts + expert``).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Iterable, Tuple

import numpy as np

_ORDERS = ("step_major", "layer_major")


@dataclass
class CacheResult:
    """Misses of one simulated cache over a trace.

    misses : int64 [steps, layers], experts copied in for each (step, layer) request
    requests : int64 [steps, layers], distinct experts each request uses (pinned included)
    """

    misses: np.ndarray
    requests: np.ndarray

    @property
    def total_misses(self) -> int:
        return int(self.misses.sum())

    @property
    def total_requests(self) -> int:
        return int(self.requests.sum())

    @property
    def miss_rate(self) -> float:
        return self.total_misses / max(1, self.total_requests)


def check_trace(trace, experts=None, name: str = "trace") -> Tuple[np.ndarray, int]:
    """Validates a decode trace ``[steps, layers, batch, top_k]`` of expert ids; returns it as int64
    and the number of experts (``experts``, or the largest id + 1)."""
    t = np.asarray(trace)
    if t.ndim != 4 or min(t.shape) < 1:
        raise ValueError(f"{name} must be [steps, layers, batch, top_k] with no empty axis, "
                         f"got shape {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"{name} must hold integer expert ids, got dtype {t.dtype}")
    lo, hi = int(t.min()), int(t.max())
    if experts is None:
        experts = hi + 1
    elif not isinstance(experts, (int, np.integer)) or experts < 1:
        raise ValueError(f"experts must be a positive integer, got {experts!r}")
    if lo < 0 or hi >= experts:
        raise ValueError(f"{name} has expert ids in [{lo}, {hi}], outside [0, {experts})")
    return t.astype(np.int64, copy=False), int(experts)


def _requests(trace: np.ndarray, experts: int, order: str):
    """Distinct keys of each request in replay order: (keys [n], request index [n], offsets [R+1]).
    Requests are numbered in replay order; ``_request_grid`` maps them back to (step, layer)."""
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
    steps, layers, batch, k = trace.shape
    per = trace.reshape(steps, layers, batch * k)
    if order == "layer_major":
        per = per.transpose(1, 0, 2)
    flat = np.sort(per.reshape(steps * layers, batch * k), axis=1)
    keep = np.ones(flat.shape, dtype=bool)
    keep[:, 1:] = flat[:, 1:] != flat[:, :-1]
    n_req = flat.shape[0]
    req = np.broadcast_to(np.arange(n_req)[:, None], flat.shape)[keep]
    layer_of_req = (np.arange(n_req) % layers) if order == "step_major" else (np.arange(n_req) // steps)
    keys = flat[keep] + layer_of_req[req] * experts
    offsets = np.zeros(n_req + 1, dtype=np.int64)
    np.cumsum(keep.sum(1), out=offsets[1:])
    return keys, req, offsets


def _request_grid(values: np.ndarray, steps: int, layers: int, order: str) -> np.ndarray:
    """Per-request values in replay order → [steps, layers]."""
    if order == "step_major":
        return values.reshape(steps, layers)
    return values.reshape(layers, steps).T.copy()


def _pinned_mask(pinned: Iterable, layers: int, experts: int) -> np.ndarray:
    mask = np.zeros(layers * experts, dtype=bool)
    for item in pinned:
        try:
            layer, expert = (int(v) for v in item)
        except (TypeError, ValueError):
            raise ValueError(f"pinned must hold (layer, expert) pairs, got {item!r}") from None
        if not (0 <= layer < layers and 0 <= expert < experts):
            raise ValueError(f"pinned key {(layer, expert)} is outside [0, {layers}) x [0, {experts})")
        mask[layer * experts + expert] = True
    return mask


def _setup(trace, capacity, pinned, order, experts):
    t, experts = check_trace(trace, experts)
    if not isinstance(capacity, (int, np.integer)) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
    steps, layers = t.shape[:2]
    pin = _pinned_mask(pinned, layers, experts)
    keys, req, offsets = _requests(t, experts, order)
    free_keys = ~pin[keys]
    need = np.bincount(req[free_keys], minlength=len(offsets) - 1)
    worst = int(need.max()) + int(pin.sum())
    if worst > capacity:
        raise ValueError(f"capacity {capacity} is below what one request needs resident at once "
                         f"({int(need.max())} experts + {int(pin.sum())} pinned)")
    requests = np.diff(offsets)
    return t, experts, pin, keys, req, offsets, requests


def belady_misses(trace, capacity: int, pinned: Iterable = (), order: str = "step_major",
                  experts=None) -> CacheResult:
    """Misses of Belady's MIN (optimal offline) on a shared expert cache.

    Parameters
    ----------
    trace : int [steps, layers, batch, top_k] expert ids
    capacity : GPU expert slots, shared by all layers; pinned keys occupy slots
    pinned : iterable of (layer, expert), always resident, never counted as misses
    order : "step_major" (decode: step by step, layer by layer) or "layer_major" (every step of
        layer 0, then layer 1, ...)
    experts : experts per layer (default: the largest id + 1)

    Returns
    -------
    CacheResult with misses and requests per (step, layer)
    """
    t, experts, pin, keys, req, offsets, requests = _setup(trace, capacity, pinned, order, experts)
    steps, layers = t.shape[:2]
    n_req = len(offsets) - 1
    n = len(keys)
    # next request using the same key (n_req + 1: never again)
    never = n_req + 1
    by_key = np.lexsort((req, keys))
    nxt = np.full(n, never, dtype=np.int64)
    same = keys[by_key[1:]] == keys[by_key[:-1]]
    nxt[by_key[:-1][same]] = req[by_key[1:][same]]

    # pinned keys never enter the simulation: they are resident and their slots are taken
    free_acc = ~pin[keys]
    req_counts = np.bincount(req[free_acc], minlength=n_req)
    keys_l = keys[free_acc].tolist()
    neg_l = (-nxt[free_acc]).tolist()
    resident = bytearray(layers * experts)
    next_use = [0] * (layers * experts)  # negated next use of each resident key
    heap = []  # (-next use, key); stale entries are skipped
    free = capacity - int(pin.sum())
    misses = np.zeros(n_req, dtype=np.int64)
    pop, push = heapq.heappop, heapq.heappush
    a = 0
    for r, n_r in enumerate(req_counts.tolist()):
        b = a + n_r
        m = 0
        for key in keys_l[a:b]:
            if resident[key]:
                continue
            m += 1
            if free == 0:
                # The request's own hits still carry next use == r, the nearest possible: they are
                # never the furthest while anything else is evictable (capacity was checked).
                while True:
                    neg, victim = pop(heap)
                    if resident[victim] and next_use[victim] == neg:
                        break
                resident[victim] = 0
            else:
                free -= 1
            resident[key] = 1
        misses[r] = m
        for key, neg in zip(keys_l[a:b], neg_l[a:b]):
            next_use[key] = neg
            push(heap, (neg, key))
        a = b
    return CacheResult(_request_grid(misses, steps, layers, order),
                       _request_grid(requests, steps, layers, order))


def _policy_misses(trace, capacity, pinned, order, experts, lam: float, lru: bool) -> CacheResult:
    t, experts, pin, keys, req, offsets, requests = _setup(trace, capacity, pinned, order, experts)
    steps, layers = t.shape[:2]
    n_req = len(offsets) - 1
    keys_l = keys.tolist()
    pin_l = pin.tolist()
    off_l = offsets.tolist()
    nkeys = layers * experts
    resident = bytearray(nkeys)
    held = bytearray(nkeys)
    crf = [0.0] * nkeys
    last = [0.0] * nkeys
    score = [0.0] * nkeys
    heap = []  # (score, key): the smallest is evicted; stale entries are skipped
    free = capacity - int(pin.sum())
    misses = np.zeros(n_req, dtype=np.int64)
    pop, push = heapq.heappop, heapq.heappush
    tick = layers if order == "step_major" else 1
    for r in range(n_req):
        now = float(r // tick)
        a, b = off_l[r], off_l[r + 1]
        cur = keys_l[a:b]
        for key in cur:  # touch: history is kept for keys that are not cached
            if not lru:
                crf[key] = 1.0 + crf[key] * 2.0 ** (-lam * (now - last[key]))
            last[key] = now
            score[key] = now if lru else math.log2(crf[key]) + lam * now
            held[key] = 1
        m = 0
        for key in cur:
            if resident[key] or pin_l[key]:
                continue
            m += 1
            if free == 0:
                while True:
                    s, victim = pop(heap)
                    if resident[victim] and not held[victim] and score[victim] == s:
                        break
                resident[victim] = 0
                free += 1
            resident[key] = 1
            free -= 1
        misses[r] = m
        for key in cur:
            held[key] = 0
            if not pin_l[key]:
                push(heap, (score[key], key))
    return CacheResult(_request_grid(misses, steps, layers, order),
                       _request_grid(requests, steps, layers, order))


def lru_misses(trace, capacity: int, pinned: Iterable = (), order: str = "step_major",
               experts=None) -> CacheResult:
    """Misses of the engine's LRU policy (``SlotCache``, kLru), same arguments as ``belady_misses``."""
    return _policy_misses(trace, capacity, pinned, order, experts, 0.0, lru=True)


def lrfu_misses(trace, capacity: int, pinned: Iterable = (), order: str = "step_major", experts=None,
                lam: float = 0.05) -> CacheResult:
    """Misses of the engine's LRFU policy (``SlotCache``, kLrfu: crf ← 1 + crf · 2^(−λ·Δt) at each
    use, the smallest current crf evicted), same arguments as ``belady_misses``; ``lam`` is λ per
    step."""
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not lam >= 0 or math.isinf(lam):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    return _policy_misses(trace, capacity, pinned, order, experts, float(lam), lru=False)


def prefill_floor(trace, pinned: Iterable = (), experts=None) -> np.ndarray:
    """Experts a prefill must bring in, once per layer: the distinct experts of each layer of a
    prefill trace ``[layers, tokens, top_k]`` that are not pinned. Returns int64 [layers]."""
    t = np.asarray(trace)
    if t.ndim != 3:
        raise ValueError(f"trace must be [layers, tokens, top_k], got shape {t.shape}")
    t4, experts = check_trace(t.transpose(1, 0, 2)[:, :, None, :], experts)
    layers = t.shape[0]
    pin = _pinned_mask(pinned, layers, experts).reshape(layers, experts)
    used = np.zeros((layers, experts), dtype=bool)
    np.put_along_axis(used, t4[:, :, 0, :].transpose(1, 0, 2).reshape(layers, -1), True, axis=1)
    return (used & ~pin).sum(1).astype(np.int64)


def max_request(trace) -> int:
    """The most distinct experts one (step, layer) of a trace [steps, layers, batch, top_k] uses: the
    fewest slots any cache simulation of it needs."""
    t, _ = check_trace(trace)
    steps, layers, batch, k = t.shape
    s = np.sort(t.reshape(steps, layers, batch * k), -1)
    return int((1 + (s[..., 1:] != s[..., :-1]).sum(-1)).max())


def equivalent_capacity(capacity: int, layers: int, sub_layers: int, working_set: float) -> int:
    """Slots for a model of ``sub_layers`` layers that leave each layer the room ``capacity`` slots
    leave each of ``layers`` layers once the current request is held. That request (``working_set``:
    the mean distinct experts of a (step, layer)) is resident whatever the depth, so a plain share
    (capacity · sub_layers / layers) leaves a shallow model less room per layer."""
    if not (isinstance(layers, int) and isinstance(sub_layers, int) and 1 <= sub_layers <= layers):
        raise ValueError(f"sub_layers must be an integer in [1, layers], got {sub_layers!r} of {layers!r}")
    if not 0 <= working_set <= capacity:
        raise ValueError(f"working_set must be in [0, capacity {capacity}], got {working_set!r}")
    return int(round((capacity - working_set) * sub_layers / layers + working_set))


def min_misses_requests(requests, capacity: int, counted=None) -> int:
    """Misses of the optimal offline schedule over a list of requests when a missed key may also
    be used without being cached (the engine reads such an expert in place from host memory):
    after each request the cache keeps the ``capacity`` keys needed soonest, among those it held
    and the request's. Never above Belady's MIN (which must cache every miss), and defined when a
    request needs more keys than the cache holds. The benchmark's decode floor, over the routing
    the engine resolved.

    Parameters
    ----------
    requests : sequence of sequences of hashable keys, e.g. (layer, expert); distinct within one
    capacity : cache slots (≥ 0)
    counted : per request, whether its misses count (default all): earlier requests warm the cache

    Returns
    -------
    int, the counted misses
    """
    if not isinstance(capacity, (int, np.integer)) or isinstance(capacity, bool) or capacity < 0:
        raise ValueError(f"capacity must be a non-negative integer, got {capacity!r}")
    reqs = [list(r) for r in requests]
    if counted is None:
        counted = [True] * len(reqs)
    if len(counted) != len(reqs):
        raise ValueError(f"counted has {len(counted)} entries for {len(reqs)} requests")
    never = len(reqs) + 1
    nxt, last = [None] * len(reqs), {}
    for i in range(len(reqs) - 1, -1, -1):
        nxt[i] = [last.get(k, never) for k in reqs[i]]
        for k in reqs[i]:
            last[k] = i
    cache, heap, misses = {}, [], 0     # key → next use; max-heap of (−next use, key), lazily pruned
    for i, req in enumerate(reqs):
        for k, nu in zip(req, nxt[i]):
            if k not in cache:
                misses += bool(counted[i])
            cache[k] = nu
            heapq.heappush(heap, (-nu, k))
        while len(cache) > capacity:
            neg, v = heapq.heappop(heap)
            if cache.get(v) == -neg:
                del cache[v]
    return misses

