"""`Policy` validation."""
import dataclasses

import numpy as np
import pytest

from moe_jax.offload_policy import Policy, PolicyError


def test_valid_policy():
    p = Policy(batch_size=4536, micro_batch_size=324, num_micro_batches=14, resident_expert_fraction=0.056)
    assert (p.attention_device, p.kv_device, p.gpu_memory_gb) == ("cpu", "cpu", None)
    assert Policy(10, 4, 3, 1, "gpu", "gpu", 16).batch_size == 10  # last micro-batch holds 2
    assert p.kv_cache_dtype == "auto" and Policy(4, 2, 2, kv_cache_dtype="int8").kv_cache_dtype == "int8"
    q = Policy(np.int64(4), np.int32(2), np.int64(2))  # NumPy integers, stored as Python ints
    assert q == Policy(4, 2, 2) and type(q.batch_size) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.batch_size = 1


@pytest.mark.parametrize("args, message", [
    ((0, 1, 1), "batch_size must be a positive integer"),
    ((4, 2.0, 2), "micro_batch_size must be a positive integer"),
    ((4, 2, True), "num_micro_batches must be a positive integer"),
    ((9, 4, 2), r"need 4 < N <= 8"),
    ((4, 4, 2), r"need 4 < N <= 8"),
    ((4, 2, 2, 1.5), r"resident_expert_fraction must be a number in \[0, 1\]"),
    ((4, 2, 2, 0.0, "tpu"), "attention_device must be one of"),
    ((4, 2, 2, 0.0, "gpu", "disk"), "kv_device must be one of"),
    ((4, 2, 2, 0.0, "cpu", "gpu"), "needs kv_device='cpu'"),
    ((4, 2, 2, 0.0, "cpu", "cpu", 0), "gpu_memory_gb must be a positive number"),
    ((4, 2, 2, 0.0, "cpu", "cpu", None, "none", "fp8"), r"kv_cache_dtype must be one of \('auto', 'int8'\)"),
    ((4, 2, 2, 0.0, "gpu", "cpu", None, "none", "int8"), "kv_cache_dtype='int8' needs attention_device='cpu'"),
])
def test_invalid_policy(args, message):
    with pytest.raises(PolicyError, match=message):
        Policy(*args)
