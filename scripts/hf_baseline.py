"""The PyTorch baseline of `bench_throughput.py`: Hugging Face transformers `generate` with accelerate CPU
offload under a GPU memory cap, on the same random weights as moe-jax.

The preset's weights (the first `--layers` layers, `moe_jax.presets.RandomWeights`) are written as a
Hugging Face checkpoint (config.json + one safetensors shard per layer, the Hub's tensor names and
layouts, read back with `moe_jax.checkpoint.Checkpoint` and compared with the source), then loaded with
`AutoModelForCausalLM.from_pretrained` and placed by accelerate's `dispatch_model`: embeddings, final norm
and LM head on the GPU, every decoder layer offloaded to CPU memory (its weights moved to the GPU whole at
the start of each of its forwards; a test rehearses this on the CPU, offloading to disk), experts as `experts_implementation="grouped_mm"` where the model supports it (DESIGN.md §3: the default
gathers weights per token and runs out of memory at large batch).

A truncated model stands for the full one: accelerate's `device_map="auto"` would keep the first
`resident` layers of the full model on the GPU under the cap (its free memory after the non-layer
weights and one offloaded layer's buffer, in whole layers, as accelerate's `infer_auto_device_map` counts
them: a test compares the two) and offload the rest,
so the full model's time is estimated as the measured time x (bytes of the full model's offloaded layers) /
(bytes of the layers run), i.e. (full layers - resident) / layers where all layers are alike (a dense layer
streams fewer bytes than a MoE one): resident layers counted as free, which favours the baseline.

Without CUDA or accelerate the model runs as plain transformers on the CPU, no offload, and the result
says so (a smoke test of the plumbing, not a baseline); `--require-offload` makes that an error instead,
before anything is written.

  PYTHONPATH=. python scripts/hf_baseline.py --model mixtral-8x7b --layers 2 --prompts P.json
      --gen-len 16 --gpu-memory-gb 16 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GiB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mixtral-8x7b", help="preset name (random weights)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the truncated baseline model")
    ap.add_argument("--prompts", required=True, help="JSON file: a list of prompts, each a list of token ids")
    ap.add_argument("--gen-len", type=int, default=16, help="tokens generated per prompt (EOS ignored)")
    ap.add_argument("--gpu-memory-gb", type=float, default=16.0, help="GPU memory cap of the full model, GiB")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (as moe-jax's)")
    ap.add_argument("--experts-implementation", default="grouped_mm",
                    help="transformers experts implementation, where the model supports one")
    ap.add_argument("--checkpoint-dir", help="where to write the checkpoint (default: a temporary directory)")
    ap.add_argument("--require-offload", action="store_true",
                    help="exit with an error where accelerate's CPU offload cannot run (no CUDA device or no accelerate)")
    ap.add_argument("--verify-export", action="store_true",
                    help="read the written checkpoint back and compare every tensor with the random weights (the "
                         "tests do; ~40%% of the export's time)")
    ap.add_argument("--json", required=True, help="write the result here")
    return ap.parse_args(argv)


# ---- our random weights as a Hugging Face checkpoint ----

def _hub_tensors(params: dict[str, np.ndarray], names) -> dict[str, np.ndarray]:
    """Our parameters (moe_jax.params layout) -> Hub tensors, inverting moe_jax.checkpoint's mapping."""
    out, fused_rows = {}, {}
    for key, arr in params.items():
        src = names[key]
        if "{e}" in src.name:  # one Hub tensor [out, in] per expert
            for e in range(arr.shape[0]):
                out[src.name.format(e=e)] = arr[e].T
        elif src.layout == "vector":
            out[src.name] = arr
        elif src.layout == "linear" and src.rows:  # a row range of a fused Hub tensor (DBRX Wqkv)
            fused_rows.setdefault(src.name, []).append((src.rows[0], arr.T))
        elif src.layout == "linear":
            out[src.name] = arr.T
        elif src.layout == "fused_in":  # ours [E, H, F] -> Hub [E*F, H]
            out[src.name] = arr.transpose(0, 2, 1).reshape(-1, arr.shape[1])
        else:  # fused_out: ours [E, F, H] -> Hub [E*F, H]
            out[src.name] = arr.reshape(-1, arr.shape[2])
    for name, parts in fused_rows.items():
        out[name] = np.concatenate([a for _, a in sorted(parts, key=lambda p: p[0])])
    return out


