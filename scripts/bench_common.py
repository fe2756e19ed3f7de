"""Shared pieces of the offload benchmarks (`bench_offload.py`, `bench_throughput.py`).

* `set_memory_env`: the XLA memory settings, made before JAX starts its backend;
* `open_source`: a preset or checkpoint, optionally cut to its first N layers;
* `synthetic_prompts`: random token ids with a given length range;
* `add_policy_options`, `policy_options`: the flags --expert-codec and --kv-cache-dtype, the Policy fields they set;
* `resolve_policy`: "auto" (HRM's choice for the workload) or "N,mu,n_ub,rw", under the GPU cap;
* `policy_before_jax`: the policy to size the pinned-host pool for, before JAX starts;
* `hrm_predict`: HRM's prediction for a given policy (the engine's placement: CPU attention, host KV);
  `job_prediction`: the same for the engine's run of given prompts, in waves of at most N;
* `timed_generate`: a warm-up, then one timed `LLM.generate` with the engine's `OffloadStats`;
* `probe_link_bandwidth`, `probe_gpu_layer_seconds`: the per-layer H2D and GPU terms measured alone;
* `measure_policy`: all of the above for one policy, as one result row;
* `markdown_table`, `append_results`, `run_command`, `device_kind`: output.
"""
from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
WARMUP_TOKENS = 2  # the warm-up run generates this many tokens: one prefill and one decode step


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line on stderr with the seconds since the script started."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def set_memory_env(cfg, dtype: str, policies=(None,), pool_gib: int | None = None, codec: str = "none") -> None:
    """XLA memory settings; call before anything touches a JAX device. Values already in the environment win.

    XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB (default `pool_gib`, else what `moe_jax.pinned_pool` sets for the
    largest of `policies`' streamed experts, None meaning all of them, coded as `codec` says): the
    pinned-host pool must hold the streamed experts (its default, 64 GiB, is below Mixtral 8x7B's 84 GiB of
    experts) but not much more (DESIGN.md §3: the pool reserves up to its cap).
    XLA_PYTHON_CLIENT_PREALLOCATE=false: the GPU holds what the engine allocates, so that the peak can be
    compared with the cap and a PyTorch baseline can share the device.
    """
    from moe_jax import pinned_pool

    if pool_gib is None:
        pool_gib = max(pinned_pool.setting_gib(pinned_pool.streamed_bytes(cfg, np.dtype(dtype), p, codec))
                       for p in policies or [None])
    os.environ.setdefault(pinned_pool.LIMIT_VAR, str(pool_gib))
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def open_source(model: str, layers: int | None = None, seed: int = 0):
    """The model (preset name or checkpoint directory); with `layers`, only its first `layers` layers.
    A layer's weights do not depend on the layer count, so layer i is the same as in the full model."""
    from moe_jax.config import ConfigError
    from moe_jax.model_source import ModelNotFound, ModelSource, open_model
    from moe_jax.presets import RandomWeights

    try:
        src = open_model(model, seed=seed)
    except (ModelNotFound, ConfigError) as e:
        raise SystemExit(f"--model: {e}") from None
    if layers is None or layers == src.cfg.num_layers:
        return src
    if not 1 <= layers <= src.cfg.num_layers:
        raise SystemExit(f"--layers must be in 1..{src.cfg.num_layers} for {model}, got {layers}")
    try:
        cfg = src.cfg.replace(num_layers=layers, dense_layers=tuple(i for i in src.cfg.dense_layers if i < layers))
    except ConfigError as e:  # e.g. only dense layers left
        raise SystemExit(f"--layers {layers}: {e}") from None
    weights = RandomWeights(cfg, seed) if isinstance(src.weights, RandomWeights) else src.weights
    return ModelSource(f"{src.name} (first {layers} layers)", cfg, weights, src.tokenizer)


