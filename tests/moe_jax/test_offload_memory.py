"""The offload engine's GPU working sets: prefill calls within their limit, padded rows counted."""
import numpy as np
import pytest

from moe_jax.microbatches import balanced_micro_batches
from moe_jax.offload_memory import (PREFILL_CALL_BYTES, activation_bytes, decode_bytes, peak_prefill_positions,
                                    prefill_bytes, prefill_call_rows, prefill_calls, prefill_rows_per_call)
from moe_jax.presets import preset_config
from moe_jax.shape_buckets import bucket


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b"])
def test_prefill_calls_stay_within_their_limit(preset):
    cfg = preset_config(preset)
    for T in (8, 12, 64, 96, 128, 1024, 3072):
        per_row = activation_bytes(cfg, T) + 4 * cfg.num_heads * T * T
        for mu in (1, 5, 30, 171, 764, 4096):
            rows = prefill_rows_per_call(cfg, T, mu)
            assert rows == bucket(rows, 1) and rows <= bucket(mu, 1)
            assert rows == 1 or rows * per_row <= PREFILL_CALL_BYTES, (T, mu, rows)


def test_prefill_calls_of_the_shorter_prompts_take_more_rows():
    """Mixtral, μ = 880 (HRM's g64 policy): a call at the longest prompt's bucket 192 takes 8 rows, one at 96
    16; so a micro-batch whose other prompts pad to 96 runs 1 + 54 + 1 calls, not 110."""
    cfg = preset_config("mixtral-8x7b")
    calls = prefill_calls(cfg, np.array([880, 309, 8]), 192, np.array([93.5, 93.5, 93.5]))
    assert [x.tolist() for x in calls] == [[8, 8, 8], [16, 16, 8], [54, 18, 0], [1, 2, 0], [8, 20, 0]]
    assert [x.tolist() for x in prefill_calls(cfg, np.array([30]), 96)] == [[16], [16], [0], [1], [16]]


def _engine_calls(cfg, mu: int, lengths, T=None) -> list[tuple[int, int]]:
    """(rows, T) of each prefill call the engine makes for one micro-batch of prompts of these lengths, in a job
    whose longest prompt's bucket is T (default theirs) (`_Run._start_prefill`'s loop)."""
    lengths, s, out = sorted(lengths, reverse=True), 0, []
    T = T or bucket(lengths[0])
    while s < len(lengths):
        T_call = bucket(lengths[s])
        n = prefill_call_rows(cfg, T_call, T, mu, len(lengths) - s)
        out.append((n, T_call))
        s += n
    return out


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_prefill_bytes_hold_the_engines_calls(preset):
    """For random micro-batches of prompts (one longest and the rest shorter, all alike, or all alike but one
    short one, the case where a last call of the short one's many rows would pass the plan), every call's working
    set and all calls' hidden states stay within what `prefill_bytes` plans for the longest prompt's bucket."""
    cfg, rng = preset_config(preset), np.random.default_rng(0)
    H, it = cfg.hidden_size, 2
    for case in range(300):
        mu = int(rng.integers(2, 1200))
        longest = int(rng.integers(1, 2000))
        lengths = [[longest] + rng.integers(1, longest + 1, mu - 1).tolist(), [longest] * mu,
                   [longest] * (mu - 1) + [1]][case % 3]
        T, calls = bucket(longest), _engine_calls(cfg, mu, lengths)
        assert sum(n for n, _ in calls) >= mu and all(n == bucket(n, 1) for n, _ in calls)
        one_call = prefill_bytes(cfg, "bfloat16", 0, mu, T)  # a batch of nothing: the largest call's working set
        assert all(activation_bytes(cfg, n * t) + 4 * n * cfg.num_heads * t * t <= one_call for n, t in calls)
        hidden = prefill_bytes(cfg, "bfloat16", mu, mu, T) - one_call
        assert sum(n * t for n, t in calls) * H * it <= hidden, (mu, longest, calls[:3])


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_prefill_calls_are_the_engines(preset):
    """HRM's count of a micro-batch's calls (`prefill_calls`) is the engine's for one prompt at bucket T and the
    others at T_rest, rows per call included."""
    cfg, rng = preset_config(preset), np.random.default_rng(1)
    for _ in range(100):
        mu, T = int(rng.integers(1, 1500)), bucket(int(rng.integers(1, 4096)))
        T_rest = bucket(int(rng.integers(1, T + 1)))
        engine = _engine_calls(cfg, mu, [T] + [T_rest] * (mu - 1))
        first, rest, calls, tail_calls, tail_rows = (int(x) for x in prefill_calls(cfg, mu, T, T_rest))
        assert engine[0] == (first, T)
        assert [n for n, _ in engine[1:]] == [rest] * calls + [n for n, _ in engine[1 + calls:]], (mu, T, T_rest)
        assert len(engine) == 1 + calls + tail_calls and sum(n for n, _ in engine[1 + calls:]) == tail_rows


