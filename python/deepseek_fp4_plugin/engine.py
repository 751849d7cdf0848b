"""Engine: load a model, then prefill → decode_one_token → … → generate.

    engine = Engine.from_pretrained("path/to/model")          # device="auto", dtype by device
    print(engine.generate("The capital of France is", max_tokens=32).text)
    for piece in engine.stream("Tell me a story", temperature=0.6, seed=0):
        print(piece, end="", flush=True)

Batches: prompts of different lengths are right-padded; every sequence keeps its tokens at
their own positions (cache slot = position), so no sequence shifts and padding never enters
attention (keys are masked by position). Decode feeds one token per sequence per step;
sequences that finished keep a slot in the batch until all are done.

The engine talks to its weights only through the ``WeightStore`` interface (weights.py);
loading and the memory plan live in loading.py, request checking in requests.py, CUDA-graph
decode (``use_cuda_graph=True``, CUDA only) in graphs.py. Prefill always runs eagerly.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Generator, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .checkpoint import CheckpointSource
from .graphs import DecodeGraph, bucket
from .guard import Occupancy, exclusive, exclusive_iter, nonfinite_message, sample_checked
from .loading import (DEFAULT_MAX_SEQ_LEN, as_paging_settings, load_store, open_source, plan_for,  # noqa: F401
                      resolve_device)
from .memory_plan import MemoryPlan, PagingSettings
from .model import DeepseekV3, KVCache, rms_norm
from .precision import PrecisionPolicy, resolve_compute_dtype
from .requests import (Completion, GenerationStats, PromptLike, RequestParser, RequestPlan,  # noqa: F401
                       SequenceState, check_int, is_int)
from .tokenizer import IncrementalDecoder, Tokenizer
from .validation import check_tokenizer_fits
from .weights import HostPoint, WeightStore, run_host_points

DEFAULT_MAX_TOKENS = 256


class Engine:
    """Generation over a ``WeightStore``.

    Parameters
    ----------
    store : the model's weights (any ``WeightStore``: resident.py, paged.py)
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
        check_int("max_seq_len", max_seq_len, 2)
        if max_seq_len > c.max_position_embeddings:
            raise ValueError(f"max_seq_len = {max_seq_len} exceeds the model's context "
                             f"(max_position_embeddings = {c.max_position_embeddings})")
        check_int("max_batch_size", max_batch_size, 1)
        check_int("prefill_chunk", prefill_chunk, 1)
        if tokenizer is not None:
            check_tokenizer_fits(tokenizer, c.vocab_size)
        self.store, self.config, self.tokenizer = store, c, tokenizer
        self.device, self.dtype = store.device, store.compute_dtype
        self.max_seq_len, self.max_batch_size, self.prefill_chunk = max_seq_len, max_batch_size, prefill_chunk
        self.model = DeepseekV3(store, max_positions=max_seq_len)
        eos = set(c.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.requests = RequestParser(tokenizer, c.vocab_size, max_seq_len, eos)
        self.cache: Optional[KVCache] = None
        self._graphs: Dict[Tuple[int, int], DecodeGraph] = {}
        self._graph_pool = None
        self.use_cuda_graph = False
        self.set_use_cuda_graph(use_cuda_graph)
        self.last_stats = GenerationStats()
        self.last_completion: Optional[Completion] = None   # set by stream()
        # called after each step as fn(stage, seconds, rows): "prefill" with the prompt tokens,
        # "decode" with the batch rows (PerfMonitor's per-step figures)
        self.step_observers: List[Callable[[str, float, int], None]] = []
        self._occupancy = Occupancy()   # one generation at a time (guard.py)

    @property
    def eos_token_ids(self) -> set:
        """Token ids that end a sequence (the config's, and the tokenizer's EOS)."""
        return self.requests.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids) -> None:
        self.requests.eos_token_ids = set(ids)

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
        source, tokenizer, owned = open_source(path)
        c = source.config
        seq = max_seq_len or min(c.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        plan = plan_for(source, dev, cdt, policy, settings, memory_limit, max_batch_size, seq, prefill_chunk)
        store = load_store(source, dev, cdt, policy, settings, plan, max(max_batch_size, prefill_chunk), progress,
                           verbose, max_batch=max_batch_size)
        if owned and not store.reads_source and hasattr(source, "close"):
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
        source, _, owned = open_source(path)
        c = source.config
        seq = max_seq_len or min(c.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        try:
            return plan_for(source, dev, cdt, PrecisionPolicy.parse(precision), as_paging_settings(paging),
                            memory_limit, max_batch_size, seq, prefill_chunk)
        finally:
            if owned and hasattr(source, "close"):
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
        if not self.store.pages:
            raise ValueError("reconfigure_paging: this engine keeps every weight resident (no memory_limit "
                             "below the model's size was given)")
        self._drop_graphs()
        self.store.reconfigure(**changes)
        self.paging = self.store.settings

    @exclusive
    def set_routing_replay(self, replay: Optional["RoutingReplay"]) -> None:
        """Routed expert ids from a trace instead of the router, for benchmarks and tests
        (replay.RoutingReplay; None: the router again). Off by default."""
        from .replay import RoutingReplay

        if replay is not None and not isinstance(replay, RoutingReplay):
            raise ValueError(f"set_routing_replay takes a RoutingReplay or None, got {type(replay).__name__}")
        if replay is not None:
            replay.bind(self.config, self.device, max(self.max_batch_size, self.prefill_chunk))
        self._drop_graphs()
        self.model.routing_replay = replay

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
    def prefill(self, tokens: Tensor, lengths: Sequence[int], rows: Optional[Sequence[int]] = None) -> Tensor:
        """Runs right-padded prompts into the KV cache (slots 0..len-1 of rows 0..B-1).

        Parameters
        ----------
        tokens : int64 [B, T] on the engine's device, right-padded
        lengths : the B prompt lengths (1 ≤ length ≤ T)
        rows : the cache rows the B prompts go to (distinct, < max_batch_size; default 0..B-1);
            other rows are left as they are, so sequences may join while others decode

        Returns
        -------
        float32 [B, V] logits of each prompt's last token
        """
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point \
                or tokens.dtype in (torch.bool, torch.complex64, torch.complex128):
            got = f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}"
            raise ValueError(f"tokens must be an integer tensor [B, T], got {got}")
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
        if len(lengths) != B or not all(is_int(n) and 1 <= n <= T for n in lengths):
            raise ValueError(f"lengths must be {B} integers in [1, {T}], got {list(lengths)!r}")
        if rows is not None and (len(rows) != B or not all(is_int(r) and 0 <= r < self.max_batch_size
                                                           for r in rows) or len(set(rows)) != B):
            raise ValueError(f"rows must be {B} distinct cache rows in [0, {self.max_batch_size}), "
                             f"got {list(rows)!r}")
        with self._compute():
            if self.model.routing_replay is not None:
                self.model.routing_replay.begin_prefill()
            cache = (self._ensure_cache(B) if rows is None   # with rows: max_batch_size rows, never regrown
                     else self._ensure_cache(self.max_batch_size).rows(rows))
            if self.store.layer_major_prefill:
                logits = self._prefill_layer_major(tokens, lengths, cache)
            else:
                logits = self._prefill_chunks(tokens, lengths, cache)
            self.store.end_step()
            return logits

    def _prefill_chunks(self, tokens: Tensor, lengths: Sequence[int], cache: KVCache) -> Tensor:
        """Resident prefill: chunks of prefill_chunk positions through the whole model."""
        B, T = tokens.shape
        positions = torch.arange(T, device=self.device).expand(B, T)              # [B, T]
        last = torch.empty(B, self.config.hidden_size, dtype=self.dtype, device=self.device)  # [B, D]
        for start in range(0, T, self.prefill_chunk):
            end = min(start + self.prefill_chunk, T)
            h = self.model.forward(tokens[:, start:end], positions[:, start:end], cache, kv_len=end,
                                   causal=start == 0)                            # [B, t, D]
            rows = [b for b, n in enumerate(lengths) if start <= n - 1 < end]      # last token in this chunk
            if rows:
                cols = [lengths[b] - 1 - start for b in rows]
                last[rows] = h[rows, cols]
        return self.model.logits(last)                                            # [B, V]

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
        limit = max(B * step, store.prefill_group_tokens or B * T)
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
        stream = self.store.compute_stream
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
        kv_bucket = bucket(kv_len, self.max_seq_len)
        with self._compute():
            if self.model.routing_replay is not None:
                self.model.routing_replay.begin_decode(B)
            self.store.prepare_decode()
            if self.use_cuda_graph:
                graph = self._graphs.get((B, kv_bucket))
                if graph is not None and graph.mode != self.store.decode_mode:
                    graph = None   # captured under a way of decoding the store has since left
                if graph is None:
                    graph = self._graphs[(B, kv_bucket)] = self._capture(B, kv_bucket, tokens, positions)
                logits = graph.replay(tokens, positions)
            else:
                self.store.begin_step(B, decode=True)
                logits = self.decode_eager(tokens, positions, kv_bucket)
            self.store.end_step()
            return logits

    def decode_eager(self, tokens: Tensor, positions: Tensor, kv_len: int) -> Tensor:
        return run_host_points(self.decode_steps(tokens, positions, kv_len), self.store)

    def decode_steps(self, tokens: Tensor, positions: Tensor, kv_len: int) -> Generator[HostPoint, None, Tensor]:
        """One decode step as a generator of host points (see DeepseekV3.forward_steps)."""
        h = yield from self.model.forward_steps(tokens[:, None], positions[:, None], self.cache, kv_len=kv_len,
                                                absorbed=True)                    # [B, 1, D]
        return self.model.logits(h[:, 0])                                         # [B, V]

    def side_stream(self) -> torch.cuda.Stream:
        if getattr(self, "_side", None) is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def _capture(self, batch: int, kv_len: int, tokens: Tensor, positions: Tensor) -> DecodeGraph:
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return DecodeGraph(self, batch, kv_len, tokens, positions, self._graph_pool)

    # ---- public API ----------------------------------------------------------------------
    @exclusive
    @torch.inference_mode()
    def logits(self, token_ids: Union[Sequence[int], Tensor]) -> Tensor:
        """Float32 logits [T, V] for every position of ``token_ids``, run exactly as given
        (no BOS added, no cache). For evaluation and tests."""
        ids = self.requests.check_ids(token_ids, "token_ids")
        if len(ids) > self.max_seq_len:
            raise ValueError(f"token_ids has {len(ids)} tokens, more than max_seq_len = {self.max_seq_len}")
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)                # [1, T]
        positions = torch.arange(len(ids), device=self.device)[None]                      # [1, T]
        with self._compute():
            if self.model.routing_replay is not None:
                self.model.routing_replay.begin_prefill()
            self.store.begin_step(len(ids))
            out = self.model.logits(self.model.forward(tokens, positions, causal=True))[0]   # [T, V]
            self.store.end_step()
            return out

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
        single, ids = self.requests.prompts(prompts, chat, add_bos)
        plan = self.requests.plan(ids, max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos)
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
        single, ids = self.requests.prompts(prompt, chat, add_bos)
        if not single:
            raise ValueError("stream takes one prompt; use generate for a list")
        if self.tokenizer is None:
            raise ValueError("stream needs a tokenizer (the model folder has no tokenizer.json); "
                             "use generate with token ids")
        plan = self.requests.plan(ids, max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids,
                                  ignore_eos)

        def pieces() -> Iterator[str]:
            stats = GenerationStats(cuda_graph=self.use_cuda_graph)
            for _, delta, done in self._run(plan, 0, 1, stats):
                if delta:
                    yield delta
                if done is not None:
                    self.last_completion = done
            self.last_stats = stats

        return exclusive_iter(self._occupancy, "stream()", pieces())

    # ---- the generation loop ---------------------------------------------------------------
    def _run(self, plan: RequestPlan, lo: int, hi: int, stats: GenerationStats
             ) -> Iterator[Tuple[int, str, Optional[Completion]]]:
        """Generates prompts lo..hi-1 of the plan as one batch; yields (prompt index, new
        text, Completion when that sequence finished)."""
        prompts = plan.ids[lo:hi]
        B = len(prompts)
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        seqs = [SequenceState(i, len(p), self._decoder(), plan) for i, p in zip(range(lo, hi), prompts)]
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
            stage = "prefill" if first else "decode"
            if first:
                stats.prefill_s += t1 - t0
                first = False
            else:
                stats.decode_s += t1 - t0
                stats.decode_steps += 1
                stats.decoded_rows += B
            for fn in self.step_observers:
                fn(stage, t1 - t0, sum(lengths) if stage == "prefill" else B)
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