def synthetic_prompts(n: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of uniformly random lengths in [min_len, max_len] and random token ids >= 3
    (above the usual special tokens). The first m of n prompts are the m prompts of the same arguments."""
    lengths = np.random.default_rng([seed, min_len, max_len]).integers(min_len, max_len + 1, n)
    tokens = np.random.default_rng([seed, min_len, max_len, 1])
    return [tokens.integers(3, vocab_size, int(length)).tolist() for length in lengths]


def add_policy_options(ap) -> None:
    """--expert-codec and --kv-cache-dtype, the Policy fields a benchmark's policies all take (`policy_options`)."""
    from moe_jax.offload_policy import CODECS, KV_CACHE_DTYPES

    ap.add_argument("--expert-codec", default="none", choices=CODECS,
                    help="streamed experts as they are, or coded losslessly in 12 bits (exp4; bfloat16)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                    help="host KV cache in the model's dtype, or int8 (lossy; about half the bytes)")


def policy_options(args) -> dict:
    """The Policy fields `add_policy_options` parsed."""
    return {"expert_codec": args.expert_codec, "kv_cache_dtype": args.kv_cache_dtype}


def parse_policy(spec: str, **options):
    """'N,mu,n_ub,rw' -> Policy (batch size, micro-batch size, micro-batches, resident expert fraction) with
    `options` (Policy fields, e.g. `policy_options`)."""
    from moe_jax.offload_policy import Policy

    parts = spec.split(",")
    if len(parts) != 4:
        raise SystemExit(f"a policy is 'auto' or 'N,mu,n_ub,rw', got {spec!r}")
    try:
        return Policy(int(parts[0]), int(parts[1]), int(parts[2]), float(parts[3]), **options)
    except ValueError as e:
        raise SystemExit(f"policy {spec!r}: {e}") from None


def engine_lengths(prompts, gen_len: int, max_positions: int, *, first_n: bool = False):
    """The `JobShape` (lengths and per-batch totals, `hrm_lengths`) HRM plans with for these prompts, each
    generating gen_len tokens: as the engine runs all of them (`moe_jax.offload_engine.hrm_lengths`), or with
    `first_n` for a job of the first n of them, whatever n HRM picks."""
    from moe_jax.offload_engine import hrm_lengths

    return hrm_lengths([len(p) for p in prompts], [gen_len] * len(prompts), max_positions, in_order=first_n)


def resolve_policy(spec: str, cfg, hardware, job, gpu_memory_gb: float, max_batch_size: int | None, dtype: str,
                   *, within_pool: bool = True, **options):
    """The Policy to run under the GPU cap with `options` (Policy fields: expert_codec, kv_cache_dtype): a fixed
    'N,mu,n_ub,rw', or for 'auto' HRM's choice for the workload `job` (a `JobShape`, e.g. `engine_lengths`),
    at most `max_batch_size` sequences, CPU attention as the engine runs it, within the pinned-host pool's cap
    where JAX has fixed it already (`within_pool`; False: HRM's own choice, as if the pool were sized for it)."""
    from moe_jax import hrm, pinned_pool
    from moe_jax.offload_policy import Policy

    if spec == "auto":
        if hardware is None:
            raise SystemExit("policy auto needs an HRM hardware profile: pass --hardware (no known GPU detected)")
        pool = pinned_pool.fixed_cap_bytes() if within_pool else None
        policy = hrm.choose_policy(cfg, hardware, **job._asdict(), gpu_memory_gb=gpu_memory_gb,
                                   pinned_pool_gb=pool / GiB if pool else None, max_batch_size=max_batch_size,
                                   placements=[("cpu", "cpu")], dtype=dtype, **options).policy
    else:
        policy = parse_policy(spec, **options)
    return Policy(**{**policy.__dict__, "gpu_memory_gb": gpu_memory_gb})


def policy_before_jax(spec: str, hardware_name: str | None, resolve):
    """The policy `spec` will run, for sizing the pinned-host pool before JAX starts: `resolve()` (what the
    run will call) for a fixed spec, and for "auto" where the HRM profile is named (with no device to detect
    yet); else None, every expert. An infeasible "auto" gives None too: the run reports it."""
    from moe_jax import hrm

    if spec == "auto" and hardware_name is None:
        return None
    try:
        return resolve()
    except (hrm.InfeasibleError, ValueError):
        return None


def hrm_predict(cfg, hardware, policy, job, dtype: str = "bfloat16") -> dict:
    """`moe_jax.hrm.predict` for `policy` on the workload `job` (a `JobShape`, e.g. `engine_lengths`) as a
    JSON-ready dict: the per-layer decode terms at the job's mean decode context, the decode step, the
    prefill and throughputs, and the GPU and host memory the policy needs (GiB) beside what is usable of the
    policy's GPU cap and of the profile's host memory (`hrm.search`'s GPU_USABLE, HOST_USABLE)."""
    from moe_jax import hrm
    from moe_jax.hrm.search import GPU_USABLE, HOST_USABLE

    hw = hrm.hardware_profile(hardware)
    r = hrm.predict(cfg, hw, policy, dtype=dtype, **job._asdict())
    gpu_cap = policy.gpu_memory_gb * GiB if policy.gpu_memory_gb else hw.gpu_memory
    return {"hardware": hw.name, "per_layer_s": r.per_layer_seconds,
            "bottleneck": r.bottleneck, "step_s": r.step_seconds, "prefill_s": r.prefill_seconds,
            "decode_tok_s": r.decode_tokens_per_s, "tok_s": r.tokens_per_s,
            "gpu_gib": r.gpu_memory_bytes / GiB, "gpu_usable_gib": GPU_USABLE * gpu_cap / GiB,
            "host_gib": r.host_memory_bytes / GiB, "host_usable_gib": HOST_USABLE * hw.host_memory / GiB}


def job_prediction(cfg, hardware, policy, prompts, gen_len: int, dtype: str = "bfloat16") -> dict:
    """`hrm_predict` for the engine's run of `prompts` (each generating up to gen_len tokens) at `policy`: in waves
    of at most N in the engine's admission order (its first fill, then the rows that finish take the next
    prompts), each priced at its own `wave_policy` and lengths, one after the other. One wave: `hrm_predict`'s
    dict for it. Several: the throughputs are the waves' tokens over their summed times (the prefills' and
    decodes'), "prefill_s" their sum, "step_s" and "per_layer_s" their means over the decode steps, the memory
    and bottleneck the first (full) wave's. "waves": the rows of each."""
    from moe_jax.offload_engine import admission_order

    lengths = [len(p) for p in prompts]
    order = admission_order(lengths, [min(gen_len, cfg.max_positions - n) for n in lengths])  # budgets, as `token_budget`
    waves = [order[i:i + policy.batch_size] for i in range(0, len(order), policy.batch_size)]
    preds, steps, rows = [], [], []
    for wave in waves:
        job = engine_lengths([prompts[i] for i in wave], gen_len, cfg.max_positions)
        preds.append(hrm_predict(cfg, hardware, wave_policy(policy, len(wave)), job, dtype))
        steps.append(job.gen_len - 1)  # HRM's decode steps: the first token comes from the prefill
        rows.append(len(wave))
    if len(preds) == 1:
        return {**preds[0], "waves": rows}
    tokens = [n * (s + 1) for n, s in zip(rows, steps)]
    decode_s = [s * p["step_s"] for s, p in zip(steps, preds)]
    mean = lambda f: sum(s * f(p) for s, p in zip(steps, preds)) / max(sum(steps), 1)
    first = preds[0]
    return {**first, "waves": rows, "prefill_s": sum(p["prefill_s"] for p in preds),
            "tok_s": sum(tokens) / sum(t / p["tok_s"] for t, p in zip(tokens, preds)),
            "decode_tok_s": sum(n * s for n, s in zip(rows, steps)) / sum(decode_s) if sum(decode_s) else first["decode_tok_s"],
            "step_s": mean(lambda p: p["step_s"]),
            "per_layer_s": {k: mean(lambda p: p["per_layer_s"][k]) for k in first["per_layer_s"]}}


def over_memory(pred: dict) -> str:
    """What of `hrm_predict`'s memory the policy needs beyond what is usable ("" where it fits)."""
    over = [f"{what} {pred[f'{k}_gib']:.1f} GiB of {pred[f'{k}_usable_gib']:.1f} usable"
            for k, what in (("gpu", "GPU"), ("host", "host")) if pred[f"{k}_gib"] > pred[f"{k}_usable_gib"]]
    return f"does not fit: {', '.join(over)}" if over else ""


def streamed_bytes_per_layer(cfg, policy, dtype: str) -> int:
    """Expert bytes the engine sends to the GPU per layer execution, on average over layers."""
    from moe_jax import pinned_pool

    return pinned_pool.streamed_bytes(cfg, np.dtype(dtype), policy) // cfg.num_layers


def probe_link_bandwidth(mib: int) -> float:
    """Bytes/s of a `device_put` from a pinned_host array to device memory."""
    from moe_jax.hrm.calibrate import link_bandwidth

    return link_bandwidth(mib * 2**20)


def probe_gpu_layer_seconds(source, policy, dtype: str, moe_impl: str) -> float:
    """GPU seconds of one decode layer for every micro-batch, measured alone: the engine's GPU step
    (post-attention with the experts, then the next layer's pre-attention) on μ random rows, n_ub calls
    dispatched back to back, with the first MoE layer's weights in device memory and no copies. Its experts sit in a
    slot array of the engine's size at the engine's slots (`ExpertPages`), as the expert kernel sees them
    there (its cost can grow with the slots of other layers). Run it before building the engine: its
    memory is freed by then and stays out of the engine's peak."""
    import jax
    import jax.numpy as jnp

    from moe_jax import model
    from moe_jax.expert_codec import expert_shapes
    from moe_jax.expert_pages import ExpertPages
    from moe_jax.hrm.calibrate import best_seconds

    cfg, mu = source.cfg, policy.micro_batch_size
    pages = ExpertPages.for_model(cfg, policy.resident_expert_fraction, 1)
    layer = next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i))
    table = jnp.asarray(pages.page_table(layer))
    p = jax.device_put(source.weights.layer(layer, np.dtype(dtype)))
    for name, shape in expert_shapes(cfg).items():
        p[name] = jnp.zeros((pages.num_slots, *shape), dtype).at[table].set(p[name])
    kx, ka = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (mu, 1, cfg.hidden_size), dtype)
    attn = jax.random.normal(ka, (mu, 1, cfg.num_heads, cfg.value_dim), dtype)
    positions = jnp.full((mu, 1), 100, jnp.int32)
    step = jax.jit(lambda p, x, a, pos: model.pre_attention(
        cfg, p, model.post_attention(cfg, p, x, a, expert_slots=table, moe_impl=moe_impl), pos))
    return best_seconds(lambda: jax.block_until_ready(
        [step(p, x, attn, positions) for _ in range(policy.num_micro_batches)]))


