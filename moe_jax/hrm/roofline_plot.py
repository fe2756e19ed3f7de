"""The hierarchical roofline picture of one decode layer under a policy (MoE-Lightning, Fig. 3).

Roofs: the GPU on its own memory, the CPU on host DRAM, and the GPU fed over the link from host memory.
Turning points: P1 = CPU peak / link bandwidth (below it an op runs faster on the CPU than its data
could reach the GPU) and P2 = GPU peak / link bandwidth (above it the GPU is compute-bound even on
data streamed from the host). Each op of one micro-batch sits at its intensity and attained FLOP/s;
ops whose data crosses the link (streamed experts, GPU attention over a host KV cache) appear a second
time at their link intensity.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from moe_jax.config import ModelConfig
from moe_jax.hrm.costs import decode_ops
from moe_jax.hrm.hardware import Hardware
from moe_jax.offload_policy import Policy
from moe_jax.expert_codec import streamed_expert_bytes


def plot_roofline(cfg: ModelConfig, hw: Hardware, policy: Policy, prompt_len: int, gen_len: int,
                  path: str | Path, dtype="bfloat16") -> None:
    """Writes the picture for a decode step at the mean context P + G/2 to `path` (PNG, SVG, PDF)."""
    n_ub = policy.num_micro_batches
    ops = decode_ops(cfg, dtype, policy.micro_batch_size, prompt_len + gen_len / 2, policy.kv_cache_dtype)
    streamed = (1 - policy.resident_expert_fraction) * cfg.num_experts  # per layer, on average
    link_bytes = {"experts": streamed * streamed_expert_bytes(cfg, dtype, policy.expert_codec) / n_ub}
    link_bytes = {k: v for k, v in link_bytes.items() if v > 0}  # all experts resident: nothing crosses the link
    if policy.attention_device == "gpu" and policy.kv_device == "cpu":
        link_bytes["attention"] = ops["attention"].bytes

    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.geomspace(1e-2, 1e5, 200)
    ax.loglog(x, np.minimum(hw.gpu_flops, hw.gpu_bandwidth * x), "C0", label="GPU, GPU memory")
    ax.loglog(x, np.minimum(hw.cpu_flops, hw.host_bandwidth * x), "C1", label="CPU, host memory")
    ax.loglog(x, np.minimum(hw.gpu_flops, hw.link_bandwidth * x), "C2--", label="GPU, host memory over the link")
    for name, value in (("P1", hw.cpu_flops / hw.link_bandwidth), ("P2", hw.gpu_flops / hw.link_bandwidth)):
        ax.axvline(value, color="gray", lw=0.8, ls=":")
        ax.annotate(f"{name} = {value:.3g} FLOP/B", (value, 0.02), xycoords=ax.get_xaxis_transform(), rotation=90,
                    va="bottom", ha="right", fontsize=8)

    placed = []  # (x, y, line) of each label: a label takes the first line below its point that no label near it has

    def point(text: str, x: float, y: float, style: str) -> None:
        ax.plot(x, y, style)
        taken = {k for px, py, k in placed if abs(np.log10(x / px)) < 0.3 and abs(np.log10(y / py)) < 0.3}
        line = next(k for k in range(len(placed) + 1) if k not in taken)
        placed.append((x, y, line))
        ax.annotate(text, (x, y), xytext=(4, 3 - 11 * line), textcoords="offset points", fontsize=8)

    for name, op in ops.items():
        on_cpu = name == "attention" and policy.attention_device == "cpu"
        seconds = hw.cpu_seconds(op, policy.kv_cache_dtype) if on_cpu else hw.gpu_seconds(op)
        if name in link_bytes:
            seconds = max(seconds, link_bytes[name] / hw.link_bandwidth)
            point(f"{name} (link)", op.flops / link_bytes[name], op.flops / seconds, "C2^")
        point(name, op.intensity, op.flops / seconds, "C1s" if on_cpu else "C0o")

    ax.set(xlabel="operational intensity (FLOP/byte)", ylabel="attained performance (FLOP/s)",
           title=f"{cfg.family} on {hw.name}: N={policy.batch_size} ({n_ub}×{policy.micro_batch_size}), "
                 f"r_w={policy.resident_expert_fraction:.3f}, attention on {policy.attention_device}"
                 + "".join(f", {v}" for v in (policy.expert_codec, f"KV {policy.kv_cache_dtype}")
                           if v not in ("none", "KV auto")))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    fig.savefig(path, dpi=120)
