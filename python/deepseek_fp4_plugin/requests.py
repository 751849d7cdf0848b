"""Request planning: prompts → token ids, sampling and stop settings → a RequestPlan, and the
per-sequence generation state (tokens, streamed text, stop strings) the engine's loop drives.
Nothing here touches the device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .sampling import SamplingParams
from .tokenizer import IncrementalDecoder, Tokenizer, check_messages, check_text

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


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(name: str, v: Any, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")


class RequestParser:
    """Checks and tokenizes what a caller passes to ``generate`` / ``stream`` / ``logits``.

    Parameters
    ----------
    tokenizer : Tokenizer or None (prompts must then be token ids)
    vocab_size : the model's vocabulary (token ids must lie in [0, vocab_size))
    max_seq_len : context of one sequence (a prompt must leave room for one generated token)
    eos_token_ids : ids that end a sequence unless ignore_eos
    """

    def __init__(self, tokenizer: Optional[Tokenizer], vocab_size: int, max_seq_len: int, eos_token_ids: set):
        self.tokenizer, self.vocab_size, self.max_seq_len = tokenizer, vocab_size, max_seq_len
        self.eos_token_ids = eos_token_ids

    def check_ids(self, ids: Union[Sequence[int], Tensor], name: str) -> List[int]:
        if isinstance(ids, Tensor):
            if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(f"{name} must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple, range)):
            raise ValueError(f"{name} must be a sequence of integer token ids")
        bad = next((i for i, t in enumerate(ids) if not is_int(t)), None)
        if bad is not None:
            t = ids[bad]
            raise ValueError(f"{name}[{bad}] must be an integer token id, got {t!r} ({type(t).__name__})")
        ids = list(ids)
        if not ids:
            raise ValueError(f"{name} is empty")
        v = self.vocab_size
        bad = [t for t in ids if not 0 <= t < v]
        if bad:
            raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {v})")
        return ids

    def prompts(self, prompts, chat: bool, add_bos: Optional[bool]) -> Tuple[bool, List[List[int]]]:
        """(single?, token ids per prompt)."""
        def is_ids(p) -> bool:
            # numbers of any kind: token ids (a bool or float among them is named by check_ids)
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
                ids = self.check_ids(p, name)
            else:
                raise ValueError(f"{name} must be a string or a list of token ids"
                                 + (" (or chat messages with chat=True)" if not chat else ""))
            if len(ids) >= self.max_seq_len:
                raise ValueError(f"{name} has {len(ids)} tokens but the context holds max_seq_len = "
                                 f"{self.max_seq_len} (prompt + at least one generated token)")
            out.append(ids)
        return single, out

    def plan(self, ids, max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids,
              ignore_eos) -> "RequestPlan":
        check_int("max_tokens", max_tokens, 1)
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
                extra = set(self.check_ids(list(stop_token_ids), "stop_token_ids"))
        eos = set() if ignore_eos else set(self.eos_token_ids)
        end_ids = eos | extra
        return RequestPlan(ids, max_tokens, params, stops, end_ids, eos)


@dataclass
class RequestPlan:
    ids: List[List[int]]
    max_tokens: int
    params: SamplingParams
    stops: List[str]
    end_ids: set        # token ids that end a sequence (EOS unless ignored, + stop_token_ids)
    eos_ids: set        # the EOS part, for finish_reason


class SequenceState:
    """Generation state of one sequence: tokens, streamed text, stop-string hold-back."""

    def __init__(self, index: int, prompt_len: int, decoder: Optional[IncrementalDecoder], plan: RequestPlan):
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