def timed_generate(llm, prompts, gen_len: int) -> dict:
    """`LLM.prepare` for the timed run (the offload engine's host KV cache allocated and faulted in, as an
    inference server does at start; its seconds reported apart: "prepare_s", "kv_fault_in_s"), a warm-up run on
    the same prompts (compiles every shape of the run), then the timed run, both on that cache.
    Generation ignores EOS, so every prompt gets exactly `gen_len` tokens. A timed run interrupted (Ctrl-C, or
    gpu_suite's time limit) after its prefill gives what it measured so far, marked "interrupted"."""
    from moe_jax.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=gen_len, ignore_eos=True)
    t0 = time.perf_counter()
    llm.prepare(prompts, params)
    fault_in_s = getattr(getattr(llm.engine, "kv_cache", None), "fault_in_s", None)  # no reference kept to the cache
    kept = {"prepare_s": time.perf_counter() - t0, "kv_fault_in_s": fault_in_s}
    t0 = time.perf_counter()
    llm.generate(prompts, params.replace(max_new_tokens=min(WARMUP_TOKENS, gen_len)))
    warmup_s = time.perf_counter() - t0
    t0, warmup_stats = time.perf_counter(), llm.stats
    kept["warmup_compiles"] = warmup_stats.compiles.compiles
    kept["warmup_compile_s"] = warmup_stats.compiles.seconds
    try:
        out = llm.generate(prompts, params)
    except KeyboardInterrupt:
        st = llm.stats
        if st is None or st is warmup_stats or not st.decode_steps:  # the timed run had not begun decoding
            raise
        log(f"  interrupted after {st.decode_steps} of {gen_len - 1} decode steps: reporting those")
        # Each decode step gives every decoding row a token: all of them when the prompts fill one batch.
        one_batch = len(prompts) <= llm.policy.batch_size
        return {"prompts": len(prompts), "tokens": None, **kept, "warmup_s": warmup_s, "wall_s": time.perf_counter() - t0,
                "prefill_s": st.prefill_s, "decode_s": st.decode_s, "decode_steps": st.decode_steps, "tok_s": None,
                "decode_tok_s": len(prompts) * st.decode_steps / st.decode_s if one_batch else None, "stats": st,
                "completions": [], "interrupted": True}
    wall = time.perf_counter() - t0
    st = llm.stats
    if st.compiles.compiles:  # the warm-up missed a shape: the figures carry the compile's stall
        log(f"  WARNING: the timed run compiled {st.compiles.compiles} new shapes ({st.compiles.seconds:.2f} s) that the "
            f"warm-up did not: its figures include those seconds")
    tokens = sum(len(c.token_ids) for c in out)
    return {"prompts": len(prompts), "tokens": tokens, **kept, "warmup_s": warmup_s, "wall_s": wall,
            "prefill_s": st.prefill_s, "decode_s": st.decode_s, "decode_steps": st.decode_steps,
            "tok_s": tokens / wall,
            # the first token of every prompt comes out of the prefill
            "decode_tok_s": (tokens - len(prompts)) / st.decode_s if st.decode_s else None,
            "prefill_calls": st.prefill_calls, "prefill_write_s": float(st.prefill_write.sum()),
            "prefill_wait_s": float(st.prefill_wait.sum()),
            "compiles": st.compiles.compiles, "compile_s": st.compiles.seconds,
            "stats": st, "completions": out}


