"""moe_ffn against a float64 NumPy reference: every impl, uneven loads, remapped slots."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import IMPLS, mgpu, moe_ffn
from pallas_kernels.grouped_matmul import _tile_and_n_block
from pallas_kernels.layout import grouped_layout, max_tiles

# (T, H, F, E, k, routing, num_slots): odd T, zero-token experts, one hot expert, S > E.
CASES = [
    (37, 32, 48, 4, 2, "uniform", None),
    (64, 64, 96, 8, 2, "skewed", None),
    (24, 48, 32, 16, 4, "skewed", 21),
    (1, 16, 16, 4, 1, "uniform", 6),
]
CPU_IMPLS = ["xla", "pallas_triton"]  # "auto" → xla and "pallas" → pallas_triton on CPU
ON_GPU = jax.default_backend() == "gpu"
moe_ffn_module = importlib.import_module("pallas_kernels.moe_ffn")  # the module: the package exports the function


def run(problem, **kw):
    """moe_ffn under jit, with expert_slots a traced argument (as a pager would pass it)."""
    f = jax.jit(lambda *a, slots: moe_ffn(*a, expert_slots=slots, **kw))
    return f(*problem.args, slots=problem.expert_slots)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}H{}F{}E{}k{}-{}-S{}".format(*c))
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_matches_reference(make_problem, assert_matches_reference, impl, case, dtype):
    T, H, F, E, k, routing, S = case
    problem = make_problem(T, H, F, E, k, dtype, routing, S)
    assert_matches_reference(run(problem, impl=impl), problem)


def test_auto_and_pallas_resolve_and_log_on_cpu(make_problem, assert_matches_reference, caplog, monkeypatch):
    if ON_GPU:
        pytest.skip("CPU resolution")
    monkeypatch.setattr(moe_ffn_module, "_logged", set())  # each choice is logged once per process
    problem = make_problem(16, 32, 32, 4, 2, "float32")
    with caplog.at_level(logging.INFO, logger="pallas_kernels"):
        for impl in ("auto", "pallas"):
            assert_matches_reference(run(problem, impl=impl), problem)
    assert "impl='auto' runs as xla on backend cpu" in caplog.text
    assert "impl='pallas' runs as pallas_triton on backend cpu" in caplog.text
    assert "Mosaic GPU kernel unavailable (no GPU)" in caplog.text


def test_auto_on_gpu_weighs_rows_per_expert(monkeypatch, caplog):
    """On a Hopper GPU "auto" runs pallas_triton below TRITON_ROWS_PER_EXPERT routed rows per expert (where it
    measured faster), pallas_mgpu from there on; resolution only, with the backend faked."""
    monkeypatch.setattr(moe_ffn_module, "_logged", set())
    monkeypatch.setattr(moe_ffn_module.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(mgpu, "unavailable_reason", lambda *a, **k: None)  # as on an H100/H200
    limit = moe_ffn_module.TRITON_ROWS_PER_EXPERT
    resolve = lambda rows, H=4096, F=14336: moe_ffn_module.resolve_impl("auto", jnp.bfloat16, H, F,
                                                                        rows_per_expert=rows)
    with caplog.at_level(logging.INFO, logger="pallas_kernels"):
        assert resolve(508 / 8) == resolve(limit - 0.5) == "pallas_triton"  # Mixtral's decode micro-batch
    assert f"takes pallas_triton for calls of fewer than {limit} rows per expert" in caplog.text
    assert resolve(limit) == resolve(32768 / 8) == resolve(None) == "pallas_mgpu"
    assert resolve(8.0, H=4104) == "pallas_mgpu"  # not a Triton shape: the rows do not matter


def test_triton_tiles_are_at_least_16_in_every_dim():
    """Triton's dot takes blocks of 16 or more in each dim (the CPU's lowering does not check it; a GPU's compile
    fails): a decode call's few rows per slot included."""
    from pallas_kernels.grouped_matmul import pick_block_m, pick_config

    for pairs, slots in [(1, 8), (2, 128), (33 * 2, 8), (508, 8), (256 * 8, 128), (10 ** 6, 8)]:
        bm = pick_block_m(pairs, slots)
        assert 16 <= bm <= 128 and bm & (bm - 1) == 0, (pairs, slots, bm)
    for K, N in [(4096, 14336), (14336, 4096), (2048, 768), (16, 16), (48, 80)]:
        for fused in (True, False):
            c = pick_config(16, K, N, fused)
            assert min(c.block_n, c.block_k) >= 16 and K % c.block_k == 0 and N % c.block_n == 0, (K, N, c)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_kernel_asks_full_precision_for_float32(dtype):
    """A float32 dot at DEFAULT precision runs in TF32 on a GPU (~1e-3 relative error); the CPU's interpreter
    computes the same either way, so the kernel's jaxpr is what is checked."""
    sd, dt = jax.ShapeDtypeStruct, jnp.dtype(dtype)
    args = (sd((8, 32), dt), sd((8, 2), jnp.int32), sd((8, 2), jnp.float32),
            sd((4, 32, 32), dt), sd((4, 32, 32), dt), sd((4, 32, 32), dt))
    text = str(jax.make_jaxpr(lambda *a: moe_ffn(*a, impl="pallas_triton", interpret=True))(*args))
    assert text.count("pallas_call") == 2
    assert ("Precision.DEFAULT" in text) == (dtype == "bfloat16")


