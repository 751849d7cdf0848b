"""Writes a random-weight GGUF with DeepSeek-V3's shapes for llama.cpp (architecture ``deepseek2``).

Every layer is MoE (no dense leading layers), as in the paging benchmark's model: MLA attention
(q_lora 1536, kv_lora 512, 128 heads, qk_nope 128, qk_rope 64, v 128, stored split as
``attn_k_b`` / ``attn_v_b`` the way llama.cpp's converter writes it), 256 routed experts of 2048
plus one shared, top-8 in 4 of 8 groups, sigmoid scores with the correction bias, routed scaling
2.5, YaRN RoPE as V3 (factor 40 over 4096), vocab 129280.

Types: routed experts in ``--expert-type`` (q4_0, q4_k or nvfp4); attention, shared expert,
embeddings and output in ``--dense-type`` (q8_0 by default, the usual choice next to 4-bit
experts offloaded to a CPU; f16 or bf16 also); norms, router and bias in F32.

The weights are random with the spread of a trained layer (std 0.02, finite scales), so the
model runs without NaN; routing is then close to uniform. Blocks are cut from a pool of random
blocks (two experts' worth) at random offsets, which keeps writing at memory speed. The vocabulary is
``tokenizer.ggml.model = none`` with ``vocab_size`` dummy tokens: enough for llama-bench, which
feeds random token ids. The file is written under a temporary name and renamed when complete.

  python benchmarks/peers/make_gguf.py --out /dev/shm/v3.gguf --layers 3 --expert-type q4_0
  python benchmarks/peers/make_gguf.py --out /tmp/tiny.gguf --layers 1 --tiny
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

_VENDORED_GGUF = Path(__file__).resolve().parents[2] / ".deps" / "llama.cpp" / "gguf-py"


def import_gguf():
    """The gguf package vendored with the llama.cpp being benchmarked, else an installed one."""
    if _VENDORED_GGUF.is_dir() and str(_VENDORED_GGUF) not in sys.path:
        sys.path.insert(0, str(_VENDORED_GGUF))
    try:
        import gguf
    except ImportError as e:
        raise SystemExit(f"make_gguf: the gguf package is missing: run benchmarks/peers/fetch_llama_cpp.sh "
                         f"(vendors it in {_VENDORED_GGUF}) or pip install gguf ({e})") from e
    if not hasattr(gguf.GGMLQuantizationType, "NVFP4"):
        raise SystemExit(f"make_gguf: gguf {getattr(gguf, '__file__', '?')} is too old (no NVFP4 type)")
    return gguf


gguf = import_gguf()
T = gguf.GGMLQuantizationType
MT = gguf.MODEL_TENSOR

EXPERT_TYPES = {"q4_0": T.Q4_0, "q4_k": T.Q4_K, "nvfp4": T.NVFP4}
DENSE_TYPES = {"q8_0": T.Q8_0, "f16": T.F16, "bf16": T.BF16}
FILE_TYPES = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_M,
              "nvfp4": gguf.LlamaFileType.MOSTLY_NVFP4}
WEIGHT_STD = 0.02


@dataclass(frozen=True)
class Shape:
    hidden: int = 7168
    q_lora: int = 1536
    kv_lora: int = 512
    heads: int = 128
    qk_nope: int = 128
    qk_rope: int = 64
    v_head: int = 128
    experts: int = 256
    expert_ff: int = 2048
    shared: int = 1
    top_k: int = 8
    groups: int = 8
    top_groups: int = 4
    vocab: int = 129280
    context: int = 163840


V3 = Shape()
# multiples of 256 where Q4_K blocks need them; runs in seconds on a CPU
TINY = replace(V3, hidden=512, q_lora=128, kv_lora=64, heads=4, qk_nope=32, qk_rope=32, v_head=32,
               experts=16, expert_ff=256, top_k=4, groups=4, top_groups=2, vocab=1024, context=4096)


def tensor_plan(s: Shape, layers: int, expert_type, dense_type) -> list[tuple[str, tuple[int, ...], object]]:
    """(name, numpy-order shape in elements, type) for every tensor, in file order."""
    f32 = T.F32

    def name(t, i=None, suffix="weight"):
        return gguf.TENSOR_NAMES[t].format(bid=i) + "." + suffix

    plan = [(name(MT.TOKEN_EMBD), (s.vocab, s.hidden), dense_type)]
    for i in range(layers):
        plan += [
            (name(MT.ATTN_NORM, i), (s.hidden,), f32),
            (name(MT.ATTN_Q_A_NORM, i), (s.q_lora,), f32),
            (name(MT.ATTN_KV_A_NORM, i), (s.kv_lora,), f32),
            (name(MT.ATTN_Q_A, i), (s.q_lora, s.hidden), dense_type),
            (name(MT.ATTN_Q_B, i), (s.heads * (s.qk_nope + s.qk_rope), s.q_lora), dense_type),
            (name(MT.ATTN_KV_A_MQA, i), (s.kv_lora + s.qk_rope, s.hidden), dense_type),
            (name(MT.ATTN_K_B, i), (s.heads, s.kv_lora, s.qk_nope), dense_type),
            (name(MT.ATTN_V_B, i), (s.heads, s.v_head, s.kv_lora), dense_type),
            (name(MT.ATTN_OUT, i), (s.hidden, s.heads * s.v_head), dense_type),
            (name(MT.FFN_NORM, i), (s.hidden,), f32),
            (name(MT.FFN_GATE_INP, i), (s.experts, s.hidden), f32),
            (name(MT.FFN_EXP_PROBS_B, i, "bias"), (s.experts,), f32),
            (name(MT.FFN_GATE_EXP, i), (s.experts, s.expert_ff, s.hidden), expert_type),
            (name(MT.FFN_DOWN_EXP, i), (s.experts, s.hidden, s.expert_ff), expert_type),
            (name(MT.FFN_UP_EXP, i), (s.experts, s.expert_ff, s.hidden), expert_type),
            (name(MT.FFN_GATE_SHEXP, i), (s.expert_ff * s.shared, s.hidden), dense_type),
            (name(MT.FFN_DOWN_SHEXP, i), (s.hidden, s.expert_ff * s.shared), dense_type),
            (name(MT.FFN_UP_SHEXP, i), (s.expert_ff * s.shared, s.hidden), dense_type),
        ]
    plan += [(name(MT.OUTPUT_NORM), (s.hidden,), f32), (name(MT.OUTPUT), (s.vocab, s.hidden), dense_type)]
    return plan


def add_metadata(w, s: Shape, layers: int, expert_key: str) -> None:
    """The keys llama.cpp's converter writes for DeepSeek-V3 (MLA form)."""
    w.add_name(f"DeepSeek-V3 shape, random weights, {layers} MoE layers")
    w.add_file_type(FILE_TYPES[expert_key])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(layers)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(9 * s.expert_ff)  # dense FFN size; unused with no dense layers
    w.add_head_count(s.heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(s.experts)
    w.add_expert_used_count(s.top_k)
    w.add_expert_group_count(s.groups)
    w.add_expert_group_used_count(s.top_groups)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(0)
    w.add_vocab_size(s.vocab)
    w.add_q_lora_rank(s.q_lora)
    w.add_kv_lora_rank(s.kv_lora)
    w.add_key_length(s.kv_lora + s.qk_rope)
    w.add_value_length(s.kv_lora)
    w.add_key_length_mla(s.qk_nope + s.qk_rope)
    w.add_value_length_mla(s.v_head)
    w.add_expert_feed_forward_length(s.expert_ff)
    w.add_expert_shared_count(s.shared)
    w.add_expert_weights_scale(2.5)
    w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(s.qk_rope)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(40.0)
    w.add_rope_scaling_orig_ctx_len(4096)
    w.add_rope_scaling_yarn_beta_fast(32.0)
    w.add_rope_scaling_yarn_beta_slow(1.0)
    w.add_rope_scaling_yarn_log_mul(0.1 * 1.0)  # 0.1 * mscale_all_dim, as the converter writes it
    w.add_tokenizer_model("none")


# ---------------------------------------------------------------------------------------
# random blocks


def _f16_scales(rng: np.random.Generator, n: int, magnitude: float) -> np.ndarray:
    """n float16 scales of the given magnitude and random sign (so blocks average to zero), as bytes."""
    signs = np.where(rng.integers(0, 2, n, dtype=np.uint8) == 1, 1.0, -1.0)
    return (signs * magnitude).astype(np.float16).view(np.uint8).reshape(n, 2)


def _random_q4_0(rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """Q4_0 blocks (d, 16 bytes of nibbles q): y = d (q - 8), std(q - 8) = 4.64."""
    blocks = rng.integers(0, 256, size=(n_blocks, 18), dtype=np.uint8)
    blocks[:, 0:2] = _f16_scales(rng, n_blocks, WEIGHT_STD / 4.64)
    return blocks.reshape(-1)


def _random_q8_0(rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """Q8_0 blocks (d, 32 int8 q): y = d q, q uniform in [-128, 127], std 73.9."""
    blocks = rng.integers(0, 256, size=(n_blocks, 34), dtype=np.uint8)
    blocks[:, 0:2] = _f16_scales(rng, n_blocks, WEIGHT_STD / 73.9)
    return blocks.reshape(-1)


def _random_q4_k(rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """Q4_K blocks (d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles) with std ~0.02."""
    blocks = rng.integers(0, 256, size=(n_blocks, 144), dtype=np.uint8)
    # y = d * sc * q - dmin * m with sc, m uniform in [0, 63] and q in [0, 15]; dmin = 7.5 d centres it
    d = np.float16(WEIGHT_STD / 258.0)  # measured: std(y) = 258 d
    dmin = np.float16(7.5 * float(d))
    blocks[:, 0:2] = np.frombuffer(d.tobytes(), np.uint8)
    blocks[:, 2:4] = np.frombuffer(dmin.tobytes(), np.uint8)
    return blocks.reshape(-1)


def _ue4m3(b: np.ndarray) -> np.ndarray:
    """ggml's UE4M3 scale decoding (ggml_ue4m3_to_fp32), for choosing scale bytes."""
    b = b.astype(np.int32)
    exp, man = (b >> 3) & 0xF, b & 0x7
    raw = np.where(exp == 0, np.ldexp(man.astype(np.float64), -9),
                   np.ldexp(1.0 + man / 8.0, exp - 7))
    return np.where((b == 0) | (b == 0x7F), 0.0, raw * 0.5)


def _random_nvfp4(rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """NVFP4 blocks (4 UE4M3 sub-block scales, 32 bytes of E2M1 pairs) with std ~0.02."""
    blocks = rng.integers(0, 256, size=(n_blocks, 36), dtype=np.uint8)
    # E2M1 codes as ggml decodes them (doubled values), uniform over the 16 codes
    e2m1 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float64)
    target = WEIGHT_STD / float(np.sqrt(np.mean(e2m1 ** 2)))
    codes = np.arange(1, 0x7F)
    near = codes[np.argsort(np.abs(_ue4m3(codes) - target))[:3]]  # the closest scales, mixed
    blocks[:, 0:4] = rng.choice(near, size=(n_blocks, 4)).astype(np.uint8)
    return blocks.reshape(-1)


_BLOCKS = {T.Q4_0: _random_q4_0, T.Q8_0: _random_q8_0, T.Q4_K: _random_q4_k, T.NVFP4: _random_nvfp4}


def block_pool(qtype, n_weights: int, rng: np.random.Generator) -> np.ndarray:
    """Flat bytes of random weights (std 0.02) in ``qtype``; any block-aligned slice is valid.

    Quantized types get random codes under scales chosen for that spread, not a quantization of
    normal values: as fast as the random generator, which matters at 6.6 GB a layer.
    """
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    n_blocks = -(-n_weights // block)
    if qtype in _BLOCKS:
        return _BLOCKS[qtype](rng, n_blocks)
    x = rng.standard_normal(n_blocks * block, dtype=np.float32) * np.float32(WEIGHT_STD)
    if qtype == T.F16:
        return x.astype(np.float16).view(np.uint8)
    if qtype == T.BF16:
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raise ValueError(f"make_gguf: no random block generator for {qtype.name}")


class Filler:
    """Cuts tensors out of one pool per type at random block-aligned offsets."""

    def __init__(self, rng: np.random.Generator, chunk_weights: int):
        self.rng = rng
        self.chunk = chunk_weights
        self.pools: dict = {}
        self.buffers: dict[int, np.ndarray] = {}  # reused: touching fresh pages costs more than copying

    def bytes_for(self, qtype, n_weights: int) -> np.ndarray:
        """The tensor's bytes, in a buffer reused by the next tensor of the same size."""
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if n_weights % block:
            raise ValueError(f"make_gguf: {n_weights} weights is not a whole number of {qtype.name} blocks")
        if qtype not in self.pools:
            self.pools[qtype] = block_pool(qtype, 2 * self.chunk, self.rng)
        pool = self.pools[qtype]
        pool_blocks = pool.size // type_size
        chunk_blocks = self.chunk // block
        nbytes = n_weights // block * type_size
        if nbytes not in self.buffers:
            self.buffers[nbytes] = np.empty(nbytes, np.uint8)
        out = self.buffers[nbytes]
        for start in range(0, n_weights // block, chunk_blocks):
            n = min(chunk_blocks, n_weights // block - start)
            off = int(self.rng.integers(0, pool_blocks - n + 1))
            out[start * type_size:(start + n) * type_size] = pool[off * type_size:(off + n) * type_size]
        return out


def f32_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if "norm" in name:
        return np.ones(shape, np.float32)
    if "exp_probs_b" in name:  # the correction bias: small, so the router's scores still decide
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-3))
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(WEIGHT_STD)


def write_gguf(out: Path, layers: int, expert_type: str = "q4_0", dense_type: str = "q8_0",
               shape: Shape = V3, seed: int = 0, log=print) -> dict:
    """Writes the model to ``out`` (via ``out``.tmp, renamed when complete). Returns a summary."""
    if layers < 1:
        raise ValueError(f"make_gguf: --layers must be >= 1 (got {layers})")
    if expert_type not in EXPERT_TYPES:
        raise ValueError(f"make_gguf: --expert-type {expert_type!r} not one of {sorted(EXPERT_TYPES)}")
    if dense_type not in DENSE_TYPES:
        raise ValueError(f"make_gguf: --dense-type {dense_type!r} not one of {sorted(DENSE_TYPES)}")
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"make_gguf: output folder {out.parent} does not exist")
    plan = tensor_plan(shape, layers, EXPERT_TYPES[expert_type], DENSE_TYPES[dense_type])

    def nbytes(shp, qtype):
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        return int(np.prod(shp)) // block * type_size

    total = sum(nbytes(s, t) for _, s, t in plan)
    free = shutil.disk_usage(out.parent).free + (out.stat().st_size if out.exists() else 0)
    if total * 1.01 + (64 << 20) > free:
        raise OSError(f"make_gguf: {out} needs {total / 1e9:.1f} GB, "
                      f"{out.parent} has {free / 1e9:.1f} GB free")

    rng = np.random.default_rng(seed)
    filler = Filler(rng, chunk_weights=shape.hidden * shape.expert_ff)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(None, "deepseek2")
    add_metadata(w, shape, layers, expert_type)
    for name, shp, qtype in plan:
        if qtype == T.F32:
            w.add_tensor_info(name, shp, np.dtype(np.float32), nbytes(shp, qtype))
        else:  # quantized and 16-bit types as raw bytes: the last dimension counted in bytes
            byte_shape = (*shp[:-1], nbytes(shp[-1:], qtype))
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes(shp, qtype), raw_dtype=qtype)
    t0 = time.perf_counter()
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, shp, qtype in plan:
            if qtype == T.F32:
                data = f32_tensor(name, shp, rng)
            else:
                data = filler.bytes_for(qtype, int(np.prod(shp)))
            w.write_tensor_data(data)
            if name.endswith("ffn_up_exps.weight"):
                done = w.fout[0].tell() / 1e9
                log(f"  layer {name.split('.')[1]:>3}: {done:6.1f} GB  {time.perf_counter() - t0:6.1f} s")
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    return {"path": str(out), "bytes": out.stat().st_size, "seconds": round(seconds, 2), "layers": layers,
            "expert_type": expert_type, "dense_type": dense_type, "shape": "tiny" if shape == TINY else "v3"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="GGUF file to write (e.g. /dev/shm/v3.gguf)")
    ap.add_argument("--layers", type=int, default=3, help="MoE layers (default 3)")
    ap.add_argument("--expert-type", default="q4_0", choices=sorted(EXPERT_TYPES))
    ap.add_argument("--dense-type", default="q8_0", choices=sorted(DENSE_TYPES))
    ap.add_argument("--tiny", action="store_true", help="a reduced shape for tests (hidden 512, 16 experts)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        info = write_gguf(a.out, a.layers, a.expert_type, a.dense_type, TINY if a.tiny else V3, a.seed)
    except (ValueError, OSError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"wrote {info['path']}: {info['bytes'] / 1e9:.2f} GB in {info['seconds']} s "
          f"({info['layers']} layers, experts {info['expert_type']}, rest {info['dense_type']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
