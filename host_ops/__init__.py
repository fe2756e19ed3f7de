"""CPU side of the offload engine: the host-memory KV cache and attention over it (numba kernels that
release the GIL). Imports neither jax nor anything GPU-related.

    HostKVCache(num_layers, num_slots, max_context, kv_heads, head_dim, dtype)  # .write/.append/.attend
                # max_context: positions of every slot, or one number per slot
    decode_attention(q, k, v, lengths)          # dense [B, S, Hk, D] K/V, one query per sequence
    prefill_attention(q, k, v, lengths_before)  # dense, T causal queries per sequence
"""
from host_ops.attention import decode_attention, prefill_attention
from host_ops.host_kv_cache import HostKVCache

__all__ = ["HostKVCache", "decode_attention", "prefill_attention"]
