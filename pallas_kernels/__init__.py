"""Expert FFN kernels for moe-jax: grouped (ragged) matmuls over experts held in weight slots."""

from pallas_kernels.moe_ffn import IMPLS, moe_ffn

__all__ = ["IMPLS", "moe_ffn"]
