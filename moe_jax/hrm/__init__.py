"""HRM: MoE-Lightning's hierarchical roofline performance model and policy search.

`choose_policy(cfg, hardware, prompt_len, gen_len)` returns a `SearchResult` (the `Policy` and its
predicted per-layer terms and throughput); `predict(cfg, hardware, policy, ...)` prices a given
policy the same way; `hardware_profile(name_or_path)` resolves `--hardware`.
Modules: `costs` (op FLOPs and bytes), `hardware` (profiles), `calibrate` (measure this machine),
`search` (the model and the search), `roofline_plot` (the picture).
"""
from moe_jax.hrm.hardware import PROFILES, Hardware, HardwareError, hardware_profile
from moe_jax.hrm.search import InfeasibleError, SearchResult, choose_policy, predict

__all__ = ["PROFILES", "Hardware", "HardwareError", "InfeasibleError", "SearchResult", "choose_policy",
           "hardware_profile", "predict"]
