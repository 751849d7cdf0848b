"""Fitting ``RoutingModel`` from local copies of the public routing data (numpy only).

Sources (docs/routing_data.md):

- DeepSeek-V3/R1 serving counts: JSON files ``{"logical_count": [[...256] × 61]}``, one per workload,
  named ``decode_*.json`` / ``prefill_*.json`` (the 3 dense layers are all-zero rows).
- DeepSeek-V2-Lite per-token routing: ``prompt_<n>_data.csv`` with the header
  ``Layer ID,Batch Number,Token,Activated Expert IDs``, rows grouped by MoE layer (1..26), one row
  per prompt token in order, the ids a JSON-like list of 6 (top-k order, not sorted). Even ``n`` fit
  the model, odd ``n`` evaluate it.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .routing_replay import (
    RoutingModel,
    _jsonable,
    calibrate_bias,
    distinct_per_step,
    kDistances,
    kR1DenseLayers,
    kTaus,
    sequence_stats,
    skew_stats,
    trace_stats,
)

kV2Header = ["Layer ID", "Batch Number", "Token", "Activated Expert IDs"]
kV2Experts = 64
kBos = "<｜begin▁of▁sentence｜>"
kFitDistances = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


# ---------------------------------------------------------------------------------------------
# readers

def _find(directory: Path, pattern: str, sub: str) -> List[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"source directory {directory} does not exist")
    files = sorted(directory.glob(pattern)) or sorted((directory / sub).glob(pattern))
    if not files:
        raise ValueError(f"no {pattern} under {directory} (or {directory / sub})")
    return files


def load_sglang_counts(directory) -> Dict[str, np.ndarray]:
    """{file stem: float64 [61, 256] logical_count} from a directory of the serving-count JSON files
    (or a checkout holding ``attachment_ep_statistics/``)."""
    out = {}
    for f in _find(Path(directory), "*.json", "attachment_ep_statistics"):
        try:
            a = np.asarray(json.loads(f.read_text())["logical_count"], dtype=np.float64)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{f}: expected {{'logical_count': [[...]]}}: {e}") from None
        if a.ndim != 2 or a.shape[0] <= kR1DenseLayers or not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"{f}: logical_count must be a finite nonnegative [layers, experts] array, "
                             f"got shape {a.shape}")
        if np.any(a[:kR1DenseLayers].sum(1) != 0) or np.any(a[kR1DenseLayers:].sum(1) <= 0):
            raise ValueError(f"{f}: expected {kR1DenseLayers} all-zero dense layers, then MoE layers "
                             "with counts")
        out[f.stem] = a
    return out


def read_v2_lite_csv(path, experts: int = kV2Experts) -> Tuple[np.ndarray, bool]:
    """One prompt's routing: (int16 [MoE layers, T, k], whether token 0 is the BOS token). The MoE
    layers must be numbered 1..L and every row must hold k distinct ids in [0, experts)."""
    path = Path(path)
    rows: Dict[int, list] = {}
    first_token = None
    top_k = None
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header != kV2Header:
            raise ValueError(f"{path}: header {header!r}, expected {kV2Header!r}")
        for line, row in enumerate(reader, start=2):
            if len(row) != 4:
                raise ValueError(f"{path}:{line}: expected 4 fields, got {len(row)}")
            try:
                layer, batch = int(row[0]), int(row[1])
                ids = [int(v) for v in row[3].strip().strip("[]").split(",")]
            except ValueError:
                raise ValueError(f"{path}:{line}: cannot parse {row!r}") from None
            top_k = len(ids) if top_k is None else top_k
            if batch != 0 or layer < 1:
                raise ValueError(f"{path}:{line}: layer {layer} / batch {batch} outside the expected range")
            if len(ids) != top_k or len(set(ids)) != top_k or min(ids) < 0 or max(ids) >= experts:
                raise ValueError(f"{path}:{line}: expected {top_k} distinct ids in [0, {experts}), got {ids}")
            if first_token is None:
                first_token = row[2]
            rows.setdefault(layer, []).append(ids)
    if not rows or sorted(rows) != list(range(1, max(rows) + 1)):
        raise ValueError(f"{path}: expected MoE layers numbered 1..L, got {sorted(rows)}")
    lengths = {len(v) for v in rows.values()}
    if len(lengths) != 1:
        raise ValueError(f"{path}: layers have different token counts {sorted(lengths)}")
    return np.asarray([rows[layer] for layer in sorted(rows)], dtype=np.int16), first_token == kBos


def load_v2_lite(directory, experts: int = kV2Experts) -> Dict[int, np.ndarray]:
    """{prompt number: int16 [26, T, 6]} with a leading BOS token dropped (decode never sees it)."""
    out = {}
    for f in _find(Path(directory), "prompt_*_data.csv", "expert_activation_scripts/training_data_eamc"):
        m = re.fullmatch(r"prompt_(\d+)_data\.csv", f.name)
        if not m:
            continue
        a, bos = read_v2_lite_csv(f, experts)
        a = a[:, 1:] if bos else a
        if a.shape[1] > 0:
            out[int(m.group(1))] = a
    if not out:
        raise ValueError(f"no prompt_<n>_data.csv with tokens under {directory}")
    shapes = {(a.shape[0], a.shape[2]) for a in out.values()}
    if len(shapes) != 1:
        raise ValueError(f"prompt files under {directory} disagree on (layers, top_k): {sorted(shapes)}")
    return out


# ---------------------------------------------------------------------------------------------
# statistics of the sources

def r1_popularity(counts: Dict[str, np.ndarray], phase: str) -> np.ndarray:
    """[MoE layers, E]: the mean over a phase's files of each file's normalized counts (each workload
    weighs the same, however many tokens it served)."""
    sel = [a[kR1DenseLayers:] for name, a in sorted(counts.items()) if name.startswith(phase)]
    if not sel:
        raise ValueError(f"no {phase}_*.json among the serving counts")
    return np.mean([a / a.sum(1, keepdims=True) for a in sel], 0)


def r1_source_stats(counts: Dict[str, np.ndarray], top_k: int = 8) -> dict:
    out = {}
    for phase in ("decode", "prefill"):
        skew = skew_stats(r1_popularity(counts, phase))
        s = _jsonable(skew)
        s["files"] = {}
        for name, a in sorted(counts.items()):
            if name.startswith(phase):
                fs = skew_stats(a[kR1DenseLayers:])
                s["files"][name] = {k: {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
                                        "argmax": int(v.argmax())} for k, v in fs.items()}
                s["files"][name]["tokens"] = float(a[kR1DenseLayers].sum() / top_k)
        out[f"r1_{phase}"] = s
    return out


def batch_distinct(sequences: Sequence[np.ndarray], batch: int = 8) -> np.ndarray:
    """[L] mean distinct experts per step when ``batch`` consecutive sequences run side by side
    (aligned at their first token, up to the shortest of each group)."""
    total, steps = 0.0, 0
    for g in range(0, len(sequences) - batch + 1, batch):
        group = sequences[g:g + batch]
        t = min(s.shape[1] for s in group)
        trace = np.stack([s[:, :t] for s in group], 2).transpose(1, 0, 2, 3)  # [t, L, batch, k]
        total = total + distinct_per_step(trace) * t
        steps += t
    return total / max(steps, 1)


def independent_distinct(sequences: Sequence[np.ndarray], batch: int = 8, draws: int = 4000,
                         seed: int = 0) -> np.ndarray:
    """[L] mean distinct experts among ``batch`` tokens drawn from ``batch`` different sequences,
    each token uniform over all tokens (sequences chosen in proportion to their length): a batch of
    independent streams, free of the first positions' shared routing."""
    rng = np.random.default_rng(seed)
    lengths = np.array([s.shape[1] for s in sequences])
    tokens = np.concatenate(sequences, 1)  # [L, all tokens, k]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    # successive sampling ∝ length without replacement = the top `batch` of log(length) + Gumbel noise
    keys = np.log(lengths)[None, :] + rng.gumbel(size=(draws, len(sequences)))
    pick = np.argpartition(-keys, batch - 1, axis=1)[:, :batch]  # [draws, batch]
    pos = starts[pick] + (rng.random(pick.shape) * lengths[pick]).astype(np.int64)
    return distinct_per_step(tokens[:, pos].transpose(1, 0, 2, 3))  # [draws, L, batch, k]