def test_mgpu_needs_the_down_projection_blockable_too(monkeypatch):
    """The down projection is [F] x [F, H]: a hidden size the Mosaic kernel's N blocks do not divide (192) is
    refused for pallas_mgpu even where [H] x [H, F] would be (faked as a jax with the Mosaic simulator)."""
    monkeypatch.setattr(moe_ffn_module, "_logged", set())
    monkeypatch.setattr(mgpu, "_interpret_mode", lambda: object())
    with pytest.raises(ValueError, match=r"pallas_mgpu.*K=256 or N=192 not a multiple"):
        moe_ffn_module.resolve_impl("pallas_mgpu", jnp.bfloat16, 192, 256, interpret=True)


def test_auto_weighs_rows_per_expert_not_per_slot(monkeypatch):
    """moe_ffn tells resolve_impl the routed rows per expert of the layer (64 tokens x 2 over 4 experts: 32),
    not per slot of a pager's buffer (40 slots: 3.2), which would send a large prefill to Triton on a GPU."""
    seen, real = [], moe_ffn_module.resolve_impl
    monkeypatch.setattr(moe_ffn_module, "resolve_impl",
                        lambda *a, rows_per_expert=None: seen.append(rows_per_expert) or real(*a))
    sd = jax.ShapeDtypeStruct
    args = (sd((64, 32), jnp.float32), sd((64, 2), jnp.int32), sd((64, 2), jnp.float32),
            sd((40, 32, 32), jnp.float32), sd((40, 32, 32), jnp.float32), sd((40, 32, 32), jnp.float32))
    jax.eval_shape(lambda *a: moe_ffn(*a, expert_slots=jnp.arange(4, dtype=jnp.int32), impl="xla"), *args)
    assert seen == [32.0]


def test_xla_path_on_gpu_reads_the_slot_array_in_place(monkeypatch):
    """On the CPU the xla path gathers the layer's experts out of a pager's slots (4 of 12); on a GPU it must not
    (a copy of the layer's experts, 2.8 GB for Mixtral, beyond the offload plan): it reads all 12 slots."""
    sd = jax.ShapeDtypeStruct
    args = (sd((16, 32), jnp.float32), sd((16, 2), jnp.int32), sd((16, 2), jnp.float32),
            sd((12, 32, 48), jnp.float32), sd((12, 32, 48), jnp.float32), sd((12, 48, 32), jnp.float32))
    slots = jnp.asarray([3, 7, 0, 9], jnp.int32)

    def rhs_slots():
        jaxpr = jax.make_jaxpr(lambda *a: moe_ffn(*a, expert_slots=slots, impl="xla", interpret=True))(*args)
        return {e.invars[1].aval.shape[0] for e in jaxpr.jaxpr.eqns
                if e.primitive.name in ("ragged_dot_general", "ragged_dot")}

    for backend, slots_read in (("cpu", 4), ("gpu", 12)):  # faked both ways: the test runs on either
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        assert rhs_slots() == {slots_read}, backend


