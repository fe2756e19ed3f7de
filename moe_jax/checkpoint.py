"""Loading Hugging Face safetensors checkpoints, streaming tensor by tensor.

`Checkpoint(path)` reads `config.json` and `model.safetensors` or the shards named in
`model.safetensors.index.json`; `layer(i, dtype)` / `globals(dtype)` return one layer's (or the
non-layer) parameters as NumPy arrays named and shaped as in `moe_jax.params`, so an engine can place
them layer by layer without ever holding the checkpoint twice. Each family's Hub tensor names are one
table below; every error names the tensor, the shard file or the shape.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open

from moe_jax.config import EOS_EXPECTED, ConfigError, ModelConfig, eos_token_ids
from moe_jax.json_files import read_json_object
from moe_jax.params import ParamSpec, global_param_specs, layer_specs


log = logging.getLogger("moe_jax")

# Tensors a checkpoint may carry that no model reads (transformers' own `_keys_to_ignore_on_load_unexpected`).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A missing, unreadable or mis-shaped checkpoint file or tensor."""


@dataclasses.dataclass(frozen=True)
class _Src:
    """Where one parameter comes from. name: Hub tensor name ("{e}" = one tensor per expert);
    layout: "linear" (Hub [out, in] -> ours [in, out]), "vector" (as is), "fused_in" (DBRX [E*F, H]
    -> [E, H, F]), "fused_out" (DBRX [E*F, H] -> [E, F, H]); rows: (start, stop, of) the row range start:stop of
    a Hub tensor of `of` rows (a fused one)."""

    name: str
    layout: str = "linear"
    rows: tuple[int, int, int] | None = None


def _llama_like_names(cfg: ModelConfig, i: int) -> dict[str, _Src]:
    p = f"model.layers.{i}."
    if cfg.family == "mixtral":
        router, ex = "block_sparse_moe.gate", ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                                               "block_sparse_moe.experts.{e}.w2")
    else:
        router, ex = "mlp.gate", ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")
    shared = "shared_experts" if cfg.family.startswith("deepseek") else "shared_expert"
    names = {
        "attn_norm": _Src(p + "input_layernorm.weight", "vector"),
        "mlp_norm": _Src(p + "post_attention_layernorm.weight", "vector"),
        "wq": _Src(p + "self_attn.q_proj.weight"), "wk": _Src(p + "self_attn.k_proj.weight"),
        "wv": _Src(p + "self_attn.v_proj.weight"), "wo": _Src(p + "self_attn.o_proj.weight"),
        "bq": _Src(p + "self_attn.q_proj.bias", "vector"), "bk": _Src(p + "self_attn.k_proj.bias", "vector"),
        "bv": _Src(p + "self_attn.v_proj.bias", "vector"),
        "q_norm": _Src(p + "self_attn.q_norm.weight", "vector"),
        "k_norm": _Src(p + "self_attn.k_norm.weight", "vector"),
        "router": _Src(p + router + ".weight"),
        "w_gate": _Src(p + ex[0] + ".weight"), "w_up": _Src(p + ex[1] + ".weight"),
        "w_down": _Src(p + ex[2] + ".weight"),
        "shared_gate": _Src(p + f"mlp.{shared}.gate_proj.weight"),
        "shared_up": _Src(p + f"mlp.{shared}.up_proj.weight"),
        "shared_down": _Src(p + f"mlp.{shared}.down_proj.weight"),
        "shared_expert_gate": _Src(p + "mlp.shared_expert_gate.weight"),
        "router_bias": _Src(p + "mlp.gate.e_score_correction_bias", "vector"),
        "wq_a": _Src(p + "self_attn.q_a_proj.weight"), "q_a_norm": _Src(p + "self_attn.q_a_layernorm.weight", "vector"),
        "wq_b": _Src(p + "self_attn.q_b_proj.weight"), "wkv_a": _Src(p + "self_attn.kv_a_proj_with_mqa.weight"),
        "kv_a_norm": _Src(p + "self_attn.kv_a_layernorm.weight", "vector"),
        "wkv_b": _Src(p + "self_attn.kv_b_proj.weight"),
        "ffn_gate": _Src(p + "mlp.gate_proj.weight"), "ffn_up": _Src(p + "mlp.up_proj.weight"),
        "ffn_down": _Src(p + "mlp.down_proj.weight"),
    }
    return names


def _dbrx_names(cfg: ModelConfig, i: int) -> dict[str, _Src]:
    p = f"transformer.blocks.{i}."
    qkv = p + "norm_attn_norm.attn.Wqkv.weight"
    q, kv = cfg.q_size, cfg.kv_size
    return {
        "attn_norm": _Src(p + "norm_attn_norm.norm_1.weight", "vector"),
        "mlp_norm": _Src(p + "norm_attn_norm.norm_2.weight", "vector"),
        "wq": _Src(qkv, rows=(0, q, q + 2 * kv)), "wk": _Src(qkv, rows=(q, q + kv, q + 2 * kv)),
        "wv": _Src(qkv, rows=(q + kv, q + 2 * kv, q + 2 * kv)),
        "wo": _Src(p + "norm_attn_norm.attn.out_proj.weight"),
        "router": _Src(p + "ffn.router.layer.weight"),
        "w_gate": _Src(p + "ffn.experts.mlp.w1", "fused_in"), "w_up": _Src(p + "ffn.experts.mlp.v1", "fused_in"),
        "w_down": _Src(p + "ffn.experts.mlp.w2", "fused_out"),
    }