def test_prefill_bytes_count_every_calls_rows():
    """Mixtral at T = 96: a call there takes 16 rows, so a micro-batch of 30 holds at most 30 + 15 rows' hidden
    states [rows, 96, H] through the layers, each of 3 micro-batches."""
    cfg = preset_config("mixtral-8x7b")
    one_call = prefill_bytes(cfg, "bfloat16", 0, 30, 96)  # a batch of nothing: just the call's working set
    assert prefill_bytes(cfg, "bfloat16", 90, 30, 96) - one_call == 3 * (30 + 15) * 96 * cfg.hidden_size * 2


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_prefill_bytes_hold_the_engines_calls_by_the_jobs_own_buckets(preset):
    """Given the job's prompt lengths (`peak_prefill_positions`), `prefill_bytes` bounds the hidden states of
    every call the engine makes: for the first fill of N of the job's prompts (`balanced_micro_batches`, as the
    engine admits them) and for refills of any rows of each micro-batch, and it never exceeds the bound without
    the lengths. Mixtral's g64 job (2640 MTBench-like prompts, μ = 880) plans 2.2 GiB of hidden states where
    all at the longest bucket plan 3.9."""
    cfg, rng = preset_config(preset), np.random.default_rng(2)
    H, it = cfg.hidden_size, 2
    for case in range(60):
        R = int(rng.integers(1, 3000))
        lengths = [rng.integers(1, int(rng.integers(2, 2000)), R), rng.integers(20, 135, R),
                   np.full(R, int(rng.integers(1, 500)))][case % 3].tolist()
        N = int(rng.integers(1, R + 1))
        mu = int(rng.integers(1, N + 1))
        T = bucket(max(lengths))
        peak = peak_prefill_positions(lengths)
        one_call = prefill_bytes(cfg, "bfloat16", 0, mu, T)
        plan = prefill_bytes(cfg, "bfloat16", N, mu, T, peak)
        assert plan <= prefill_bytes(cfg, "bfloat16", N, mu, T)
        order = sorted(range(R), key=lambda i: -lengths[i])[:N] if case % 2 else list(rng.permutation(R)[:N])
        first = balanced_micro_batches(order, lengths, mu)
        # then a refill: in each micro-batch, some of its rows take any of the job's requests, distinct ones
        waiting, refill = iter(rng.permutation(R).tolist()), []
        for g in first:
            refill.append([next(waiting) for _ in range(int(rng.integers(0, len(g) + 1)))])
        fills = [first, [g for g in refill if g]]
        for groups in fills:
            hidden = sum(n * t for g in groups for n, t in _engine_calls(cfg, mu, [lengths[i] for i in g], T))
            assert hidden * H * it + one_call <= plan, (R, N, mu, T)
    lengths = np.random.default_rng(0).integers(20, 135, 2640)
    cfg = preset_config("mixtral-8x7b")
    one_call = prefill_bytes(cfg, "bfloat16", 0, 880, 192)
    gib = lambda peak: (prefill_bytes(cfg, "bfloat16", 2640, 880, 192, peak) - one_call) / 2**30
    assert gib(peak_prefill_positions(lengths)) == pytest.approx(2.2, abs=0.1) and gib(None) == pytest.approx(3.9, abs=0.1)


def test_prefill_bytes_of_a_job_of_the_first_n_prompts_cover_the_engines_check():
    """A bench plans a job of the first N prompts of a pool with the pool's in-order totals of own buckets
    (`hrm_lengths(in_order=True)`): what it plans covers the engine's check of those N prompts, whose own
    shortest may be longer than the pool's last (a review found the padding taken from the pool's last prompt)."""
    cfg, rng = preset_config("mixtral-8x7b"), np.random.default_rng(3)
    for case in range(200):
        pool = rng.integers(1, 600, int(rng.integers(2, 500))).tolist()
        if case % 2:
            pool[-1] = max(pool)  # the pool's last prompt long, the first N's shortest shorter
        N = int(rng.integers(1, len(pool) + 1))
        mu, T = int(rng.integers(1, N + 1)), bucket(max(pool[:N]))
        in_order = np.concatenate([[0], np.cumsum([bucket(n) for n in pool])])
        engine = prefill_bytes(cfg, "bfloat16", N, mu, T, peak_prefill_positions(pool[:N]))
        assert prefill_bytes(cfg, "bfloat16", N, mu, T, in_order) >= engine, (len(pool), N, mu)


def test_decode_bytes_hold_the_compiled_lm_head_and_sampling():
    """`decode_bytes` beyond the activations holds what XLA compiles the decode's LM head and sampling to (float32
    logits [μ, V], then `sample`, as `offload_engine._start_token` runs them), at a micro-batch of Mixtral 8x7B
    whose logits (1 GiB) outgrow the sampling's chunked temporaries: logits counted at 2 bytes would not hold it."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from moe_jax import model
    from moe_jax.params import global_param_specs
    from moe_jax.sampling import sample

    cfg, mu, sd = preset_config("mixtral-8x7b"), 8192, jax.ShapeDtypeStruct
    glob = {k: sd(s.shape, s.dtype(ml_dtypes.bfloat16)) for k, s in global_param_specs(cfg).items()}
    args = (glob, sd((mu, cfg.hidden_size), ml_dtypes.bfloat16), sd((mu,), jnp.float32), sd((mu,), jnp.float32),
            sd((mu,), jnp.int32), sd((mu, 2), jnp.uint32))
    step = lambda g, h, temperature, top_p, top_k, keys: sample(model.lm_head(cfg, g, h), temperature, top_p, top_k, keys)
    temp = jax.jit(step).lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert 4 * mu * cfg.vocab_size < temp <= decode_bytes(cfg, mu) - activation_bytes(cfg, mu)
