"""Argument checks shared by the attention entry points and the KV cache: each raises ValueError
naming the argument and the shapes involved, before anything reaches numba."""
from __future__ import annotations

import math

import numpy as np

from host_ops._kernel import BFLOAT16, INT8, KV_DTYPES

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), BFLOAT16)


def query(name: str, q, dims: str) -> np.ndarray:
    """q as an ndarray of a float dtype with len(dims.split(',')) dimensions ("B, Hq, D")."""
    q = np.asarray(q)
    ndim = len(dims.split(","))
    if q.ndim != ndim:
        raise ValueError(f"{name} must have shape [{dims}], got shape {q.shape}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 (or another float dtype), got {q.dtype} with shape {q.shape}")
    if q.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {q.shape}")
    return q


def kv_dtype(name: str, dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in KV_DTYPES:
        raise ValueError(f"{name} must be bfloat16 (ml_dtypes) or float32, got {dtype}")
    return dtype


def cache_dtype(dtype) -> np.dtype:
    """A `HostKVCache` storage dtype: the kernel's K/V dtypes, or int8 (quantised per row)."""
    dtype = np.dtype(dtype)
    if dtype not in (*KV_DTYPES, INT8):
        raise ValueError(f"HostKVCache dtype must be bfloat16 (ml_dtypes), float32 or int8, got {dtype}")
    return dtype


def heads(q_name: str, hq: int, kv_name: str, hk: int) -> None:
    if hk < 1:
        raise ValueError(f"{kv_name} has Hk={hk} KV heads: at least one is needed")
    if hq % hk:
        raise ValueError(f"{q_name} has Hq={hq} heads, not a multiple of {kv_name}'s Hk={hk} KV heads (GQA needs "
                         f"Hq % Hk == 0)")


def ints(name: str, x, shape: tuple[int, ...], shape_note: str, lo: int, hi: int | None, range_note: str) -> np.ndarray:
    """x as an int64 array of `shape` with lo <= x <= hi (hi None: no upper bound); the notes say where
    shape and bounds come from."""
    x = np.asarray(x)
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape} ({shape_note}), got {x.shape}")
    if x.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got {x.dtype} with shape {x.shape}")
    x = x.astype(np.int64)
    bad = np.flatnonzero((x < lo) | (x > hi) if hi is not None else x < lo)
    if bad.size:
        i = np.unravel_index(bad[0], x.shape)
        where = ", ".join(str(int(j)) for j in i)
        bounds = f"lie in [{lo}, {hi}]" if hi is not None else f"be >= {lo}"
        raise ValueError(f"{name} must {bounds} ({range_note}), got {name}[{where}] = {x[i]} (shape {x.shape})")
    return x


def out(o, shape: tuple[int, ...]) -> np.ndarray:
    """o checked as a float32 or bfloat16 C-contiguous writeable array of `shape`; a new float32 one if o is None."""
    if o is None:
        return np.empty(shape, np.float32)
    if not isinstance(o, np.ndarray) or o.dtype not in KV_DTYPES or o.shape != shape:
        raise ValueError(f"out must be a float32 or bfloat16 ndarray of shape {shape}, got "
                         f"{getattr(o, 'dtype', type(o).__name__)} with shape {getattr(o, 'shape', None)}")
    if not (o.flags.c_contiguous and o.flags.writeable):
        raise ValueError(f"out must be C-contiguous and writeable (shape {o.shape})")
    return o


def scale(s, head_dim: int) -> float:
    s = 1.0 / math.sqrt(head_dim) if s is None else float(s)
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {s}")
    return s