def per_layer_terms(run: dict, cfg, policy, dtype: str, link_bw: float, gpu_s: float | None) -> dict:
    """Per layer and decode step, in seconds: the three terms (h2d estimated from the bytes streamed,
    cpu from OffloadStats, gpu from the probe), the engine's waits, and the measured step per layer."""
    st, L = run["stats"], cfg.num_layers
    n = max(st.decode_steps, 1) * L
    return {"h2d_est": streamed_bytes_per_layer(cfg, policy, dtype) / link_bw, "cpu": float(st.cpu.sum()) / n,
            "cpu_kernel": float(st.cpu_kernel.sum()) / n, "cpu_write": float(st.cpu_write.sum()) / n,
            "cpu_handoff": float(st.cpu_handoff.sum()) / n, "cpu_fetch": float(st.cpu_fetch.sum()) / n,
            "gpu_probe": gpu_s, "gpu_wait": float(st.gpu_wait.sum()) / n, "main_wait": float(st.main_wait.sum()) / n,
            "step": st.decode_s / n}


def overlap_efficiency(terms: dict) -> float | None:
    """Measured decode time per layer over the largest of the three terms: 1.0 is perfect overlap."""
    parts = [terms[k] for k in ("h2d_est", "cpu", "gpu_probe") if terms[k] is not None]
    return terms["step"] / max(parts) if parts and terms["step"] else None


