"""A built-in small random DeepSeek-V3, so the library runs on a fresh machine with no download.

``make_tiny(dir)`` writes a complete model folder: config.json, sharded safetensors with an
index, and a byte-level BPE tokenizer trained on a short built-in text. The architecture keeps
everything that makes DeepSeek-V3 what it is (MLA with q LoRA, YaRN RoPE, one dense layer
then MoE layers with group-limited ``noaux_tc`` routing and a shared expert) at sizes that run
in milliseconds on a CPU. Weights are random (std 0.02, RMSNorm weights near 1, a small router
bias), so generated text is gibberish but the numbers stay in range.

The three formats of one seed hold the same model up to quantization error: BF16 master weights
are drawn from the seed and written as BF16, as DeepSeek FP8 blocks (float8_e4m3fn with 128×128
``weight_scale_inv``, routers and lm_head left in BF16 as in the DeepSeek release) or as NVFP4
(the BF16 folder run through ``convert_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from safetensors.torch import save_file
from torch import Tensor

from .config import DeepseekV3Config, RopeScaling
from .convert import MANIFEST_FILE, convert_checkpoint, current_umask, file_mode
from .loader import CONFIG_FILE, INDEX_FILE, layer_of, linear_shapes, other_tensor_shapes

TINY_VERSION = "tiny-v1"
FORMATS = ("nvfp4", "fp8_block", "bf16")

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)   # ids 0, 1, 2, 3

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

# Tokenizer training text: written for this file, varied enough (prose, numbers, code, Chinese)
# for 250 BPE merges.
_TEXT = """\
The small model in this folder has never read a book. Its weights were drawn from a random
number generator with a fixed seed, so every machine that builds it gets the same numbers.
It exists to exercise the code paths of a much larger model: attention with compressed keys
and values, a router that picks four experts out of sixteen, and a shared expert that every
token visits. When it writes, it writes nonsense, but it does so quickly and reproducibly.

A mixture of experts splits the feed-forward layer into many smaller networks. For each token
the router computes a score per expert, adds a learned bias, keeps the best groups, and then
the best experts inside those groups. The chosen experts run, and their outputs are summed
with weights taken from the scores. Most experts sit idle for any given token, which is why a
model with hundreds of billions of parameters can answer with the cost of a few tens of
billions, as long as the weights can be fetched in time.

Four-bit weights store each value as one of sixteen codes: zero, one half, one, one and a
half, two, three, four and six, each with a sign. Every sixteen values share a scale stored
in eight bits, and the whole matrix shares one more scale in thirty-two bits. Reading a
weight means looking up its code, multiplying by the block scale and by the global scale.

Numbers appear in text all the time: 0 1 2 3 4 5 6 7 8 9, 10, 42, 128, 256, 1024, 4096,
3.14159, 2.71828, 1e-6, 65536, 7168, 18432, 129280. Dates such as 2024-12-26 and times such
as 09:30 or 17:45 are common too. So are prices: $19.99, 5 EUR, 100%.

def rms_norm(x, weight, eps=1e-6):
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * x * torch.rsqrt(variance + eps)

for step in range(max_new_tokens):
    logits = model(tokens[:, -1:], cache)
    next_token = torch.argmax(logits, dim=-1)
    if next_token.item() == eos_id:
        break

Questions and answers follow a simple pattern. What is the capital of France? Paris. How
many legs does a spider have? Eight. Which planet is closest to the sun? Mercury. What do
bees make? Honey. Why is the sky blue? Sunlight scatters off the air, and blue light
scatters the most.

深度学习模型的权重可以用四位浮点数存储。每十六个数值共享一个缩放因子。
专家混合模型只为每个词元激活少数专家，因此计算量远小于参数量。
今天天气很好，我们去公园散步吧。你好，世界！

Le petit modèle répond vite. Der kleine Rechner rechnet schnell. El modelo pequeño aprende.