def _to_torch(arr: np.ndarray):
    import torch

    arr = np.ascontiguousarray(arr)
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def hf_config(preset: str, layers: int, dtype: str) -> dict:
    """The preset's config.json with `layers` decoder layers. RoPE's theta is also given as the top-level
    `rope_parameters` of transformers 5, which ignores DBRX's attn_config.rope_theta (moe_jax reads both)."""
    from moe_jax.presets import preset_config, preset_hf_config

    cfg = preset_hf_config(preset)
    cfg["n_layers" if "n_layers" in cfg else "num_hidden_layers"] = layers
    theta = preset_config(preset).rope_theta
    return {**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "dtype": dtype}


def export_checkpoint(preset: str, layers: int, dtype: str, seed: int, path: Path, verify: bool = True) -> None:
    """Write the preset's random weights (first `layers` layers) as a sharded Hugging Face checkpoint; with
    `verify`, read it back with moe_jax's loader and check every tensor against the source."""
    from safetensors.torch import save_file

    from moe_jax.checkpoint import Checkpoint, _dbrx_names, _global_names, _llama_like_names
    from moe_jax.config import ModelConfig
    from moe_jax.presets import RandomWeights

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config(preset, layers, dtype), indent=1))
    cfg = ModelConfig.from_file(path / "config.json")
    weights, np_dtype = RandomWeights(cfg, seed), np.dtype(dtype)
    layer_names = _dbrx_names if cfg.family == "dbrx" else _llama_like_names
    shards = [("model-globals.safetensors", weights.globals(np_dtype), _global_names(cfg))]
    shards += [(f"model-layer{i:03d}.safetensors", None, layer_names(cfg, i)) for i in range(layers)]
    weight_map = {}
    for i, (file, params, names) in enumerate(shards):
        params = params if params is not None else weights.layer(i - 1, np_dtype)
        tensors = {k: _to_torch(v) for k, v in _hub_tensors(params, names).items()}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if not verify:
        return
    ckpt = Checkpoint(path)
    pairs = [(ckpt.globals(np_dtype), weights.globals(np_dtype))]
    pairs += [(ckpt.layer(i, np_dtype), weights.layer(i, np_dtype)) for i in range(layers)]
    for got, want in pairs:
        bad = [k for k in want if not np.array_equal(got[k], want[k])]
        if bad:
            raise AssertionError(f"exported checkpoint differs from the random weights in {bad}")
    ckpt.close()


# ---- the baseline run ----

