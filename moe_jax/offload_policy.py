"""`Policy`: how the offload engine (CGOPipe) batches a generation run and places weights, KV and attention."""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_jax.integers import is_integer

DEVICES = ("cpu", "gpu")
CODECS = ("none", "exp4")  # moe_jax.expert_codec
KV_CACHE_DTYPES = ("auto", "int8")  # the host KV cache's storage: the model's dtype, or int8 (host_ops.HostKVCache)
PREFETCH = ("split", "whole")  # how the engine sends the next layer's experts (moe_jax.offload_engine)


class PolicyError(ValueError):
    """A `Policy` field out of range; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """An offload policy (MoE-Lightning's `N, μ, r_w, A_g, r_c`).

    batch_size: N sequences decoded together, split into `num_micro_batches` (n_ub) micro-batches of at
      most `micro_batch_size` (μ) sequences, none empty: μ·(n_ub − 1) < N ≤ μ·n_ub.
    resident_expert_fraction: r_w in [0, 1], the fraction of the model's expert weights kept on the GPU;
      the rest stays in pinned host memory and is streamed to the GPU layer by layer.
    attention_device: where decode attention runs; kv_device: where the KV cache lives. CPU attention
      reads a host KV cache; GPU attention reads it from either (a host cache crosses the link).
    gpu_memory_gb: GPU memory the engine may use, in GiB (2**30 bytes); None: all of it.
    expert_codec: how the streamed experts are held in pinned memory and cross the link: "none" (as they
      are) or "exp4" (bfloat16 coded losslessly in 12 bits, decoded on the GPU: `moe_jax.expert_codec`).
    kv_cache_dtype: how the host KV cache stores keys and values: "auto" (in the model's dtype) or "int8"
      (lossy: each row of head_dim values quantised with its own float32 scale, `host_ops.HostKVCache`;
      about half of bfloat16's bytes, so twice the sequences per GiB of host and half the bytes for CPU
      attention to read). CPU attention only.
    """

    batch_size: int
    micro_batch_size: int
    num_micro_batches: int
    resident_expert_fraction: float = 0.0
    attention_device: str = "cpu"
    kv_device: str = "cpu"
    gpu_memory_gb: float | None = None
    expert_codec: str = "none"
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        for name in ("batch_size", "micro_batch_size", "num_micro_batches"):
            v = getattr(self, name)
            if not is_integer(v) or v < 1:
                raise PolicyError(f"Policy.{name} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))  # a NumPy integer as a Python int (JSON, hashing)
        mu, n_ub = self.micro_batch_size, self.num_micro_batches
        if not mu * (n_ub - 1) < self.batch_size <= mu * n_ub:
            raise PolicyError(f"Policy.batch_size={self.batch_size} does not fill {n_ub} micro-batches of at most "
                              f"{mu} sequences without an empty one (need {mu * (n_ub - 1)} < N <= {mu * n_ub})")
        r = self.resident_expert_fraction
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 <= r <= 1.0:
            raise PolicyError(f"Policy.resident_expert_fraction must be a number in [0, 1], got {r!r}")
        for name in ("attention_device", "kv_device"):
            if getattr(self, name) not in DEVICES:
                raise PolicyError(f"Policy.{name} must be one of {DEVICES}, got {getattr(self, name)!r}")
        if self.attention_device == "cpu" and self.kv_device == "gpu":
            raise PolicyError("Policy: attention_device='cpu' needs kv_device='cpu' "
                              "(CPU attention reads a host KV cache)")
        cap = self.gpu_memory_gb
        if cap is not None and (not isinstance(cap, (int, float)) or isinstance(cap, bool) or not cap > 0):
            raise PolicyError(f"Policy.gpu_memory_gb must be a positive number of GiB or None, got {cap!r}")
        if self.expert_codec not in CODECS:
            raise PolicyError(f"Policy.expert_codec must be one of {CODECS}, got {self.expert_codec!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise PolicyError(f"Policy.kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "int8" and self.attention_device != "cpu":
            raise PolicyError("Policy: kv_cache_dtype='int8' needs attention_device='cpu' (the int8 cache is read "
                              "by the CPU attention kernel)")


def kv_storage_dtype(kv_cache_dtype: str, dtype) -> np.dtype:
    """The host KV cache's storage dtype for a model run in `dtype`: `dtype` itself ("auto") or int8."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise PolicyError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    return np.dtype(np.int8) if kv_cache_dtype == "int8" else np.dtype(dtype)
