"""XLA's pinned-host pool: its cap follows the experts the policy streams, set before JAX starts."""
import os
import subprocess
import sys

from moe_jax import pinned_pool
from moe_jax.offload_policy import Policy
from moe_jax.params import layer_bytes
from moe_jax.presets import preset_config


def test_pool_sized_for_the_streamed_experts(monkeypatch):
    """The cap is set for what the policy streams (+ 5% + 2 GiB): all 84 GiB of Mixtral 8x7B's experts
    before a policy is chosen, about half at r_w = 0.5. The setting can be revised until JAX starts; a
    caller's setting and a running backend's are kept."""
    cfg = preset_config("mixtral-8x7b")
    experts = cfg.num_layers * layer_bytes(cfg, "bfloat16", expert=True)
    half = Policy(batch_size=8, micro_batch_size=4, num_micro_batches=2, resident_expert_fraction=0.5)
    assert pinned_pool.streamed_bytes(cfg, "bfloat16") == experts
    assert pinned_pool.streamed_bytes(cfg, "bfloat16", half) == experts // 2
    assert pinned_pool.setting_gib(experts) == int(experts / 2**30 * 1.05) + 2 == 90
    assert pinned_pool.setting_gib(experts) * 2**30 == pinned_pool.cap_bytes(experts)  # what HRM counts

    var = pinned_pool.LIMIT_VAR
    monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(pinned_pool, "_ours", None)
    started = None
    monkeypatch.setattr(pinned_pool, "_gpu_backend_started", lambda: started)
    pinned_pool.reserve(experts)
    assert os.environ[var] == "90" and pinned_pool.fixed_cap_bytes() is None
    pinned_pool.reserve(experts // 2)  # ours, the backend not started: revised for the chosen policy
    assert os.environ[var] == str(pinned_pool.setting_gib(experts // 2))
    started = True
    pinned_pool.reserve(experts)  # too late: the running backend keeps its cap
    assert os.environ[var] == str(pinned_pool.setting_gib(experts // 2))
    assert pinned_pool.fixed_cap_bytes() == pinned_pool.setting_gib(experts // 2) * 2**30
    monkeypatch.setenv(var, "100")
    started = None
    pinned_pool.reserve(experts // 2)  # the caller's
    assert os.environ[var] == "100"



SPY = """
import moe_jax
from moe_jax import pinned_pool
from jax._src import xla_bridge

calls, reserve = [], pinned_pool.reserve
def spy(streamed):
    calls.append((streamed, bool(xla_bridge._backends)))
    reserve(streamed)
pinned_pool.reserve = spy
llm = moe_jax.LLM("tiny-mixtral", policy="offload", hardware="h100-80gb", gpu_memory_gb=1)
assert not xla_bridge._backends, "JAX started before the policy was chosen"
llm.generate(["hi there"], moe_jax.SamplingParams(max_new_tokens=2))
assert calls == [(pinned_pool.streamed_bytes(llm.cfg, llm.dtype, llm.policy), False)], calls
print("ok")
"""


def test_llm_sets_the_cap_for_hrms_policy_before_jax_starts():
    """policy="offload" with the hardware and the GPU cap named: HRM chooses with no device to ask, and the
    cap is set for its policy's streamed experts before anything starts JAX (a fresh process)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop(pinned_pool.LIMIT_VAR, None)
    p = subprocess.run([sys.executable, "-c", SPY], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