def v2_source_stats(v2: Dict[int, np.ndarray], parity: int, experts: int = kV2Experts,
                    distances=kDistances) -> dict:
    seqs = [v2[n] for n in sorted(v2) if n % 2 == parity]
    st = sequence_stats(seqs, experts, distances)
    st["distinct_per_step"] = independent_distinct(seqs, 8)
    out = _jsonable(st)
    aligned = batch_distinct(seqs, 8)
    out["layers"]["distinct_per_step_aligned"] = [float(x) for x in aligned]
    out["summary"]["distinct_per_step_aligned"] = float(aligned.mean())
    out["files"] = len(seqs)
    out["tokens"] = int(sum(s.shape[1] for s in seqs))
    return out


# ---------------------------------------------------------------------------------------------
# the fit

def reuse_curve(bias: np.ndarray, top_k: int, corr: np.ndarray, pairs: int = 10000,
                seed: int = 1) -> np.ndarray:
    """Reuse r(c): the fraction of a token's top_k shared with a token whose latent scores have
    correlation c with its own, for each c in ``corr`` (Monte Carlo, common random numbers)."""
    rng = np.random.default_rng(seed)
    e = len(bias)
    z1 = rng.standard_normal((pairs, e))
    w = rng.standard_normal((pairs, e))

    def chosen(s):
        m = np.zeros(s.shape, dtype=bool)
        np.put_along_axis(m, np.argpartition(-s, top_k - 1, axis=1)[:, :top_k], True, axis=1)
        return m

    m1 = chosen(z1 + bias)
    r = np.array([(m1 & chosen(c * z1 + np.sqrt(1 - c * c) * w + bias)).sum() / m1.sum() for c in corr])
    return np.maximum.accumulate(r)