def test_triton_tiles_follow_rows_per_expert_not_slots(make_problem, assert_matches_reference, monkeypatch):
    """With a pager's buffer of S slots, most holding other layers' experts, the Triton tiles are sized by the
    rows per expert (what was benchmarked), not per slot: 128 rows over 4 experts -> 32-row tiles, where the
    40 slots would give 16."""
    seen = []
    real = moe_ffn_module.grouped_layout
    monkeypatch.setattr(moe_ffn_module, "grouped_layout", lambda *a: seen.append(a[3]) or real(*a))
    problem = make_problem(64, 32, 32, 4, 2, "float32", "uniform", 40)
    assert_matches_reference(run(problem, impl="pallas_triton"), problem)
    assert seen == [32]


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_slots_no_row_reads_do_not_reach_the_output(make_problem, assert_matches_reference, impl):
    """A pager's buffer holds other layers' experts: a non-finite weight in a slot this call's experts do not use
    changes nothing (the xla path ran a dense dot over every slot, its zero mask times inf giving NaN everywhere)."""
    if impl == "xla" and ON_GPU:
        pytest.skip("on a GPU the xla fallback runs over every slot (no room planned for a copy of the layer's experts)")
    problem = make_problem(32, 32, 48, 4, 2, "float32", "uniform", 12)
    unused = sorted(set(range(12)) - set(problem.expert_slots.tolist()))
    weights = {k: np.array(getattr(problem, k)) for k in ("w_gate", "w_up", "w_down")}
    for w in weights.values():
        w[unused[0]], w[unused[-1]] = np.nan, np.inf
    problem = dataclasses.replace(problem, **weights)  # the reference reads no unused slot
    assert_matches_reference(run(problem, impl=impl), problem)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_no_tokens(impl):
    w = jnp.ones((3, 16, 32))
    y = moe_ffn(jnp.ones((0, 16)), jnp.zeros((0, 2), jnp.int32), jnp.zeros((0, 2)), w, w,
                w.transpose(0, 2, 1), impl=impl)
    assert y.shape == (0, 16)


def test_unknown_impl_names_allowed_values(make_problem):
    problem = make_problem(4, 16, 16, 2, 1, "float32")
    with pytest.raises(ValueError, match=re.escape(str(IMPLS))):
        run(problem, impl="cuda")


@pytest.mark.parametrize("impl", ["pallas_mgpu", "jax_mgpu"])
def test_mgpu_refuses_without_hopper(make_problem, impl):
    if ON_GPU:
        pytest.skip("CPU behaviour")
    problem = make_problem(4, 128, 128, 2, 1, "bfloat16")
    with pytest.raises(ValueError, match=f"{impl}.*no GPU"):
        run(problem, impl=impl, interpret=False)
    if mgpu.unavailable_reason(jnp.bfloat16, 128, 128, interpret=True):  # jax 0.10: no simulator either
        with pytest.raises(ValueError, match=f"{impl}.*no Mosaic GPU interpret mode"):
            run(problem, impl=impl)


@pytest.mark.parametrize("impl", ["pallas_mgpu", "jax_mgpu"])
@pytest.mark.parametrize("case", [(100, 128, 256, 6, 2, "skewed", 9), (33, 256, 128, 4, 1, "uniform", None)],
                         ids=["skewed-S9", "uniform"])
