"""moe-jax: high-throughput offline batch inference of Mixture-of-Experts LLMs in JAX."""
from moe_jax.config import ConfigError, ModelConfig
from moe_jax.llm import LLM
from moe_jax.offload_policy import Policy
from moe_jax.requests import Completion
from moe_jax.sampling import SamplingParams

__all__ = ["LLM", "Policy", "SamplingParams", "Completion", "ModelConfig", "ConfigError"]