def observed_reuse(seqs: Sequence[np.ndarray], experts: int, distances=kFitDistances):
    """Per layer reuse at each distance and the token pairs behind it: ([L, D], [L, D])."""
    n_layers = seqs[0].shape[0]
    num = np.zeros((n_layers, len(distances)))
    den = np.zeros((n_layers, len(distances)))
    for a in seqs:
        m = np.zeros((n_layers, a.shape[1], experts), dtype=bool)
        np.put_along_axis(m, a.astype(np.int64), True, axis=2)
        for j, d in enumerate(distances):
            if a.shape[1] > d:
                num[:, j] += (m[:, d:] & m[:, :-d]).sum((1, 2))
                den[:, j] += m[:, d:].sum((1, 2))
    return num / np.maximum(den, 1), den


def fit_weights(corr: np.ndarray, distances: Sequence[int], pair_weights: np.ndarray,
                taus=kTaus) -> np.ndarray:
    """Nonnegative parts [len(taus) + 2] (AR parts, persistent, white) whose c(d) = Σ w_i ρ_i^d + w_p
    best fits ``corr`` [D] in weighted least squares, Σ w ≤ 1 (the rest is white noise). Exact:
    every active set is tried (there are 2^(len(taus)+1))."""
    d = np.asarray(distances, dtype=np.float64)
    rho = np.exp(-1.0 / np.asarray(taus))
    a = np.concatenate([rho[None, :] ** d[:, None], np.ones((len(d), 1))], 1)  # [D, C+1]
    sw = np.sqrt(np.asarray(pair_weights, dtype=np.float64))
    aw, yw = a * sw[:, None], np.asarray(corr) * sw
    nvar = a.shape[1]
    best, best_err = np.zeros(nvar), float(np.sum(yw ** 2))
    for size in range(1, nvar + 1):
        for s in itertools.combinations(range(nvar), size):
            s = list(s)
            cands = [np.linalg.lstsq(aw[:, s], yw, rcond=None)[0]]
            # with Σ w = 1 active: w_last = 1 − Σ others
            if size == 1:
                cands.append(np.ones(1))
            else:
                base = aw[:, s[-1]]
                m = aw[:, s[:-1]] - base[:, None]
                x = np.linalg.lstsq(m, yw - base, rcond=None)[0]
                cands.append(np.concatenate([x, [1 - x.sum()]]))
            for x in cands:
                if np.all(x >= -1e-12) and x.sum() <= 1 + 1e-9:
                    full = np.zeros(nvar)
                    full[s] = np.clip(x, 0, None)
                    err = float(np.sum((aw @ full - yw) ** 2))
                    if err < best_err:
                        best, best_err = full, err
    best = best / max(1.0, best.sum())
    return np.concatenate([best, [1.0 - best.sum()]])


