"""Tokenizer of a model folder: tokenizer.json (the ``tokenizers`` library) plus
tokenizer_config.json (BOS/EOS tokens, ``add_bos_token``, chat template rendered with jinja2),
and incremental detokenization for streaming.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import re
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from .config import read_json_file

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

Message = Dict[str, Any]


def _token_text(v: Any) -> Optional[str]:
    """A special token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    """Text ↔ token ids for one model folder.

    Parameters
    ----------
    path : folder holding tokenizer.json (and optionally tokenizer_config.json,
        chat_template.jinja)

    BOS handling: when tokenizer_config.json sets ``add_bos_token``, that decides and
    tokenizer.json's own post-processing is not applied (so BOS is never added twice);
    otherwise tokenizer.json's post-processor decides, as Hugging Face fast tokenizers do.
    Chat prompts are rendered by the template, which writes its own BOS, and encoded without
    adding one.
    """

    def __init__(self, path: Union[str, Path]):
        from tokenizers import Tokenizer as _Tok

        self.path = Path(path)
        tok_file = self.path / TOKENIZER_FILE
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: no such file (the model folder has no tokenizer)")
        try:
            self._tok = _Tok.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises its own Exception type
            raise ValueError(f"{tok_file}: not a readable tokenizer ({e})") from e
        cfg: Dict[str, Any] = {}
        cfg_file = self.path / TOKENIZER_CONFIG_FILE
        if cfg_file.is_file():
            cfg = read_json_file(cfg_file)
        self.config = cfg
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos_token: Optional[bool] = cfg.get("add_bos_token")
        self.chat_template_source = str(cfg_file)   # where the template came from, for errors
        self.chat_template = self._find_chat_template(cfg)
        self._template = None

    @classmethod
    def from_dir(cls, path: Union[str, Path]) -> Optional["Tokenizer"]:
        """The folder's tokenizer, or None when it has no tokenizer.json."""
        return cls(path) if (Path(path) / TOKENIZER_FILE).is_file() else None

    def _find_chat_template(self, cfg: Dict[str, Any]) -> Optional[str]:
        t = cfg.get("chat_template")
        if isinstance(t, list):   # [{"name": ..., "template": ...}, ...]
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            t = named.get("default") or next(iter(named.values()), None)
        if isinstance(t, str) and t:
            return t
        f = self.path / CHAT_TEMPLATE_FILE
        if not f.is_file():
            return None
        self.chat_template_source = str(f)
        try:
            return f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text (byte {e.start})") from e
        except OSError as e:
            raise ValueError(f"{f}: cannot be read ({e.strerror or e})") from e

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def file(self) -> Path:
        """The tokenizer.json this tokenizer was read from."""
        return self.path / TOKENIZER_FILE

    def max_token_id(self) -> int:
        """The largest id encoding can produce (added tokens included)."""
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)

    # ---- encode / decode ----
    def encode(self, text: str, add_bos: Optional[bool] = None) -> List[int]:
        """Token ids of ``text``. ``add_bos`` None follows the folder's BOS rule (see class)."""
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a string, got {type(text).__name__}")
        if add_bos is None and self.add_bos_token is None:
            return self._tok.encode(text, add_special_tokens=True).ids
        ids = self._tok.encode(text, add_special_tokens=False).ids
        want_bos = self.add_bos_token if add_bos is None else add_bos
        if want_bos:
            if self.bos_token_id is None:
                raise ValueError(f"{self.path}: add_bos requested but tokenizer_config.json names no "
                                 f"bos_token")
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ----
    def apply_chat_template(self, messages: Union[str, Sequence[Message]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Renders ``messages`` ([{"role": ..., "content": ...}], or one user string) with the
        folder's chat template."""
        if self.chat_template is None:
            raise ValueError(f"{self.path}: the tokenizer has no chat template "
                             f"(tokenizer_config.json 'chat_template' or {CHAT_TEMPLATE_FILE})")
        check_messages(messages)
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if self._template is None:
            self._template = _compile_template(self.chat_template, self.chat_template_source)
        return _render(self._template, self.chat_template_source, messages=list(messages),
                       add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                       eos_token=self.eos_token or "", **kwargs)

    def encode_chat(self, messages: Union[str, Sequence[Message]], **kwargs: Any) -> List[int]:
        """Token ids of a rendered chat prompt (the template writes BOS; none is added)."""
        return self._tok.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False).ids

    def decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens)


