"""The decoder's math as small pure functions over parameter dicts (names from `moe_jax.params`).

A layer is three separable pieces so that engines can place them anywhere:
  pre_attention:  norm, QKV projection (+bias, q/k norm, clip), RoPE      -> q, k, v
                  (latent attention: q and the latent key, v None: the values are the key's first dims)
  attention:      causal GQA attention of q over a key/value sequence       (engine's choice of device)
  post_attention: O projection, residual, norm, router, experts (+shared) or a dense FFN, residual
The functions know nothing about where weights or the KV cache live.
Shapes: B batch, T query positions, S key positions, H hidden, Hq/Hk heads, D head_dim, Dv value dims.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels
from moe_jax.config import ModelConfig

Params = dict[str, jax.Array]


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, statistics in float32, as transformers computes it."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * y.astype(x.dtype)


def layer_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without bias over the last axis, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * w.astype(jnp.float32)).astype(x.dtype)


def norm(cfg: ModelConfig, x: jax.Array, w: jax.Array) -> jax.Array:
    return (rms_norm if cfg.norm == "rms" else layer_norm)(x, w, cfg.norm_eps)


def rope(cfg: ModelConfig, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary embedding (rotate-half convention) on the first `rotary_dim` dims of each head, with the
    config's frequency scaling (cos and sin times its attention factor, as transformers computes them).
    Interleaved pairs (`rope_interleaved`: dims 2i, 2i+1 rotate together) are first laid out as halves, the
    same permutation for queries and keys, so their dot products are the interleaved rotation's.
    x: [B, T, heads, D]; positions: [B, T] int32."""
    rot, scaling = cfg.rotary_dim, cfg.rope_scaling
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot))
    if scaling is not None:
        inv_freq = scaling.scale(inv_freq, cfg.rope_theta, rot)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rot/2]
    emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    gain = 1.0 if scaling is None else scaling.attention_factor
    cos, sin = (jnp.cos(emb) * gain).astype(x.dtype), (jnp.sin(emb) * gain).astype(x.dtype)
    xr, rest = x[..., :rot], x[..., rot:]
    if cfg.rope_interleaved:
        xr = jnp.concatenate([xr[..., 0::2], xr[..., 1::2]], axis=-1)
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return jnp.concatenate([xr * cos + rotated * sin, rest], axis=-1)


