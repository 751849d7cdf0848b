"""Realistic routing traces for paging benchmarks (numpy only).

Random weights route uniformly; a real model does not. ``RoutingModel`` generates expert ids with
DeepSeek-R1's shape (58 MoE layers × 256 experts, top-8) whose per-layer popularity follows
DeepSeek-V3/R1 serving counts and whose token-to-token reuse follows DeepSeek-V2-Lite's per-token
routing (see docs/routing_data.md for the sources, their licenses and the fit).

The model: each sequence, layer and expert has a latent router score
``s = b_e + z``, ``z ~ N(0, 1)`` stationary, and a token takes the ``top_k`` largest scores. The bias
``b`` is calibrated so that each expert's marginal selection rate equals its measured popularity.
``z`` is a sum of independent parts: AR(1) processes with time constants ``taus`` (tokens), a part
fixed for the whole sequence (its topic) and white noise; their weights give the correlation of a
token's scores with those of the token d positions back, ``c(d) = Σ w_i ρ_i^d + w_persist``. That
correlation is what is carried from V2-Lite to R1 (fitted per V2-Lite layer, mapped by relative
depth): the reuse of a top-8 of 256 then follows from R1's own shape and skew.

Layers, sequences and the prefill stream each draw from their own random stream (keyed by seed,
phase, layer and sequence), so a trace of a layer subset, a smaller batch or fewer steps is the
matching slice of the larger trace.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Union

import numpy as np

from .cache_floor import (  # noqa: F401  (re-exported: the benchmark's one import)
    CacheResult,
    belady_misses,
    check_trace,
    equivalent_capacity,
    lrfu_misses,
    lru_misses,
    max_request,
    prefill_floor,
)

kR1Layers = 61
kR1DenseLayers = 3
kMoeLayers = 58
kExperts = 256
kTopK = 8
kTaus = (1.0, 16.0, 256.0)  # AR(1) time constants of the latent score, in tokens (fit: docs/routing_data.md)
kBlock = 16                            # steps of random draws per call (fixed: keeps traces prefix-stable)
kDefaultPath = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "routing" / "routing_model.npz"
kDistances = (1, 2, 4, 16, 64)
_PHASES = {"decode": 1, "prefill": 2}
_SUBSETS = ("first", "spread", "representative")


# ---------------------------------------------------------------------------------------------
# normal distribution helpers (numpy has no erf)

def norm_sf(x) -> np.ndarray:
    """P(N(0,1) > x), Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7)."""
    x = np.asarray(x, dtype=np.float64)
    s = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * s)
    y = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    half = 0.5 * y * np.exp(-s * s)
    return np.where(x >= 0, half, 1.0 - half)


def norm_isf(p) -> np.ndarray:
    """Inverse of ``norm_sf`` by bisection (monotone, robust in the tails)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-15, 1 - 1e-15)
    lo = np.full(p.shape, -9.0)
    hi = np.full(p.shape, 9.0)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        above = norm_sf(mid) > p
        lo = np.where(above, mid, lo)
        hi = np.where(above, hi, mid)
    return 0.5 * (lo + hi)


def inclusion_probabilities(bias: np.ndarray, top_k: int, z: np.ndarray) -> np.ndarray:
    """P(expert e is in the top_k of bias + z), z iid N(0, 1), estimated over the samples ``z``
    [n, E] without noise in e's own draw: e is chosen iff b_e + z_e beats the k-th largest of the
    others, so P = mean over samples of P(z_e > T_(-e) - b_e)."""
    s = z + bias
    part = -np.partition(-s, (top_k - 1, top_k), axis=1)
    kth, next_ = part[:, top_k - 1:top_k], part[:, top_k:top_k + 1]
    threshold = np.where(s >= kth, next_, kth)  # the k-th largest among the other experts
    pi = norm_sf(threshold - bias).mean(0)
    return pi * (top_k / pi.sum())  # Σπ = k exactly (a global shift of b cannot fix a sampled sum)