Good morning! How are you today? I am fine, thank you. Please write a short poem about the
sea. The sea is wide and grey, the gulls call out at break of day, the waves roll in and
roll away. Thank you, that was lovely. You are welcome.
"""


# ---------------------------------------------------------------------------------------
# config, tokenizer, weights


def tiny_config(**overrides: Any) -> DeepseekV3Config:
    """The tiny model's config; keyword arguments override DeepseekV3Config fields.

    Sizes: hidden 256, 4 layers (1 dense, 3 MoE), 16 routed experts in 4 groups, top-2 groups,
    4 experts per token, 1 shared expert, q LoRA 128, kv LoRA 64, 4 heads of qk 32+16 / v 32,
    YaRN ×4 over 512 positions (2048 in all), vocab 512. Every K of every linear layer is a
    multiple of 64.
    """
    cfg = DeepseekV3Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, n_shared_experts=1, n_routed_experts=16,
        routed_scaling_factor=2.5, kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=16, v_head_dim=32,
        qk_nope_head_dim=32, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1,
        max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=0,
        rope=RopeScaling(rope_type="yarn", theta=10000.0, factor=4.0, original_max_position_embeddings=512,
                         beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    )
    known = {f.name for f in dataclasses.fields(DeepseekV3Config)}
    for k, v in overrides.items():
        if k not in known:
            raise ValueError(f"tiny_config: unknown config field {k!r}")
        setattr(cfg, k, v)
    cfg.validate("tiny_config")
    return cfg


def build_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained on the built-in text (deterministic). Returns a tokenizers.Tokenizer
    with BOS added to every encoded sequence, as DeepSeek-V3's tokenizer does. The text supports
    vocabularies up to about 1000 tokens; a larger ``vocab_size`` raises ValueError."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT.splitlines(keepends=True), trainer=trainer)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                                      special_tokens=[(BOS_TOKEN, 0)]),
    ])
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"tokenizer: training text yields {tok.get_vocab_size()} tokens, not {vocab_size}")
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i
    return tok


def tokenizer_config(max_length: int) -> Dict[str, Any]:
    """tokenizer_config.json for the tiny tokenizer."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def tiny_state_dict(config: DeepseekV3Config, seed: int = 0) -> Dict[str, Tensor]:
    """BF16 master weights of a random DeepSeek-V3 with this config, drawn from ``seed``.

    Linear weights N(0, 0.02²); RMSNorm weights 1 + N(0, 0.02²); router bias
    (``e_score_correction_bias``, float32) U(-0.01, 0.01). With ``num_nextn_predict_layers``
    > 0 the MTP layers (indices from num_hidden_layers) are included, named as in DeepSeek-V3.
    """
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std=0.02, mean=0.0):
        return (torch.randn(shape, generator=g) * std + mean).to(torch.bfloat16)

    out: Dict[str, Tensor] = {}
    for name, shape in other_tensor_shapes(config).items():
        if name.endswith("e_score_correction_bias"):
            out[name] = (torch.rand(shape, generator=g) * 0.02 - 0.01).to(torch.float32)
        elif name == "model.embed_tokens.weight":
            out[name] = normal(shape)
        else:
            out[name] = normal(shape, 0.02, 1.0)
    for module, (n, k) in linear_shapes(config).items():
        out[module + ".weight"] = normal((n, k))
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    for i in range(config.num_nextn_predict_layers):
        out.update(_mtp_layer(config, config.num_hidden_layers + i, normal))
    return out


def _mtp_layer(config: DeepseekV3Config, layer: int, normal) -> Dict[str, Tensor]:
    """One DeepSeek-V3 multi-token-prediction layer: a MoE decoder layer plus its own
    embedding, input norms, projection and head."""
    c, h = config, config.hidden_size
    mtp_cfg = DeepseekV3Config(**{**c.__dict__, "num_hidden_layers": layer + 1, "first_k_dense_replace": 0})
    p = f"model.layers.{layer}."
    out = {}
    for name, shape in other_tensor_shapes(mtp_cfg).items():
        if name.startswith(p):
            bias = name.endswith("bias")
            out[name] = normal(shape, 0.005).to(torch.float32) if bias else normal(shape, 0.02, 1.0)
    for module, (n, k) in linear_shapes(mtp_cfg).items():
        if module.startswith(p):
            out[module + ".weight"] = normal((n, k))
    out[p + "embed_tokens.weight"] = normal((c.vocab_size, h))
    out[p + "enorm.weight"] = normal((h,), 0.02, 1.0)
    out[p + "hnorm.weight"] = normal((h,), 0.02, 1.0)
    out[p + "eh_proj.weight"] = normal((h, 2 * h))
    out[p + "shared_head.norm.weight"] = normal((h,), 0.02, 1.0)
    out[p + "shared_head.head.weight"] = normal((c.vocab_size, h))
    return out


# 2-D weights the DeepSeek FP8 release keeps in BF16: embeddings, output heads, MoE routers
_FP8_KEEP = ("embed_tokens", "lm_head", "shared_head.head", ".mlp.gate")


