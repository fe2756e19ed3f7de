"""Continuous batching in the offload engine vs waves, on a workload with ragged generation lengths.

The same engine and policy (N rows), the same prompts, each with its own max_new_tokens drawn uniformly
from [--gen-min, --gen-max] (EOS ignored, so runs are comparable):

  * continuous: one `generate` call with every request; rows of finished requests take waiting ones;
  * waves: the requests, longest prompts first, cut into groups of N, one `generate` call per group
    (what the engine did before continuous batching, and what a caller batching by hand gets).

Reports generated tok/s of each (best of --repeats), decode steps, and their ratio. The first round
compiles what its calls need (each wave and each refill prefills its own prompt buckets; a short warm-up
run covers only the first wave's), so the best of at least two rounds counts: --repeats must be >= 2.

  PYTHONPATH=. python scripts/bench_continuous_batching.py [--model mixtral-8x7b --layers 4] \\
      [--policy N,mu,n_ub,rw] [--num-prompts 3N] [--gen-min 8 --gen-max 128] [--append-results]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import bench_common as bc
import numpy as np

DEFAULT_RESULTS = str(bc.ROOT / "benchmarks" / "RESULTS.md")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mixtral-8x7b", help="preset name or checkpoint directory")
    ap.add_argument("--layers", type=int, help="run only the model's first N layers")
    ap.add_argument("--policy", default="64,32,2,0", help="fixed offload policy 'N,mu,n_ub,rw' (default 64,32,2,0)")
    ap.add_argument("--gpu-memory-gb", type=float, default=16.0, help="GPU memory cap, GiB (default 16)")
    ap.add_argument("--num-prompts", type=int, help="requests (default 3 N)")
    ap.add_argument("--prompt-min", type=int, default=20, help="shortest prompt, tokens (default 20)")
    ap.add_argument("--prompt-max", type=int, default=134, help="longest prompt, tokens (default 134)")
    ap.add_argument("--gen-min", type=int, default=8, help="fewest tokens a request generates (default 8)")
    ap.add_argument("--gen-max", type=int, default=128, help="most tokens a request generates (default 128)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds of each mode, >= 2 (the first also compiles); the best counts (default 2)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--moe-impl", default="auto", help="expert kernel (pallas_kernels.moe_ffn impl)")
    bc.add_policy_options(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--append-results", nargs="?", const=DEFAULT_RESULTS, metavar="FILE",
                    help=f"append the table to FILE (default {DEFAULT_RESULTS})")
    args = ap.parse_args(argv)
    if args.policy.strip() == "auto":
        ap.error("--policy takes a fixed 'N,mu,n_ub,rw' here (both modes must run the same rows)")
    if args.repeats < 2:
        ap.error(f"--repeats must be at least 2 (the first round also compiles), got {args.repeats}")
    if not 1 <= args.gen_min <= args.gen_max:
        ap.error(f"need 1 <= --gen-min <= --gen-max, got {args.gen_min} and {args.gen_max}")
    return args


def waves_of(prompts, n: int) -> list[list[int]]:
    """Request indices, longest prompt first, in groups of n."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[w:w + n] for w in range(0, len(order), n)]


def timed(llm, prompts, params, groups) -> dict:
    """Best-of-repeats generated tok/s of running `groups` of request indices, one generate call each."""
    t0 = time.perf_counter()
    tokens = steps = 0
    for g in groups:
        outs = llm.generate([prompts[i] for i in g], [params[i] for i in g])
        tokens += sum(len(o.token_ids) for o in outs)
        steps += llm.stats.decode_steps
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "decode_steps": steps}


def main(argv=None) -> int:
    args = parse_args(argv)
    from moe_jax.sampling import SamplingParams

    source = bc.open_source(args.model, args.layers, args.seed)
    policy = dataclasses.replace(bc.parse_policy(args.policy, **bc.policy_options(args)),
                                 gpu_memory_gb=args.gpu_memory_gb)
    bc.set_memory_env(source.cfg, args.dtype, [policy], codec=args.expert_codec)
    n = args.num_prompts or 3 * policy.batch_size
    prompts = bc.synthetic_prompts(n, args.prompt_min, args.prompt_max, source.cfg.vocab_size, args.seed)
    gens = np.random.default_rng([args.seed, 7]).integers(args.gen_min, args.gen_max + 1, n)
    params = [SamplingParams(max_new_tokens=int(g), ignore_eos=True) for g in gens]
    llm, load_s = bc.build_llm(source, policy, args.dtype, args.moe_impl)
    bc.log(f"{source.name} on {bc.device_kind()}: {policy}; {n} requests, prompts {args.prompt_min}-"
           f"{args.prompt_max}, gen {args.gen_min}-{args.gen_max} ({int(gens.sum())} tokens); load {load_s:.1f} s")
    llm.generate(prompts[:policy.batch_size], [p.replace(max_new_tokens=2) for p in params[:policy.batch_size]])
    modes = {"continuous": [list(range(n))], "waves": waves_of(prompts, policy.batch_size)}
    best = {}
    for _ in range(args.repeats):
        for mode, groups in modes.items():
            r = timed(llm, prompts, params, groups)
            bc.log(f"  {mode}: {r['tokens']} tokens in {r['seconds']:.2f} s = {r['tok_s']:.1f} tok/s, "
                   f"{r['decode_steps']} decode steps")
            if mode not in best or r["tok_s"] > best[mode]["tok_s"]:
                best[mode] = r
    rows = [[mode, str(r["tokens"]), bc.fmt(r["seconds"], ".2f"), bc.fmt(r["tok_s"]), str(r["decode_steps"])]
            for mode, r in best.items()]
    ratio = best["continuous"]["tok_s"] / best["waves"]["tok_s"]
    steps = best["waves"]["decode_steps"] / max(best["continuous"]["decode_steps"], 1)
    body = (bc.markdown_table(["mode", "tokens", "seconds", "tok/s", "decode steps"], rows)
            + f"\n\ncontinuous / waves: {ratio:.2f}x tok/s, {steps:.2f}x fewer decode steps "
              f"(lower bound on steps: {int(np.ceil(gens.sum() / policy.batch_size))})")
    print(f"\n## bench_continuous_batching: {source.name}, {policy}\n\n{body}")
    if args.append_results:
        bc.append_results(args.append_results, "Continuous batching vs waves", bc.device_kind(), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
