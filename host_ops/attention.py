"""Dense CPU attention over K/V laid out [B, S, Hk, D] (the public contract; the KV cache's
head-major layout has its own entry points in `host_ops.host_kv_cache`, same kernel).

GQA: query head j uses KV head j // (Hq // Hk). Softmax scale 1/sqrt(D) unless given. K/V are
bfloat16 (`ml_dtypes.bfloat16`, read as 2 bytes per element) or float32; q may be any float dtype
(bfloat16 and float32 are read as they are, others cast to float32); all arithmetic is float32. Outputs are
float32, or bfloat16 where `out` is a bfloat16 array. Runs multi-threaded (numba, `NUMBA_NUM_THREADS`
threads) and releases the GIL.
"""
from __future__ import annotations

import numpy as np

from host_ops import _kernel, _validate


def _dense_kv(q: np.ndarray, k, v) -> tuple[np.ndarray, np.ndarray]:
    """k, v checked against q ([B, ..., Hq, D]) and made C-contiguous."""
    k, v = np.asarray(k), np.asarray(v)
    for name, x in (("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape [B, S, Hk, D], got shape {x.shape}")
        _validate.kv_dtype(name, x.dtype)
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"k and v must have the same shape and dtype, got k {k.shape} {k.dtype}, "
                         f"v {v.shape} {v.dtype}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[-1] or k.shape[1] == 0:
        raise ValueError(f"k/v of shape {k.shape} [B, S, Hk, D] do not match q of shape {q.shape} "
                         f"(need the same B and D, S >= 1)")
    _validate.heads("q", q.shape[-2], "k", k.shape[2])
    return np.ascontiguousarray(k), np.ascontiguousarray(v)


def _run_dense(q, k, v, starts, ends, out, scale) -> None:
    """q, out [B, T, Hq, D]; k, v [B, S, Hk, D] C-contiguous (strided reads: the cache's head-major
    layout is the faster one)."""
    B, S, Hk, D = k.shape
    _kernel.run(q, _kernel.flat_kv(k), _kernel.flat_kv(v), Hk, np.arange(B) * (S * Hk * D), D, Hk * D, starts, ends,
                _validate.scale(scale, D), out)


def decode_attention(q, k, v, lengths, out=None, scale=None) -> np.ndarray:
    """One query per sequence: q [B, Hq, D]; k, v [B, S, Hk, D]; lengths [B] ints in [1, S]: query b
    attends to positions [0, lengths[b]). Returns out [B, Hq, D] float32 (written into `out`, float32 or
    bfloat16, if given)."""
    q = _validate.query("q", q, "B, Hq, D")
    k, v = _dense_kv(q, k, v)
    B, S = k.shape[:2]
    lengths = _validate.ints("lengths", lengths, (B,), f"B from q {q.shape}", 1, S, f"S={S} from k {k.shape}")
    out = _validate.out(out, q.shape)
    _run_dense(q[:, None], k, v, lengths - 1, lengths, out[:, None], scale)
    return out


def prefill_attention(q, k, v, lengths_before, out=None, scale=None) -> np.ndarray:
    """Causal attention for T new positions per sequence: q [B, T, Hq, D]; k, v [B, S, Hk, D] hold the
    prefix and the new positions; query t of sequence b sits at position lengths_before[b] + t and
    attends to positions [0, lengths_before[b] + t]. Needs 0 <= lengths_before[b] <= S - T.
    Returns out [B, T, Hq, D] float32 (written into `out`, float32 or bfloat16, if given)."""
    q = _validate.query("q", q, "B, T, Hq, D")
    k, v = _dense_kv(q, k, v)
    (B, T), S = q.shape[:2], k.shape[1]
    if T > S:
        raise ValueError(f"q has T={T} query positions (shape {q.shape}), more than k's S={S} (shape {k.shape})")
    before = _validate.ints("lengths_before", lengths_before, (B,), f"B from q {q.shape}", 0, S - T,
                            f"S - T = {S} - {T} from k {k.shape} and q {q.shape}")
    out = _validate.out(out, q.shape)
    _run_dense(q, k, v, before, np.full(B, S), out, scale)
    return out
