"""Rotary position embeddings (RoPE) on the fused qkv activation (NumPy oracle).

Layout: qkv (B,T,(NH+2*NKV)*hs) holds NH query heads, then NKV key heads, then
NKV value heads, each hs wide. Query and key heads are rotated with Hugging
Face's "rotate_half" convention: element i of a head pairs with element
i + hs/2, and at position t with angle theta_t,i = t * inv_freq[i]:
    x1' = x1 * cos - x2 * sin
    x2' = x2 * cos + x1 * sin
Value heads are copied unchanged. cos/sin are (max_seq_len, hs/2) tables from
rope_frequencies; position t uses row t. The rotation is orthogonal, so the
backward is the transposed rotation (the angle negated). Activation gradients
overwrite (=); out may be inp (and dinp may be dout).
"""

import numpy as np

THETA = 10000.0


# Llama 3.1's frequency scaling as llm.c fixes it (use_scaled_rope=1 in its model
# file): (factor, low_freq_factor, high_freq_factor, original context length).
LLAMA31_SCALING = (8.0, 1.0, 4.0, 8192)


def scale_frequencies(inv_freq, scaling):
    """Llama 3's "llama3" RoPE scaling of the inverse frequencies (float32).

    scaling = (factor, low_freq_factor, high_freq_factor, original_max_seq_len).
    With wavelength 2*pi/inv_freq: wavelengths shorter than original/high are
    kept, those longer than original/low are divided by factor, and those in
    between blend the two with weight (original/wavelength - low) / (high - low)
    on the kept one -- Hugging Face's _compute_llama3_parameters, in float32.
    """
    factor, low, high, original = (np.float32(x) for x in scaling)
    if not (factor > 0 and 0 < low < high and original > 0):
        raise ValueError(f"scale_frequencies: scaling must be (factor > 0, 0 < low_freq_factor < "
                         f"high_freq_factor, original_max_seq_len > 0), got {tuple(scaling)}")
    wavelen = (np.float32(2 * np.pi) / inv_freq).astype(np.float32)
    low_wavelen, high_wavelen = original / low, original / high
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((original / wavelen - low) / (high - low)).astype(np.float32)
    blended = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_frequencies(head_dim, max_seq_len, theta=THETA, scaling=None):
    """(cos, sin), each float32 (max_seq_len, head_dim // 2), as Hugging Face Llama.

    inv_freq = 1 / theta ** (arange(0, hs, 2) / hs) in float32 (then Llama 3's
    scale_frequencies when `scaling` is given), positions in float32, their
    outer product, then cos and sin in float32.
    """
    if head_dim <= 0 or head_dim % 2 != 0:
        raise ValueError(f"rope_frequencies: head_dim must be a positive even number, got {head_dim}")
    if max_seq_len <= 0:
        raise ValueError(f"rope_frequencies: max_seq_len must be positive, got {max_seq_len}")
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    if scaling is not None:
        inv_freq = scale_frequencies(inv_freq, scaling)
    positions = np.arange(max_seq_len, dtype=np.float32)
    angles = np.outer(positions, inv_freq).astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _heads(fn, inp, cos, num_heads, num_kv_heads):
    """inp seen as (B, T, NH+2*NKV, hs), and hs; checks the shapes."""
    nkv = num_heads if num_kv_heads is None else num_kv_heads
    nh3 = num_heads + 2 * nkv
    B, T, W = inp.shape
    if W % nh3 != 0 or (W // nh3) % 2 != 0:
        raise ValueError(f"{fn}: inp last axis must be (NH+2*NKV)*hs = {nh3}*hs with hs even, got {W}")
    hs = W // nh3
    if cos.shape[0] < T or cos.shape[1] != hs // 2:
        raise ValueError(f"{fn}: cos/sin must be (>= T, hs/2) = (>= {T}, {hs // 2}), got {cos.shape}")
    return inp.reshape(B, T, nh3, hs), num_heads + nkv, hs


def _rotate(out, inp, cos, sin, num_heads, num_kv_heads, sign, fn):
    """out = inp with the q/k pairs rotated by (cos, sign * sin); v copied."""
    x, nqk, hs = _heads(fn, inp, cos, num_heads, num_kv_heads)
    T = x.shape[1]
    half = hs // 2
    c = cos[:T][None, :, None, :]
    s = sin[:T][None, :, None, :] * sign
    x1 = x[:, :, :nqk, :half]
    x2 = x[:, :, :nqk, half:]
    y = np.empty(x.shape, np.result_type(x, c))  # all of it first: out may be inp
    y[:, :, :nqk, :half] = x1 * c - x2 * s
    y[:, :, :nqk, half:] = x2 * c + x1 * s
    y[:, :, nqk:] = x[:, :, nqk:]
    if out.shape != inp.shape:
        raise ValueError(f"{fn}: output must have shape {inp.shape}, got {out.shape}")
    out[...] = y.reshape(out.shape)


def rope_forward(out, inp, cos, sin, num_heads, num_kv_heads=None):
    """Rotate the query and key heads of inp by their position's angles; copy values."""
    _rotate(out, inp, cos, sin, num_heads, num_kv_heads, 1, "rope_forward")


def rope_backward(dinp, dout, cos, sin, num_heads, num_kv_heads=None):
    """dinp = the transposed rotation of dout (angles negated); value part copied."""
    _rotate(dinp, dout, cos, sin, num_heads, num_kv_heads, -1, "rope_backward")