def map_by_depth(values: np.ndarray, layers: int) -> np.ndarray:
    """Rows of a per-layer array [L0, ...] interpolated to ``layers`` layers by relative depth."""
    l0 = values.shape[0]
    x0 = (np.arange(l0) + 0.5) / l0
    x = (np.arange(layers) + 0.5) / layers
    return np.stack([np.interp(x, x0, values[:, j]) for j in range(values.shape[1])], 1)


def fit_routing_model(sglang_dir, v2_lite_dir, *, meta: Optional[dict] = None, top_k: int = 8,
                      v2_experts: int = kV2Experts, taus=kTaus, corr_grid: int = 45, pairs: int = 10000,
                      calibration_samples: int = 4000, stats_steps: int = 256, stats_batch: int = 32,
                      stats_prefill: int = 4096,
                      progress: Callable[[str], None] = lambda s: None) -> RoutingModel:
    """Fits the routing model: R1 popularity (decode and prefill files), V2-Lite latent correlation
    per layer (even prompt files only), mapped to R1's MoE layers by relative depth. The sources' and
    the generator's statistics go into ``meta`` (odd files reported beside the even ones).

    top_k : experts per token of the serving-count model (DeepSeek-R1: 8)
    corr_grid, pairs : the correlation grid and Monte Carlo pairs of the reuse → correlation map
    calibration_samples : Monte Carlo samples of the bias calibration
    stats_steps, stats_batch, stats_prefill : size of the generated traces whose statistics are stored
    """
    counts = load_sglang_counts(sglang_dir)
    shapes = {a.shape for a in counts.values()}
    if len(shapes) != 1:
        raise ValueError(f"serving-count files disagree on shape: {sorted(shapes)}")
    progress(f"serving counts: {len(counts)} files, shape {shapes.pop()}")
    dec, pre = r1_popularity(counts, "decode"), r1_popularity(counts, "prefill")
    v2 = load_v2_lite(v2_lite_dir, v2_experts)
    even = [v2[n] for n in sorted(v2) if n % 2 == 0]
    if not even or len(even) == len(v2):
        raise ValueError("V2-Lite files must include even (fit) and odd (evaluation) prompt numbers")
    v2_layers, v2_top_k = even[0].shape[0], even[0].shape[2]
    progress(f"V2-Lite: {len(v2)} prompts ({v2_layers} MoE layers, top-{v2_top_k}), "
             f"{len(even)} even for the fit")

    v2_counts = np.zeros((v2_layers, v2_experts))
    for a in even:
        np.add.at(v2_counts, (np.arange(v2_layers)[:, None], a.reshape(v2_layers, -1).astype(np.int64)), 1)
    v2_pop = (v2_counts + 0.5) / (v2_counts + 0.5).sum(1, keepdims=True)  # +0.5: no expert exactly 0
    v2_bias = np.stack([calibrate_bias(p, v2_top_k, samples=calibration_samples) for p in v2_pop])
    obs, den = observed_reuse(even, v2_experts, kFitDistances)
    grid = np.concatenate([np.linspace(0.0, 0.9, corr_grid - 10, endpoint=False),
                           np.linspace(0.9, 0.995, 10)])
    v2_weights, corr_obs = [], []
    for i in range(v2_layers):
        curve = reuse_curve(v2_bias[i], v2_top_k, grid, pairs=pairs, seed=1 + i)
        c = np.interp(obs[i], curve, grid)  # reuse → latent correlation (clipped at the grid's ends)
        corr_obs.append(c)
        v2_weights.append(fit_weights(c, kFitDistances, den[i], taus))
    v2_weights = np.asarray(v2_weights)
    progress("V2-Lite latent correlation fitted per layer")

    source = RoutingModel(v2_pop, v2_pop, v2_weights, v2_top_k, taus,
                          meta={"shape": f"{v2_layers} MoE layers, {v2_experts} routed experts, "
                                         f"top-{v2_top_k}",
                                "fit_distances": list(kFitDistances),
                                "reuse_observed": obs.round(5).tolist(), "pairs": den.tolist(),
                                "corr_observed": np.asarray(corr_obs).round(5).tolist()},
                          biases={(p, v2_experts, v2_top_k): v2_bias for p in ("decode", "prefill")},
                          calibration_samples=calibration_samples)
    model = RoutingModel(dec, pre, map_by_depth(v2_weights, dec.shape[0]), top_k, taus, meta=dict(meta or {}),
                         source_model=source, calibration_samples=calibration_samples)
    for phase in ("decode", "prefill"):
        model.bias(phase, model.experts, model.top_k)
        progress(f"R1 {phase} biases calibrated")

    stats = r1_source_stats(counts, top_k)
    stats["v2_lite_even"] = v2_source_stats(v2, 0, v2_experts)
    stats["v2_lite_odd"] = v2_source_stats(v2, 1, v2_experts)
    model.meta["source_stats"] = stats
    model.meta["generator_stats"] = generator_stats(model, stats_steps, stats_batch, stats_prefill)
    progress("statistics computed")
    return model