def _global_names(cfg: ModelConfig) -> dict[str, _Src]:
    if cfg.family == "dbrx":
        return {"embed": _Src("transformer.wte.weight", "vector"), "final_norm": _Src("transformer.norm_f.weight", "vector"),
                "lm_head": _Src("lm_head.weight")}
    return {"embed": _Src("model.embed_tokens.weight", "vector"), "final_norm": _Src("model.norm.weight", "vector"),
            "lm_head": _Src("lm_head.weight")}


# generation_config.json's fields of a model's suggested sampling, which transformers' `generate` applies
SUGGESTED_SAMPLING = ("do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty")


def _with_generation_eos(cfg: ModelConfig, path: Path) -> ModelConfig:
    """Chat checkpoints often end turns with an EOS that only generation_config.json lists: take the union.
    The sampling the file suggests is not applied, and said so (as vLLM's `--generation-config vllm`)."""
    if not path.exists():
        return cfg
    gen = read_json_object(path, CheckpointError)
    suggested = {k: gen[k] for k in SUGGESTED_SAMPLING if gen.get(k) is not None}
    if any(k != "do_sample" or v for k, v in suggested.items()):  # do_sample=false alone suggests greedy
        log.info("%s suggests sampling with %s; moe-jax samples only as a request asks (SamplingParams, the CLI's "
                 "flags or a line's fields)", path, ", ".join(f"{k}={v!r}" for k, v in suggested.items()))
    eos = gen.get("eos_token_id")
    extra = eos_token_ids(eos)
    if extra is None:
        raise CheckpointError(f"{path}: field 'eos_token_id' = {eos!r}: {EOS_EXPECTED}")
    return cfg.replace(eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + extra)))


FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors dtype names this loader converts


