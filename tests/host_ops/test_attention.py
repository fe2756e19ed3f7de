"""Dense entry points `decode_attention` / `prefill_attention` against a float64 NumPy reference."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import host_ops
from host_ops import decode_attention, prefill_attention

BF16 = np.dtype(ml_dtypes.bfloat16)
KV_DTYPES = [BF16, np.dtype(np.float32)]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_decode_matches_reference(ref, rng, head_dim, group, kv_dtype):
    B, S, Hk = 7, 203, 2  # odd shapes; S spans several 64-position blocks plus a ragged tail
    q = rng.standard_normal((B, Hk * group, head_dim), np.float32)
    k, v = (ref.random_kv(rng, (B, S, Hk, head_dim), kv_dtype) for _ in range(2))
    lengths = np.array([1, S, 2, 63, 64, 65, 130])
    out = decode_attention(q, k, v, lengths)
    assert out.dtype == np.float32 and out.shape == q.shape
    expected = ref.attention(q[:, None], k, v, lengths[:, None])[:, 0]
    assert ref.error(out, expected) < ref.tolerance[kv_dtype]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
def test_decode_sharp_softmax_and_given_scale_and_out(ref, rng, kv_dtype):
    """A large scale makes the softmax nearly one-hot (the running max changes between blocks)."""
    B, S, Hk, G, D = 3, 300, 1, 4, 64
    q = rng.standard_normal((B, Hk * G, D), np.float32)
    k, v = (ref.random_kv(rng, (B, S, Hk, D), kv_dtype) for _ in range(2))
    lengths = np.array([300, 150, 5])
    out = np.full(q.shape, np.nan, np.float32)
    result = decode_attention(q, k, v, lengths, out=out, scale=3.0)
    assert result is out
    expected = ref.attention(q[:, None], k, v, lengths[:, None], scale=3.0)[:, 0]
    assert ref.error(out, expected) < ref.tolerance[kv_dtype]


def test_decode_accepts_readonly_noncontiguous_and_bf16_query(ref, rng):
    B, S, Hk, G, D = 4, 40, 2, 4, 64
    q = rng.standard_normal((B, Hk * G, D), np.float32).astype(BF16)
    big = ref.random_kv(rng, (B, S, 2 * Hk, D), BF16)
    k, v = big[:, :, :Hk], big[:, :, Hk:]  # non-contiguous views
    k.flags.writeable = False
    lengths = np.array([40, 1, 17, 33], np.int32)
    expected = ref.attention(q[:, None], k, v, lengths[:, None])[:, 0]
    assert ref.error(decode_attention(q, k, v, lengths), expected) < 1e-3


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
def test_bfloat16_query_and_out_are_read_and_written_as_they_are(ref, rng, kv_dtype):
    """A bfloat16 q and out (the offload engine's activations) give what the float32 path gives for the same
    values, rounded once to bfloat16 at the end: the kernel widens q itself and rounds its float32 result."""
    B, S, Hk, G, D = 5, 150, 2, 4, 128
    q = rng.standard_normal((B, Hk * G, D), np.float32).astype(BF16)
    k, v = (ref.random_kv(rng, (B, S, Hk, D), kv_dtype) for _ in range(2))
    lengths = np.array([150, 1, 64, 65, 99])
    wide = decode_attention(q.astype(np.float32), k, v, lengths, scale=0.3)
    out = np.full(q.shape, np.nan, BF16)
    assert decode_attention(q, k, v, lengths, out=out, scale=0.3) is out
    np.testing.assert_allclose(out.astype(np.float32), wide.astype(BF16).astype(np.float32), rtol=2**-7, atol=0)
    assert (out.astype(np.float32) == wide.astype(BF16).astype(np.float32)).mean() > 0.99  # mostly bit-exact
    expected = ref.attention(q[:, None], k, v, lengths[:, None], scale=0.3)[:, 0]
    assert ref.error(out.astype(np.float32), expected) < 1e-2


def test_claiming_a_rows_heads_at_once_or_one_task_at_a_time_gives_the_same_output(ref, rng):
    """The kernel's threads claim all KV heads of a query row at once where there are rows enough per thread
    (_ROWS_PER_THREAD), else one (row, head) task: the same 7 rows on one thread (a row a claim) and on every
    thread (a task a claim, where there are 2 or more) give the same bits."""
    import numba

    B, S, Hk, G, D = 7, 90, 4, 2, 64
    q = rng.standard_normal((B, Hk * G, D), np.float32)
    k, v = (ref.random_kv(rng, (B, S, Hk, D), BF16) for _ in range(2))
    lengths = np.array([90, 1, 33, 64, 65, 2, 80])
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = decode_attention(q, k, v, lengths)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(decode_attention(q, k, v, lengths), one)
    assert ref.error(one, ref.attention(q[:, None], k, v, lengths[:, None])[:, 0]) < ref.tolerance[BF16]


def test_float32_to_bfloat16_rounds_to_nearest_even_as_ml_dtypes_does():
    """The kernel's output rounding against ml_dtypes' cast: ties both ways, the largest finite value (rounds
    to inf), infinities, NaNs of either sign with payloads, subnormals, signed zeros, and random values."""
    import numba

    from host_ops import _kernel

    @numba.njit
    def to_bf16(x, out):
        for i in range(x.size):
            out[i] = _kernel._from_f32(x[i], out)

    special = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000,
                        0x7FC00001, 0xFFC00001, 0x7F800001, 0xFF812345, 0x00000001, 0x80008000, 0x00018000,
                        0x00000000, 0x80000000, 0x3F80FFFF, 0x3F807FFF], np.uint32)
    bits = np.concatenate([special, np.random.default_rng(7).integers(0, 2**32, 100_000, dtype=np.uint32)])
    x = bits.view(np.float32)
    got = np.zeros(x.size, np.uint16)
    to_bf16(x, got)
    with np.errstate(invalid="ignore"):
        expected = x.astype(BF16).view(np.uint16)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_matches_reference(ref, rng, head_dim, group, kv_dtype):
    B, T, S, Hk = 3, 9, 80, 2
    q = rng.standard_normal((B, T, Hk * group, head_dim), np.float32)
    k, v = (ref.random_kv(rng, (B, S, Hk, head_dim), kv_dtype) for _ in range(2))
    before = np.array([0, S - T, 37])
    out = prefill_attention(q, k, v, before)
    assert out.dtype == np.float32 and out.shape == q.shape
    expected = ref.attention(q, k, v, before[:, None] + np.arange(1, T + 1))
    assert ref.error(out, expected) < ref.tolerance[kv_dtype]


def test_prefill_of_one_position_is_decode(ref, rng):
    B, S, Hk, G, D = 5, 50, 2, 4, 96
    q = rng.standard_normal((B, Hk * G, D), np.float32)
    k, v = (ref.random_kv(rng, (B, S, Hk, D), BF16) for _ in range(2))
    lengths = np.array([1, 50, 9, 20, 33])
    np.testing.assert_allclose(prefill_attention(q[:, None], k, v, lengths - 1)[:, 0],
                               decode_attention(q, k, v, lengths), rtol=0, atol=1e-6)


def _decode_inputs(B=2, S=10, Hk=2, Hq=4, D=64):
    q = np.ones((B, Hq, D), np.float32)
    k = np.ones((B, S, Hk, D), BF16)
    return q, k, k.copy(), np.full(B, S)


@pytest.mark.parametrize("change, match", [
    (dict(q=np.ones((2, 64), np.float32)), r"q must have shape \[B, Hq, D\], got shape \(2, 64\)"),
    (dict(q=np.ones((2, 4, 64), np.int32)), r"q must be float32.*int32"),
    (dict(k=np.ones((2, 10, 64), BF16)), r"k must have shape \[B, S, Hk, D\], got shape \(2, 10, 64\)"),
    (dict(k=np.ones((2, 10, 2, 64), np.float16)), r"k must be bfloat16 \(ml_dtypes\) or float32, got float16"),
    (dict(v=np.ones((2, 10, 2, 64), np.float32)), r"k and v must have the same shape and dtype"),
    (dict(k=np.ones((3, 10, 2, 64), BF16), v=np.ones((3, 10, 2, 64), BF16)),
     r"k/v of shape \(3, 10, 2, 64\).*q of shape \(2, 4, 64\)"),
    (dict(k=np.ones((2, 10, 3, 64), BF16), v=np.ones((2, 10, 3, 64), BF16)),
     r"q has Hq=4 heads, not a multiple of k's Hk=3"),
    (dict(k=np.ones((2, 10, 0, 64), BF16), v=np.ones((2, 10, 0, 64), BF16)), r"k has Hk=0 KV heads: at least one"),
    (dict(lengths=np.array([10, 0])), r"lengths must lie in \[1, 10\].*lengths\[1\] = 0"),
    (dict(lengths=np.array([11, 1])), r"lengths must lie in \[1, 10\].*lengths\[0\] = 11"),
    (dict(lengths=np.array([1, 2, 3])), r"lengths must have shape \(2,\) \(B from q \(2, 4, 64\)\), got \(3,\)"),
    (dict(lengths=np.array([1.0, 2.0])), r"lengths must be integers, got float64"),
    (dict(out=np.empty((2, 4, 32), np.float32)), r"out must be a float32 or bfloat16 ndarray of shape \(2, 4, 64\)"),
    (dict(out=np.empty((2, 4, 64), np.float64)), r"out must be a float32 or bfloat16 ndarray"),
])
def test_decode_validation_errors_name_argument_and_shapes(change, match):
    q, k, v, lengths = _decode_inputs()
    args = dict(q=q, k=k, v=v, lengths=lengths) | change
    with pytest.raises(ValueError, match=match):
        decode_attention(**args)


def test_prefill_validation_errors():
    q = np.ones((2, 4, 4, 64), np.float32)
    k = np.ones((2, 10, 2, 64), BF16)
    with pytest.raises(ValueError, match=r"q must have shape \[B, T, Hq, D\]"):
        prefill_attention(q[0], k, k, np.zeros(2, int))
    with pytest.raises(ValueError, match=r"lengths_before must lie in \[0, 6\] \(S - T = 10 - 4"):
        prefill_attention(q, k, k, np.array([0, 7]))
    with pytest.raises(ValueError, match=r"q has T=12 query positions.*more than k's S=10"):
        prefill_attention(np.ones((2, 12, 4, 64), np.float32), k, k, np.zeros(2, int))


def test_host_ops_does_not_import_jax():
    root = pathlib.Path(host_ops.__file__).parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    code = "import sys, host_ops; assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