def test_mgpu_kernel_in_interpret_mode_matches_reference(make_problem, assert_matches_reference, case, impl):
    """jax's Mosaic GPU simulator (jax >= 0.11) runs the kernel that `auto` picks on an H100 from 256 rows per
    expert on (pallas_mgpu) and jax's own, the fallback (jax_mgpu)."""
    T, H, F, E, k, routing, S = case
    if reason := mgpu.unavailable_reason(jnp.bfloat16, H, F, interpret=True):
        pytest.skip(reason)
    problem = make_problem(T, H, F, E, k, "bfloat16", routing, S)
    assert_matches_reference(run(problem, impl=impl, interpret=True), problem)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_layout_tiles_belong_to_one_slot(block_m):
    rng = np.random.default_rng(1)
    T, k, E, S = 30, 3, 6, 9
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)])
    ids[ids == 2] = 5  # expert 2 empty, expert 5 doubled up
    slots = rng.permutation(S)[:E].astype(np.int32)
    lay = jax.tree.map(np.asarray, grouped_layout(jnp.asarray(ids), slots, S, block_m))
    pair_slot = slots[ids]
    np.testing.assert_array_equal(lay.group_sizes, np.bincount(pair_slot.ravel(), minlength=S))
    assert lay.tile_slot.shape == (max_tiles(T * k, S, block_m),)
    used = lay.tile_slot >= 0
    assert used.sum() == (-(-lay.group_sizes // block_m)).sum()  # no tile for empty slots
    assert used[: used.sum()].all()  # used tiles first, unused at the end
    np.testing.assert_array_equal(lay.tile_slot[lay.pair_row // block_m], pair_slot)
    np.testing.assert_array_equal(lay.row_token[lay.pair_row], np.repeat(np.arange(T), k).reshape(T, k))
    assert len(np.unique(lay.pair_row)) == T * k


@pytest.mark.parametrize("num_tiles,n_blocks,group_m", [(5, 3, 2), (17, 7, 8), (1, 1, 8)])
def test_launch_order_covers_every_tile_once(num_tiles, n_blocks, group_m):
    pid = jnp.arange(num_tiles * n_blocks)
    tile, n_block = map(np.asarray, _tile_and_n_block(pid, num_tiles, n_blocks, group_m))
    assert sorted(zip(tile, n_block)) == [(i, j) for i in range(num_tiles) for j in range(n_blocks)]


def _lower_for_cuda(T, H, F, S, k, impl):
    sd = jax.ShapeDtypeStruct
    bf16 = jnp.bfloat16
    args = (sd((T, H), bf16), sd((T, k), jnp.int32), sd((T, k), jnp.float32),
            sd((S, H, F), bf16), sd((S, H, F), bf16), sd((S, F, H), bf16))
    f = jax.jit(lambda *a: moe_ffn(*a, impl=impl, interpret=False))
    return f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("shape", [(512, 4096, 14336, 8, 2), (33, 4096, 14336, 8, 2), (256, 2048, 768, 128, 8)],
                         ids=["mixtral", "mixtral-odd-T", "qwen3"])
def test_triton_kernel_lowers_for_cuda(shape, lowering_for_h100):
    """Pallas → Triton IR lowering runs on CPU; compiling that IR to PTX needs a GPU (untested)."""
    with lowering_for_h100:
        assert _lower_for_cuda(*shape, "pallas_triton").count("xla.gpu.triton") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("impl", ["auto", "pallas_mgpu", "jax_mgpu", "pallas_triton", "xla"])
@pytest.mark.parametrize("routing", ["uniform", "skewed"])
def test_gpu_matches_reference(make_problem, assert_matches_reference, impl, routing):
    problem = make_problem(1000, 256, 512, 8, 2, "bfloat16", routing, num_slots=10)
    assert_matches_reference(run(problem, impl=impl), problem)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("impl", ["pallas_triton", "xla"])
def test_gpu_float32_matches_reference(make_problem, assert_matches_reference, impl):
    problem = make_problem(300, 128, 256, 6, 2, "float32", "skewed")
    assert_matches_reference(run(problem, impl=impl), problem)