def generator_stats(model: RoutingModel, steps: int = 256, batch: int = 32,
                    prefill_tokens: int = 4096) -> dict:
    """The generator's statistics at R1's shape (decode, batch ``batch``; prefill, one prompt of
    ``prefill_tokens``) and at the source shape (V2-Lite, the same steps × batch), seed 0."""
    k, e = model.top_k, model.experts
    shape = dict(layers=model.layers, experts=e, top_k=k)
    out = {"decode": trace_stats(model.decode_trace(steps, batch, **shape), e),
           "prefill": trace_stats(model.prefill_trace(prefill_tokens, **shape), e)}
    out["decode"]["settings"] = {"steps": steps, "batch": batch, "seed": 0}
    # skew from many short independent sequences (the serving counts pool many requests)
    out["decode_skew"] = trace_stats(model.decode_trace(16, 16 * batch, **shape), e, distances=(1,))
    out["decode_skew"]["settings"] = {"steps": 16, "batch": 16 * batch, "seed": 0}
    out["decode"]["layers"]["distinct_per_step_batch8"] = [
        float(x) for x in distinct_per_step(model.decode_trace(steps, 8, **shape))]
    out["decode"]["summary"]["distinct_per_step_batch8"] = float(
        np.mean(out["decode"]["layers"]["distinct_per_step_batch8"]))
    src = model.source_model
    if src is not None:
        t = src.decode_trace(steps, batch, layers=src.layers, experts=src.experts, top_k=src.top_k)
        out["source_shape"] = trace_stats(t, src.experts)
        d8 = distinct_per_step(t[:, :, :8])
        out["source_shape"]["layers"]["distinct_per_step_batch8"] = [float(x) for x in d8]
        out["source_shape"]["summary"]["distinct_per_step_batch8"] = float(d8.mean())
    return out


