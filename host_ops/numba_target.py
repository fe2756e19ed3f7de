"""numba's code-generation target for the host kernels: 512-bit vectors on hosts with AVX-512.

LLVM tunes Intel's AVX-512 server CPUs (Skylake-SP to Sapphire and Granite Rapids; the GPU machine's
host is a Sapphire Rapids Xeon) to prefer 256-bit vectors, its "prefer-256-bit" tuning, so numba's
vectorised loops there use half of each vector register and FMA unit. The attention kernel is
compute-bound at DeepSeek's latent shape (16 query heads over one 576-dim KV head): on a 2-core Zen 5 VM,
compiled with LLVM's Sapphire Rapids tuning it ran at 171 GFLOP/s (batch 64, context 1024) and at
242 GFLOP/s with the preference dropped, as fast as with the VM's own tuning.

Importing this module (host_ops' kernels do, before defining any) appends "-prefer-256-bit" to numba's
target features on a host with AVX-512. numba reads them once, when it builds its code generator at the
first `@njit` of the process: where another library defined a numba function before host_ops was
imported, the preference stays and `describe()` says so. NUMBA_CPU_NAME and NUMBA_CPU_FEATURES, set by
the user, are left as they are.
"""
from __future__ import annotations

from numba.core import codegen, config, registry

NO_256_BIT_PREFERENCE = "-prefer-256-bit"
_USER_TARGET = config.CPU_NAME is not None or config.CPU_FEATURES is not None


def host_features() -> str:
    """The host CPU's features as LLVM names them, "+f1,-f2,..." (numba's NUMBA_ENABLE_AVX applied): with
    these alone, LLVM tunes the vector width for the CPU itself."""
    return codegen.get_host_cpu_features()


def compiled_features() -> str:
    """The target features numba compiles for in this process."""
    return registry.cpu_target.target_context.codegen().magic_tuple()[2]


def _configure() -> None:
    if _USER_TARGET:
        return
    features = host_features()
    if "+avx512f" in features.split(","):
        config.CPU_FEATURES = f"{features},{NO_256_BIT_PREFERENCE}"


def describe() -> str:
    """The target numba compiles the host kernels for, e.g. "sapphirerapids, AVX-512, 512-bit vectors"."""
    cpu = registry.cpu_target.target_context.codegen().magic_tuple()[1]
    flags = compiled_features().split(",")
    if "+avx512f" not in flags:
        return f"{cpu}, no AVX-512"
    if NO_256_BIT_PREFERENCE in flags:
        return f"{cpu}, AVX-512, 512-bit vectors"
    how = ("as NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say" if _USER_TARGET else
           "numba's code generator was built before host_ops was imported")
    return f"{cpu}, AVX-512, LLVM's own vector width for this CPU ({how})"


_configure()