def fp8_block_quantize(w: Tensor, block: int = 128):
    """DeepSeek FP8 block quantization: w [N, K] → (float8_e4m3fn [N, K], float32 weight_scale_inv
    [ceil(N/block), ceil(K/block)]), scale_inv = block amax / 448 (1 for an all-zero block)."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    wf = torch.nn.functional.pad(w.to(torch.float32), (0, kb * block - k, 0, nb * block - n))
    blocks = wf.reshape(nb, block, kb, block)
    amax = blocks.abs().amax(dim=(1, 3))                                   # [nb, kb]
    scale_inv = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.reshape(nb * block, kb * block)[:n, :k].contiguous(), scale_inv.contiguous()


# ---------------------------------------------------------------------------------------
# writing


def _hf_config_dict(config: DeepseekV3Config) -> Dict[str, Any]:
    d = config.to_dict()
    # fields Hugging Face's DeepseekV3Config reads that ours does not keep
    d.update(num_key_value_heads=config.num_attention_heads, torch_dtype="bfloat16", initializer_range=0.02,
             use_cache=True, attention_dropout=0.0)
    return d


def _write_folder(d: Path, config: DeepseekV3Config, tensors: Dict[str, Tensor], num_shards: int,
                  quantization_config: Optional[Dict[str, Any]], tokenizer) -> None:
    shard_of: Dict[str, int] = {}
    n_layers = config.num_hidden_layers
    for name in tensors:
        layer = layer_of(name)
        if layer is None:
            shard_of[name] = 0 if name.startswith("model.embed_tokens") else num_shards - 1
        else:
            shard_of[name] = min(layer * num_shards // n_layers, num_shards - 1)
    files = [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    weight_map, total = {}, 0
    for i, fname in enumerate(files):
        part = {k: v.contiguous() for k, v in sorted(tensors.items()) if shard_of[k] == i}
        save_file(part, str(d / fname), metadata={"format": "pt"})
        os.chmod(d / fname, file_mode())
        weight_map.update({k: fname for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    cfg = _hf_config_dict(config)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                            "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    tokenizer.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(config.max_position_embeddings), indent=2, ensure_ascii=False) + "\n")
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "do_sample": True,
         "temperature": 0.6, "top_p": 0.95}, indent=2) + "\n")


def _claim(tmp: Path, final: Path) -> None:
    """Renames the finished temporary folder to ``final`` (an empty folder there is replaced)."""
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    os.rename(tmp, final)


def make_tiny(dir: Union[str, Path], seed: int = 0, format: str = "nvfp4", num_shards: int = 2,
              **overrides: Any) -> Path:
    """Writes the tiny random DeepSeek-V3 to the folder ``dir`` (new or empty).

    Parameters
    ----------
    dir : output folder; built in a temporary folder beside it and renamed into place
    seed : weight seed; one seed gives the same model in every format
    format : "nvfp4" (ModelOpt layout), "fp8_block" (DeepSeek FP8) or "bf16"
    num_shards : number of safetensors shards (split by layer; ≥ 2 exercises the index)
    **overrides : DeepseekV3Config fields (see ``tiny_config``), e.g. num_hidden_layers=2

    Returns
    -------
    Path of ``dir``.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
    final = Path(dir)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise ValueError(f"{final}: exists and is not an empty folder")
    config = tiny_config(**overrides)
    num_shards = min(num_shards, config.num_hidden_layers)
    tokenizer = build_tokenizer(config.vocab_size)
    tensors = tiny_state_dict(config, seed)

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    os.chmod(tmp, 0o777 & ~current_umask())   # mkdtemp makes it owner-only; a model folder need not be
    try:
        if format == "bf16":
            _write_folder(tmp, config, tensors, num_shards, None, tokenizer)
        elif format == "fp8_block":
            out = {}
            for name, t in tensors.items():
                module = name[: -len(".weight")]
                if name.endswith(".weight") and t.dim() == 2 and not module.endswith(_FP8_KEEP):
                    out[name], out[module + ".weight_scale_inv"] = fp8_block_quantize(t)
                else:
                    out[name] = t
            qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": [128, 128]}
            _write_folder(tmp, config, out, num_shards, qc, tokenizer)
        else:
            src = tmp / "bf16"
            src.mkdir()
            _write_folder(src, config, tensors, num_shards, None, tokenizer)
            out_dir = tmp / "nvfp4"
            convert_checkpoint(src, out_dir, progress=False)
            (out_dir / MANIFEST_FILE).unlink()
            shutil.rmtree(src)
            for p in out_dir.iterdir():
                os.rename(p, tmp / p.name)
            out_dir.rmdir()
        _claim(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def default_tiny_path() -> Path:
    """Cache folder of the built-in tiny model: $DSFP4_CACHE/tiny-v1, else
    ${XDG_CACHE_HOME:-~/.cache}/deepseek-fp4/tiny-v1."""
    root = os.environ.get("DSFP4_CACHE")
    if root:
        return Path(root).expanduser() / TINY_VERSION
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "deepseek-fp4" / TINY_VERSION


def ensure_tiny(path: Optional[Union[str, Path]] = None) -> Path:
    """The tiny NVFP4 model folder, created on first use (default: ``default_tiny_path()``).

    Safe against concurrent callers: each builds in its own temporary folder and the first
    rename wins; a finished folder (its index present) is never rebuilt.
    """
    final = Path(path) if path is not None else default_tiny_path()
    if (final / INDEX_FILE).is_file():
        return final
    try:
        make_tiny(final)
    except (OSError, ValueError):
        if (final / INDEX_FILE).is_file():   # another process finished first
            return final
        raise
    return final