def layer_sizes(preset: str, dtype: str) -> list[int]:
    """Bytes of each decoder layer of the full model (a dense layer's, where it has them, are fewer)."""
    from moe_jax.params import layer_bytes
    from moe_jax.presets import preset_config

    cfg = preset_config(preset)
    return [layer_bytes(cfg, np.dtype(dtype), moe=cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]


def resident_layers(preset: str, dtype: str, gpu_memory_gb: float) -> int:
    """Decoder layers of the full model that device_map="auto" keeps on the GPU under the cap: what is
    left after the non-layer weights and one offloaded layer's buffer (accelerate reserves no activations)."""
    from moe_jax.params import global_bytes
    from moe_jax.presets import preset_config

    sizes = layer_sizes(preset, dtype)
    free = gpu_memory_gb * GiB - global_bytes(preset_config(preset), np.dtype(dtype)) - max(sizes)
    kept = 0  # the first layers, in order, as device_map="auto" fills the GPU
    while kept < len(sizes) and sizes[kept] <= free:
        free -= sizes[kept]
        kept += 1
    return kept


def offload_available() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False, "accelerate is not installed"
    return True, ""


def device_map(path: Path) -> dict:
    """Every decoder layer on the CPU (offloaded), every other module on GPU 0."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    n = meta.config.num_hidden_layers
    layers = next(name for name, m in meta.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)
    out = {f"{layers}.{i}": "cpu" for i in range(n)}
    for name, m in meta.named_modules():
        inside = name == layers or name.startswith(layers + ".")
        if name and not inside and (next(m.parameters(False), None) is not None or next(m.buffers(False), None) is not None):
            out[name] = 0
    return out


def load_model(path: Path, dtype: str, experts_impl: str, placement: dict | None = None, offload_folder=None):
    """(model, experts implementation used): on the CPU, or dispatched by accelerate as `placement` says (a device
    map, e.g. `device_map(path)`; a module placed on "disk" needs `offload_folder`). Each offloaded module's
    weights come in whole at the start of its forward (`preload_module_classes`): DBRX's experts read their
    child's weights without calling it, which accelerate's per-submodule hooks (transformers' own dispatch, as
    of 5.17) leave on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), experts_implementation=experts_impl)
    except ValueError as e:  # a model without pluggable experts (e.g. DBRX)
        print(f"experts_implementation={experts_impl!r} refused ({e}); using the model's own", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    if placement is not None:
        from accelerate import dispatch_model

        offloaded = {type(model.get_submodule(k)).__name__ for k, v in placement.items() if v in ("cpu", "disk")}
        model = dispatch_model(model, placement, offload_dir=offload_folder, preload_module_classes=sorted(offloaded),
                               skip_keys=model._skip_keys_device_placement)
    return model.eval(), getattr(model.config, "_experts_implementation", None) or "model's own"


def left_padded(prompts: list[list[int]], pad: int, device):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def timed_generate(model, prompts, gen_len: int, device):
    """(wall seconds, generated ids [B, gen_len]) of a greedy `generate` of exactly gen_len tokens per
    prompt, after a one-token warm-up on the same batch."""
    import torch

    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    ids, mask = left_padded(prompts, pad, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(n):
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad)
        sync()
        return out

    run(1)
    t0 = time.perf_counter()
    out = run(gen_len)
    return time.perf_counter() - t0, out[:, ids.shape[1]:].cpu()


def main(argv=None) -> int:
    import torch
    import transformers

    from moe_jax.presets import preset_config

    args = parse_args(argv)
    try:
        prompts = json.loads(Path(args.prompts).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--prompts {args.prompts}: {e}") from None
    full_layers = preset_config(args.model).num_layers
    layers = min(args.layers, full_layers)
    offload, why_not = offload_available()
    if args.require_offload and not offload:
        raise SystemExit(f"--require-offload: accelerate's CPU offload cannot run here: {why_not}")
    with tempfile.TemporaryDirectory(prefix="hf_baseline_") as tmp:
        path = Path(args.checkpoint_dir or tmp)
        t0 = time.perf_counter()
        export_checkpoint(args.model, layers, args.dtype, args.seed, path, verify=args.verify_export)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model, experts_impl = load_model(path, args.dtype, args.experts_implementation, device_map(path) if offload else None)
        load_s = time.perf_counter() - t0
        device = torch.device("cuda:0" if offload else "cpu")
        wall, generated = timed_generate(model, prompts, args.gen_len, device)
    resident = resident_layers(args.model, args.dtype, args.gpu_memory_gb) if offload else 0
    sizes = layer_sizes(args.model, args.dtype)
    scale = sum(sizes[resident:]) / sum(sizes[:layers])  # the full model's offloaded bytes over those run
    tokens = generated.numel()
    if scale == 0:
        print(f"the full model fits {args.gpu_memory_gb:g} GiB without offload: no full-model estimate", file=sys.stderr)
    result = {
        "mode": "accelerate CPU offload" if offload else f"plain transformers on CPU, no offload ({why_not})",
        "transformers": transformers.__version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if offload else "cpu", "experts_implementation": experts_impl,
        "model": args.model, "layers_run": layers, "full_layers": full_layers,
        "full_model_resident_layers": resident, "scale_to_full": scale, "prompts": len(prompts),
        "mean_prompt_len": float(np.mean([len(p) for p in prompts])), "gen_len": args.gen_len,
        "tokens": tokens, "wall_s": wall, "tok_s_measured": tokens / wall, "tok_s_full_model": tokens / (wall * scale) if scale else None,
        "export_s": export_s, "load_s": load_s,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / GiB if offload else None,
        "first_tokens": generated[:, 0].tolist(),
    }
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