def embed(p: Params, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] int32 -> hidden [B, T, H]."""
    return jnp.take(p["embed"], tokens, axis=0)


def pre_attention(cfg: ModelConfig, p: Params, x: jax.Array, positions: jax.Array):
    """x [B, T, H], positions [B, T] -> q [B, T, Hq, D], k [B, T, Hk, D] and v [B, T, Hk, D] (None where
    the values are the keys' first `value_dim` dims: `latent_pre_attention`)."""
    B, T, _ = x.shape
    h = norm(cfg, x, p["attn_norm"])
    if cfg.attention == "mla":
        return latent_pre_attention(cfg, p, h, positions)
    q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    if cfg.qk_norm == "full":
        q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    if cfg.clip_qkv is not None:
        q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm == "head":
        q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    return rope(cfg, q, positions), rope(cfg, k, positions), v


LATENT_NORM_EPS = 1e-6  # transformers' DeepSeek norms of the query and KV latents (not rms_norm_eps)


def _latent_up(cfg: ModelConfig, p: Params):
    """wkv_b [kv_lora_rank, Hq * (qk_nope_dim + v_head_dim)] as (to keys [r, Hq, nope], to values [r, Hq, v])."""
    w = p["wkv_b"].reshape(cfg.kv_lora_rank, cfg.num_heads, cfg.qk_nope_dim + cfg.v_head_dim)
    return w[..., :cfg.qk_nope_dim], w[..., cfg.qk_nope_dim:]


def latent_pre_attention(cfg: ModelConfig, p: Params, h: jax.Array, positions: jax.Array):
    """Multi-head latent attention (DeepSeek), weights absorbed: h [B, T, H] (normed) -> q [B, T, Hq, D] and
    k [B, T, 1, D] with D = kv_lora_rank + rotary_dim, v None. k is the normed latent c and the RoPE key;
    q is each head's no-RoPE query mapped into the latent space (q_nope · W_UK, so q · k = q_nope · k_nope +
    q_pe · k_pe of the expanded keys) and its RoPE query. The values are c itself (`values_in_keys`), each
    head's output expanded by `post_attention`."""
    B, T, _ = h.shape
    r, nope = cfg.kv_lora_rank, cfg.qk_nope_dim
    if cfg.q_lora_rank:
        q = rms_norm(h @ p["wq_a"], p["q_a_norm"], LATENT_NORM_EPS) @ p["wq_b"]
    else:
        q = h @ p["wq"]
    q = q.reshape(B, T, cfg.num_heads, nope + cfg.rotary_dim)
    ckv = h @ p["wkv_a"]
    c = rms_norm(ckv[..., :r], p["kv_a_norm"], LATENT_NORM_EPS)[:, :, None, :]
    k_pe = rope(cfg, ckv[..., None, r:], positions)
    q_latent = jnp.einsum("bthn,rhn->bthr", q[..., :nope], _latent_up(cfg, p)[0]).astype(q.dtype)
    q = jnp.concatenate([q_latent, rope(cfg, q[..., nope:], positions)], axis=-1)
    return q, jnp.concatenate([c, k_pe], axis=-1), None


def attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array | None, q_positions: jax.Array) -> jax.Array:
    """Causal GQA attention: query at position p sees keys 0..p of its own sequence, scores scaled by
    `cfg.attention_scale`. q [B, T, Hq, D]; k [B, S, Hk, D] and v [B, S, Hk, Dv] (None: k's first
    `cfg.value_dim` dims) holding positions 0..S-1; q_positions [B, T] -> [B, T, Hq, Dv]."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    qg = q.reshape(B, T, Hk, Hq // Hk, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * cfg.attention_scale
    visible = jnp.arange(k.shape[1])[None, None, :] <= q_positions[:, :, None]  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(k.dtype)
    # values in the keys: weigh the keys whole (no copy of the cache's value dims) and keep the value dims
    out = jnp.einsum("bkgts,bskd->btkgd", probs, k if v is None else v, preferred_element_type=jnp.float32)
    return out[..., :cfg.value_dim].reshape(B, T, Hq, cfg.value_dim).astype(q.dtype)


def route(cfg: ModelConfig, p: Params, h: jax.Array):
    """Router: h [N, H] -> (expert ids [N, k] int32, weights [N, k] float32). Scores are the softmax or
    sigmoid of the router logits; the k experts with the best scores (+ `router_bias`) among those of the
    best `router_topk_groups` groups are chosen, weighted by their scores, renormalised by the
    `router_norm_p`-norm unless None, times `routed_scaling`."""
    w = p["router"]
    if w.dtype == jnp.float32:  # a float32 router (DeepSeek's; any float32 model's): the matmul in float32, exact
        logits = jnp.dot(h.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    else:
        logits = (h @ w).astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if cfg.router_scoring == "softmax" else jax.nn.sigmoid(logits)
    choice = scores + p["router_bias"] if cfg.router_bias else scores
    if cfg.router_groups > 1:
        grouped = choice.reshape(-1, cfg.router_groups, cfg.num_experts // cfg.router_groups)
        if cfg.router_scoring == "softmax":  # DeepSeek V2: a group's best score; the others' scores count as 0
            group_scores, fill = grouped.max(axis=-1), 0.0
        else:  # DeepSeek V3: the sum of its best two; the others' cannot be chosen
            group_scores, fill = jax.lax.top_k(grouped, 2)[0].sum(axis=-1), -jnp.inf
        best = jax.nn.one_hot(jax.lax.top_k(group_scores, cfg.router_topk_groups)[1], cfg.router_groups).sum(-2) > 0
        choice = jnp.where(best[..., None], grouped, fill).reshape(choice.shape)
    ids = jax.lax.top_k(choice, cfg.experts_per_token)[1]
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if cfg.router_norm_p is not None:
        weights = weights / jnp.sum(weights ** cfg.router_norm_p, axis=-1, keepdims=True) ** (1 / cfg.router_norm_p)
    return ids.astype(jnp.int32), weights * cfg.routed_scaling


def swiglu(h: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    return (jax.nn.silu(h @ w_gate) * (h @ w_up)) @ w_down


def moe(cfg: ModelConfig, p: Params, h: jax.Array, *, expert_slots=None, impl: str = "auto") -> jax.Array:
    """Routed experts (+ gated shared expert): h [N, H] -> [N, H]. The expert weights p["w_*"] are
    `[slots, ...]`, addressed through `expert_slots` [E] (expert id -> slot; identity when None)."""
    ids, weights = route(cfg, p, h)
    y = pallas_kernels.moe_ffn(h, ids, weights, p["w_gate"], p["w_up"], p["w_down"],
                               expert_slots=expert_slots, impl=impl)
    if cfg.shared_expert_ffn_size:
        shared = swiglu(h, p["shared_gate"], p["shared_up"], p["shared_down"])
        y = y + (jax.nn.sigmoid(h @ p["shared_expert_gate"]) * shared if cfg.shared_expert_gated else shared)
    return y


def post_attention(cfg: ModelConfig, p: Params, x: jax.Array, attn: jax.Array, *,
                   expert_slots=None, moe_impl: str = "auto") -> jax.Array:
    """x [B, T, H] (layer input), attn [B, T, Hq, value_dim] -> layer output [B, T, H]. The FFN is the layer's
    parameters' own: the experts (`moe`) or, in a dense layer (`ffn_*` parameters), one SwiGLU."""
    B, T, H = x.shape
    if cfg.attention == "mla":  # each head's latent output expanded to its values
        attn = jnp.einsum("bthr,rhv->bthv", attn, _latent_up(cfg, p)[1]).astype(attn.dtype)
    x = x + attn.reshape(B, T, -1) @ p["wo"]
    h = norm(cfg, x, p["mlp_norm"]).reshape(B * T, H)
    if "ffn_gate" in p:
        y = swiglu(h, p["ffn_gate"], p["ffn_up"], p["ffn_down"])
    else:
        y = moe(cfg, p, h, expert_slots=expert_slots, impl=moe_impl)
    return x + y.reshape(B, T, H)


def lm_head(cfg: ModelConfig, p: Params, x: jax.Array) -> jax.Array:
    """Final norm and vocabulary projection: x [..., H] -> float32 logits [..., V]."""
    h = norm(cfg, x, p["final_norm"])
    w = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
    return (h @ w).astype(jnp.float32)