class Checkpoint:
    """A Hugging Face model directory. Tensors are read on demand from memory-mapped shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"model directory {self.path} does not exist")
        self.cfg = _with_generation_eos(ModelConfig.from_file(self.path / "config.json"),
                                        self.path / "generation_config.json")
        past = [t for t in self.cfg.eos_token_ids if t >= self.cfg.vocab_size]
        if past:
            log.warning("%s: EOS token id(s) %s (config.json / generation_config.json 'eos_token_id') are not below "
                        "vocab_size %d: the model never generates them, so generation stops only at its token "
                        "budget, a stop string or a stop token", self.path, past, self.cfg.vocab_size)
        self._shard_of = self._index()
        self._open: dict[str, object] = {}
        self._keys: dict[str, set[str]] = {}  # per open shard, the tensors it holds
        self._untie_a_stored_lm_head()
        self.unused = self._unused_tensors()
        if self.unused:
            log.warning("%s: %d tensor(s) in the checkpoint are not read for the model config.json describes (%d "
                        "layers, %d experts), e.g. %s: does config.json match the weights?", self.path,
                        len(self.unused), self.cfg.num_layers, self.cfg.num_experts, ", ".join(self.unused[:3]))

    def _untie_a_stored_lm_head(self) -> None:
        """config.json ties the embeddings but the checkpoint stores an lm_head.weight that differs from them:
        the stored one is the LM head, as transformers loads it ("both are present ... with different values, so
        we will NOT tie them"), and said. One equal to the embeddings changes nothing."""
        cfg = self.cfg
        names = _global_names(cfg)
        if not cfg.tie_embeddings or names["lm_head"].name not in self._shard_of:
            return
        shape = (cfg.vocab_size, cfg.hidden_size)
        try:
            embed, head = (self._read(names[k].name, shape) for k in ("embed", "lm_head"))
        except CheckpointError as e:  # a head of another shape or dtype: not one the model can use
            log.warning("%s: config.json ties the embeddings; the checkpoint's %s is not read (%s)", self.path,
                        names["lm_head"].name, e)
            return
        if not np.array_equal(embed, head):
            log.warning("%s: config.json ties the embeddings (tie_word_embeddings) but the checkpoint's %s differs "
                        "from %s: using the stored LM head, as transformers does", self.path, names["lm_head"].name,
                        names["embed"].name)
            self.cfg = cfg.replace(tie_embeddings=False)

    def _index(self) -> dict[str, str]:
        """tensor name -> shard file name."""
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json_object(index, CheckpointError).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: not a safetensors index (its 'weight_map' is not an object of "
                                      f"tensor name -> shard file name)")
            return weight_map
        single = self.path / "model.safetensors"
        if not single.exists():
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        with self._safe_open(single) as f:
            return {k: single.name for k in f.keys()}

    def _layer_names(self, i: int) -> dict[str, _Src]:
        return (_dbrx_names if self.cfg.family == "dbrx" else _llama_like_names)(self.cfg, i)

    def _unused_tensors(self) -> list[str]:
        """The checkpoint's tensors that no parameter reads (sorted), e.g. the layers or experts of a larger
        model than config.json says; a tied model's lm_head.weight counts as read."""
        cfg, read = self.cfg, {"lm_head.weight"}
        sources = [(_global_names(cfg)[k], s) for k, s in global_param_specs(cfg).items()]
        for i in range(cfg.num_layers):
            names = self._layer_names(i)
            sources += [(names[k], s) for k, s in layer_specs(cfg, i).items()]
        for src, spec in sources:
            experts = range(spec.shape[0]) if spec.expert and "{e}" in src.name else [None]
            read.update(src.name.format(e=e) for e in experts)
        return sorted(t for t in self._shard_of if t not in read and not t.endswith(_IGNORED_SUFFIXES)
                      and not self._is_mtp_layer(t))

    def _is_mtp_layer(self, tensor: str) -> bool:
        """DeepSeek V3's multi-token-prediction layers follow the decoder's (`model.layers.{num_layers}...`);
        generation does not use them, and transformers skips them too."""
        m = re.match(r"model\.layers\.(\d+)\.", tensor)
        return self.cfg.family == "deepseek_v3" and m is not None and int(m.group(1)) >= self.cfg.num_layers

    def _safe_open(self, file: Path):
        if not file.exists():
            raise CheckpointError(f"shard {file} is missing (named in {self.path / 'model.safetensors.index.json'})")
        try:
            return safe_open(str(file), framework="numpy")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file}: cannot read safetensors file: {e}") from None

    def _handle(self, tensor: str):
        shard = self._shard_of.get(tensor)
        if shard is None:
            raise CheckpointError(f"{self.path}: tensor '{tensor}' is missing from the checkpoint")
        if shard not in self._open:
            f = self._open[shard] = self._safe_open(self.path / shard).__enter__()
            self._keys[shard] = set(f.keys())
        if tensor not in self._keys[shard]:
            raise CheckpointError(f"{self.path / shard}: tensor '{tensor}' is not in this shard, though "
                                  f"{self.path / 'model.safetensors.index.json'} maps it here")
        return self._open[shard]

    def _read(self, tensor: str, shape: tuple[int, ...], rows: tuple[int, int, int] | None = None) -> np.ndarray:
        """Tensor `tensor` (its rows rows[0]:rows[1] of rows[2]), checked to have `shape` (that of the rows)."""
        f = self._handle(tensor)
        sl = f.get_slice(tensor)
        if sl.get_dtype() not in FLOAT_DTYPES:  # e.g. F8_E4M3 or packed integers: values need scales we do not read
            raise CheckpointError(f"{self.path / self._shard_of[tensor]}: tensor '{tensor}' is stored as "
                                  f"{sl.get_dtype()}; moe-jax reads {', '.join(FLOAT_DTYPES)} weights")
        got = tuple(sl.get_shape())
        want = (rows[2], *shape[1:]) if rows else shape
        if got != want:
            fused = f" (rows {rows[0]}:{rows[1]} of it: {shape})" if rows else ""
            raise CheckpointError(f"{self.path / self._shard_of[tensor]}: tensor '{tensor}' has shape {got}, "
                                  f"expected {want}{fused} from config.json")
        return sl[rows[0]:rows[1]] if rows else f.get_tensor(tensor)

    def _param(self, src: _Src, spec: ParamSpec, dtype) -> np.ndarray:
        dtype = spec.dtype(dtype)
        if spec.expert and "{e}" in src.name:  # one Hub tensor per expert, stacked into [E, ...]
            out = np.empty(spec.shape, dtype)
            for e in range(spec.shape[0]):
                out[e] = self._read(src.name.format(e=e), spec.shape[1:][::-1]).T
            return out
        if src.layout == "linear":
            return self._read(src.name, spec.shape[::-1], src.rows).T.astype(dtype)
        if src.layout == "vector":
            return self._read(src.name, spec.shape).astype(dtype)
        E, a, b = spec.shape  # fused_in: [E, H, F]; fused_out: [E, F, H]
        if src.layout == "fused_in":
            return self._read(src.name, (E * b, a)).reshape(E, b, a).transpose(0, 2, 1).astype(dtype)
        return self._read(src.name, (E * a, b)).reshape(E, a, b).astype(dtype)

    def layer(self, i: int, dtype) -> dict[str, np.ndarray]:
        """Layer i's parameters, `{name: array}` with shapes from `layer_specs`."""
        names = self._layer_names(i)
        return {k: np.ascontiguousarray(self._param(names[k], spec, dtype))
                for k, spec in layer_specs(self.cfg, i).items()}

    def globals(self, dtype) -> dict[str, np.ndarray]:
        names = _global_names(self.cfg)
        return {k: np.ascontiguousarray(self._param(names[k], spec, dtype))
                for k, spec in global_param_specs(self.cfg).items()}

    def close(self) -> None:
        for f in self._open.values():
            f.__exit__(None, None, None)
        self._open.clear()
        self._keys.clear()


__all__ = ["Checkpoint", "CheckpointError", "ConfigError"]
