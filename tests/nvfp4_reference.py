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
