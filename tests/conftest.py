"""Shared fixtures: tiny random Hugging Face checkpoints for every supported family, built with
transformers in a temp dir (sharded, with non-trivial random weights)."""
from __future__ import annotations

import importlib
import os
import pkgutil


def _gpu_plugin_installed() -> bool:
    """Whether a jax GPU plugin (CUDA or ROCm) is installed: the process may then compile for a GPU."""
    try:
        import jax_plugins
    except ImportError:
        return False
    return any("cuda" in m.name or "rocm" in m.name for m in pkgutil.iter_modules(jax_plugins.__path__))


# Where only the CPU backend can run, XLA compiles the tests' programs with LLVM's optimisations off: compiling is
# most of the suite's time (85% of the offload engine's preset tests on the 2-core VM) and their tiny shapes do
# not need fast code. The whole suite passes at either level, in 738 s instead of 1000 there. Set before jax starts a
# backend, inherited by the tests' subprocesses; an XLA_FLAGS that sets the level itself is left as it is (XLA's
# default is 2: `XLA_FLAGS=--xla_backend_optimization_level=2` runs the suite as the package runs).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "") and not _gpu_plugin_installed():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402


def reference(*modules: str) -> None:
    """Import the reference stack's `modules` (torch, transformers, accelerate) or skip the test where one is not
    installed: the documented run under the GPU machine's versions on a CPU (Python 3.12, for which no CPU build
    of torch is at hand) skips the tests against transformers instead of erroring. In CI (CI set), which
    installs them, a missing one fails the test: the reference tests are never skipped there."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"needs {name}, not installed here ({e})")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_executables():
    """Free each test module's compiled XLA executables after it. Each one holds about three memory mappings
    of the process (jaxlib 0.10.2 on CPU: 300 compiles took it from 434 to 1411 mappings, jax.clear_caches()
    back to 524), and Linux refuses mappings past vm.max_map_count (65530 by default). Without this the whole
    suite in one process reached 60,182 mappings before tests/moe_jax/test_sampling.py (test_offload_engine
    alone adds ~52,500), and an XLA compile there segfaulted once a test that compiles a few more shapes came."""
    yield
    jax.clear_caches()


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dbrx", "deepseek_v2", "deepseek_v3")

_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
               max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5,
               tie_word_embeddings=False)
HF_CONFIGS = {
    "mixtral": dict(_COMMON, intermediate_size=80, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6),
    "qwen2_moe": dict(_COMMON, intermediate_size=80, moe_intermediate_size=40, num_experts=6, num_experts_per_tok=2,
                      shared_expert_intermediate_size=56, norm_topk_prob=False),
    "qwen3_moe": dict(_COMMON, intermediate_size=80, moe_intermediate_size=40, num_experts=6, num_experts_per_tok=3,
                      head_dim=24, norm_topk_prob=True),
    "olmoe": dict(_COMMON, intermediate_size=40, num_experts=6, num_experts_per_tok=2, clip_qkv=3.0),
    # latent attention, a dense first layer, shared experts; V2: a YaRN context (its softmax scale) and
    # group-limited softmax routing; V3: a query bottleneck and sigmoid routing with a bias over groups
    "deepseek_v2": dict(_COMMON, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=80,
                        moe_intermediate_size=24, n_routed_experts=6, n_shared_experts=2, num_experts_per_tok=2,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, q_lora_rank=None,
                        first_k_dense_replace=1,
                        topk_method="group_limited_greedy", n_group=3, topk_group=2, routed_scaling_factor=1.5,
                        rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0, mscale=0.707,
                                             mscale_all_dim=0.707, original_max_position_embeddings=64)),
    "deepseek_v3": dict(_COMMON, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=80,
                        moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, q_lora_rank=24,
                        first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
                        routed_scaling_factor=2.5),
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, vocab_size=96, max_seq_len=256, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0, attn_config=dict(kv_n_heads=2, clip_qkv=2.0, rope_theta=5e5),
                 # transformers 5 drops attn_config's theta (its DBRX runs at rope_parameters'): both set, so that
                 # the comparisons run at DBRX's own 5e5, not transformers' default of 1e4
                 rope_parameters=dict(rope_type="default", rope_theta=5e5),
                 ffn_config=dict(ffn_hidden_size=40, moe_num_experts=4, moe_top_k=2, moe_normalize_expert_weights=1.0)),
}


def build_hf_model(family: str, seed: int = 0, **config_changes):
    """A transformers model of `family` (its HF_CONFIGS entry with `config_changes`) with weights
    ~ N(0, 1/fan_in) (norm scales 1 + N(0, 0.1)), so that logits are far from uniform and routing is decisive."""
    reference("torch", "transformers")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **{**HF_CONFIGS[family], **config_changes})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.1)
            elif "embed" in name or "wte" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():  # DeepSeek V3's routing bias, zero at init, is learnt
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """{family: (checkpoint dir, transformers model)}; each checkpoint is split into several shards."""
    out = {}
    for family in FAMILIES:
        model = build_hf_model(family)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path, max_shard_size="100KB")
        out[family] = (path, model)
    return out


@pytest.fixture
def lowering_for_h100():
    """Context for lowering GPU kernels for CUDA on a CPU-only machine: jax >= 0.11's Triton lowering asks
    the target GPU's compute capability, which only an abstract device can give here."""
    import jax

    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100))
