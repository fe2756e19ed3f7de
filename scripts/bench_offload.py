"""Benchmark the offload engine (CGOPipe) on one model under a GPU memory cap, for one or more policies.

Default: Mixtral 8x7B shapes (random bf16 weights, all 32 layers), 16 GiB GPU cap, HRM's policy,
synthetic prompts of 77 tokens, 64 generated tokens each (EOS ignored), as many prompts as the
policy's batch. For each policy: the weights are materialised and placed (load time, printed apart),
a warm-up run on the same prompts compiles every shape, then the timed run gives

  * generated tok/s end to end (prefill + decode wall time) and decode only;
  * per layer and decode step: H2D seconds (an estimate: the expert bytes streamed per layer over the
    link bandwidth measured at start), CPU attention seconds (OffloadStats), GPU seconds (a probe
    before the engine is built: the layer's GPU step for all micro-batches, alone), the engine's waits,
    the step;
  * overlap efficiency: decode time per layer / the largest of the three terms (goal <= 1.1);
  * peak GPU memory (JAX's peak_bytes_in_use) vs the cap;
  * HRM's prediction for the same policy and measured / predicted.

  PYTHONPATH=. python scripts/bench_offload.py [--layers 4] [--policies "auto;64,64,1,0"] [--json R.json]
      [--append-results [benchmarks/RESULTS.md]]

Loading Mixtral 8x7B takes about a second per layer on the GPU machine; a device command has 10
minutes, so one full-size policy per command, or truncate with --layers. Ctrl-C (or the suite's
timeout) stops after the current step and still prints the table of what was measured.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback

import bench_common as bc

DEFAULT_RESULTS = str(bc.ROOT / "benchmarks" / "RESULTS.md")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mixtral-8x7b", help="preset name or checkpoint directory")
    ap.add_argument("--layers", type=int, help="run only the model's first N layers (quick runs)")
    ap.add_argument("--gpu-memory-gb", type=float, default=16.0, help="GPU memory cap, GiB (default 16)")
    ap.add_argument("--policy", default="auto", help="'auto' (HRM's choice) or 'N,mu,n_ub,rw'")
    ap.add_argument("--batch-size", type=int, help="a fixed policy: N sequences (overrides --policy)")
    ap.add_argument("--micro-batch-size", type=int, help="fixed policy: μ (default ceil(N / n_ub))")
    ap.add_argument("--num-micro-batches", type=int, help="fixed policy: n_ub (default ceil(N / μ), or 1)")
    ap.add_argument("--resident-fraction", type=float, default=0.0, help="fixed policy: r_w (default 0)")
    ap.add_argument("--policies", help="several policies in one run, ';'-separated, each 'auto' or 'N,mu,n_ub,rw' "
                                       "(overrides --policy and the fixed-policy flags)")
    ap.add_argument("--hardware", help="HRM profile name or JSON file (default: detected from the GPU); "
                                       "without one there is no HRM choice or prediction")
    ap.add_argument("--max-batch-size", type=int, help="cap on HRM's batch (default: --num-prompts if given)")
    ap.add_argument("--prompt-len", type=int, default=77, help="tokens per synthetic prompt (default 77)")
    ap.add_argument("--gen-len", type=int, default=64, help="tokens generated per prompt (default 64)")
    ap.add_argument("--num-prompts", type=int, help="prompts per run (default: the policy's batch size)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--moe-impl", default="auto", help="expert kernel (pallas_kernels.moe_ffn impl)")
    ap.add_argument("--prefetch", default="split", choices=("split", "whole"),
                    help="next layer's experts: one chunk per micro-batch step, or all in the first step")
    bc.add_policy_options(ap)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and the prompts")
    ap.add_argument("--link-probe-mib", type=int, default=512, help="size of the link bandwidth probe (MiB)")
    ap.add_argument("--no-gpu-probe", action="store_true", help="skip the GPU-term probe of each policy")
    ap.add_argument("--host-pool-gb", type=int, help="XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB (default: the streamed experts + 5%% + 2)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--append-results", nargs="?", const=DEFAULT_RESULTS, metavar="FILE",
                    help=f"append the table to FILE (default {DEFAULT_RESULTS})")
    args = ap.parse_args(argv)
    for flag in ("prompt_len", "gen_len", "num_prompts"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    return args


def policy_specs(args) -> list[str]:
    """Policies to run, each 'auto' or 'N,mu,n_ub,rw'."""
    if args.policies:
        return [s.strip() for s in args.policies.split(";") if s.strip()]
    if args.batch_size is None:
        return [args.policy]
    N, mu, n_ub = args.batch_size, args.micro_batch_size, args.num_micro_batches
    if mu is None:
        n_ub = n_ub or 1
        mu = -(-N // n_ub)
    elif n_ub is None:
        n_ub = -(-N // mu)
    return [f"{N},{mu},{n_ub},{args.resident_fraction}"]


def resolve(spec: str, cfg, args, hardware):
    """The Policy of `spec` for this run's workload (HRM's choice for "auto")."""
    from moe_jax.offload_engine import hrm_lengths

    # every prompt alike: prompt + budget KV positions each, for any batch size
    job = hrm_lengths([args.prompt_len], [args.gen_len], cfg.max_positions)._replace(
        kv_positions=None, prompt_positions=None, prefill_positions=None, prefill_peak_positions=None)
    return bc.resolve_policy(spec, cfg, hardware, job, args.gpu_memory_gb, args.max_batch_size or args.num_prompts,
                             args.dtype, **bc.policy_options(args))


def run_policy(spec: str, source, args, hardware, link_bw: float) -> dict:
    """Build the engine for one policy, run it, free it; returns the result row (with 'error' on failure, the
    traceback on stderr, and the next policy goes on)."""
    from moe_jax import hrm

    cfg = source.cfg
    try:
        policy = resolve(spec, cfg, args, hardware)
    except (hrm.InfeasibleError, ValueError) as e:
        return {"spec": spec, "error": f"{type(e).__name__}: {e}"}
    n = args.num_prompts or policy.batch_size
    prompts = bc.synthetic_prompts(n, args.prompt_len, args.prompt_len, cfg.vocab_size, args.seed)
    bc.log(f"policy {spec}: {policy}; {n} prompts of {args.prompt_len} tokens, {args.gen_len} generated each")
    llm = None
    try:
        gpu_s = None if args.no_gpu_probe else bc.probe_gpu_layer_seconds(source, policy, args.dtype, args.moe_impl)
        llm, load_s = bc.build_llm(source, policy, args.dtype, args.moe_impl, args.prefetch)
        bc.log(f"  load: {load_s:.1f} s ({cfg.num_layers} layers materialised and placed)")
        row = bc.measure_policy(llm, source, prompts, args.gen_len, dtype=args.dtype, link_bw=link_bw,
                                hardware=hardware, gpu_s=gpu_s)
    except Exception as e:
        bc.log(f"  ERROR: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        return {"spec": spec, "policy": bc.policy_dict(policy), "error": f"{type(e).__name__}: {e}"}
    finally:
        del llm
        gc.collect()
    row.update(spec=spec, load_s=load_s)
    bc.log(f"  {row['stats_summary']}")
    return row


TABLE_HEADERS = ["policy", bc.SETUP_HEADER, "tok/s e2e", "tok/s decode", "H2D est. ms", "CPU ms (kernel/writes/hand-off/fetch)", "GPU ms", "step ms",
                 "overlap", "peak GiB / cap", "host GiB KV / pool / free / rest", "HRM tok/s", "e2e meas/HRM",
                 "HRM H2D/CPU/GPU ms"]


def table_row(r: dict, cap: float) -> list[str]:
    if "error" in r:
        label = bc.policy_label(r["policy"]) if "policy" in r else r["spec"]
        return [label, r["error"].splitlines()[0][:120]] + [""] * (len(TABLE_HEADERS) - 2)
    t, h = r["per_layer_s"], r["hrm"]
    hrm_terms = "/".join(bc.fmt(h["per_layer_s"][k], ".1f", 1e3) for k in ("h2d", "cpu", "gpu")) if h else "n/a"
    label = ("HRM: " if r["spec"] == "auto" else "") + bc.policy_label(r["policy"]) + (
        f" (interrupted after {r['decode_steps']} decode steps)" if r.get("interrupted") else "")
    return [label, bc.setup_cell(r), bc.fmt(r["tok_s"]), bc.fmt(r["decode_tok_s"]),
            bc.fmt(t["h2d_est"], ".2f", 1e3), f'{bc.fmt(t["cpu"], ".2f", 1e3)} ({bc.fmt(t["cpu_kernel"], ".2f", 1e3)}/{bc.fmt(t["cpu_write"], ".2f", 1e3)}/'
            f'{bc.fmt(t["cpu_handoff"], ".2f", 1e3)}/{bc.fmt(t["cpu_fetch"], ".2f", 1e3)})',
            bc.fmt(t["gpu_probe"], ".2f", 1e3), bc.fmt(t["step"], ".2f", 1e3), bc.fmt(r["overlap_efficiency"], ".2f"),
            f"{bc.peak_cell(r)} / {cap:g}",
            f"{bc.fmt(r['host']['kv_gib'])} / {bc.fmt(r['host']['pool_cap_gib'], '.0f')} / {bc.fmt(r['host']['free_gib'])}"
            f" / {bc.fmt(r['host']['rest_gib'])}",
            bc.fmt(h and h["tok_s"]),
            bc.fmt(r["measured_over_predicted"] and r["measured_over_predicted"]["tok_s"], ".2f"), hrm_terms]


NOTES = """Per layer and decode step. H2D est.: expert bytes streamed per layer / link bandwidth measured
at start (the engine does not time its copies). CPU: attention in the worker thread (OffloadStats), in
brackets the attention kernel's calls alone / the k/v writes into the host cache / the outputs' hand-off to pinned memory / the fetch of the GPU's q/k/v as NumPy arrays (the rest: the rows' lengths, Python; the wait for q/k/v to be ready is not CPU time). GPU: the layer's GPU step for all micro-batches, timed alone.
step: decode wall time per layer.
overlap: step / max(H2D, CPU, GPU), 1.0 = perfect overlap. peak: JAX's peak_bytes_in_use, which
cannot be reset: "≤ X" where the run did not raise the mark set before it (an earlier policy's, or a probe's). host: the KV
cache, the pinned-host pool's cap (XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB; HRM counts the pool at its cap),
MemAvailable at the end of the run and the rest of the host's memory (the process, JAX, the OS: what
HRM's HOST_USABLE leaves for it). HRM: prediction for the same policy (engine placement: CPU
attention, host KV) on the profile named above."""


def main(argv=None) -> int:
    args = parse_args(argv)
    source = bc.open_source(args.model, args.layers, args.seed)
    specs = policy_specs(args)
    bc.set_memory_env(source.cfg, args.dtype, [bc.policy_before_jax(s, args.hardware, lambda: resolve(
        s, source.cfg, args, args.hardware)) for s in specs], args.host_pool_gb, args.expert_codec)
    hardware = bc.detect_hardware_profile(args.hardware)
    device = bc.device_kind()
    link_bw = bc.probe_link_bandwidth(args.link_probe_mib)
    bc.log(f"{source.name} on {device}: link {link_bw / 1e9:.1f} GB/s (pinned host -> device), "
           f"HRM profile {hardware or 'none'}, GPU cap {args.gpu_memory_gb:g} GiB")
    rows, interrupted = [], False
    try:
        for spec in specs:
            rows.append(run_policy(spec, source, args, hardware, link_bw))
            if rows[-1].get("interrupted"):  # its decode steps so far are in the row; stop here
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
        bc.log("interrupted: reporting what was measured")
    title = (f"bench_offload: {source.name}, GPU cap {args.gpu_memory_gb:g} GiB, prompt {args.prompt_len}, "
             f"gen {args.gen_len}")
    table = bc.markdown_table(TABLE_HEADERS, [table_row(r, args.gpu_memory_gb) for r in rows])
    footer = (f"link {link_bw / 1e9:.1f} GB/s; HRM profile: {hardware or 'none'}"
              + ("; INTERRUPTED (timeout): later policies not run" if interrupted else ""))
    body = f"{table}\n\n{footer}\n\n{NOTES}"
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": bc.run_command(), "device": device, "model": source.name,
                       "layers": source.cfg.num_layers, "gpu_memory_gb": args.gpu_memory_gb,
                       "prompt_len": args.prompt_len, "gen_len": args.gen_len, "hardware": hardware,
                       "link_bytes_per_s": link_bw, "interrupted": interrupted, "runs": rows}, f, indent=1)
    if args.append_results:
        bc.append_results(args.append_results, title, device, body)
    print(f"\n## {title} ({device})\n\n{body}")
    return 130 if interrupted else int(any("error" in r for r in rows))


if __name__ == "__main__":
    sys.exit(main())
