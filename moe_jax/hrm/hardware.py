"""Hardware profiles for HRM: the roofs of one GPU, its host and the link between them.

A profile is a built-in name (`PROFILES`) or a JSON file with the fields of `Hardware` (as written by
`python -m moe_jax.hrm.calibrate`). Units: bytes, bytes/s and FLOP/s (bf16 dense).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from moe_jax.hrm.costs import Op
from moe_jax.json_files import read_json_object

GB, GiB, TFLOPS = 1e9, 2.0**30, 1e12


class HardwareError(ValueError):
    """An unknown profile name or a bad profile file; the message names it."""


# The expert kernels' rate as a fraction of the dense bf16 matmul's, by routed rows per expert, where they are
# compute-bound: measured on an H200 (benchmarks/RESULTS.md, 2026-11-26; Mixtral 8x7B's shape, the faster of
# pallas_triton and pallas_mgpu, i.e. what `auto` runs, over the best dense rate of that run, 716 TFLOP/s) at
# 256, 1024 and 4096 rows per expert (T = 1024, 4096, 16384 tokens, top-2 of 8). Fewer rows take the first
# point's fraction: there the kernels read their weights at close to the HBM's rate (3.6 TB/s at 64 rows), which
# the roofline's bytes term prices, not this one.
GROUPED_MATMUL_EFFICIENCY = ((256, 0.55), (1024, 0.75), (4096, 0.83))


def grouped_matmul_efficiency(rows_per_group):
    """Fraction of the dense matmul rate that grouped expert matmuls reach at `rows_per_group` rows per expert
    (interpolated in log2 of the rows over GROUPED_MATMUL_EFFICIENCY, constant beyond its ends)."""
    rows, frac = (np.array(c, float) for c in zip(*GROUPED_MATMUL_EFFICIENCY))
    return np.interp(np.log2(np.maximum(np.asarray(rows_per_group, float), 1.0)), np.log2(rows), frac)


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Memory sizes in bytes, bandwidths in bytes/s, compute in FLOP/s.

    link_bandwidth: host→GPU copies from pinned host memory (GPU→host is assumed as fast).
    host_bandwidth: host DRAM read by all cores.
    attention_bandwidth: KV bytes/s of the CPU decode-attention kernel (None: host_bandwidth), its time per query
      row apart (attention_row_seconds).
    attention_row_seconds: the CPU kernel's time per query row and query head beyond its bytes and FLOPs (a
      task's start, its softmax's end, its output): at a context of 64 the kernel took 1.34x its time at 1024 for
      the same bytes on the 2-core VM (2026-11-27). `calibrate` measures it from a long and a short context; None:
      0, as the built-in profiles (unmeasured).
    int8_attention_bandwidth: the same over an int8 KV cache, its bytes counted with their scales (None:
      attention_bandwidth, as where the kernel is bound by DRAM bandwidth; where it is not, int8 moves fewer
      bytes per second: 34.6 GB/s against bf16's 52 on the H200 machine's 16 cores. `calibrate` measures it).
    expert_flops: FLOP/s of the GPU expert kernel with many rows per expert (`calibrate` times 8192; None: the
      dense rate times the efficiency curve's last point); fewer rows run slower (`grouped_matmul_efficiency`).
    launch_seconds: fixed GPU time per micro-batch and layer (dispatch of a jitted call, kernel launches).
    """

    name: str
    gpu_memory: float
    gpu_bandwidth: float
    gpu_flops: float
    cpu_flops: float
    host_memory: float
    host_bandwidth: float
    link_bandwidth: float
    attention_bandwidth: float | None = None
    attention_row_seconds: float | None = None
    int8_attention_bandwidth: float | None = None
    expert_flops: float | None = None
    launch_seconds: float = 50e-6

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise HardwareError(f"hardware name must be a non-empty string, got {self.name!r}")
        for f in dataclasses.fields(self)[1:]:
            v = getattr(self, f.name)
            if v is None and f.default is None:
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise HardwareError(f"hardware {self.name!r}: {f.name} must be a positive number, got {v!r}")

    def gpu_seconds(self, op: Op):
        """Roofline time of `op` on the GPU, its data in GPU memory. Grouped expert matmuls run at
        `expert_flops` (else the dense rate times the efficiency curve's last point) scaled by the curve for
        their rows per expert (`grouped_matmul_efficiency`)."""
        peak = self.gpu_flops
        if op.name == "experts":
            most = GROUPED_MATMUL_EFFICIENCY[-1][1]
            peak = self.expert_flops or self.gpu_flops * most
            if op.rows_per_group is not None:
                peak = peak * grouped_matmul_efficiency(op.rows_per_group) / most
        return np.maximum(op.flops / peak, op.bytes / self.gpu_bandwidth)

    def cpu_seconds(self, op: Op, kv_cache_dtype: str = "auto"):
        """Roofline time of `op` (decode attention over a KV cache of `kv_cache_dtype`) on the CPU, its data in
        host memory, plus its query rows' fixed time (attention_row_seconds). The kernel's only: the offload
        engine's worker also pays per call (the k/v writes, waking the kernel's threads, the output's hand-off
        to pinned memory), which this does not price; on the H200 machine its CPU term ran 2.6-10x this
        (benchmarks/RESULTS.md, 2026-11-27)."""
        bandwidth = self.attention_bandwidth or self.host_bandwidth
        if kv_cache_dtype == "int8":
            bandwidth = self.int8_attention_bandwidth or bandwidth
        rows = 0.0 if op.head_rows is None else op.head_rows * (self.attention_row_seconds or 0.0)
        return np.maximum(op.flops / self.cpu_flops, op.bytes / bandwidth) + rows

    @classmethod
    def from_json_file(cls, path: str | Path) -> "Hardware":
        """Loads a profile; a "notes" object (calibration details) is allowed and ignored."""
        d = read_json_object(path, HardwareError, "hardware profile ")
        d.pop("notes", None)
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if unknown := sorted(d.keys() - names):
            raise HardwareError(f"hardware profile {path}: unknown field(s) {', '.join(unknown)}")
        if missing := sorted(required - d.keys()):
            raise HardwareError(f"hardware profile {path}: missing field(s) {', '.join(missing)}")
        try:
            return cls(**d)
        except HardwareError as e:
            raise HardwareError(f"hardware profile {path}: {e}") from None


