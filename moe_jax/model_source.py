"""Resolving the `model` argument (a checkpoint directory or a preset name) into a config, a weight
source (`layer(i, dtype)` / `globals(dtype)` -> NumPy arrays) and an optional tokenizer."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from moe_jax.chat_template import token_text
from moe_jax.checkpoint import Checkpoint
from moe_jax.config import ModelConfig
from moe_jax.json_files import read_json_object
from moe_jax.presets import PRESETS, RandomWeights, preset_config
from moe_jax.saved_model import CONFIG_FILE, SavedModelError, SavedWeights, is_saved_model
from moe_jax.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger("moe_jax")


class WeightSource(Protocol):
    cfg: ModelConfig

    def layer(self, i: int, dtype) -> dict[str, np.ndarray]: ...

    def globals(self, dtype) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass
class ModelSource:
    name: str
    cfg: ModelConfig
    weights: WeightSource
    tokenizer: Tokenizer | None


class ModelNotFound(ValueError):
    pass


def _eos_of_the_tokenizer(path: Path, cfg: ModelConfig, tok: Tokenizer | None) -> ModelConfig:
    """Where config.json and generation_config.json name no EOS, the tokenizer's `eos_token`
    (tokenizer_config.json), at which vLLM stops too; said either way."""
    if cfg.eos_token_ids:
        return cfg
    config = path / "tokenizer_config.json"
    text = token_text(read_json_object(config, TokenizerError).get("eos_token")) if config.is_file() else ""
    eos = tok.token_id(text) if tok is not None and text else None
    if eos is None or eos >= cfg.vocab_size:
        log.warning("%s: no EOS token id (config.json / generation_config.json 'eos_token_id', or a tokenizer "
                    "eos_token): generation stops only at its token budget, a stop string or a stop token", path)
        return cfg
    log.warning("%s: config.json and generation_config.json name no 'eos_token_id': stopping at the tokenizer's "
                "eos_token %r (id %d), as vLLM does", path, text, eos)
    return cfg.replace(eos_token_ids=(eos,))


def open_model(model: str | Path, seed: int = 0) -> ModelSource:
    """A directory with config.json + safetensors [+ tokenizer.json], a model saved by moe-jax
    (`moe_jax.saved_model`), or a preset name; seed: a preset's random weights (a directory's weights are its
    own: a seed other than 0 is said to be unused)."""
    path = Path(model)
    if path.is_dir() and seed:
        log.warning("seed=%r unused: it draws a preset's random weights, and %s holds its own (sampling seeds are "
                    "SamplingParams.seed)", seed, path)
    if path.is_dir():
        if not is_saved_model(path) and (path / "globals").is_dir() and not (path / "config.json").exists():
            raise SavedModelError(f"{path} holds a moe-jax save's items but not its {CONFIG_FILE}, which a save "
                                  f"writes last: the save was interrupted; save the model again")
        weights = SavedWeights(path) if is_saved_model(path) else Checkpoint(path)
        tok_file = path / "tokenizer.json"
        tok = Tokenizer.from_file(tok_file) if tok_file.exists() else None
        if tok is not None and tok.vocab_size > weights.cfg.vocab_size:
            log.warning("%s has %d tokens but the model's vocabulary %d: a prompt holding a token id past it is "
                        "refused", tok_file, tok.vocab_size, weights.cfg.vocab_size)
        return ModelSource(str(path), _eos_of_the_tokenizer(path, weights.cfg, tok), weights, tok)
    if str(model) in PRESETS:
        cfg = preset_config(str(model))
        return ModelSource(str(model), cfg, RandomWeights(cfg, seed), Tokenizer.byte_level())
    if path.is_file():
        raise ModelNotFound(f"model {model} is a file: give the directory that holds config.json and the weights")
    if "/" in str(model) or path.suffix:
        raise ModelNotFound(f"model directory {model} does not exist")
    raise ModelNotFound(f"model {str(model)!r} is neither a directory nor a preset (presets: {', '.join(PRESETS)})")
