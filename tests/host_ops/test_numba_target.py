"""host_ops.numba_target: numba compiles the kernels for 512-bit vectors on an AVX-512 host, unless the user
chose the target or numba's code generator was built before host_ops was imported."""
from __future__ import annotations

import os
import subprocess
import sys

from host_ops import numba_target

AVX512 = "+avx512f" in numba_target.host_features().split(",")


def _describe_in_subprocess(code_before: str = "", **env) -> str:
    code = f"{code_before}\nfrom host_ops import numba_target\nprint(numba_target.describe())"
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")} | env
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_this_process_compiles_for_512_bit_vectors_where_the_host_has_avx512():
    compiled = numba_target.compiled_features()
    if AVX512:
        assert compiled == f"{numba_target.host_features()},{numba_target.NO_256_BIT_PREFERENCE}"
        assert numba_target.describe().endswith("AVX-512, 512-bit vectors")
    else:
        assert compiled == numba_target.host_features() and numba_target.describe().endswith("no AVX-512")


def test_a_code_generator_built_before_host_ops_is_named():
    said = _describe_in_subprocess("import numba\nnumba.njit(lambda x: x)")
    assert said.endswith("numba's code generator was built before host_ops was imported)" if AVX512 else
                         "no AVX-512")


def test_the_users_own_target_features_are_kept():
    said = _describe_in_subprocess(NUMBA_CPU_FEATURES=numba_target.host_features())
    assert said.endswith("(as NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say)" if AVX512 else "no AVX-512")
