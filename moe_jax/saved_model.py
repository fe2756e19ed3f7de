"""moe-jax's own checkpoint format, written with orbax: a model's parameters under `moe_jax.params`' names,
one orbax item per layer (so loading streams layer by layer, as from safetensors), beside its
`ModelConfig` as JSON and, when there is one, its `tokenizer.json`:

    DIR/moe_jax_config.json   DIR/globals/   DIR/layer_000/ ... DIR/layer_{L-1}/   [DIR/tokenizer.json]
    [DIR/tokenizer_config.json, DIR/chat_template.jinja: the chat template, copied from the source model]

`save_model` writes it (e.g. `MoEDecoder.save` after fine-tuning in a research pipeline); `open_model`,
hence `LLM(DIR)` and the CLI's `--model DIR`, read it like a Hugging Face checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np

from moe_jax.config import ConfigError, ModelConfig, RopeScaling
from moe_jax.json_files import read_json_object
from moe_jax.params import global_param_specs, layer_specs

CONFIG_FILE = "moe_jax_config.json"
CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja")  # where `moe_jax.chat_template` reads a template


class SavedModelError(ValueError):
    """A saved model directory that cannot be read or written as asked (names the file or item)."""


def is_saved_model(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _layer_item(i: int) -> str:
    return f"layer_{i:03d}"


def _check_tree(where, arrays: Mapping, specs) -> None:
    """`arrays` must hold exactly the parameters of `specs`, each of its shape."""
    if set(arrays) != set(specs):
        raise SavedModelError(f"{where}: holds {sorted(arrays)}, the config needs {sorted(specs)}")
    for k, s in specs.items():
        if tuple(np.shape(arrays[k])) != tuple(s.shape):
            raise SavedModelError(f"{where}: {k} has shape {tuple(np.shape(arrays[k]))}, the config needs {s.shape}")


def save_model(path: str | Path, cfg: ModelConfig, globals_: Mapping[str, np.ndarray],
               layers: Sequence[Mapping[str, np.ndarray]], tokenizer=None, overwrite: bool = False,
               files_from: str | Path | None = None) -> Path:
    """Write a model to `path` (created); refuses to replace a saved model unless `overwrite`. Every
    parameter is checked against the config's specs first. files_from: a model directory whose chat template
    files (`CHAT_FILES`) are copied beside the weights."""
    import orbax.checkpoint as ocp  # here, not at import: orbax is slow to import and only this needs it

    path = Path(path).absolute()  # orbax wants absolute paths
    if path.exists() and not path.is_dir():
        raise SavedModelError(f"{path} is a file: give a directory to save the model in")
    if is_saved_model(path) and not overwrite:
        raise SavedModelError(f"{path} already holds a saved model; pass overwrite=True to replace it")
    foreign = [p.name for p in (path / "config.json", *sorted(path.glob("*.safetensors"))) if p.is_file()]
    if foreign:
        raise SavedModelError(f"{path} holds a Hugging Face checkpoint ({', '.join(foreign[:3])}): save to another "
                              f"directory (saving here would hide those weights and replace their files)")
    if len(layers) != cfg.num_layers:
        raise SavedModelError(f"{len(layers)} layers given for a {cfg.num_layers}-layer config")
    _check_tree("globals", globals_, global_param_specs(cfg))
    for i, p in enumerate(layers):
        _check_tree(f"layer {i}", p, layer_specs(cfg, i))
    # read before anything is removed: files_from may be `path` itself (a saved model overwritten in place)
    chat = {name: (Path(files_from) / name).read_bytes() for name in CHAT_FILES
            if files_from is not None and (Path(files_from) / name).is_file()}
    path.mkdir(parents=True, exist_ok=True)
    for stale in (CONFIG_FILE, "tokenizer.json", *CHAT_FILES):  # unmark first: an interrupted overwrite is no model
        (path / stale).unlink(missing_ok=True)
    host = lambda tree: {k: np.asarray(v) for k, v in tree.items()}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "globals", host(globals_), force=True)
        for i, p in enumerate(layers):
            ckpt.save(path / _layer_item(i), host(p), force=True)
    if tokenizer is not None:
        tokenizer.save(path / "tokenizer.json")
    for name, data in chat.items():
        (path / name).write_bytes(data)
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    tmp.replace(path / CONFIG_FILE)  # last, atomically: marks the model complete
    return path


def read_config(path: Path) -> ModelConfig:
    file = path / CONFIG_FILE
    d = read_json_object(file, ConfigError)
    try:
        scaling = d.get("rope_scaling")
        return ModelConfig(**{**d, "eos_token_ids": tuple(d.get("eos_token_ids", ())),
                              "dense_layers": tuple(d.get("dense_layers", ())),
                              "rope_scaling": None if scaling is None else RopeScaling(**scaling)})
    except (TypeError, AttributeError, ConfigError) as e:
        raise ConfigError(f"{file}: not a moe-jax model config ({e})") from None


class SavedWeights:
    """A weight source over a saved model directory: `layer(i, dtype)` / `globals(dtype)` restore one item
    to host NumPy arrays, checked against the parameter specs."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self.cfg = read_config(self.path)
        missing = [n for n in ["globals", *map(_layer_item, range(self.cfg.num_layers))]
                   if not (self.path / n).is_dir()]
        if missing:
            raise SavedModelError(f"{self.path}: missing {', '.join(missing)} for {self.cfg.num_layers} layers")

    def _restore(self, item: str, specs, dtype) -> dict[str, np.ndarray]:
        """The arrays of one item, checked against `specs`, in `dtype`."""
        import orbax.checkpoint as ocp

        where = self.path / item
        try:
            with ocp.StandardCheckpointer() as ckpt:
                meta = ckpt.metadata(where).item_metadata
            if meta is None:  # its _METADATA or manifest gone or unreadable
                raise SavedModelError(f"{where}: no orbax metadata (an incomplete or damaged save): save the model again")
            meta = meta.tree
            target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), dict(meta))
            with ocp.PyTreeCheckpointer() as ckpt:
                arrays = ckpt.restore(where, args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
        except (OSError, ValueError, KeyError) as e:
            raise SavedModelError(f"{where}: cannot restore ({type(e).__name__}: {e})") from None
        _check_tree(where, arrays, specs)
        return {k: v.astype(specs[k].dtype(dtype), copy=False) for k, v in arrays.items()}

    def layer(self, i: int, dtype) -> dict[str, np.ndarray]:
        return self._restore(_layer_item(i), layer_specs(self.cfg, i), dtype)

    def globals(self, dtype) -> dict[str, np.ndarray]:
        return self._restore("globals", global_param_specs(self.cfg), dtype)
