"""numba's code-generation target for the host kernels: 512-bit vectors on Sapphire Rapids and its successors.

LLVM tunes Intel's AVX-512 server CPUs to prefer 256-bit vectors (its "prefer-256-bit" tuning), so
numba's vectorised loops there use half of each vector register and FMA unit. On Skylake-SP to Ice Lake
that spares the clock, which 512-bit code lowers; from Sapphire Rapids on (the GPU machine's host, DESIGN.md
§3) the cost is small, and the attention kernel is compute-bound at DeepSeek's latent shape (16 query heads
over one 576-dim KV head). On a 2-core Zen 5 VM, compiled with LLVM's Sapphire Rapids tuning, the kernel ran
at 167-169 GFLOP/s (batch 64, context 1024) and with the preference dropped at 233-239, in the same runs
(benchmarks/RESULTS.md). AMD's Zen 4 and Zen 5 get 512-bit vectors from LLVM already.

Importing this module (host_ops' kernels do, before defining any) appends "-prefer-256-bit" to numba's
target features on a CPU of `WIDENED` with AVX-512. numba reads them once, when it builds its code
generator at the first `@njit` of the process: where another library defined a numba function before
host_ops was imported, the preference stays and `describe()` says so. NUMBA_CPU_NAME and
NUMBA_CPU_FEATURES, set by the user, are left as they are. The setting holds for every numba function of
the process.
"""
from __future__ import annotations

import llvmlite.binding as llvm
from numba.core import codegen, config, registry

NO_256_BIT_PREFERENCE = "-prefer-256-bit"
WIDENED = ("sapphirerapids", "emeraldrapids", "graniterapids", "graniterapids-d", "diamondrapids")  # LLVM's names
_USER_TARGET = config.CPU_NAME is not None or config.CPU_FEATURES is not None


def host_features() -> str:
    """The host CPU's features as LLVM names them, "+f1,-f2,..." (numba's NUMBA_ENABLE_AVX applied): with
    these alone, LLVM tunes the vector width for the CPU itself."""
    return codegen.get_host_cpu_features()


def compiled_features() -> str:
    """The target features numba compiles for in this process."""
    return registry.cpu_target.target_context.codegen().magic_tuple()[2]


def widened_features(cpu: str, features: str) -> str | None:
    """The target features for numba on CPU `cpu` with LLVM features `features`: those with the 256-bit
    preference dropped where `cpu` is one of WIDENED and has AVX-512, else None (LLVM's own)."""
    return f"{features},{NO_256_BIT_PREFERENCE}" if cpu in WIDENED and "+avx512f" in features.split(",") else None


def describe() -> str:
    """The target numba compiles the host kernels for, e.g. "sapphirerapids, AVX-512, 512-bit vectors"."""
    cpu = registry.cpu_target.target_context.codegen().magic_tuple()[1]
    flags = compiled_features().split(",")
    if "+avx512f" not in flags:
        return f"{cpu}, no AVX-512"
    if NO_256_BIT_PREFERENCE in flags:
        return f"{cpu}, AVX-512, 512-bit vectors (LLVM's 256-bit preference dropped)"
    if _USER_TARGET:
        return f"{cpu}, AVX-512, as NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say"
    if cpu in WIDENED:
        return (f"{cpu}, AVX-512, LLVM's 256-bit preference kept: numba's code generator was built before host_ops "
                f"was imported")
    return f"{cpu}, AVX-512, LLVM's own vector width for this CPU"


if not _USER_TARGET:
    config.CPU_FEATURES = widened_features(llvm.get_host_cpu_name(), host_features())