def calibrate_bias(popularity: np.ndarray, top_k: int, samples: int = 4000, iters: int = 25,
                   tol: float = 1e-3, seed: int = 0) -> np.ndarray:
    """Biases b [E] such that top_k of b + N(0, I) selects expert e with probability top_k · p_e.

    popularity : [E] nonnegative (normalized here); every top_k · p_e must be below 1
    """
    p = np.asarray(popularity, dtype=np.float64)
    if p.ndim != 1 or len(p) <= top_k or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"popularity must be a finite nonnegative [E] vector with E > top_k ({top_k}), "
                         f"got shape {p.shape}")
    p = np.maximum(p / p.sum(), 1e-7)
    target = top_k * p / p.sum()
    if target.max() >= 1.0:
        raise ValueError(f"popularity: an expert would be chosen by {target.max():.2f} of the tokens (>= 1) "
                         f"at top_k {top_k}")
    z = np.random.default_rng(seed).standard_normal((samples, len(p)))
    b = -norm_isf(target)
    want = norm_isf(target)
    for _ in range(iters):
        pi = inclusion_probabilities(b, top_k, z)
        if np.max(np.abs(pi / target - 1.0)) < tol:
            break
        b += norm_isf(pi) - want
    return b - b.mean()


def _quantile_map(p: np.ndarray, experts: int) -> np.ndarray:
    """A popularity vector for another expert count with the same Lorenz curve (share of traffic
    carried by the top x of experts); expert i takes the rank the source expert at the same
    relative id had among the sampled ids."""
    e0 = len(p)
    if experts == e0:
        return p.copy()
    desc = np.sort(p)[::-1] / p.sum()
    cum = np.concatenate([[0.0], np.cumsum(desc)])
    shares = np.diff(np.interp(np.arange(experts + 1) / experts, np.arange(e0 + 1) / e0, cum))
    sampled = p[np.minimum((np.arange(experts) * e0) // experts, e0 - 1)]
    rank = np.argsort(np.argsort(-sampled, kind="stable"), kind="stable")
    return shares[rank]


# ---------------------------------------------------------------------------------------------
# the latent-score generator

def component_weights_to_corr(weights: np.ndarray, taus: Sequence[float], d) -> np.ndarray:
    """c(d) of each layer: weights [L, len(taus) + 2] (AR parts, persistent, white) → [L, len(d)]."""
    d = np.asarray(d, dtype=np.float64)
    rho = np.exp(-1.0 / np.asarray(taus))
    basis = np.concatenate([rho[:, None] ** d[None, :], np.ones((1, len(d)))], 0)  # [C+1, D]
    return np.asarray(weights)[:, : len(taus) + 1] @ basis


def generate(bias: np.ndarray, weights: np.ndarray, taus: Sequence[float], steps: int, streams: int,
             top_k: int, seed: int, phase: int, layer_ids: Sequence[int]) -> np.ndarray:
    """Expert ids [steps, L, streams, top_k] (int32, each token's ids by descending score).

    bias : [L, E] latent biases; weights : [L, C + 2] parts of the latent variance (C AR parts with
    time constants ``taus``, persistent, white; each row sums to 1); layer_ids [L] key the random
    streams (with seed, phase and the stream number)."""
    bias = np.asarray(bias, dtype=np.float32)
    n_layers, experts = bias.shape
    weights = np.asarray(weights, dtype=np.float64)
    out = np.empty((steps, n_layers * streams, top_k), np.int32)
    # (layer, stream) units are independent: run them in chunks that bound the memory of a block
    per_unit = kBlock * (len(taus) + 2) * experts * 4
    chunk = max(1, (64 << 20) // per_unit)
    units = [(i, s) for i in range(n_layers) for s in range(streams)]
    for a in range(0, len(units), chunk):
        part = units[a:a + chunk]
        rows = [i for i, _ in part]
        keys = [(seed, phase, int(layer_ids[i]), s) for i, s in part]
        out[:, a:a + len(part)] = _generate_units(bias[rows], weights[rows], taus, steps, top_k, keys)
    return out.reshape(steps, n_layers, streams, top_k)


def _generate_units(bias: np.ndarray, weights: np.ndarray, taus, steps: int, top_k: int, keys) -> np.ndarray:
    """[steps, U, top_k] for U independent token streams with their own bias [U, E], weights [U, C+2]
    and random-stream keys."""
    n, experts = bias.shape
    c = len(taus)
    rho = np.exp(-1.0 / np.asarray(taus, dtype=np.float64))
    rho_b = rho.astype(np.float32)[None, :, None]
    innov_b = np.sqrt(1.0 - rho ** 2).astype(np.float32)[None, :, None]
    w = np.sqrt(np.clip(weights, 0.0, None)).astype(np.float32)
    w_ar, w_p, w_white = w[:, :c], w[:, c][:, None], w[:, c + 1][:, None]
    rngs = [np.random.default_rng(np.random.SeedSequence(list(k))) for k in keys]
    u = np.stack([g.standard_normal(experts, dtype=np.float32) for g in rngs])        # persistent [U, E]
    x = np.stack([g.standard_normal((c, experts), dtype=np.float32) for g in rngs])   # AR states [U, C, E]
    up = w_p * u
    out = np.empty((steps, n, top_k), np.int32)
    eps = np.empty((kBlock, n, c + 1, experts), np.float32)
    z = np.empty((kBlock, n, experts), np.float32)
    for t0 in range(0, steps, kBlock):
        for j, g in enumerate(rngs):  # whole blocks always: a shorter trace is a prefix of a longer one
            eps[:, j] = g.standard_normal((kBlock, c + 1, experts), dtype=np.float32)
        m = min(kBlock, steps - t0)
        for t in range(m):
            x *= rho_b
            x += innov_b * eps[t, :, :c]
            np.einsum("uc,uce->ue", w_ar, x, out=z[t])
            z[t] += up
            z[t] += w_white * eps[t, :, c]
        score = z[:m] + bias[None]
        top = np.argpartition(-score, top_k - 1, axis=-1)[..., :top_k]
        order = np.argsort(-np.take_along_axis(score, top, -1), axis=-1, kind="stable")
        out[t0:t0 + m] = np.take_along_axis(top, order, -1)
    return out


# ---------------------------------------------------------------------------------------------
# statistics

def _summary(v: np.ndarray) -> dict:
    return {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v)),
            "argmin": int(np.argmin(v)), "argmax": int(np.argmax(v))}


def skew_stats(counts: np.ndarray) -> Dict[str, np.ndarray]:
    """Per layer of counts [L, E]: max_over_mean (busiest expert's load / the mean load) and
    top10_share (share of traffic on the round(10%) busiest experts)."""
    counts = np.asarray(counts, dtype=np.float64)
    experts = counts.shape[1]
    total = counts.sum(1)
    top = max(1, int(round(0.1 * experts)))
    return {"max_over_mean": counts.max(1) * experts / total,
            "top10_share": np.sort(counts, 1)[:, ::-1][:, :top].sum(1) / total}


def sequence_stats(sequences: Sequence[np.ndarray], experts: int,
                   distances: Sequence[int] = kDistances) -> dict:
    """Per-layer statistics of token streams: ``sequences`` is a list of int [L, T, k] (each its own
    stream; lengths may differ). reuse_at[d]: fraction of a token's experts that the token d positions
    earlier in the same stream used in the same layer (pooled over tokens)."""
    n_layers = sequences[0].shape[0]
    counts = np.zeros((n_layers, experts))
    num = {d: np.zeros(n_layers) for d in distances}
    den = {d: np.zeros(n_layers) for d in distances}
    for a in sequences:
        a = np.asarray(a, dtype=np.int64)
        np.add.at(counts, (np.arange(n_layers)[:, None], a.reshape(n_layers, -1)), 1)
        for d in distances:
            if a.shape[1] > d:
                hit = (a[:, d:, :, None] == a[:, :-d, None, :]).any(-1)
                num[d] += hit.sum((1, 2))
                den[d] += hit.shape[1] * hit.shape[2]
    skew = skew_stats(counts)
    reuse_at = {d: np.where(den[d] > 0, num[d] / np.maximum(den[d], 1), np.nan) for d in distances}
    return {"max_over_mean": skew["max_over_mean"], "top10_share": skew["top10_share"],
            "reuse": reuse_at[distances[0]] if distances[0] == 1 else None, "reuse_at": reuse_at,
            "pairs_at": den}


def distinct_per_step(trace: np.ndarray) -> np.ndarray:
    """Mean distinct experts per (step, layer) over the batch of a trace [steps, L, batch, k] → [L]."""
    steps, n_layers, batch, k = trace.shape
    s = np.sort(trace.reshape(steps, n_layers, batch * k), -1)
    return (1 + (s[..., 1:] != s[..., :-1]).sum(-1)).mean(0)


def _jsonable(stats: dict) -> dict:
    out = {"layers": {}, "summary": {}}
    for name in ("max_over_mean", "top10_share", "reuse", "distinct_per_step"):
        v = stats.get(name)
        if v is not None:
            out["layers"][name] = [float(x) for x in v]
            if np.all(np.isfinite(v)):
                out["summary"][name] = _summary(np.asarray(v))
    if stats.get("reuse_at"):
        out["layers"]["reuse_at"] = {str(d): [float(x) for x in v] for d, v in stats["reuse_at"].items()}
        out["summary"]["reuse_at"] = {str(d): float(np.nanmean(v)) for d, v in stats["reuse_at"].items()
                                      if np.any(np.isfinite(v))}
    return out


def trace_stats(trace, experts: Optional[int] = None, distances: Sequence[int] = kDistances) -> dict:
    """Statistics of a generated trace, JSON-ready: per layer max_over_mean, top10_share, reuse (d = 1),
    reuse_at[d] and distinct_per_step (the batch's distinct experts per step), with summaries
    (mean, min, max, argmin, argmax over layers).

    trace : int [steps, layers, batch, top_k] (decode) or [layers, tokens, top_k] (prefill: one stream)
    experts : experts per layer (default: the largest id + 1)
    """
    t = np.asarray(trace)
    if t.ndim == 3:
        t = t.transpose(1, 0, 2)[:, :, None, :]
    t, experts = check_trace(t, experts)
    _validate_distances(distances)
    stats = sequence_stats([t[:, :, b].transpose(1, 0, 2) for b in range(t.shape[2])], experts, distances)
    stats["distinct_per_step"] = distinct_per_step(t)
    out = _jsonable(stats)
    out["shape"] = {"steps": t.shape[0], "layers": t.shape[1], "batch": t.shape[2], "top_k": t.shape[3],
                    "experts": experts}
    return out


def _validate_distances(distances):
    if (not isinstance(distances, (tuple, list)) or not distances or distances[0] != 1
            or any(not isinstance(d, int) or d < 1 for d in distances)):
        raise ValueError(f"distances must be a list of positive ints starting with 1, got {distances!r}")


# ---------------------------------------------------------------------------------------------
# the model

def _check_int(name: str, v, lo: int = 1, hi: Optional[int] = None) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {rng}, got {v!r}")
    return int(v)


class RoutingModel:
    """Per-layer popularity and latent-correlation parameters of a model's routing.

    decode_popularity, prefill_popularity : float [L, E], each row sums to 1
    weights : float [L, len(taus) + 2], parts of the latent variance (AR parts, persistent, white)
    top_k : experts per token of the source shape
    meta : JSON-able dict (sources, commits, the sources' and the generator's statistics)
    """

    def __init__(self, decode_popularity, prefill_popularity, weights, top_k: int, taus=kTaus, meta=None,
                 biases: Optional[dict] = None, source_model: Optional["RoutingModel"] = None,
                 calibration_samples: int = 4000):
        self.decode_popularity = np.asarray(decode_popularity, dtype=np.float64)
        self.prefill_popularity = np.asarray(prefill_popularity, dtype=np.float64)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.taus = tuple(float(t) for t in taus)
        self.top_k = int(top_k)
        self.meta = dict(meta or {})
        self.source_model = source_model
        n_layers, experts = self.decode_popularity.shape
        if self.prefill_popularity.shape != (n_layers, experts):
            raise ValueError(f"prefill_popularity shape {self.prefill_popularity.shape} != decode "
                             f"{(n_layers, experts)}")
        if self.weights.shape != (n_layers, len(self.taus) + 2):
            raise ValueError(f"weights must be [{n_layers}, {len(self.taus) + 2}], got {self.weights.shape}")
        if np.any(self.weights < -1e-9) or np.any(np.abs(self.weights.sum(1) - 1) > 1e-6):
            raise ValueError("weights must be nonnegative with rows summing to 1")
        self._bias: Dict[tuple, np.ndarray] = dict(biases or {})
        self.calibration_samples = int(calibration_samples)

    @property
    def layers(self) -> int:
        return self.decode_popularity.shape[0]

    @property
    def experts(self) -> int:
        return self.decode_popularity.shape[1]

    # --- persistence ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Union[str, Path, None] = None) -> "RoutingModel":
        """The fitted model (default: benchmarks/data/routing/routing_model.npz in the repository,
        written by scripts/derive_routing_traces.py)."""
        path = Path(path) if path is not None else kDefaultPath
        if not path.is_file():
            raise FileNotFoundError(f"routing model {path} not found: derive it with "
                                    "scripts/derive_routing_traces.py (see docs/routing_data.md)")
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            models = {}
            for prefix in ("", "source_"):
                if prefix + "weights" not in f:
                    continue
                biases = {}
                for phase in _PHASES:
                    key = f"{prefix}{phase}_bias"
                    if key in f:
                        pop = f[f"{prefix}{phase}_popularity"]
                        biases[(phase, pop.shape[1], int(f[prefix + "top_k"]))] = f[key]
                models[prefix] = cls(f[prefix + "decode_popularity"], f[prefix + "prefill_popularity"],
                                     f[prefix + "weights"], int(f[prefix + "top_k"]),
                                     tuple(f[prefix + "taus"]),
                                     meta=meta if prefix == "" else meta.get("source_model_meta", {}),
                                     biases=biases)
        model = models[""]
        model.source_model = models.get("source_")
        return model

    def save(self, path: Union[str, Path]) -> None:
        """Writes the model (and its source-shape model) to an .npz file."""
        arrays = {}
        meta = dict(self.meta)
        for prefix, m in (("", self), ("source_", self.source_model)):
            if m is None:
                continue
            arrays[prefix + "decode_popularity"] = m.decode_popularity
            arrays[prefix + "prefill_popularity"] = m.prefill_popularity
            arrays[prefix + "weights"] = m.weights
            arrays[prefix + "top_k"] = np.int64(m.top_k)
            arrays[prefix + "taus"] = np.asarray(m.taus)
            for phase in _PHASES:
                arrays[f"{prefix}{phase}_bias"] = m.bias(phase, m.experts, m.top_k)
            if prefix:
                meta["source_model_meta"] = m.meta
        arrays["meta"] = np.asarray(json.dumps(meta))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def fit(cls, sglang_dir, v2_lite_dir, **kwargs) -> "RoutingModel":
        """Fits the model from local copies of the sources (see routing_fit.fit_routing_model)."""
        from .routing_fit import fit_routing_model

        return fit_routing_model(sglang_dir, v2_lite_dir, **kwargs)

    # --- parameters at a shape ----------------------------------------------------------------
    def popularity(self, phase: str, experts: Optional[int] = None) -> np.ndarray:
        """[L, experts] popularity of a phase, quantile-mapped when experts differs from the source."""
        if phase not in _PHASES:
            raise ValueError(f"phase must be one of {tuple(_PHASES)}, got {phase!r}")
        pop = self.decode_popularity if phase == "decode" else self.prefill_popularity
        experts = self.experts if experts is None else experts
        return np.stack([_quantile_map(p, experts) for p in pop])

    def bias(self, phase: str, experts: int, top_k: int,
             layer_ids: Optional[Sequence[int]] = None) -> np.ndarray:
        """Latent biases [L (or len(layer_ids)), experts] for a shape (calibrated once, then cached)."""
        key = (phase, experts, top_k)
        if key not in self._bias:
            self._bias[key] = np.full((self.layers, experts), np.nan)
        b = self._bias[key]
        ids = np.arange(self.layers) if layer_ids is None else np.asarray(layer_ids)
        pop = None
        for i in ids:
            if np.isnan(b[i, 0]):
                pop = self.popularity(phase, experts) if pop is None else pop
                b[i] = calibrate_bias(pop[i], top_k, samples=self.calibration_samples)
        return b[ids]

    # --- layer choice -------------------------------------------------------------------------
    def layer_statistics(self) -> np.ndarray:
        """Per layer [L, 4]: decode max_over_mean, top10_share (from the popularity), reuse at d = 1 and
        d = 16 (the generator's, stored by the fit; the latent correlation when absent)."""
        skew = skew_stats(self.decode_popularity)
        gen = self.meta.get("generator_stats", {}).get("decode", {}).get("layers", {})
        if "reuse_at" in gen and len(gen["reuse"]) == self.layers:
            r1, r16 = np.asarray(gen["reuse"]), np.asarray(gen["reuse_at"].get("16", gen["reuse"]))
        else:
            c = component_weights_to_corr(self.weights, self.taus, [1, 16])
            r1, r16 = c[:, 0], c[:, 1]
        return np.stack([skew["max_over_mean"], skew["top10_share"], r1, r16], 1)

    def select_layers(self, layers: int, how="representative") -> np.ndarray:
        """Indices (into this model's layers; R1 layer = index + 3) of ``layers`` layers.

        how : "first" (the first ones), "spread" (evenly over depth), "representative" (one per depth
            stratum, chosen so that the subset's mean skew and reuse match the mean over all layers),
            or a sequence of indices
        """
        layers = _check_int("layers", layers, 1, self.layers)
        if not isinstance(how, str):
            ids = np.asarray(list(how), dtype=np.int64)
            if ids.ndim != 1 or len(ids) != layers or len(set(ids.tolist())) != layers or \
                    ids.min() < 0 or ids.max() >= self.layers:
                raise ValueError(f"layers_subset must be {layers} distinct indices in [0, {self.layers}), "
                                 f"got {how!r}")
            return ids
        if how not in _SUBSETS:
            raise ValueError(f"layers_subset must be one of {_SUBSETS} or a list of indices, got {how!r}")
        n = self.layers
        if how == "first" or layers == n:
            return np.arange(layers)
        bounds = np.linspace(0, n, layers + 1).round().astype(int)
        if how == "spread":
            return np.array([(a + b - 1) // 2 for a, b in zip(bounds[:-1], bounds[1:])])
        stats = self.layer_statistics()
        scale = stats.std(0) + 1e-12
        target = stats.mean(0) / scale
        norm = stats / scale
        pick = [(a + b - 1) // 2 for a, b in zip(bounds[:-1], bounds[1:])]
        for _ in range(10):  # coordinate descent, one stratum at a time
            changed = False
            for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                best, best_err = pick[j], None
                for cand in range(a, b):
                    trial = pick[:j] + [cand] + pick[j + 1:]
                    err = float(np.sum((norm[trial].mean(0) - target) ** 2))
                    # ties: the candidate closest to the stratum's own mean
                    err += 1e-6 * float(np.sum((norm[cand] - norm[a:b].mean(0)) ** 2))
                    if best_err is None or err < best_err - 1e-15:
                        best, best_err = cand, err
                changed |= best != pick[j]
                pick[j] = best
            if not changed:
                break
        return np.asarray(pick)

    # --- traces -------------------------------------------------------------------------------
    def _check_shape(self, layers, experts, top_k, seed):
        layers = _check_int("layers", layers, 1, self.layers)
        experts = _check_int("experts", experts, 2)
        top_k = _check_int("top_k", top_k, 1, experts - 1)
        _check_int("seed", seed, 0)
        return layers, experts, top_k

    def decode_trace(self, steps: int, batch: int, layers: int = kMoeLayers, experts: int = kExperts,
                     top_k: int = kTopK, seed: int = 0, layers_subset="representative") -> np.ndarray:
        """Decode routing: int32 [steps, layers, batch, top_k], each sequence of the batch its own
        token stream, ids distinct within a token (by descending latent score).

        layers < the model's: the layers ``select_layers(layers, layers_subset)`` picks;
        experts / top_k other than the source's: popularity quantile-mapped and recalibrated.
        """
        steps = _check_int("steps", steps)
        batch = _check_int("batch", batch)
        layers, experts, top_k = self._check_shape(layers, experts, top_k, seed)
        ids = self.select_layers(layers, layers_subset)
        return generate(self.bias("decode", experts, top_k, ids), self.weights[ids], self.taus, steps, batch,
                        top_k, seed, _PHASES["decode"], ids)

    def prefill_trace(self, tokens: int, layers: int = kMoeLayers, experts: int = kExperts,
                      top_k: int = kTopK, seed: int = 0, layers_subset="representative") -> np.ndarray:
        """Prefill routing of one prompt: int32 [layers, tokens, top_k] (prefill popularity)."""
        tokens = _check_int("tokens", tokens)
        layers, experts, top_k = self._check_shape(layers, experts, top_k, seed)
        ids = self.select_layers(layers, layers_subset)
        t = generate(self.bias("prefill", experts, top_k, ids), self.weights[ids], self.taus, tokens, 1,
                     top_k, seed, _PHASES["prefill"], ids)
        return np.ascontiguousarray(t[:, :, 0, :].transpose(1, 0, 2))

    def source_stats(self) -> dict:
        """The sources' statistics stored by the fit (R1 counts: skew per layer, decode and prefill;
        V2-Lite even and odd files: skew, reuse, distinct experts per step at batch 8)."""
        if "source_stats" not in self.meta:
            raise ValueError("this model carries no source statistics (not made by the fit)")
        return self.meta["source_stats"]


def source_stats(model: Optional[RoutingModel] = None) -> dict:
    """The sources' statistics of ``model`` (default: the committed-path fitted model)."""
    return (model or RoutingModel.load()).source_stats()


def layer_names(ids: Iterable[int]) -> list:
    """DeepSeek-R1 layer numbers of model layer indices (the first 3 layers are dense)."""
    return [int(i) + kR1DenseLayers for i in ids]