def build_llm(source, policy, dtype: str, moe_impl: str, prefetch: str = "split"):
    """An LLM running `policy` (under its GPU cap), and the seconds its weights took to materialise and place."""
    from moe_jax.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(source, dtype=dtype, policy=policy, gpu_memory_gb=policy.gpu_memory_gb, moe_impl=moe_impl,
              prefetch=prefetch)
    return llm, time.perf_counter() - t0


def measure_policy(llm, source, prompts, gen_len: int, *, dtype: str, link_bw: float, hardware,
                   gpu_s: float | None) -> dict:
    """One result row: the timed run, the per-layer terms (gpu_s: `probe_gpu_layer_seconds`, or None),
    the overlap efficiency, peak GPU memory and HRM's prediction for the same policy with measured /
    predicted ratios."""
    cfg, policy = source.cfg, llm.policy
    peak_before = device_peak_bytes()  # the process's high-water mark: the load's, or an earlier engine's or probe's
    run = timed_generate(llm, prompts, gen_len)
    what = "interrupted" if run.get("interrupted") else f"{run['tokens']} tokens"
    fault_in = "" if run["kv_fault_in_s"] is None else f", of it {run['kv_fault_in_s']:.2f} s the KV cache's pages faulted in"
    log(f"  run: {what} in {run['wall_s']:.2f} s (prefill {run['prefill_s']:.2f} s, decode {run['decode_s']:.2f} s); "
        f"before it: prepare {run['prepare_s']:.2f} s{fault_in}, warm-up {run['warmup_s']:.2f} s (of it "
        f"{run['warmup_compile_s']:.2f} s compiling {run['warmup_compiles']} shapes)")
    terms = per_layer_terms(run, cfg, policy, dtype, link_bw, gpu_s)
    peak = run["stats"].peak_gpu_bytes
    row = {"policy": policy_dict(policy), **{k: v for k, v in run.items() if k not in ("stats", "completions")},
           "stats_summary": run["stats"].summary(), "h2d_bytes": run["stats"].h2d_bytes,
           "per_layer_s": terms, "overlap_efficiency": overlap_efficiency(terms),
           "peak_gpu_gib": peak / GiB if peak else None,
           # XLA's peak is never reset: a run that did not raise it peaked at most at the mark before it
           "peak_gpu_at_most": bool(peak and peak_before and peak <= peak_before),
           "host": host_memory(run["stats"], cfg, policy, dtype), "hrm": None, "measured_over_predicted": None}
    if row["peak_gpu_at_most"]:
        log(f"  peak GPU memory: at most {peak / GiB:.2f} GiB (the run did not raise the process's mark, set before it)")
    if hardware is not None:
        try:
            _predicted(row, run, terms, cfg, hardware, policy, prompts, gen_len, dtype)
        except Exception as e:  # the measured figures stand without it
            row["hrm_error"] = f"{type(e).__name__}: {e}"
            log(f"  ERROR: HRM's prediction failed ({row['hrm_error']}): the row has no HRM figures")
    return row


