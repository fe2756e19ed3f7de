"""Lossless 12-bit coding of bfloat16 expert weights for the host-to-GPU link ("exp4").

The offload engine is link-bound in decode: every step streams the experts the GPU does not hold. A
bfloat16 is a sign, 8 exponent bits and 7 mantissa bits, and a weight matrix's exponents crowd into a
few values (Gaussian weights: 2.5 bits of entropy; 15 consecutive exponents hold all but ~2e-4 of the
elements). So each matrix [rows, cols] is stored as
  sm    uint8 [rows, cols]            sign and mantissa: (sign << 7) | mantissa,
  nib   uint8 [rows, ceil(cols / 2)]  the exponent minus `base`, 4 bits each, two per byte (even column in the
                                      low nibble); 15 marks an escape,
  base  the start of the 15 exponents that cover the most elements,
  escapes: flat indices (int32) and full bits (uint16) of the elements whose exponent is outside them,
1.5 bytes per element instead of 2: the link carries and the pinned pool holds 25% fewer bytes per
streamed expert, and the GPU restores the exact bits (`decode`, a few elementwise ops and one scatter).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from moe_jax.offload_policy import CODECS
from moe_jax.params import expert_bytes, layer_param_specs

ESCAPE = 15  # the nibble of an element whose exponent is outside [base, base + 15)
ESCAPE_ALLOWANCE = 1e-3  # escapes per element planned before the weights are seen (Gaussian: ~2e-4)
ESCAPE_BYTES = 10  # an escape's int32 expert and index and its uint16 bits, held on the GPU
BF16 = np.dtype(ml_dtypes.bfloat16)


class Coded(NamedTuple):
    """One bfloat16 matrix [rows, cols], coded (see the module doc)."""

    sm: np.ndarray  # uint8 [rows, cols]
    nib: np.ndarray  # uint8 [rows, ceil(cols / 2)]
    base: int
    escape_index: np.ndarray  # int32 [n], flat indices into [rows, cols]
    escape_bits: np.ndarray  # uint16 [n]


def check(codec: str, dtype) -> None:
    """Raise ValueError for an unknown codec, or a codec that cannot code `dtype`."""
    if codec not in CODECS:
        raise ValueError(f"expert codec must be one of {CODECS}, got {codec!r}")
    if codec != "none" and np.dtype(dtype) != BF16:
        raise ValueError(f"expert codec {codec!r} codes bfloat16 weights; the model runs in {np.dtype(dtype)}")


def expert_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Shape of one expert's matrix per expert weight name."""
    return {k: s.shape[1:] for k, s in layer_param_specs(cfg, moe=True).items() if s.expert}


def streamed_expert_bytes(cfg, dtype, codec: str) -> int:
    """Bytes of one streamed expert of one layer in the pinned pool and on the link under `codec`."""
    check(codec, dtype)
    if codec == "none":
        return expert_bytes(cfg, dtype)
    return sum(coded_nbytes(shape) for shape in expert_shapes(cfg).values())


def decode_overhead_bytes(cfg, dtype, codec: str, streamed_experts, escape_bytes: int | None = None) -> float:
    """GPU bytes a codec adds beyond the slots and the coded chunks in flight: the escapes of the
    `streamed_experts` experts (`escape_bytes` once known, else at ESCAPE_ALLOWANCE) and one decoded
    expert's temporaries."""
    if codec == "none":
        return 0.0
    if escape_bytes is None:
        elements = sum(int(np.prod(shape)) for shape in expert_shapes(cfg).values())
        escape_bytes = ESCAPE_ALLOWANCE * ESCAPE_BYTES * elements * np.asarray(streamed_experts)
    return escape_bytes + expert_bytes(cfg, dtype)


def coded_nbytes(shape) -> int:
    """Bytes of sm and nib (the part the link carries) for a bfloat16 array of `shape` [..., cols]."""
    *lead, cols = shape
    rows = int(np.prod(lead, dtype=np.int64))
    return rows * (cols + (cols + 1) // 2)


def encode(x: np.ndarray, sm: np.ndarray | None = None, nib: np.ndarray | None = None) -> Coded:
    """Code a bfloat16 matrix [rows, cols] (rows * cols < 2**31), into `sm` and `nib` where given (e.g. one
    expert's rows of a chunk's arrays, C-contiguous)."""
    if x.dtype != BF16 or x.ndim != 2:
        raise ValueError(f"expert codec: needs a bfloat16 matrix, got {x.dtype} {x.shape}")
    if x.size >= 2**31:
        raise ValueError(f"expert codec: {x.shape} has too many elements for int32 escape indices")
    from host_ops.expert_coding import code, exponent_counts, gather_escapes  # numba, loaded when first coding

    bits = np.ascontiguousarray(x).view(np.uint16)
    counts = exponent_counts(bits)
    base = int(np.argmax(np.convolve(counts, np.ones(ESCAPE, np.int64), "valid")))
    rows, cols = bits.shape
    sm = np.empty((rows, cols), np.uint8) if sm is None else sm
    nib = np.empty((rows, (cols + 1) // 2), np.uint8) if nib is None else nib
    per_row = np.empty(rows, np.int64)
    code(bits, base, ESCAPE, sm, nib, per_row)
    starts = np.concatenate([[0], np.cumsum(per_row)])
    index, values = np.empty(starts[-1], np.int32), np.empty(starts[-1], np.uint16)
    gather_escapes(bits, base, ESCAPE, starts[:-1], index, values)
    return Coded(sm, nib, base, index, values)


def decode(sm, nib, base, escape_index=None, escape_bits=None) -> jax.Array:
    """JAX decoding (runs on the GPU): sm [..., cols], nib [..., ceil(cols / 2)] and a scalar base -> bfloat16
    [..., cols], exact but at the escapes, which the given ones (flat indices into [..., cols] and their
    uint16 bits; an index may repeat with the same bits; one past the array is dropped) set as bits, before the
    bitcast (a scatter of bfloat16 values may quieten a signalling NaN); without them the caller sets them."""
    sm, nib = sm.astype(jnp.uint16), nib.astype(jnp.uint16)
    codes = jnp.stack([nib & 15, nib >> 4], axis=-1).reshape(*nib.shape[:-1], -1)[..., :sm.shape[-1]]
    bits = ((sm & 0x80) << 8) | ((codes + jnp.asarray(base).astype(jnp.uint16)) << 7) | (sm & 0x7F)
    if escape_index is not None:
        bits = bits.reshape(-1).at[escape_index].set(escape_bits.astype(jnp.uint16), mode="drop").reshape(sm.shape)
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
