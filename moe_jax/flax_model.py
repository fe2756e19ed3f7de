"""The decoder as a Flax NNX module, for JAX research pipelines (probing, fine-tuning, analysis).

Its parameters are exactly those of `moe_jax.params` (same names and shapes: matrices `[in, out]`, experts
`[E, ...]`), held as `nnx.Param` and materialised from any weight source (a checkpoint or a preset's
random weights); its forward pass is `moe_jax.model`'s functions, the ones the engines run.

    decoder = MoEDecoder.from_pretrained("path/to/checkpoint-or-preset", dtype="float32")
    logits = decoder(tokens)        # tokens [B, T] int32 -> float32 [B, T, vocab]
    grads = nnx.grad(loss_fn)(decoder, tokens)
    decoder.save("path/to/out")     # orbax, moe_jax.saved_model: moe_jax.LLM("path/to/out") serves it
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import model
from moe_jax.config import ModelConfig
from moe_jax.model_source import WeightSource, open_model
from moe_jax.params import model_dtype
from moe_jax.saved_model import save_model
from moe_jax.tokenizer import Tokenizer


def _params(arrays: dict) -> nnx.Object:
    return nnx.data({k: nnx.Param(jnp.asarray(v)) for k, v in arrays.items()})


def _values(params) -> dict[str, jax.Array]:
    return {k: p[...] for k, p in params.items()}


class MoEDecoder(nnx.Module):
    """Causal MoE decoder: `globals` (embed, final_norm[, lm_head]) and one parameter dict per layer."""

    def __init__(self, cfg: ModelConfig, weights: WeightSource, dtype="float32", tokenizer: Tokenizer | None = None):
        """dtype: a name `moe_jax.LLM` takes ("float32"/"fp32"/"f32", "bfloat16"/"bf16")."""
        dtype = model_dtype(dtype)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.source_dir = None  # the model directory it came from, if any: `save` copies its chat template
        self.globals = _params(weights.globals(dtype))
        self.layers = nnx.List([_params(weights.layer(i, dtype)) for i in range(cfg.num_layers)])

    @classmethod
    def from_pretrained(cls, model_or_dir: str, dtype="float32", seed: int = 0) -> "MoEDecoder":
        model_dtype(dtype)  # a bad name fails before the weights load
        source = open_model(model_or_dir, seed=seed)
        decoder = cls(source.cfg, source.weights, dtype, source.tokenizer)
        decoder.source_dir = Path(model_or_dir) if Path(model_or_dir).is_dir() else None
        return decoder

    def save(self, path, overwrite: bool = False):
        """The current parameters (and tokenizer, and the source model's chat template) as a moe-jax saved
        model, which `moe_jax.LLM(path)` runs."""
        return save_model(path, self.cfg, _values(self.globals), [_values(p) for p in self.layers], self.tokenizer,
                          overwrite, files_from=self.source_dir)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] int32 (each row starting at position 0) -> float32 logits [B, T, vocab]. Shapes,
        dtype and (outside a trace) the ids' range are checked. A float32 model's matmuls run at full float32
        precision, as the engines run them (accelerators default to rounder modes), under a caller's jit too."""
        cfg, glob = self.cfg, _values(self.globals)
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer token ids of shape [batch, seq], got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        if tokens.shape[1] > cfg.max_positions:
            raise ValueError(f"tokens has {tokens.shape[1]} positions; the model has {cfg.max_positions}")
        if not isinstance(tokens, jax.core.Tracer) and tokens.size and not (
                0 <= int(tokens.min()) and int(tokens.max()) < cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got {int(tokens.min())}.."
                             f"{int(tokens.max())}")
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        full = glob["embed"].dtype == jnp.float32
        with jax.default_matmul_precision("highest") if full else contextlib.nullcontext():
            x = model.embed(glob, tokens)
            for layer in self.layers:
                p = _values(layer)
                q, k, v = model.pre_attention(cfg, p, x, positions)
                x = model.post_attention(cfg, p, x, model.attention(cfg, q, k, v, positions), moe_impl="xla")
            return model.lm_head(cfg, glob, x)