def check_text(text: Any, name: str) -> None:
    """ValueError naming ``name`` unless ``text`` is a string that encodes as UTF-8 (a lone
    surrogate, e.g. from command-line bytes that were not UTF-8, does not)."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string, got {text!r} ({type(text).__name__})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: not valid Unicode text: lone surrogate {text[e.start]!r} at index "
                         f"{e.start} (decoded from bytes that are not UTF-8?)") from None


def check_messages(messages: Any, name: str = "messages") -> None:
    """ValueError naming the message and field unless ``messages`` is a string or a list of
    {"role": str, "content": str} dicts."""
    if isinstance(messages, str):
        check_text(messages, name)
        return
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{name} must be a string or a non-empty list of "
                         f"{{'role': ..., 'content': ...}} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{name}[{i}] needs 'role' and 'content', got {m!r}"[:300])
        for key in ("role", "content"):
            check_text(m[key], f"{name}[{i}][{key!r}]")


# A chat template comes with the model folder and may be hostile: rendering is sandboxed
# (jinja2's immutable sandbox) and bounded in time and in the size of what it builds.
TEMPLATE_TIME_LIMIT = 10.0      # seconds per rendering
TEMPLATE_MAX_CHARS = 1 << 24    # characters (or items) of the output and of any string or list it builds


class _TemplateLimit(Exception):
    """A chat template went past a bound (the message says which)."""


class _Timeout(BaseException):
    """Raised inside the rendering thread when its time is up (not an Exception, so template
    code and jinja2 cannot swallow it)."""


def _size(x: Any) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple, dict)) else 0


def _check_size(x: Any) -> Any:
    if _size(x) > TEMPLATE_MAX_CHARS:
        raise _TemplateLimit(f"builds a value too large ({_size(x)} > {TEMPLATE_MAX_CHARS} items)")
    return x


def _check_args(args: Sequence[Any], kwargs: Dict[str, Any]) -> None:
    # widths and counts (center, ljust, indent, wordwrap, ...) size what a call allocates
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > TEMPLATE_MAX_CHARS:
            raise _TemplateLimit(f"asks for a value too large ({v} > {TEMPLATE_MAX_CHARS})")


def _bounded_join(join):
    def bounded(parts):
        parts = list(parts)
        if sum(_size(p) for p in parts) > TEMPLATE_MAX_CHARS:
            raise _TemplateLimit(f"builds a value too large (more than {TEMPLATE_MAX_CHARS} characters)")
        return join(parts)
    return bounded


def _bounded_filter(f):
    @functools.wraps(f)   # keeps jinja2's pass_context / pass_environment marks
    def bounded(*args, **kwargs):
        _check_args(args[1:], kwargs)
        return _check_size(f(*args, **kwargs))
    return bounded


def _compile_template(source: str, where: str = "chat template"):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and all(isinstance(v, (int, float)) for v in (left, right)) \
                    and abs(left) > 1 and abs(right) * math.log2(abs(left)) > 4096:
                raise _TemplateLimit(f"asks for a value too large ({left!r} ** {right!r})")
            if operator == "*":
                n, seq = (right, left) if isinstance(right, int) else (left, right)
                if isinstance(n, int) and _size(seq) * n > TEMPLATE_MAX_CHARS:
                    raise _TemplateLimit(f"builds a value too large ({_size(seq)} × {n} items)")
            if operator == "+" and _size(left) + _size(right) > TEMPLATE_MAX_CHARS:
                raise _TemplateLimit("builds a value too large (a sum of sequences)")
            if operator == "%" and isinstance(left, str):
                widths = [int(w) for w in re.findall(r"%[-#0 +]*(\d+)", left)]
                if any(w > TEMPLATE_MAX_CHARS for w in widths):
                    raise _TemplateLimit(f"asks for a value too large (format width {max(widths)})")
            return _check_size(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            _check_args(args, kwargs)
            return _check_size(super().call(__context, __obj, *args, **kwargs))

    def raise_exception(message: str):
        raise ValueError(f"{where}: chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.filters = {k: _bounded_filter(f) for k, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        template = env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"{where}: chat template does not parse: {e}") from e
    except (_TemplateLimit, RecursionError, MemoryError) as e:
        raise ValueError(f"{where}: chat template does not parse: {_why(e)}") from None
    g = template.root_render_func.__globals__
    for name in ("str_join", "markup_join"):   # what `~` and output concatenation compile to
        if name in g:
            g[name] = _bounded_join(g[name])
    return template


def _why(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "recursion too deep"
    if isinstance(e, _TemplateLimit):
        return str(e)
    return f"{type(e).__name__}: {e}"


def _render(template, where: str, **variables: Any) -> str:
    """Renders within TEMPLATE_TIME_LIMIT seconds and TEMPLATE_MAX_CHARS characters; any
    failure is a ValueError naming the template's file."""
    import jinja2

    limit = TEMPLATE_TIME_LIMIT
    thread = threading.get_ident()
    lock = threading.Lock()
    state = {"done": False}

    def interrupt() -> None:   # on the timer thread: stops the rendering thread's Python code
        with lock:
            if not state["done"]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(_Timeout))

    timer = threading.Timer(limit, interrupt)
    timer.daemon = True
    out: List[str] = []
    try:
        try:
            timer.start()
            n = 0
            for piece in template.generate(**variables):
                n += len(piece)
                if n > TEMPLATE_MAX_CHARS:
                    raise _TemplateLimit(f"output exceeds {TEMPLATE_MAX_CHARS} characters")
                out.append(piece)
        finally:
            with lock:
                state["done"] = True
            timer.cancel()   # a call: an interrupt already sent is raised here at the latest
    except _Timeout:
        raise ValueError(f"{where}: chat template took longer than {limit:g} s to render") from None
    except ValueError as e:
        if str(e).startswith(f"{where}: chat template"):   # raise_exception() in the template
            raise
        raise ValueError(f"{where}: chat template failed: ValueError: {e}") from None
    except jinja2.TemplateError as e:   # a sandbox refusal (SecurityError) or a template error
        raise ValueError(f"{where}: chat template failed: {e}") from None
    except Exception as e:   # noqa: BLE001 (a hostile template can raise anything)
        raise ValueError(f"{where}: chat template failed: {_why(e)}") from None
    return "".join(out)


class IncrementalDecoder:
    """Turns a growing token list into text pieces whose concatenation is the decode of all.

    Each ``push`` decodes a short window of recent tokens twice — without and with the new
    ones — and returns the new tail. Text is held back while it ends in an incomplete UTF-8
    character (a byte-level token may carry part of one); ``flush`` returns what is left.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: List[int] = []
        self._prefix = 0   # window start: tokens before it are final text
        self._read = 0     # tokens before it have been returned as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, self._skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]