def _host_192(cpu_tflops: float) -> dict:
    return dict(cpu_flops=cpu_tflops * TFLOPS, host_memory=192 * GiB, host_bandwidth=76 * GB)


PROFILES: dict[str, Hardware] = {
    # MoE-Lightning's two machines (the original's HardwareConfig; a 192 GB host with 76 GB/s DRAM).
    "t4": Hardware("t4", gpu_memory=15 * GiB, gpu_bandwidth=300 * GB, gpu_flops=65 * TFLOPS,
                   link_bandwidth=16 * GB, **_host_192(0.8)),
    "l4": Hardware("l4", gpu_memory=24 * GiB, gpu_bandwidth=285 * GB, gpu_flops=104 * TFLOPS,
                   link_bandwidth=16 * GB, **_host_192(1.6)),
    # Spec-sheet A100s (SXM, bf16 dense) on the same host, over PCIe 4.0 x16 (~25 GB/s pinned).
    "a100-40gb": Hardware("a100-40gb", gpu_memory=40 * GiB, gpu_bandwidth=1555 * GB, gpu_flops=312 * TFLOPS,
                          link_bandwidth=25 * GB, **_host_192(1.6)),
    "a100-80gb": Hardware("a100-80gb", gpu_memory=80 * GiB, gpu_bandwidth=2039 * GB, gpu_flops=312 * TFLOPS,
                          link_bandwidth=25 * GB, **_host_192(1.6)),
    # The measured H100 machine of DESIGN.md §3 (HBM from the spec sheet; CPU attention at Mixtral's shape is
    # bandwidth-bound: the numba attention kernel reached 43 GB/s). cpu_flops is that kernel's compute roof
    # (DeepSeek's latent attention is compute-bound) and its int8 rate are the H200 machine's, a host of the same
    # class (16 cores, 125 GiB; `calibrate`, 2026-11-26: 0.34 TFLOP/s at DeepSeek-V2-Lite's shape, int8 KV at
    # 34.6/52 of bf16's bytes/s, applied here to the 43 GB/s).
    "h100-80gb": Hardware("h100-80gb", gpu_memory=79.6 * GiB, gpu_bandwidth=3350 * GB, gpu_flops=796 * TFLOPS,
                          cpu_flops=0.34 * TFLOPS, host_memory=125 * GiB, host_bandwidth=56.6 * GB,
                          link_bandwidth=52 * GB, attention_bandwidth=43 * GB,
                          int8_attention_bandwidth=43 * GB * 34.6 / 52),
    # The H200 machines lent here: the H100's chip with 141 GB of HBM3e at 4.8 TB/s (datasheet; bf16 matmul
    # measured at 716-798 TFLOP/s), on a 16-core, 125 GiB host whose figures `calibrate` measured on one
    # (benchmarks/profiles/h200-measured.json, 2026-11-26, before the attention kernel prefetched): DRAM read
    # 83 GB/s, link 52.6 GB/s (52 kept, as the H100 machine's), CPU attention 52 GB/s over bf16 and 34.6 over int8, 0.34 TFLOP/s.
    "h200": Hardware("h200", gpu_memory=139 * GiB, gpu_bandwidth=4800 * GB, gpu_flops=790 * TFLOPS,
                     cpu_flops=0.34 * TFLOPS, host_memory=125 * GiB, host_bandwidth=83 * GB,
                     link_bandwidth=52 * GB, attention_bandwidth=52 * GB, int8_attention_bandwidth=34.6 * GB),
}


def hardware_profile(name_or_path: str | Path | Hardware) -> Hardware:
    """A built-in profile by name, or a JSON profile file."""
    if isinstance(name_or_path, Hardware):
        return name_or_path
    if str(name_or_path) in PROFILES:
        return PROFILES[str(name_or_path)]
    if Path(name_or_path).is_file():
        return Hardware.from_json_file(name_or_path)
    raise HardwareError(f"unknown hardware {str(name_or_path)!r}: neither a profile "
                        f"({', '.join(PROFILES)}) nor a JSON profile file")