__all__ = ["fit_routing_model", "fit_weights", "generator_stats", "load_sglang_counts", "load_v2_lite",
           "map_by_depth", "observed_reuse", "r1_popularity", "read_v2_lite_csv", "reuse_curve"]


# ---------------------------------------------------------------------------------------------
# evaluation and the summary the docs quote

def uniform_trace(steps: int, layers: int, batch: int, experts: int = 256, top_k: int = 8,
                  seed: int = 0) -> np.ndarray:
    """What random weights route like: each token a uniform draw of top_k distinct experts."""
    rng = np.random.default_rng(seed)
    out = np.empty((steps, layers, batch, top_k), np.int32)
    for t in range(steps):
        out[t] = np.argpartition(rng.random((layers, batch, experts)), top_k - 1, axis=-1)[..., :top_k]
    return out


def cache_evaluation(model: RoutingModel, steps: int = 1000, share: float = 120 / 14848,
                     batches: Sequence[int] = (1, 8), sub_layers: int = 6,
                     progress: Callable[[str], None] = lambda s: None) -> dict:
    """Misses per token per MoE layer of Belady's MIN, LRU and LRFU (λ 0.05) on decode traces with
    an expert cache of ``share`` of the experts (default: DeepSeek-R1's full-depth share in a 16 GiB
    plan, 120 of 58 · 256), for all layers, for ``sub_layers`` layers picked each way with the same
    share (never below one request), for the representative ones with ``equivalent_capacity``, and
    for uniform routing. CPU seconds of each simulation are recorded."""
    from .cache_floor import belady_misses, equivalent_capacity, lrfu_misses, lru_misses, max_request

    out = {"steps": steps, "share": share, "rows": []}
    for batch in batches:
        full = model.decode_trace(steps, batch, layers=model.layers)
        work = float(distinct_per_step(full).mean())
        full_cap = max(int(round(share * model.layers * model.experts)), max_request(full))
        rep = model.select_layers(sub_layers, "representative")
        cases = [("all", np.arange(model.layers), full, full_cap)]
        for how in ("representative", "spread", "first"):
            ids = model.select_layers(sub_layers, how)
            cases.append((how, ids, full[:, ids], None))
        cases.append(("representative, equivalent slots", rep, full[:, rep],
                      equivalent_capacity(full_cap, model.layers, sub_layers, work)))
        cases.append(("uniform", np.arange(model.layers),
                      uniform_trace(steps, model.layers, batch, model.experts, model.top_k), full_cap))
        for name, ids, trace, capacity in cases:
            want = int(round(share * len(ids) * model.experts))
            capacity = max(want if capacity is None else capacity, max_request(trace))
            row = {"batch": batch, "layers": name, "layer_ids": [int(i) for i in ids], "capacity": capacity,
                   "capacity_from_share": want}
            for policy, fn in (("belady", belady_misses), ("lru", lru_misses), ("lrfu", lrfu_misses)):
                if name == "uniform" and policy != "belady":
                    continue
                t0 = time.process_time()
                r = fn(trace, capacity, experts=model.experts)
                row[f"{policy}_cpu_s"] = time.process_time() - t0
                row[f"{policy}_misses_per_token_layer"] = r.total_misses / (steps * len(ids) * batch)
                row[f"{policy}_miss_rate"] = r.miss_rate
            out["rows"].append(row)
            progress(f"cache eval batch {batch} {name}: {capacity} slots, belady "
                     f"{row['belady_misses_per_token_layer']:.3f} misses/token/layer "
                     f"({row['belady_cpu_s']:.1f} s cpu)")
    return out


def _fmt(s: dict, name: str, scale: float = 1.0, digits: int = 2) -> str:
    v = s.get(name)
    if not isinstance(v, dict):
        return "–"
    f = f"{{:.{digits}f}}"
    return f"{f.format(v['mean'] * scale)} ({f.format(v['min'] * scale)}–{f.format(v['max'] * scale)})"


