"""The offload engine's GPU working sets: prefill calls within their limit, padded rows counted."""
import numpy as np
import pytest

from moe_jax.offload_memory import (PREFILL_CALL_BYTES, activation_bytes, prefill_bytes, prefill_calls,
                                    prefill_rows_per_call)
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


def test_prefill_bytes_count_every_calls_padded_rows():
    """Mixtral at T = 96: a call takes 16 rows, so a micro-batch of 30 runs 2 calls (32 rows, the last
    padded) and every call's hidden states [16, 96, H] stay alive through the layers."""
    cfg = preset_config("mixtral-8x7b")
    rows, calls = prefill_calls(cfg, np.array([30, 16]), 96)
    assert rows.tolist() == [16, 16] and calls.tolist() == [2, 1]
    one_call = prefill_bytes(cfg, "bfloat16", 0, 30, 96)  # a batch of nothing: just the call's working set
    assert prefill_bytes(cfg, "bfloat16", 90, 30, 96) - one_call == 3 * 2 * 16 * 96 * cfg.hidden_size * 2
