"""The Mosaic GPU grouped GEMM: its task table, its numerics in jax's GPU simulator, its lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mgpu


def _random_sizes(rng, S, M):
    """Group sizes summing to M with most groups empty and one large group."""
    sizes = np.zeros(S, np.int64)
    used = rng.choice(S, size=min(S, 3), replace=False)
    sizes[used] = rng.multinomial(M, [0.7, 0.2, 0.1][: len(used)])
    return sizes


@pytest.mark.parametrize("block_m", [1, 8, 128])
def test_row_tasks_cover_every_row_once_with_work_first(block_m):
    rng = np.random.default_rng(0)
    row_tasks = jax.jit(mgpu.row_tasks, static_argnums=(1, 2))
    for _ in range(10):
        S, M = int(rng.integers(1, 40)), int(rng.integers(1, 600))
        sizes = _random_sizes(rng, S, M) if rng.random() < 0.5 else rng.multinomial(M, np.ones(S) / S)
        rows_in = M + int(rng.integers(0, 9))  # rows past the groups' (ragged_dot pads to a multiple of 8)
        tasks = row_tasks(jnp.asarray(sizes, jnp.int32), rows_in, block_m)
        group, block, first, rows = map(np.asarray, tasks)
        assert len(rows) == mgpu.num_tasks(rows_in, S, block_m)
        work = rows > 0
        assert work[: work.sum()].all()  # tasks without rows only at the end
        assert ((first + rows)[work] <= block_m).all()
        owner = np.full(rows_in, -1)
        for g, b, f, r in zip(group[work], block[work], first[work], rows[work]):
            span = slice(b * block_m + f, b * block_m + f + r)
            assert (owner[span] == -1).all()
            owner[span] = g
        np.testing.assert_array_equal(owner, np.concatenate([np.repeat(np.arange(S), sizes),
                                                             np.full(rows_in - M, -1)]))


ON_GPU = jax.default_backend() == "gpu"
# (M, K, N, S, sizes): a group spanning blocks and sharing blocks, most slots empty (as in the
# offload engine's slot array), a single group, fewer rows than one tile, one token's two rows (a decode of one).
CASES = [
    (300, 128, 256, 40, "sparse"),
    (256, 64, 128, 1, "one"),
    (70, 128, 128, 6, "uniform"),
    (2, 128, 128, 3, "uniform"),
]


def check_against_reference(M, K, N, S, kind, *, interpret, jax_kernel=False):
    rng = np.random.default_rng(1)
    sizes = {"sparse": lambda: _random_sizes(rng, S, M), "one": lambda: np.array([M]),
             "uniform": lambda: rng.multinomial(M, np.ones(S) / S)}[kind]()
    lhs = rng.standard_normal((M, K)).astype(jnp.bfloat16)
    rhs = (rng.standard_normal((S, K, N)) / K ** 0.5).astype(jnp.bfloat16)
    f = jax.jit(lambda a, b, g: mgpu.ragged_dot(a, b, g, interpret=interpret, jax_kernel=jax_kernel))
    out = f(lhs, rhs, jnp.asarray(sizes, jnp.int32))
    group = np.repeat(np.arange(S), sizes)
    ref = np.einsum("mk,mkn->mn", lhs.astype(np.float64), rhs.astype(np.float64)[group])
    err = np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max()
    assert err < 1e-2, err


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}K{}N{}S{}-{}".format(*c))
def test_ragged_dot_in_interpret_mode_matches_reference(case):
    if reason := mgpu.unavailable_reason(jnp.bfloat16, case[1], case[2], interpret=True):
        pytest.skip(reason)
    check_against_reference(*case, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("jax_kernel", [False, True], ids=["ours", "jax"])
@pytest.mark.parametrize("case", CASES + [(2000, 1024, 512, 40, "sparse"), (4096, 512, 768, 128, "uniform")],
                         ids=lambda c: "M{}K{}N{}S{}-{}".format(*c))
def test_gpu_ragged_dot_matches_reference(case, jax_kernel):
    if reason := mgpu.unavailable_reason(jnp.bfloat16, case[1], case[2]):
        pytest.skip(reason)
    check_against_reference(*case, interpret=False, jax_kernel=jax_kernel)


@pytest.mark.parametrize("jax_kernel", [False, True], ids=["ours", "jax"])
@pytest.mark.parametrize("M", [1024, 4, 70, 1327])
def test_ragged_dot_lowers_for_cuda(M, jax_kernel):
    """The Mosaic GPU path lowers on CPU (moe_ffn only selects it on a Hopper GPU), also for row counts
    that are not a multiple of the TMA's 8-row tiling (a Mosaic GPU layout check that interpret mode skips)."""
    sd = jax.ShapeDtypeStruct
    H, F, S = 2048, 768, 8
    f = jax.jit(lambda xs, w, gs: mgpu.ragged_dot(xs, w, gs, jax_kernel=jax_kernel))
    text = f.trace(sd((M, H), jnp.bfloat16), sd((S, H, F), jnp.bfloat16),
                   sd((S,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_row_tasks_rows_are_never_negative():
    """A task without work has 0 rows (the kernel acts only on rows > 0; a negative count is a wrong table)."""
    for sizes, M in [([0, 30, 0], 30), ([100, 100], 200), ([5, 0, 3, 30], 40)]:
        for block_m in (1, 8, 128):
            rows = np.asarray(mgpu.row_tasks(jnp.asarray(sizes, jnp.int32), M, block_m).rows)
            assert (rows >= 0).all(), (sizes, block_m, rows)


def test_unavailable_reason_checks_dtype_and_both_block_dims(monkeypatch):
    """What refuses a shape or dtype on Hopper, reached here by faking a jax with the Mosaic simulator (on the
    CPU "no GPU" answers first): float32 (no wgmma path) and a K or N the blocks do not divide."""
    monkeypatch.setattr(mgpu, "_interpret_mode", lambda: object())
    r = lambda dt, K, N: mgpu.unavailable_reason(dt, K, N, interpret=True)
    assert r(jnp.bfloat16, 128, 256) is None and r(jnp.float16, 64, 128) is None
    assert "dtype float32" in (r(jnp.float32, 128, 128) or "")
    assert "K=96 or N=128 not a multiple" in (r(jnp.bfloat16, 96, 128) or "")
    assert "K=128 or N=192 not a multiple" in (r(jnp.bfloat16, 128, 192) or "")
