"""An independent NumPy implementation of NVIDIA ModelOpt's NVFP4 formulas, written from the
format definition (not from the library's code), used to check the C++/CUDA ops bit for bit.

- global scale: amax(|W|) / (6 · 448)
- block scale: amax(|block|) / (6 · global) in float32; 0 → 1; clamped to [2⁻⁹, 448]; cast to
  float8_e4m3fn with round-to-nearest-even
- element: W / (block_scale · global) in float32, rounded to the nearest E2M1 value; a value
  exactly halfway between two E2M1 values goes to the one with an even code; |x| > 6 → 6
- packing: element 2i in the low nibble of byte i, sign in bit 3 of a nibble
"""

import numpy as np

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)


def e4m3_values() -> np.ndarray:
    """The 127 non-negative finite float8_e4m3fn values, indexed by code (0..126)."""
    vals = []
    for code in range(127):
        e, m = code >> 3, code & 7
        vals.append(m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(vals)


_E4M3 = e4m3_values()


def round_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 values in [0, 448] → e4m3 codes, nearest value, ties to the even code."""
    x = x.astype(np.float64)
    idx = np.searchsorted(_E4M3, x)  # first value >= x
    idx = np.clip(idx, 1, 126)
    lo, hi = _E4M3[idx - 1], _E4M3[idx]
    dlo, dhi = x - lo, hi - x
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (idx % 2 == 0))
    codes = np.where(pick_hi, idx, idx - 1)
    codes = np.where(x <= 0, 0, codes)
    return codes.astype(np.uint8)


def round_e2m1(x: np.ndarray) -> np.ndarray:
    """float32 values → E2M1 codes (sign in bit 3), nearest value, ties to the even code."""
    a = np.abs(x.astype(np.float64))
    dist = np.abs(a[..., None] - E2M1)                       # [..., 8]
    best = dist.min(-1, keepdims=True)
    cand = dist == best
    # among equally near values prefer the even code (lowest even index present)
    even_pref = np.where(cand & (np.arange(8) % 2 == 0), np.arange(8), 99).min(-1)
    any_even = even_pref < 99
    first = np.argmax(cand, -1)
    mag = np.where(any_even, even_pref, first)
    mag = np.where(a > 6.0, 7, mag)
    sign = (x < 0).astype(np.uint8)
    return (sign << 3 | mag).astype(np.uint8)


def quantize(w: np.ndarray, global_scale: float = None):
    """w float32 [N, K] → (packed uint8 [N, K/2], scale codes uint8 [N, K/16], global float32)."""
    w = w.astype(np.float32)
    n, k = w.shape
    if global_scale is None:
        amax = np.float32(np.abs(w).max())
        gs = np.float32(amax / np.float32(2688.0)) if amax > 0 else np.float32(1.0)
    else:
        gs = np.float32(global_scale)
    blocks = w.reshape(n, k // 16, 16)
    bmax = np.abs(blocks).max(-1).astype(np.float32)
    s = (bmax / np.float32(np.float32(6.0) * gs)).astype(np.float32)
    s = np.where(s == 0, np.float32(1.0), s)
    s = np.clip(s, np.float32(2.0 ** -9), np.float32(448.0)).astype(np.float32)
    codes = round_e4m3(s)
    sdec = _E4M3[codes].astype(np.float32)
    q = (blocks / (sdec * gs).astype(np.float32)[..., None]).astype(np.float32)
    nib = round_e2m1(q).reshape(n, k)
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)
    return packed, codes, gs


def dequantize(packed: np.ndarray, codes: np.ndarray, gs: float) -> np.ndarray:
    n = packed.shape[0]
    nib = np.empty((n, packed.shape[1] * 2), dtype=np.uint8)
    nib[:, 0::2] = packed & 0xF
    nib[:, 1::2] = packed >> 4
    vals = (E2M1[nib & 7] * np.where(nib & 8, -1.0, 1.0)).astype(np.float32)
    # float32 like ModelOpt: (block scale × global scale), then × the E2M1 value
    s = np.repeat((_E4M3[codes].astype(np.float32) * np.float32(gs)).astype(np.float32), 16, axis=1)
    return (vals * s).astype(np.float32)


# ---- tiled kernel layout -----------------------------------------------------------------
# Written from two outside facts, not from the library's repack code:
# 1. The fused GEMM decodes a 32-bit word into four bf16x2 mma A registers with fixed shifts
#    and masks (fp4_gemm_mma.cuh, decode_word): register i = ((word << MAG_SHIFT[i]) & 0x01C001C0)
#    | ((word << SIGN_SHIFT[i]) & 0x80008000) (a negative shift is a right shift). In each bf16
#    half the E2M1 magnitude must sit at bits 6..8 and the sign at bit 15, which reads as
#    E2M1 × 2^-126.
# 2. mma.m16n8k16's A fragment (PTX ISA): lane 4g + c holds rows g and g+8; of the lane's
#    four k columns, register 0 holds row g cols 0,1, register 1 row g+8 cols 0,1, register 2
#    row g cols 2,3, register 3 row g+8 cols 2,3 (low half first).
# Word j of lane 4g + c in row tile t, k-block b holds rows {16t+g, 16t+g+8} × columns
# {64b + 16c + 4j + 0..3}; qscale entry (kb', r) of the lane in chunk kc is the scale of row
# 16t+g+8r, group 4(8kc+kb')+c (cpp/include/dsfp4/nvfp4.h).
MAG_SHIFT = (0, 3, 6, -3)
SIGN_SHIFT = (0, 3, 1, 2)
REGISTER = ((0, 0, 2, 2), (1, 1, 3, 3))  # [rowsel][column kk] → register; half = kk % 2


def _shl(v: np.ndarray, s: int) -> np.ndarray:
    return (v << np.uint32(s)) if s >= 0 else (v >> np.uint32(-s))


def tiled_decode(words: np.ndarray) -> np.ndarray:
    """uint32 words [...] → the four registers' eight values [..., 4 registers, 2 halves], as
    float64 (the E2M1 value × 2^-126 each half must hold)."""
    w = words.astype(np.uint32)
    regs = [(_shl(w, MAG_SHIFT[i]) & np.uint32(0x01C001C0)) | (_shl(w, SIGN_SHIFT[i]) & np.uint32(0x80008000))
            for i in range(4)]
    out = np.empty(w.shape + (4, 2), dtype=np.float64)
    for i, r in enumerate(regs):
        for h in range(2):
            half = (r >> np.uint32(16 * h)) & np.uint32(0xFFFF)
            exp, man, sign = (half >> 7) & 0xFF, half & 0x7F, half >> 15
            mag = np.where(exp == 0, man / 128.0 * 2.0 ** -126, (1 + man / 128.0) * 2.0 ** (exp.astype(np.int64) - 127))
            out[..., i, h] = np.where(sign == 1, -mag, mag)
    return out


def tiled_repack(packed: np.ndarray, codes: np.ndarray, rows: int, cols: int):
    """ModelOpt packed [rows, cols/2] and scale codes [rows, cols/16] → (qweight uint32 [words],
    qscale uint8 [bytes]) of the tiled layout, padding zero."""
    nt, nkb = -(-rows // 16), -(-cols // 64)
    nkc = -(-nkb // 8)
    nib = np.zeros((nt * 16, nkb * 64), dtype=np.uint32)
    nib[:rows, 0:cols:2] = packed & 0xF
    nib[:rows, 1:cols:2] = packed >> 4
    t, b, lane, j = np.meshgrid(np.arange(nt), np.arange(nkb), np.arange(32), np.arange(4), indexing="ij")
    g, c = lane // 4, lane % 4
    words = np.zeros(t.shape, dtype=np.uint32)
    for r in range(2):
        for kk in range(4):
            code = nib[16 * t + g + 8 * r, 64 * b + 16 * c + 4 * j + kk]
            reg, h = REGISTER[r][kk], kk % 2
            mag_pos, sign_pos = 6 - MAG_SHIFT[reg] + 16 * h, 15 - SIGN_SHIFT[reg] + 16 * h
            words |= (code & np.uint32(7)) << np.uint32(mag_pos)
            words |= (code >> np.uint32(3)) << np.uint32(sign_pos)
    sc = np.zeros((nt * 16, nkc * 32 + 4), dtype=np.uint8)
    sc[:rows, : cols // 16] = codes
    t, kc, lane, kbi, r = np.meshgrid(np.arange(nt), np.arange(nkc), np.arange(32), np.arange(8), np.arange(2),
                                      indexing="ij")
    qscale = sc[16 * t + lane // 4 + 8 * r, 4 * (8 * kc + kbi) + lane % 4]
    return words.reshape(-1), qscale.reshape(-1).astype(np.uint8)