def device_peak_bytes() -> int | None:
    """XLA's high-water mark of the first device's memory in this process (None where it does not say: CPU)."""
    import jax

    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def _predicted(row: dict, run: dict, terms: dict, cfg, hardware, policy, prompts, gen_len: int, dtype: str) -> None:
    """HRM's prediction for the run's policy and the measured / predicted ratios, into `row`."""
    pred = job_prediction(cfg, hardware, policy, prompts, gen_len, dtype)
    row["hrm"] = pred
    row["measured_over_predicted"] = {
        "tok_s": run["tok_s"] / pred["tok_s"] if run["tok_s"] else None,
        "decode_tok_s": run["decode_tok_s"] / pred["decode_tok_s"] if run["decode_tok_s"] else None,
        "step": terms["step"] * cfg.num_layers / pred["step_s"],
        "prefill": run["prefill_s"] / pred["prefill_s"] if pred["prefill_s"] else None,
        **{k: (terms[m] / pred["per_layer_s"][k] if terms[m] is not None and pred["per_layer_s"][k] else None)
           for k, m in (("h2d", "h2d_est"), ("cpu", "cpu"), ("gpu", "gpu_probe"))}}
    calls = run.get("prefill_calls")  # all of them in prefill_s where no request refilled a row
    per_call = (f", {run['prefill_s'] / calls * 1e3:.2f} ms per GPU call of {calls}"
                if calls and not run["stats"].refilled else "")
    log(f"  prefill {run['prefill_s']:.2f} s (HRM: {pred['prefill_s']:.2f} s{per_call}); the prompts' k/v writes took "
        f"{run.get('prefill_write_s', 0):.2f} s of the CPU worker, the waits for them "
        f"{run.get('prefill_wait_s', 0):.2f} s of the dispatching thread")


