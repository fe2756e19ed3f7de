"""host_ops.numba_target: numba compiles the kernels for 512-bit vectors on Sapphire Rapids and its successors
with AVX-512, unless the user chose the target or numba's code generator was built before host_ops was
imported; elsewhere LLVM's own tuning stands."""
from __future__ import annotations

import os
import subprocess
import sys

import llvmlite.binding as llvm
import pytest

from host_ops import numba_target

HOST_WIDENED = numba_target.widened_features(llvm.get_host_cpu_name(), numba_target.host_features())
user_target = pytest.mark.skipif(numba_target._USER_TARGET, reason="NUMBA_CPU_NAME / NUMBA_CPU_FEATURES set")


def _describe_in_subprocess(code_before: str = "", **env) -> str:
    code = f"{code_before}\nfrom host_ops import numba_target\nprint(numba_target.describe())"
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")} | env
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_the_256_bit_preference_is_dropped_on_sapphire_rapids_and_later_with_avx512_only():
    features = "+64bit,+avx2,+avx512f,+avx512bf16,-amx-tile"
    assert numba_target.widened_features("sapphirerapids", features) == f"{features},-prefer-256-bit"
    assert numba_target.widened_features("graniterapids", features) == f"{features},-prefer-256-bit"
    for cpu in ("skylake-avx512", "icelake-server", "znver4", "znver5"):  # slower clocks at 512; or 512 already
        assert numba_target.widened_features(cpu, features) is None
    assert numba_target.widened_features("sapphirerapids", "+64bit,+avx2,-avx512f") is None  # NUMBA_ENABLE_AVX=0


@user_target
def test_this_process_compiles_for_the_hosts_features_widened_where_it_pays():
    assert numba_target.compiled_features() == (HOST_WIDENED or numba_target.host_features())
    said = numba_target.describe()
    if HOST_WIDENED:
        assert said.endswith("AVX-512, 512-bit vectors (LLVM's 256-bit preference dropped)")
    else:
        assert said.endswith(("no AVX-512", "LLVM's own vector width for this CPU"))


def test_the_users_own_target_features_are_kept():
    said = _describe_in_subprocess(NUMBA_CPU_FEATURES=numba_target.host_features())
    assert said.endswith("as NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say" if "+avx512f" in numba_target.host_features()
                         else "no AVX-512")


AS_SAPPHIRE_RAPIDS = "import llvmlite.binding as b\nb.get_host_cpu_name = lambda: 'sapphirerapids'"  # LLVM's name
avx512 = pytest.mark.skipif("+avx512f" not in numba_target.host_features(), reason="no AVX-512 on this host")


@avx512
def test_sapphire_rapids_compiles_for_512_bit_vectors():
    said = _describe_in_subprocess(AS_SAPPHIRE_RAPIDS)
    assert said == "sapphirerapids, AVX-512, 512-bit vectors (LLVM's 256-bit preference dropped)"


@avx512
def test_a_code_generator_built_before_host_ops_is_named():
    said = _describe_in_subprocess(f"{AS_SAPPHIRE_RAPIDS}\nimport numba\nnumba.njit(lambda x: x)")
    assert said == ("sapphirerapids, AVX-512, LLVM's 256-bit preference kept: numba's code generator was built "
                    "before host_ops was imported")
