"""numba kernels that code bfloat16 expert weights for the link (the format: `moe_jax.expert_codec`):
bits uint16 [rows, cols] in, rows in parallel. `moe_jax.expert_codec.encode` loads them when it first codes,
so that importing moe_jax does not import numba."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from host_ops import numba_target  # noqa: F401  (numba's target, set before the first @njit below)

_JIT = dict(nogil=True, cache=True)


@njit(parallel=True, **_JIT)
def exponent_counts(bits):
    """bits uint16 [rows, cols] -> int64 [256]: elements per exponent."""
    rows = bits.shape[0]
    parts = np.zeros((rows, 256), np.int64)
    for r in prange(rows):
        row, part = bits[r], parts[r]
        for c in range(bits.shape[1]):
            part[(row[c] >> 7) & 0xFF] += 1
    return parts.sum(axis=0)


@njit(parallel=True, **_JIT)
def code(bits, base, escape, sm, nib, escapes_per_row):
    """Fill sm [rows, cols] with sign and mantissa and nib [rows, ceil(cols / 2)] with exponent - base in 4
    bits (`escape` where it does not fit); count each row's escapes."""
    rows, cols = bits.shape
    for r in prange(rows):
        row, srow, nrow = bits[r], sm[r], nib[r]
        n = 0
        for c in range(cols):
            b = np.int32(row[c])
            srow[c] = np.uint8(((b >> 8) & 0x80) | (b & 0x7F))
            e = ((b >> 7) & 0xFF) - base
            if e < 0 or e >= escape:
                e = escape
                n += 1
            if c % 2 == 0:
                nrow[c // 2] = np.uint8(e)
            else:
                nrow[c // 2] = np.uint8(nrow[c // 2] | (e << 4))
        escapes_per_row[r] = n


@njit(parallel=True, **_JIT)
def gather_escapes(bits, base, escape, starts, index, values):
    """Flat indices and bits of each row's escapes, from starts[row] on."""
    rows, cols = bits.shape
    for r in prange(rows):
        row, k = bits[r], starts[r]
        for c in range(cols):
            e = ((np.int32(row[c]) >> 7) & 0xFF) - base
            if e < 0 or e >= escape:
                index[k] = r * cols + c
                values[k] = row[c]
                k += 1