def host_memory(stats, cfg, policy, dtype: str) -> dict:
    """Host memory of a run, GiB: the KV cache, the experts streamed from the pinned-host pool and the pool's
    cap (it reserves about that, `moe_jax.pinned_pool`), MemAvailable at the end of the run, and the rest of
    the host's memory (total − KV − pool cap − available: the process, JAX's runtime, the OS): the checks of
    the pool model and of the reserve (`hrm.search.HOST_USABLE`) HRM plans with."""
    from moe_jax import pinned_pool

    cap = os.environ.get(pinned_pool.LIMIT_VAR)
    free = stats.host_free_bytes / GiB if stats.host_free_bytes is not None else None
    total = (stats.host_total_bytes if stats.host_total_bytes is not None  # MemTotal then (a VM may grow it)
             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / GiB
    return {"kv_gib": stats.kv_bytes / GiB,
            "streamed_gib": pinned_pool.streamed_bytes(cfg, np.dtype(dtype), policy) / GiB,
            "pool_cap_gib": float(cap) if cap else None, "free_gib": free, "total_gib": total,
            "rest_gib": total - stats.kv_bytes / GiB - float(cap) - free if cap and free is not None else None}


def wave_policy(policy, n: int):
    """The policy of n <= N filled rows as the engine runs it: ceil(n / μ) micro-batches of μ."""
    from moe_jax.offload_policy import Policy

    n_ub = -(-n // policy.micro_batch_size)
    return Policy(**{**policy.__dict__, "batch_size": n, "num_micro_batches": n_ub})


def policy_dict(policy) -> dict:
    return {"batch_size": policy.batch_size, "micro_batch_size": policy.micro_batch_size,
            "num_micro_batches": policy.num_micro_batches,
            "resident_expert_fraction": policy.resident_expert_fraction, "gpu_memory_gb": policy.gpu_memory_gb,
            "expert_codec": policy.expert_codec, "kv_cache_dtype": policy.kv_cache_dtype}


def policy_label(p: dict) -> str:
    codec, kv = p.get("expert_codec", "none"), p.get("kv_cache_dtype", "auto")
    return (f"N={p['batch_size']} μ={p['micro_batch_size']} n_ub={p['num_micro_batches']} "
            f"r_w={p['resident_expert_fraction']:.3g}" + (f" {codec}" if codec != "none" else "")
            + (f" KV {kv}" if kv != "auto" else ""))


def fmt(x, spec: str = ".1f", scale: float = 1.0) -> str:
    return "n/a" if x is None else format(x * scale, spec)


SETUP_HEADER = "load + KV s"


def peak_cell(row: dict) -> str:
    """The run's peak GPU GiB, "≤ X" where the run did not raise the process's mark (`measure_policy`)."""
    return ("≤ " if row.get("peak_gpu_at_most") else "") + fmt(row["peak_gpu_gib"], ".2f")


def setup_cell(row: dict) -> str:
    """Seconds before the timed run: the weights' load, + the host KV cache's allocation faulting its pages in
    (`timed_generate`'s kv_fault_in_s; none where the engine has no host cache)."""
    kv = row.get("kv_fault_in_s")
    return fmt(row["load_s"]) + ("" if kv is None else f" + {kv:.1f}")


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def device_kind() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}: {d.device_kind}"


def detect_hardware_profile(name: str | None):
    """The HRM profile: --hardware, else the detected GPU's, else None (no prediction)."""
    from moe_jax.llm import detect_hardware

    return name or detect_hardware()


# Environment that changes what the benchmarks measure: the host memory the engine plans with, XLA's pinned-host
# pool cap and flags, the host kernel's threads, how CUDA waits (XLA's TF_CUDA_PLATFORM_GPU_DEVICE_SCHEDULE: unset,
# a thread waiting for the GPU spins on its core). `run_command` puts those that are set in front of the command line.
RESULT_ENV = ("MOE_JAX_HOST_MEMORY_GB", "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "XLA_FLAGS", "NUMBA_NUM_THREADS",
              "TF_CUDA_PLATFORM_GPU_DEVICE_SCHEDULE", "MOE_JAX_KV_HUGE_PAGES", "MOE_JAX_HOST_VIEWS")


def run_command() -> str:
    """This script's command line, as run from the repository root, with the `RESULT_ENV` variables set."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in RESULT_ENV if os.environ.get(k)]
    return " ".join([*env, "PYTHONPATH=. python", shlex.join([str(script), *sys.argv[1:]])])


def versions() -> str:
    """The versions that decide what runs: "jax X, jaxlib Y[, commit C]": the commit where the tree is a git
    checkout, else $MOE_JAX_COMMIT (the device machine's copy has no .git: the session that sends it sets that)."""
    from importlib.metadata import version

    try:
        git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
        commit = f", commit {git.stdout.strip()}" if git.returncode == 0 and git.stdout.strip() else ""
    except OSError:  # no git there
        commit = ""
    if not commit and os.environ.get("MOE_JAX_COMMIT"):
        commit = f", commit {os.environ['MOE_JAX_COMMIT']}"
    return f"jax {version('jax')}, jaxlib {version('jaxlib')}{commit}"


def append_results(path: str, title: str, device: str, body: str) -> None:
    """Append a dated section (title, device, exact command, body) to a markdown file."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "a") as f:
        f.write(f"\n### {title}: {date}, {device}, {versions()}\n\n    {run_command()}\n\n{body}\n")
    log(f"appended results to {path}")