def summary_table(model: RoutingModel, cache_eval: Optional[dict] = None) -> str:
    """Markdown tables: the sources' statistics beside the generator's (mean over layers, range)."""
    src, gen = model.meta["source_stats"], model.meta["generator_stats"]
    lines = ["Skew per MoE layer, R1 shape (mean over layers, min–max):", "",
             "| quantity | serving counts, decode | generator, decode | serving counts, prefill | "
             "generator, prefill (one prompt) |", "| --- | --- | --- | --- | --- |"]
    dec_gen = gen.get("decode_skew", gen["decode"])["summary"]
    for q, label in (("max_over_mean", "busiest expert / mean"), ("top10_share", "top-10% share")):
        lines.append(f"| {label} | {_fmt(src['r1_decode']['summary'], q)} | {_fmt(dec_gen, q)} | "
                     f"{_fmt(src['r1_prefill']['summary'], q)} | {_fmt(gen['prefill']['summary'], q)} |")
    ev, od, sg = src["v2_lite_even"]["summary"], src["v2_lite_odd"]["summary"], gen["source_shape"]["summary"]

    def row(label, a, b, c):
        return f"| {label} | {a} | {b} | {c} |"

    lines += ["", "Reuse, V2-Lite shape (26 layers, 64 experts, top-6):", "",
              row("quantity", "even files (fit)", "generator", "odd files (evaluation)"),
              "| --- | --- | --- | --- |",
              row("reuse d=1", *(_fmt(x, "reuse", digits=3) for x in (ev, sg, od)))]
    for d in ("2", "4", "16", "64"):
        lines.append(row(f"reuse d={d}", *(f"{x['reuse_at'][d]:.3f}" for x in (ev, sg, od))))
    lines.append(row("distinct experts per step, batch 8", f"{ev['distinct_per_step']['mean']:.1f}",
                     f"{sg['distinct_per_step_batch8']:.1f}", f"{od['distinct_per_step']['mean']:.1f}"))
    lines.append(row("the same, 8 prompts started together", f"{ev['distinct_per_step_aligned']:.1f}", "–",
                     f"{od['distinct_per_step_aligned']:.1f}"))
    lines.append(row("busiest expert / mean", *(_fmt(x, "max_over_mean") for x in (ev, sg, od))))
    d = gen["decode"]["summary"]
    far = " | ".join(f"{d['reuse_at'][k]:.3f}" for k in ("2", "4", "16", "64"))
    lines += ["", "Generator at R1's shape (58 layers, 256 experts, top-8), decode:", "",
              "| reuse d=1 | d=2 | d=4 | d=16 | d=64 | distinct per step, batch 8 |",
              "| --- | --- | --- | --- | --- | --- |",
              f"| {_fmt(d, 'reuse', digits=3)} | {far} | {d['distinct_per_step_batch8']:.1f} of 64 |"]
    if cache_eval:
        lines += ["", f"Expert cache at {cache_eval['share'] * 100:.2f}% of the experts, "
                  f"{cache_eval['steps']} decode steps: misses per token per MoE layer (CPU s of the "
                  "simulation):", "",
                  "| batch | layers | slots | Belady | LRU | LRFU |", "| --- | --- | --- | --- | --- | --- |"]
        for r in cache_eval["rows"]:
            def cell(p):
                k = f"{p}_misses_per_token_layer"
                return f"{r[k]:.3f} ({r[f'{p}_cpu_s']:.1f} s)" if k in r else "–"
            slots = f"{r['capacity']}" + ("" if r["capacity"] == r["capacity_from_share"] else
                                          f" (share: {r['capacity_from_share']})")
            which = r["layers"]
            if len(r["layer_ids"]) < 10:
                which += " (R1 layers " + ", ".join(str(i + kR1DenseLayers) for i in r["layer_ids"]) + ")"
            cells = " | ".join(cell(p) for p in ("belady", "lru", "lrfu"))
            lines.append(f"| {r['batch']} | {which} | {slots} | {cells} |")
    return "\n".join(lines)
