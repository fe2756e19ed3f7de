"""Fixtures for host_ops tests: a float64 NumPy attention reference and random inputs."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

BF16 = np.dtype(ml_dtypes.bfloat16)
TOLERANCE = {BF16: 1e-3, np.dtype(np.float32): 1e-5}  # relative error bound per KV dtype


def attention_reference(q, k, v, n_ctx, scale=None):
    """float64 GQA attention: q [B, T, Hq, D], k [B, S, Hk, D] and v [B, S, Hk, Dv] (any float dtype),
    n_ctx [B, T]: query (b, t) attends to positions [0, n_ctx[b, t]). Returns [B, T, Hq, Dv] float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    scale = 1 / np.sqrt(D) if scale is None else scale
    out = np.empty((B, T, Hq, v.shape[-1]))
    for b in range(B):
        for t in range(T):
            n = n_ctx[b, t]
            kk = np.repeat(k[b, :n], Hq // Hk, axis=1)  # [n, Hq, D]
            vv = np.repeat(v[b, :n], Hq // Hk, axis=1)
            s = np.einsum("hd,nhd->hn", q[b, t], kk) * scale
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[b, t] = np.einsum("hn,nhd->hd", p / p.sum(axis=1, keepdims=True), vv)
    return out


def relative_error(out, ref) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def random_kv(rng, shape, dtype):
    """Random N(0, 1) K or V cast to dtype (never zeros)."""
    return rng.standard_normal(shape, np.float32).astype(dtype)


class Reference:
    attention = staticmethod(attention_reference)
    error = staticmethod(relative_error)
    random_kv = staticmethod(random_kv)
    tolerance = TOLERANCE


@pytest.fixture
def ref():
    """The float64 reference and helpers (see `Reference`)."""
    return Reference


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
