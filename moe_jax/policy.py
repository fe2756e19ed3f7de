"""`python -m moe_jax.policy`: the offload policy HRM chooses for a model, a machine and a workload.

    python -m moe_jax.policy --model mixtral-8x7b --hardware l4 --prompt-len 77 --gen-len 32 [--json]
        [--gpu-memory-gb X] [--host-memory-gb Y] [--max-batch-size N] [--expert-codec none|exp4]
        [--kv-cache-dtype auto|int8] [--gpu-attention] [--plot roofline.png|.svg|.pdf]

--model: a preset name, a checkpoint directory (config.json) or a model saved by moe-jax; --hardware: a
profile name or a JSON profile (`python -m moe_jax.hrm.calibrate`). Memory sizes in GiB. The search plans
what the offload engine runs, CPU attention over a host KV cache; --gpu-attention also prices attention on
the GPU (HRM's model only: the engine does not run it). Bad arguments: one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moe_jax.config import ConfigError, ModelConfig
from moe_jax.hrm import PROFILES, SearchResult, choose_policy, hardware_profile
from moe_jax.hrm.search import PLACEMENTS
from moe_jax.offload_policy import CODECS, KV_CACHE_DTYPES
from moe_jax.presets import PRESETS, preset_config
from moe_jax.resident_engine import JAX_DEFAULT_SHARE, JAX_SHARE_VAR
from moe_jax.saved_model import is_saved_model, read_config


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def jax_share_note(r: SearchResult, hw, capped: bool) -> str | None:
    """A built-in profile holds the card's whole memory, of which a JAX process allocates only its share
    (JAX_SHARE_VAR, default 0.75): where the plan needs more than that share and no cap was given, how to run it."""
    if capped or hw.name not in PROFILES or PROFILES[hw.name] != hw:
        return None
    try:
        share = float(os.environ.get(JAX_SHARE_VAR, JAX_DEFAULT_SHARE))
    except ValueError:  # JAX itself refuses such a value when it starts
        share = JAX_DEFAULT_SHARE
    if r.gpu_memory_bytes <= share * hw.gpu_memory:
        return None
    return (f"note: this plan needs {r.gpu_memory_bytes / 2**30:.1f} GiB on the GPU, more than the {share:g} of "
            f"{hw.gpu_memory / 2**30:.1f} GiB a JAX process allocates ({JAX_SHARE_VAR}): set {JAX_SHARE_VAR}=0.95 "
            f"before JAX starts, or plan with --gpu-memory-gb {share * hw.gpu_memory / 2**30:.1f}")


def load_model(name: str) -> ModelConfig:
    """A preset by name, or the config of a checkpoint directory (config.json) or of a model saved by moe-jax."""
    if name in PRESETS:
        return preset_config(name)
    if is_saved_model(name):
        return read_config(Path(name))
    if Path(name).is_dir():
        return ModelConfig.from_file(Path(name) / "config.json")
    raise ConfigError(f"unknown model {name!r}: neither a preset ({', '.join(PRESETS)}) nor a directory")


def summary(r: SearchResult) -> str:
    """A few human-readable lines."""
    p, t = r.policy, r.per_layer_seconds
    gib = 2**30
    return "\n".join([
        f"policy: N={p.batch_size} = {p.num_micro_batches} micro-batch(es) x {p.micro_batch_size}, "
        f"resident experts r_w={p.resident_expert_fraction:.3f}, attention on {p.attention_device}, "
        f"KV cache on {p.kv_device}" + (f" ({p.kv_cache_dtype})" if p.kv_cache_dtype != "auto" else "")
        + (f", experts streamed coded ({p.expert_codec})" if p.expert_codec != "none" else ""),
        f"per layer (decode): h2d {t['h2d']:.4f} s, cpu {t['cpu']:.4f} s, gpu {t['gpu']:.4f} s "
        f"-> bound by {r.bottleneck}",
        f"predicted: decode {r.decode_tokens_per_s:.1f} tok/s, end to end {r.tokens_per_s:.1f} tok/s "
        f"(prefill {r.prefill_seconds:.1f} s + decode {r.decode_seconds:.1f} s)",
        f"memory: GPU {r.gpu_memory_bytes / gib:.1f} GiB, host {r.host_memory_bytes / gib:.1f} GiB (of it the "
        f"pinned-host pool for the streamed experts, {r.pinned_pool_bytes / gib:.0f} GiB)",
        *(["note: attention on the GPU is HRM's plan only; the offload engine runs attention on the CPU"]
          if p.attention_device == "gpu" else []),
    ])


def main(argv=None) -> int:
    ap = _Parser(prog="python -m moe_jax.policy", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="preset name or checkpoint directory")
    ap.add_argument("--hardware", required=True, help=f"profile ({', '.join(PROFILES)}) or JSON profile file")
    ap.add_argument("--prompt-len", type=int, required=True)
    ap.add_argument("--gen-len", type=int, required=True)
    ap.add_argument("--gpu-memory-gb", type=float, help="GPU memory cap in GiB (default: the hardware's)")
    ap.add_argument("--host-memory-gb", type=float, help="host memory cap in GiB (default: the hardware's)")
    ap.add_argument("--max-batch-size", type=int, help="at most this many sequences (default: no limit)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--expert-codec", choices=CODECS, default="none",
                    help="streamed experts as they are, or coded losslessly in 12 bits (exp4, bfloat16)")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                    help="the host KV cache in the model's dtype, or int8 (lossy; CPU attention only)")
    ap.add_argument("--gpu-attention", action="store_true",
                    help="also price attention on the GPU (HRM only: the offload engine runs it on the CPU)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--plot", metavar="FILE.png", help="write the hierarchical roofline picture (.png, .svg, .pdf)")
    args = ap.parse_args(argv)
    if args.plot:
        plot = Path(args.plot)
        if plot.suffix.lower() not in PLOT_SUFFIXES or not plot.parent.is_dir() or plot.is_dir():
            ap.error(f"--plot {args.plot}: give a file name ending in {', '.join(PLOT_SUFFIXES)} in an existing "
                     f"directory")
    try:
        cfg = load_model(args.model)
        hw = hardware_profile(args.hardware)
        result = choose_policy(cfg, hw, args.prompt_len, args.gen_len, gpu_memory_gb=args.gpu_memory_gb,
                               host_memory_gb=args.host_memory_gb, max_batch_size=args.max_batch_size,
                               dtype=args.dtype, expert_codec=args.expert_codec,
                               kv_cache_dtype=args.kv_cache_dtype,
                               placements=PLACEMENTS if args.gpu_attention else [("cpu", "cpu")])
    except ValueError as e:  # ConfigError, HardwareError, InfeasibleError, bad numbers
        ap.error(str(e))
    if args.json:
        print(json.dumps({"model": args.model, "hardware": hw.name, **result.to_dict()}))
    else:
        print(f"{args.model} on {hw.name}: prompt {args.prompt_len}, generate {args.gen_len} ({args.dtype})")
        print(summary(result))
    note = jax_share_note(result, hw, args.gpu_memory_gb is not None)
    if note:
        print(note, file=sys.stderr if args.json else sys.stdout)
    if args.plot:
        from moe_jax.hrm.roofline_plot import plot_roofline
        plot_roofline(cfg, hw, result.policy, args.prompt_len, args.gen_len, args.plot, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
