"""Engine: load a model, then prefill → decode_one_token → … → generate.

    engine = Engine.from_pretrained("path/to/model")          # device="auto", dtype by device
    print(engine.generate("The capital of France is", max_tokens=32).text)
    for piece in engine.stream("Tell me a story", temperature=0.6, seed=0):
        print(piece, end="", flush=True)

Batches: prompts of different lengths are right-padded; every sequence keeps its tokens at
their own positions (cache slot = position), so no sequence shifts and padding never enters
attention (keys are masked by position). Decode feeds one token per sequence per step;
sequences that finished keep a slot in the batch until all are done.

CUDA graphs (``use_cuda_graph=True``, CUDA only): decode_one_token is captured once per
(batch size, attended-length bucket) with static token/position buffers and replayed;
buckets are powers of two from 128 up to ``max_seq_len``, so a step attends over at most
twice the live length (eager decode uses the same buckets, so both compute the same thing).
Prefill always runs eagerly.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Generator, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._ext import _C, has_cuda_kernels
from .checkpoint import CheckpointSource
from .guard import Occupancy, exclusive, exclusive_iter, nonfinite_message, sample_checked
from .memory_plan import MemoryPlan, PagingSettings, plan_memory, size_text
from .model import DeepseekV3, KVCache, rms_norm
from .paged import PagedWeightStore, RoutePoint, non_nvfp4_expert
from .precision import PrecisionPolicy, resolve_compute_dtype
from .resident import ResidentWeightStore
from .sampling import SamplingParams
from .tokenizer import IncrementalDecoder, Tokenizer, check_messages, check_text
from .validation import check_tokenizer_fits
from .weights import HostPoint, WeightStore, run_host_points

GiB = 1 << 30
CUBLAS_WORKSPACE = 32 << 20   # PyTorch's default per-stream cuBLAS workspace on Hopper (":4096:8")
DEFAULT_MAX_SEQ_LEN = 4096
MAX_MEMORY_LIMIT = 1 << 20   # GiB (1 PiB): larger budgets overflow byte counts
DEFAULT_MAX_TOKENS = 256
_GRAPH_MIN_BUCKET = 128

PromptLike = Union[str, Sequence[int], Sequence[Dict[str, Any]]]


@dataclass
class Completion:
    """One generated sequence.

    text : the generated text (special tokens skipped; cut before a matched stop string)
    token_ids : generated ids (an EOS / stop token that ended generation is not included)
    finish_reason : "eos" (EOS or a stop token id), "stop" (a stop string), "length"
        (max_tokens, or the context is full) or "error" (the model produced NaN or inf logits;
        ``error`` says where, and text / token_ids hold what came before)
    prompt_tokens : number of prompt tokens (BOS and chat template included)
    error : why generation failed (finish_reason "error"), else None
    """

    text: str
    token_ids: List[int]
    finish_reason: str
    prompt_tokens: int
    error: Optional[str] = None


@dataclass
class GenerationStats:
    """Timings of the last generate/stream call (wall clock, synchronised by token reads)."""

    batch_size: int = 0          # largest batch run
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decoded_rows: int = 0        # rows through decode_one_token (finished sequences included)
    cuda_graph: bool = False

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode throughput: batch rows per second through decode_one_token."""
        return self.decoded_rows / self.decode_s if self.decode_s > 0 else 0.0


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    """"auto" → cuda when a GPU and the CUDA kernels are present, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and has_cuda_kernels() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: no CUDA device is available (use device='cpu' or 'auto')")
        if not has_cuda_kernels():
            raise ValueError(f"device={device!r}: this build of deepseek-fp4 has no CUDA kernels")
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def as_paging_settings(paging: Union[None, PagingSettings, Dict[str, Any]]) -> PagingSettings:
    if paging is None:
        return PagingSettings()
    if isinstance(paging, PagingSettings):
        return paging.validate()
    if not isinstance(paging, dict):
        raise ValueError(f"paging must be a PagingSettings or a dict, got {type(paging).__name__}")
    known = set(PagingSettings.__dataclass_fields__)
    bad = sorted(set(paging) - known)
    if bad:
        raise ValueError(f"paging: unknown setting(s) {bad} (known: {', '.join(sorted(known))})")
    return PagingSettings(**paging).validate()


def plan_for(source: CheckpointSource, dev: torch.device, cdt: torch.dtype, policy: PrecisionPolicy,
             settings: PagingSettings, memory_limit: Optional[float], max_batch_size: int, max_seq_len: int,
             prefill_chunk: int) -> Optional[MemoryPlan]:
    """The memory plan, or None when there is no budget to plan (CPU without memory_limit)."""
    if memory_limit is not None and (isinstance(memory_limit, bool) or not isinstance(memory_limit, (int, float))
                                     or not math.isfinite(memory_limit) or not 0 < memory_limit <= MAX_MEMORY_LIMIT):
        raise ValueError(f"memory_limit must be a positive number of GiB up to {MAX_MEMORY_LIMIT}, "
                         f"got {memory_limit!r}")
    total = None
    budget = None if memory_limit is None else int(memory_limit * GiB)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        frac = settings.gpu_memory_fraction
        if budget is None:
            budget = int((frac if frac is not None else 0.9) * free)
        elif frac is not None:
            budget = min(budget, int(frac * total))
    if budget is None:
        return None
    c = source.config
    unit = _C.paging.expert_unit_layout(c.hidden_size, c.moe_intermediate_size)["bytes"] if (
        c.hidden_size % 16 == 0 and c.moe_intermediate_size % 16 == 0) else 1 << 40
    if not hasattr(source, "tensor_info"):
        not_pageable = "paging reads routed experts from safetensors files (open the model folder)"
    elif cdt != torch.bfloat16:
        not_pageable = (f"paging runs the NVFP4 kernels on bfloat16 activations: use dtype='bfloat16' "
                        f"(got {str(cdt).replace('torch.', '')})")
    elif non_nvfp4_expert(source) is not None:
        not_pageable = ("paging experts reads them from NVFP4 safetensors files (convert FP8/BF16 checkpoints "
                        "with `deepseek-fp4 convert`)")
    else:
        not_pageable = ""
    pageable = not not_pageable
    # cuBLAS keeps a workspace per stream that runs a matmul: the compute and the graph side stream
    cublas = 2 * CUBLAS_WORKSPACE if dev.type == "cuda" else 0
    plan = plan_memory(source, policy, cdt, budget, settings, max_batch_size, max_seq_len, prefill_chunk, unit,
                       device_total=total, experts_pageable=pageable, library_workspace=cublas,
                       not_pageable_reason=not_pageable)
    if plan.paged and cdt != torch.bfloat16:
        raise ValueError(f"the model needs paging within {size_text(budget)}, which runs the FP4 kernels: "
                         f"use dtype='bfloat16' (got {str(cdt).replace('torch.', '')})")
    if plan.paged and plan.paged_layers and not pageable:
        raise ValueError(f"the model needs paging within {size_text(budget)}: {not_pageable}")
    return plan


class Engine:
    """Generation over a ``WeightStore``.

    Parameters
    ----------
    store : the model's weights (``ResidentWeightStore`` today)
    tokenizer : Tokenizer, or None (prompts must then be token ids)
    max_seq_len : context of one sequence, prompt + generated (default min(model context, 4096))
    max_batch_size : prompts run together; longer lists run in consecutive batches
    use_cuda_graph : capture decode_one_token in CUDA graphs (ignored with a warning off CUDA)
    prefill_chunk : prompt tokens per prefill forward (bounds activation memory)
    """

    def __init__(self, store: WeightStore, tokenizer: Optional[Tokenizer] = None,
                 max_seq_len: Optional[int] = None, max_batch_size: int = 8, use_cuda_graph: bool = False,
                 prefill_chunk: int = 2048):
        c = store.config
        if max_seq_len is None:
            max_seq_len = min(c.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        _check_int("max_seq_len", max_seq_len, 2)
        if max_seq_len > c.max_position_embeddings:
            raise ValueError(f"max_seq_len = {max_seq_len} exceeds the model's context "
                             f"(max_position_embeddings = {c.max_position_embeddings})")
        _check_int("max_batch_size", max_batch_size, 1)
        _check_int("prefill_chunk", prefill_chunk, 1)
        if tokenizer is not None:
            check_tokenizer_fits(tokenizer, c.vocab_size)
        self.store, self.config, self.tokenizer = store, c, tokenizer
        self.device, self.dtype = store.device, store.compute_dtype
        self.max_seq_len, self.max_batch_size, self.prefill_chunk = max_seq_len, max_batch_size, prefill_chunk
        self.model = DeepseekV3(store, max_positions=max_seq_len)
        self.eos_token_ids = set(c.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self.cache: Optional[KVCache] = None
        self._graphs: Dict[Tuple[int, int], "_DecodeGraph"] = {}
        self._graph_pool = None
        self.use_cuda_graph = False
        self.set_use_cuda_graph(use_cuda_graph)
        self.last_stats = GenerationStats()
        self.last_completion: Optional[Completion] = None   # set by stream()
        self._occupancy = Occupancy()   # one generation at a time (guard.py)

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Union[str, Path, CheckpointSource],
                        device: Union[None, str, torch.device] = "auto", memory_limit: Optional[float] = None,
                        dtype: Union[None, str, torch.dtype] = None,
                        precision: Union[None, str, PrecisionPolicy] = None,
                        max_seq_len: Optional[int] = None, max_batch_size: int = 8,
                        use_cuda_graph: bool = False, progress: bool = False,
                        prefill_chunk: int = 2048,
                        paging: Union[None, PagingSettings, Dict[str, Any]] = None,
                        verbose: bool = True) -> "Engine":
        """Loads a model folder (or any CheckpointSource) within a device memory budget.

        Parameters
        ----------
        path : model folder (config.json, safetensors, tokenizer.json) or a CheckpointSource
        device : "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"
        memory_limit : device memory budget in GiB for everything the engine keeps on the
            device (weights, KV cache, activations, layer slots, expert cache). The budget is
            planned before anything is loaded (``engine.memory_plan``); what does not fit is
            paged between GPU, pinned host memory and the checkpoint files. None: on CUDA,
            ``paging.gpu_memory_fraction`` (default 0.9) of the card's free memory; on the CPU,
            no limit (everything resident)
        dtype : compute dtype, "float32" or "bfloat16" (default: float32 on CPU, bfloat16 on CUDA);
            paging needs bfloat16
        precision : PrecisionPolicy or "default" / "fp4" / "bf16" (see precision.PrecisionPolicy)
        max_seq_len, max_batch_size, use_cuda_graph, prefill_chunk : see Engine
        paging : PagingSettings or a dict of its fields (prefetch_layers, max_gpu_layers,
            expert_threshold, cpu_cache_size, miss_mode, …; see memory_plan.PagingSettings)
        progress : show a progress bar while loading; verbose : print the plan when it pages
        """
        dev = resolve_device(device)
        cdt = resolve_compute_dtype(dtype, dev)
        policy = PrecisionPolicy.parse(precision)
        settings = as_paging_settings(paging)
        tokenizer = None
        if isinstance(path, CheckpointSource):
            source = path
        else:
            from .loader import open_checkpoint

            source = open_checkpoint(path)
            tokenizer = Tokenizer.from_dir(path)
        c = source.config
        seq = max_seq_len or min(c.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        plan = plan_for(source, dev, cdt, policy, settings, memory_limit, max_batch_size, seq, prefill_chunk)
        if plan is not None and plan.paged:
            if verbose:
                print(plan.table())
            store: WeightStore = PagedWeightStore(source, dev, cdt, policy, plan, settings,
                                                  max_rows=max(max_batch_size, prefill_chunk), progress=progress)
        else:
            store = ResidentWeightStore(source, dev, cdt, policy, progress=progress)
            if not isinstance(path, CheckpointSource) and hasattr(source, "close"):
                source.close()   # every weight is on the device now: release the memory maps
        engine = cls(store, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                     use_cuda_graph=use_cuda_graph, prefill_chunk=prefill_chunk)
        engine.memory_plan = plan
        engine.paging = settings
        return engine

    @staticmethod
    def plan(path: Union[str, Path, CheckpointSource], device: Union[None, str, torch.device] = "auto",
             memory_limit: Optional[float] = None, dtype: Union[None, str, torch.dtype] = None,
             precision: Union[None, str, PrecisionPolicy] = None, max_seq_len: Optional[int] = None,
             max_batch_size: int = 8, prefill_chunk: int = 2048,
             paging: Union[None, PagingSettings, Dict[str, Any]] = None) -> Optional[MemoryPlan]:
        """The memory plan ``from_pretrained`` would make, without loading anything (headers
        only). None when there is no budget to plan (CPU without memory_limit)."""
        dev = resolve_device(device)
        cdt = resolve_compute_dtype(dtype, dev)
        source = path
        if not isinstance(path, CheckpointSource):
            from .loader import open_checkpoint

            source = open_checkpoint(path)
        c = source.config
        seq = max_seq_len or min(c.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        try:
            return plan_for(source, dev, cdt, PrecisionPolicy.parse(precision), as_paging_settings(paging),
                            memory_limit, max_batch_size, seq, prefill_chunk)
        finally:
            if source is not path and hasattr(source, "close"):
                source.close()

    def set_use_cuda_graph(self, enabled: bool) -> None:
        """Turns CUDA-graph decode on or off (a warning, and off, when it cannot apply)."""
        if not isinstance(enabled, bool):
            raise ValueError(f"use_cuda_graph must be True or False, got {enabled!r}")
        self._drop_graphs()
        if enabled and self.device.type != "cuda":
            warnings.warn("use_cuda_graph is ignored: the engine runs on the CPU", stacklevel=2)
            enabled = False
        if enabled and not self.store.graph_safe:
            warnings.warn("use_cuda_graph is ignored: some routed experts are dense (not NVFP4), and the "
                          "dense expert path reads row counts on the host", stacklevel=2)
            enabled = False
        self.use_cuda_graph = enabled

    @exclusive   # not under a running generation's feet
    def reconfigure_paging(self, **changes) -> None:
        """Changes paging knobs that need no new memory plan (see PagedWeightStore.reconfigure)."""
        if not isinstance(self.store, PagedWeightStore):
            raise ValueError("reconfigure_paging: this engine keeps every weight resident (no memory_limit "
                             "below the model's size was given)")
        self._drop_graphs()
        self.store.reconfigure(**changes)
        self.paging = self.store.settings

    def _drop_graphs(self) -> None:
        # The allocator frees a graph pool with its last graph, so a new capture needs a new pool.
        self._graphs.clear()
        self._graph_pool = None

    # ---- stages --------------------------------------------------------------------------
    def _ensure_cache(self, batch: int) -> KVCache:
        if self.cache is None or self.cache.batch < batch:
            self.cache = None
            self._drop_graphs()   # graphs hold pointers into the old cache
            self.cache = KVCache(self.config, batch, self.max_seq_len, self.device, self.dtype)
        return self.cache

    @torch.inference_mode()
    def prefill(self, tokens: Tensor, lengths: Sequence[int]) -> Tensor:
        """Runs right-padded prompts into the KV cache (slots 0..len-1 of rows 0..B-1).

        Parameters
        ----------
        tokens : int64 [B, T] on the engine's device, right-padded
        lengths : the B prompt lengths (1 ≤ length ≤ T)

        Returns
        -------
        float32 [B, V] logits of each prompt's last token
        """
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point \
                or tokens.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise ValueError(f"tokens must be an integer tensor [B, T], got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
        B, T = tokens.shape
        if T > self.max_seq_len:
            raise ValueError(f"tokens has {T} positions, more than max_seq_len = {self.max_seq_len}")
        if tokens.numel():
            # one sync; an id out of range would index past the embedding (or wrap around, if negative)
            lo, hi = torch.aminmax(tokens)
            v = self.config.vocab_size
            for t in (int(lo), int(hi)):
                if not 0 <= t < v:
                    raise ValueError(f"tokens: token id {t} is outside the vocabulary [0, {v})")
        if len(lengths) != B or not all(_is_int(n) and 1 <= n <= T for n in lengths):
            raise ValueError(f"lengths must be {B} integers in [1, {T}], got {list(lengths)!r}")
        with self._compute():
            cache = self._ensure_cache(B)
            if isinstance(self.store, PagedWeightStore):
                return self._prefill_layer_major(tokens, lengths, cache)
            positions = torch.arange(T, device=self.device).expand(B, T)          # [B, T]
            last = torch.empty(B, self.config.hidden_size, dtype=self.dtype, device=self.device)  # [B, D]
            for start in range(0, T, self.prefill_chunk):
                end = min(start + self.prefill_chunk, T)
                h = self.model.forward(tokens[:, start:end], positions[:, start:end], cache, kv_len=end,
                                       causal=start == 0)                        # [B, t, D]
                rows = [b for b, n in enumerate(lengths) if start <= n - 1 < end]  # last token in this chunk
                if rows:
                    cols = [lengths[b] - 1 - start for b in rows]
                    last[rows] = h[rows, cols]
            return self.model.logits(last)                                        # [B, V]

    def _prefill_layer_major(self, tokens: Tensor, lengths: Sequence[int], cache: KVCache) -> Tensor:
        """Paged prefill: every chunk runs through layer l before any runs through l+1, so a
        layer's weights and experts are brought in once for the whole prompt (a chunk is
        prefill_chunk tokens over the batch; later chunks find the layer's experts cached).
        The float32 residuals of the chunks wait between layers; beyond the plan's
        prefill_group_tokens, consecutive groups of chunks run one after the other (each
        layer-major), which keeps the causal order of the cache."""
        B, T = tokens.shape
        m, store = self.model, self.store
        step = max(1, self.prefill_chunk // B)
        chunks = [(s, min(s + step, T)) for s in range(0, T, step)]
        limit = max(B * step, getattr(store.plan, "prefill_group_tokens", 0) or B * T)
        groups, cur, held = [], [], 0
        for ch in chunks:
            n = B * (ch[1] - ch[0])
            if cur and held + n > limit:
                groups.append(cur)
                cur, held = [], 0
            cur.append(ch)
            held += n
        groups.append(cur)
        positions = torch.arange(T, device=self.device).expand(B, T)              # [B, T]
        last = torch.empty(B, self.config.hidden_size, dtype=self.dtype, device=self.device)  # [B, D]
        norm, eps = store.final_norm(), self.config.rms_norm_eps
        store.begin_step(B * min(step, T))
        try:
            for group in groups:
                xs = [store.embedding()[tokens[:, s:e]].float() for s, e in group]   # [B, t, D] f32 each
                for layer in range(self.config.num_hidden_layers):
                    for i, (s, e) in enumerate(group):
                        store.prefetch_next_layer = i == len(group) - 1
                        xs[i] = run_host_points(m.layer_steps(layer, xs[i], positions[:, s:e], cache, e, False,
                                                              s == 0), store)
                for (s, e), x in zip(group, xs):
                    rows = [b for b, n in enumerate(lengths) if s <= n - 1 < e]
                    if rows:
                        cols = [lengths[b] - 1 - s for b in rows]
                        last[rows] = rms_norm(x[rows, cols], norm, eps, self.dtype)
        finally:
            store.prefetch_next_layer = True
        return m.logits(last)                                                     # [B, V]

    @contextmanager
    def _compute(self):
        """Runs the block on the paged store's compute stream (high priority), if it has one;
        the caller's stream then waits for it."""
        stream = getattr(self.store, "compute_stream", None)
        if stream is None or torch.cuda.current_stream(self.device) == stream:
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        stream.wait_stream(caller)
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            caller.wait_stream(stream)

    @torch.inference_mode()
    def decode_one_token(self, tokens: Tensor, positions: Tensor, kv_len: int) -> Tensor:
        """One decode step for every sequence of the cache's first B rows.

        Parameters
        ----------
        tokens : int64 [B], the latest token of each sequence
        positions : int64 [B], its position (cache slot)
        kv_len : ≥ max(positions) + 1; attention runs over the cache slots up to the next
            power-of-two bucket (≥ 128) of it, masked by position, in eager and CUDA-graph
            mode alike, so both compute the same thing

        Returns
        -------
        float32 [B, V] logits of the next token
        """
        B = tokens.shape[0]
        if self.cache is None or self.cache.batch < B:
            raise ValueError(f"decode_one_token: no KV cache for {B} sequences (run prefill first)")
        if not 1 <= kv_len <= self.max_seq_len:
            raise ValueError(f"kv_len = {kv_len} must be in [1, max_seq_len = {self.max_seq_len}]")
        bucket = _bucket(kv_len, self.max_seq_len)
        with self._compute():
            if self.use_cuda_graph:
                graph = self._graphs.get((B, bucket))
                if graph is None:
                    graph = self._graphs[(B, bucket)] = self._capture(B, bucket, tokens, positions)
                return graph.replay(tokens, positions)
            self.store.begin_step(B)
            return self._decode_eager(tokens, positions, bucket)

    def _decode_eager(self, tokens: Tensor, positions: Tensor, kv_len: int) -> Tensor:
        return run_host_points(self._decode_steps(tokens, positions, kv_len), self.store)

    def _decode_steps(self, tokens: Tensor, positions: Tensor, kv_len: int) -> Generator[HostPoint, None, Tensor]:
        """One decode step as a generator of host points (see DeepseekV3.forward_steps)."""
        h = yield from self.model.forward_steps(tokens[:, None], positions[:, None], self.cache, kv_len=kv_len,
                                                absorbed=True)                    # [B, 1, D]
        return self.model.logits(h[:, 0])                                         # [B, V]

    def _side_stream(self) -> torch.cuda.Stream:
        if getattr(self, "_side", None) is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def _capture(self, batch: int, kv_len: int, tokens: Tensor, positions: Tensor) -> "_DecodeGraph":
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return _DecodeGraph(self, batch, kv_len, tokens, positions, self._graph_pool)

    # ---- public API ----------------------------------------------------------------------
    @exclusive
    @torch.inference_mode()
    def logits(self, token_ids: Union[Sequence[int], Tensor]) -> Tensor:
        """Float32 logits [T, V] for every position of ``token_ids``, run exactly as given
        (no BOS added, no cache). For evaluation and tests."""
        ids = self._check_ids(token_ids, "token_ids")
        if len(ids) > self.max_seq_len:
            raise ValueError(f"token_ids has {len(ids)} tokens, more than max_seq_len = {self.max_seq_len}")
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)                # [1, T]
        positions = torch.arange(len(ids), device=self.device)[None]                      # [1, T]
        with self._compute():
            self.store.begin_step(len(ids))
            return self.model.logits(self.model.forward(tokens, positions, causal=True))[0]   # [T, V]

    @exclusive
    def generate(self, prompts: Union[PromptLike, Sequence[PromptLike]], max_tokens: int = DEFAULT_MAX_TOKENS,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
                 stop: Union[None, str, Sequence[str]] = None, stop_token_ids: Optional[Sequence[int]] = None,
                 ignore_eos: bool = False, chat: bool = False, add_bos: Optional[bool] = None
                 ) -> Union[Completion, List[Completion]]:
        """Generates a continuation of each prompt.

        Parameters
        ----------
        prompts : one prompt or a list. A prompt is a string, a list of token ids (used as
            given), or with ``chat=True`` a string (one user message) or a list of
            {"role", "content"} messages rendered with the chat template.
        max_tokens : most tokens to generate per prompt (≥ 1)
        temperature, top_p, top_k, seed : see ``SamplingParams``; prompt i of a list samples
            with seed + i, so a batch gives what its prompts give one by one
        stop : string(s) that end generation; the text is cut before the first match
        stop_token_ids : ids that end generation like EOS
        ignore_eos : keep generating through EOS
        chat : apply the tokenizer's chat template
        add_bos : override the tokenizer's BOS rule for string prompts

        Returns
        -------
        Completion for one prompt, list of Completion for a list
        """
        single, ids = self._prompts(prompts, chat, add_bos)
        plan = self._plan(ids, max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos)
        results: List[Optional[Completion]] = [None] * len(ids)
        stats = GenerationStats(cuda_graph=self.use_cuda_graph)
        for start in range(0, len(ids), self.max_batch_size):
            for i, _, done in self._run(plan, start, min(start + self.max_batch_size, len(ids)), stats):
                if done is not None:
                    results[i] = done
        self.last_stats = stats
        return results[0] if single else results  # type: ignore[return-value]

    def stream(self, prompt: PromptLike, max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
               stop: Union[None, str, Sequence[str]] = None, stop_token_ids: Optional[Sequence[int]] = None,
               ignore_eos: bool = False, chat: bool = False, add_bos: Optional[bool] = None) -> Iterator[str]:
        """Like ``generate`` for one prompt, yielding text pieces as they are decoded. Their
        concatenation equals ``generate(...).text``; text that may begin a stop string is held
        back until it is known not to. Needs a tokenizer. After the loop, ``last_completion``
        holds the Completion (check its finish_reason: "error" ends the stream early). The
        stream holds the engine from its first piece until it ends, is closed or dropped;
        meanwhile other calls on this engine raise EngineBusyError."""
        self._occupancy.check("stream()")
        single, ids = self._prompts(prompt, chat, add_bos)
        if not single:
            raise ValueError("stream takes one prompt; use generate for a list")
        if self.tokenizer is None:
            raise ValueError("stream needs a tokenizer (the model folder has no tokenizer.json); "
                             "use generate with token ids")
        plan = self._plan(ids, max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos)

        def pieces() -> Iterator[str]:
            stats = GenerationStats(cuda_graph=self.use_cuda_graph)
            for _, delta, done in self._run(plan, 0, 1, stats):
                if delta:
                    yield delta
                if done is not None:
                    self.last_completion = done
            self.last_stats = stats

        return exclusive_iter(self._occupancy, "stream()", pieces())

    # ---- input checking --------------------------------------------------------------------
    def _check_ids(self, ids: Union[Sequence[int], Tensor], name: str) -> List[int]:
        if isinstance(ids, Tensor):
            if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(f"{name} must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple, range)):
            raise ValueError(f"{name} must be a sequence of integer token ids")
        bad = next((i for i, t in enumerate(ids) if not _is_int(t)), None)
        if bad is not None:
            t = ids[bad]
            raise ValueError(f"{name}[{bad}] must be an integer token id, got {t!r} ({type(t).__name__})")
        ids = list(ids)
        if not ids:
            raise ValueError(f"{name} is empty")
        v = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < v]
        if bad:
            raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {v})")
        return ids

    def _prompts(self, prompts, chat: bool, add_bos: Optional[bool]) -> Tuple[bool, List[List[int]]]:
        """(single?, token ids per prompt)."""
        def is_ids(p) -> bool:
            # numbers of any kind: token ids (a bool or float among them is named by _check_ids)
            return isinstance(p, Tensor) or (isinstance(p, (list, tuple)) and len(p) > 0 and all(
                isinstance(t, (int, float)) for t in p))

        def is_messages(p) -> bool:
            return isinstance(p, (list, tuple)) and len(p) > 0 and all(isinstance(m, dict) for m in p)

        if isinstance(prompts, str) or is_ids(prompts) or (chat and is_messages(prompts)):
            single, items = True, [prompts]
        elif isinstance(prompts, (list, tuple)) and len(prompts) > 0:
            single, items = False, list(prompts)
        else:
            raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")
        out = []
        for i, p in enumerate(items):
            name = "prompt" if single else f"prompts[{i}]"
            if (isinstance(p, str) and p == "") or (isinstance(p, (list, tuple)) and len(p) == 0):
                raise ValueError(f"{name} is empty")
            if isinstance(p, str) or (chat and is_messages(p)):
                if self.tokenizer is None:
                    raise ValueError(f"{name}: text prompts need a tokenizer (the model has no "
                                     f"tokenizer.json); pass token ids")
                if chat:
                    check_messages(p, name if isinstance(p, str) else "messages")
                    ids = self.tokenizer.encode_chat(p)
                else:
                    check_text(p, name)
                    ids = self.tokenizer.encode(p, add_bos=add_bos)
                if not ids:
                    raise ValueError(f"{name} is empty")
            elif is_ids(p):
                ids = self._check_ids(p, name)
            else:
                raise ValueError(f"{name} must be a string or a list of token ids"
                                 + (" (or chat messages with chat=True)" if not chat else ""))
            if len(ids) >= self.max_seq_len:
                raise ValueError(f"{name} has {len(ids)} tokens but the context holds max_seq_len = "
                                 f"{self.max_seq_len} (prompt + at least one generated token)")
            out.append(ids)
        return single, out

    def _plan(self, ids, max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids,
              ignore_eos) -> "_Plan":
        _check_int("max_tokens", max_tokens, 1)
        params = SamplingParams(temperature, top_p, top_k, seed)
        if stop is None:
            stops: List[str] = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        for i, s in enumerate(stops):
            check_text(s, "stop" if isinstance(stop, str) else f"stop[{i}]")
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (the model has no tokenizer.json); "
                             "use stop_token_ids")
        if not isinstance(ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {ignore_eos!r}")
        extra: set = set()
        if stop_token_ids is not None:
            if isinstance(stop_token_ids, (str, bytes)) or not isinstance(stop_token_ids, (list, tuple, set)):
                raise ValueError(f"stop_token_ids must be a list of token ids, got {stop_token_ids!r}")
            if stop_token_ids:
                extra = set(self._check_ids(list(stop_token_ids), "stop_token_ids"))
        eos = set() if ignore_eos else set(self.eos_token_ids)
        end_ids = eos | extra
        return _Plan(ids, max_tokens, params, stops, end_ids, eos)

    # ---- the generation loop ---------------------------------------------------------------
    def _run(self, plan: "_Plan", lo: int, hi: int, stats: GenerationStats
             ) -> Iterator[Tuple[int, str, Optional[Completion]]]:
        """Generates prompts lo..hi-1 of the plan as one batch; yields (prompt index, new
        text, Completion when that sequence finished)."""
        prompts = plan.ids[lo:hi]
        B = len(prompts)
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        seqs = [_Sequence(i, len(p), self._decoder(), plan) for i, p in zip(range(lo, hi), prompts)]
        gens = plan.params.generators(hi, self.device)
        gens = gens[lo:hi] if gens is not None else None

        padded = torch.zeros(B, T, dtype=torch.long)
        for b, p in enumerate(prompts):
            padded[b, : len(p)] = torch.tensor(p)
        t0 = time.perf_counter()
        logits = self.prefill(padded.to(self.device), lengths)                            # [B, V]
        stats.batch_size = max(stats.batch_size, B)
        stats.prompt_tokens += sum(lengths)
        positions = list(lengths)   # where each sequence's next token goes
        first = True
        while True:
            next_tokens, finite = sample_checked(logits, plan.params, gens)               # [B], [B]
            t1 = time.perf_counter()
            if first:
                stats.prefill_s += t1 - t0
                first = False
            else:
                stats.decode_s += t1 - t0
                stats.decode_steps += 1
                stats.decoded_rows += B
            t0 = t1
            for b, s in enumerate(seqs):
                if s.done:
                    continue
                delta = (s.accept(next_tokens[b], room=self.max_seq_len - positions[b]) if finite[b]
                         else s.fail(nonfinite_message(len(s.tokens))))
                if delta or s.done:
                    yield s.index, delta, s.completion() if s.done else None
            if all(s.done for s in seqs):
                break
            feed = [s.last_token for s in seqs]
            pos = [min(p, self.max_seq_len - 1) for p in positions]
            logits = self.decode_one_token(torch.tensor(feed, dtype=torch.long, device=self.device),
                                           torch.tensor(pos, dtype=torch.long, device=self.device),
                                           kv_len=max(pos) + 1)
            positions = [p + 1 for p in positions]
        stats.generated_tokens += sum(len(s.tokens) for s in seqs)

    def _decoder(self) -> Optional[IncrementalDecoder]:
        return None if self.tokenizer is None else self.tokenizer.decoder()


# ---------------------------------------------------------------------------------------
# helpers


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(name: str, v: Any, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")


def _bucket(kv_len: int, cap: int) -> int:
    b = _GRAPH_MIN_BUCKET
    while b < kv_len:
        b *= 2
    return min(b, cap)


@dataclass
class _Plan:
    ids: List[List[int]]
    max_tokens: int
    params: SamplingParams
    stops: List[str]
    end_ids: set        # token ids that end a sequence (EOS unless ignored, + stop_token_ids)
    eos_ids: set        # the EOS part, for finish_reason


class _Sequence:
    """Generation state of one sequence: tokens, streamed text, stop-string hold-back."""

    def __init__(self, index: int, prompt_len: int, decoder: Optional[IncrementalDecoder], plan: _Plan):
        self.index, self.prompt_len, self.decoder, self.plan = index, prompt_len, decoder, plan
        self.tokens: List[int] = []
        self.last_token = 0
        self.text = ""        # decoded text so far (cut at a stop string once matched)
        self.emitted = 0      # characters of text already handed out
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token: int, room: int) -> str:
        """Takes the sampled token; ``room`` = context slots left before it is placed.
        Returns the text now safe to hand out."""
        self.last_token = token
        plan = self.plan
        if token in plan.end_ids:
            self.finish_reason = "eos" if token in plan.eos_ids else "stop"
            return self._finish_text()
        self.tokens.append(token)
        if self.decoder is not None:
            self._add_text(self.decoder.push(token))
        if self.done:   # a stop string matched
            return self._take(len(self.text))
        if len(self.tokens) >= plan.max_tokens or room <= 1:
            self.finish_reason = "length"
            return self._finish_text()
        return self._take(len(self.text) - self._held_back())

    def fail(self, message: str) -> str:
        """Ends the sequence with finish_reason "error"; returns the text still held back."""
        piece = self._finish_text()
        self.finish_reason, self.error = "error", message
        return piece

    def _add_text(self, piece: str) -> None:
        if not piece:
            return
        old = len(self.text)
        self.text += piece
        cut = -1
        for s in self.plan.stops:
            # only a match that ends in the new piece is new
            i = self.text.find(s, max(0, old - len(s) + 1))
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self.text = self.text[:cut]
            self.finish_reason = "stop"

    def _held_back(self) -> int:
        """Length of the longest tail of text that could begin a stop string."""
        best = 0
        for s in self.plan.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _finish_text(self) -> str:
        if self.decoder is not None:
            self._add_text(self.decoder.flush())   # may still complete a stop string
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        piece = self.text[self.emitted:upto]
        self.emitted = upto
        return piece

    def completion(self) -> Completion:
        return Completion(self.text, list(self.tokens), self.finish_reason or "length", self.prompt_len,
                          self.error)


class _DecodeGraph:
    """decode_one_token captured for one batch size and attended length, replayed with new
    tokens and positions copied into its static buffers. With a paged store the step is a
    sequence of graphs, one per stretch of GPU work between two host points; replay runs
    them in order and does the host's part at each point in between."""

    def __init__(self, engine: Engine, batch: int, kv_len: int, tokens: Tensor, positions: Tensor, pool):
        self.store = engine.store
        self.batch = batch
        self.tokens = tokens.clone()          # int64 [B] static
        self.positions = positions.clone()    # int64 [B] static
        # warm-up runs the real step (same tokens and positions), so its cache writes are the
        # ones the replay makes again
        # one side stream per engine: each stream that runs a matmul gets its own cuBLAS workspace
        side = engine._side_stream()
        side.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(side):
            self.store.begin_step(batch)
            engine._decode_eager(self.tokens, self.positions, kv_len)
        torch.cuda.current_stream(engine.device).wait_stream(side)
        steps = engine._decode_steps(self.tokens, self.positions, kv_len)
        self.segments: List[Tuple[torch.cuda.CUDAGraph, Optional[HostPoint], int]] = []
        while True:
            graph = torch.cuda.CUDAGraph()
            point, done = None, False
            # thread_local: the paged store's I/O threads may touch CUDA events meanwhile
            with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                try:
                    point = next(steps)
                except StopIteration as end:
                    self.logits = end.value                                       # [B, V] static
                    done = True
            self.segments.append((graph, point, point.rows if isinstance(point, RoutePoint) else 0))
            if done:
                break

    def replay(self, tokens: Tensor, positions: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.store.begin_step(self.batch)
        for graph, point, rows in self.segments:
            graph.replay()
            if point is not None:
                if isinstance(point, RoutePoint):
                    point.rows = rows          # the point is shared by graphs of other batch sizes
                self.store.resolve(point)
                if getattr(point, "deferred", False):
                    raise RuntimeError("a captured decode step needs more experts than the GPU cache holds")
        return self.logits
