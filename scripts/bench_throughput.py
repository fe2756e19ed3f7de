"""End-to-end throughput on the paper's workloads (MoE-Lightning §5), synthetic prompts, random weights.

Metric (the paper's): generated tokens / (prefill + decode wall time), EOS ignored; also decode-only
tok/s. For every GPU cap x workload x policy ('auto' = HRM's choice for that workload, or a fixed
'N,mu,n_ub,rw'): a warm-up, the timed run, HRM's prediction for the same policy (measured/predicted),
the overlap efficiency (see bench_offload.py), and, where a published figure has the same model and
workload (PUBLISHED), our figure on its metric normalised to its link (ours x their link / our measured
link) over theirs: MoE-Lightning's 294.5 tok/s (Mixtral 8x7B, L4, MTBench gen 64, prefill + decode) and
MoE-Gen's 469 decode tok/s (Mixtral 8x7B, A5000 24 GB, prompt 512, gen 256).

Workloads (prompt lengths uniform in a range; no dataset is downloaded; ':G' sets the generation length):
  mtbench        20..134 tokens (mean 77, MTBench's), gen 32/64/128/256 in the paper (default 64)
  reasoning      192..256 tokens (the paper's synthetic reasoning: prompts <= 256), gen 50
  summarization  1536..1984 tokens (prompts <= 1984), gen 64
  moegen         512 tokens, gen 256 (the setting of MoE-Gen's published figures)

Baseline (first, in a subprocess: scripts/hf_baseline.py): transformers `generate` with accelerate
CPU offload under the first GPU cap, on the same random weights, truncated to --baseline-layers layers
and scaled to the full model, on a workload small enough to finish (--baseline-batch prompts of
--baseline-workload's lengths, --baseline-gen-len tokens each); then ours on the same prompts, with
the first policy ('auto': HRM's choice for that workload). --workloads "" runs only this comparison.
Prints markdown tables last; --plot writes a bar chart.

  PYTHONPATH=. python scripts/bench_throughput.py [--model mixtral-8x7b|dbrx] [--workloads mtbench:64,mtbench:128]
      [--gpu-memory-gb 16,24] [--policies "auto;N,mu,n_ub,rw"] [--no-baseline] [--json R.json] [--plot R.png]
      [--append-results [FILE]]

Loading Mixtral 8x7B takes about a second per layer and each new policy reloads it, unless it differs only in
N and μ (the loaded engine is rebatched); --keep-engine runs the later workloads at a cap on the engine loaded
for the first (HRM's best N and μ for it, HRM's own best policy reported beside): keep one device command (10
minutes) to one or two runs of the full model. Ctrl-C reports what was measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import bench_common as bc

WORKLOADS = {"mtbench": (20, 134, 64), "reasoning": (192, 256, 50), "summarization": (1536, 1984, 64),
             "moegen": (512, 512, 256)}
POOL_PROMPTS = 8192  # HRM's batch at most this many prompts when neither --max-batch-size nor --num-prompts says
# Published figures to compare with where model and workload are the same: theirs on `metric` (a key of our
# rows) at their host-to-device link (bytes/s).
PUBLISHED = (
    {"system": "MoE-Lightning", "value": 294.5, "metric": "tok_s", "link": 16e9, "model": "mixtral-8x7b",
     "workload": ("mtbench", 64), "source": "paper (ASPLOS 2025): L4 24 GB, 16 GB/s link, prefill + decode"},
    {"system": "MoE-Gen", "value": 469.0, "metric": "decode_tok_s", "link": 25e9, "model": "mixtral-8x7b",
     "workload": ("moegen", 256), "source": "README of github.com/EfficientMoE/MoE-Gen: A5000 24 GB, decode only; "
     "link not published (PCIe 4.0 x16): 25 GB/s assumed"},
)
DEFAULT_RESULTS = str(bc.ROOT / "benchmarks" / "RESULTS.md")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mixtral-8x7b", help="preset name (mixtral-8x7b, dbrx, ...)")
    ap.add_argument("--layers", type=int, help="run only the model's first N layers")
    ap.add_argument("--workloads", default="mtbench:64", help="comma-separated NAME[:GEN] "
                                                             f"({', '.join(WORKLOADS)}; default mtbench:64)")
    ap.add_argument("--gpu-memory-gb", default="16", help="comma-separated GPU caps, GiB (16: T4-class, 24: L4-class)")
    ap.add_argument("--policies", default="auto", help="';'-separated, each 'auto' (HRM) or 'N,mu,n_ub,rw'")
    ap.add_argument("--num-prompts", type=int, help="prompts per run (default: the policy's batch size)")
    ap.add_argument("--max-batch-size", type=int, help="cap on HRM's batch (default: --num-prompts if given)")
    ap.add_argument("--hardware", help="HRM profile name or JSON file (default: detected from the GPU)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--moe-impl", default="auto", help="expert kernel (pallas_kernels.moe_ffn impl)")
    bc.add_policy_options(ap)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and the prompts")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the PyTorch baseline")
    ap.add_argument("--baseline-layers", type=int, default=2, help="layers of the truncated baseline model")
    ap.add_argument("--baseline-workload", default="mtbench", choices=tuple(WORKLOADS),
                    help="prompt length distribution of the baseline workload (default mtbench)")
    ap.add_argument("--baseline-batch", type=int, default=64, help="prompts of the baseline workload")
    ap.add_argument("--baseline-gen-len", type=int, default=16, help="tokens per prompt, baseline workload")
    ap.add_argument("--baseline-timeout-s", type=int, default=300, help="give up on the baseline after this")
    ap.add_argument("--baseline-require-offload", action="store_true",
                    help="the baseline fails where accelerate's CPU offload cannot run, rather than run on the CPU")
    ap.add_argument("--link-probe-mib", type=int, default=512, help="size of the link bandwidth probe (MiB)")
    ap.add_argument("--no-gpu-probe", action="store_true", help="skip the GPU-term probe of each run")
    ap.add_argument("--host-pool-gb", type=int, help="XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB (default: the streamed experts + 5%% + 2)")
    ap.add_argument("--keep-engine", action="store_true",
                    help="'auto' runs after the first run loaded at a cap keep its engine (HRM's best N and μ for "
                         "that engine's micro-batch count and resident experts; no reload), HRM's own best policy "
                         "for each reported beside")
    ap.add_argument("--predict-only", action="store_true",
                    help="print HRM's policy and predictions for each run (needs --hardware) and run nothing")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a bar chart (PNG) here")
    ap.add_argument("--append-results", nargs="?", const=DEFAULT_RESULTS, metavar="FILE",
                    help=f"append the tables to FILE (default {DEFAULT_RESULTS})")
    args = ap.parse_args(argv)
    for flag in ("num_prompts", "max_batch_size", "baseline_batch", "baseline_gen_len", "baseline_layers",
                 "baseline_timeout_s", "link_probe_mib", "host_pool_gb"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.predict_only and not args.hardware:
        ap.error("--predict-only needs --hardware (the HRM profile to predict with)")
    if args.hardware:  # before any minute is spent: a typo found after a timed run would cost its prediction
        from moe_jax.hrm import HardwareError, hardware_profile

        try:
            hardware_profile(args.hardware)
        except HardwareError as e:
            ap.error(f"--hardware: {e}")
    args.specs = [s.strip() for s in args.policies.split(";") if s.strip()]
    if not args.specs:
        ap.error(f"--policies names no policy: {args.policies!r}")
    for spec in args.specs:
        if spec != "auto":
            try:
                bc.parse_policy(spec, **bc.policy_options(args))
            except SystemExit as e:
                ap.error(f"--policies: {e.code}")
    return args


def parse_workloads(spec: str) -> list[tuple[str, int]]:
    out = []
    for item in filter(str.strip, spec.split(",")):
        name, _, gen = item.strip().partition(":")
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r} (workloads: {', '.join(WORKLOADS)})")
        if gen and not (gen.isdigit() and int(gen) > 0):
            raise SystemExit(f"workload {item.strip()!r}: the generation length must be a positive integer")
        out.append((name, int(gen) if gen else WORKLOADS[name][2]))
    return out


def parse_caps(spec: str) -> list[float]:
    try:
        caps = [float(c) for c in spec.split(",")]
    except ValueError:
        raise SystemExit(f"--gpu-memory-gb takes comma-separated GiB, got {spec!r}") from None
    if not all(0 < c < float("inf") for c in caps):
        raise SystemExit(f"--gpu-memory-gb caps must be positive, got {spec!r}")
    return caps


def predictions(args, cfg, caps, workloads, specs) -> str:
    """HRM's policy and predictions for every run this command would make, as a markdown table (no device
    used): what RESULTS.md's prediction tables quote, with the command that made them."""
    from moe_jax import hrm

    link = hrm.hardware_profile(args.hardware).link_bandwidth
    rows, first_at = [], {}
    for cap in caps:
        for workload, gen_len in workloads:
            for spec in specs:
                head = [workload, str(gen_len), f"{cap:g}"]
                loaded = first_at.get(cap) if args.keep_engine and spec == "auto" else None
                try:
                    policy = policy_for(args, cfg, args.hardware, cap, workload, gen_len, spec, loaded)
                    own = policy_for(args, cfg, args.hardware, cap, workload, gen_len, spec) if loaded else policy
                except (hrm.InfeasibleError, ValueError) as e:
                    rows.append(head + [f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"] + [""] * 5)
                    continue
                first_at.setdefault(cap, policy)
                prompts = workload_prompts(workload, args.num_prompts or policy.batch_size, cfg.vocab_size, args.seed)
                pred = bc.job_prediction(cfg, args.hardware, policy, prompts, gen_len, args.dtype)
                terms = " / ".join(f"{pred['per_layer_s'][k] * 1e3:.1f}" for k in ("h2d", "cpu", "gpu"))
                label = bc.policy_label(bc.policy_dict(policy))
                if pred["waves"] != [policy.batch_size]:  # fewer prompts than N, or refills after the first N
                    label += f" (runs {' + '.join(map(str, pred['waves']))} rows)"
                if own != policy:
                    label += beside_own(hrm_own(args, cfg, args.hardware, workload, gen_len, own, ON_LOADED_ENGINE))
                if bc.over_memory(pred):  # a fixed policy: HRM predicts it without memory limits
                    label += f" ({bc.over_memory(pred)})"
                bound = pred["bottleneck"]
                if spec == "auto" and host_limits_batch(args, cfg, args.hardware, cap, workload, gen_len, own):
                    bound += "; N: host memory for KV"
                rows.append(head + [label, bc.fmt(pred["tok_s"]),
                                    bc.fmt(pred["decode_tok_s"]), terms, bound,
                                    bc.fmt(pred["tok_s"] * 16e9 / link)])
    return bc.markdown_table(["workload", "gen", "cap GiB", "policy", "HRM tok/s e2e", "HRM tok/s decode",
                              "per layer H2D / CPU / GPU ms", "bound", "e2e x 16 GB/s / profile link"], rows)


def workload_prompts(name: str, n: int, vocab_size: int, seed: int) -> list[list[int]]:
    lo, hi, _ = WORKLOADS[name]
    return bc.synthetic_prompts(n, lo, hi, vocab_size, seed)


def run_baseline(args, prompts, cap: float) -> dict:
    """scripts/hf_baseline.py in a subprocess (JAX kept off the GPU there); its JSON, or {'error': ...}."""
    with tempfile.TemporaryDirectory(prefix="bench_baseline_") as tmp:
        prompt_file, out = Path(tmp) / "prompts.json", Path(tmp) / "baseline.json"
        prompt_file.write_text(json.dumps(prompts))
        cmd = [sys.executable, str(bc.ROOT / "scripts" / "hf_baseline.py"), "--model", args.model,
               "--layers", str(args.baseline_layers), "--prompts", str(prompt_file),
               "--gen-len", str(args.baseline_gen_len), "--gpu-memory-gb", str(cap), "--dtype", args.dtype,
               "--seed", str(args.seed), "--json", str(out), *(["--require-offload"] if args.baseline_require_offload else [])]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{bc.ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        bc.log(f"baseline: {' '.join(cmd[1:])}")
        try:
            p = subprocess.run(cmd, cwd=bc.ROOT, env=env, capture_output=True, text=True,
                               timeout=args.baseline_timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.baseline_timeout_s} s"}
        if p.returncode != 0:
            return {"error": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}",
                    "stderr_tail": p.stderr[-3000:]}
        return json.loads(out.read_text())


def policy_for(args, cfg, hardware, cap: float, workload: str, gen_len: int, spec: str, loaded=None,
               within_pool: bool = True):
    """The Policy of `spec` for one workload under one cap; for "auto", HRM's for the run's prompts: the
    --num-prompts of the workload, or without it a job of the first N (N at most --max-batch-size or
    POOL_PROMPTS), with a `loaded` policy (--keep-engine) the best N and μ on its layout (`layout`), and within
    the pinned pool's cap where JAX has fixed it (`within_pool`; False: HRM's own choice)."""
    n = args.num_prompts or args.max_batch_size or POOL_PROMPTS
    job = bc.engine_lengths(workload_prompts(workload, n, cfg.vocab_size, args.seed), gen_len, cfg.max_positions,
                            first_n=not args.num_prompts)
    kept = layout(loaded) if loaded is not None and spec == "auto" else {}
    return bc.resolve_policy(spec, cfg, hardware, job, cap, args.max_batch_size or n, args.dtype,
                             within_pool=within_pool, **bc.policy_options(args), **kept)


def layout(policy) -> dict:
    """What HRM keeps of a loaded engine's policy to search only its batch (`hrm.choose_policy`'s arguments)."""
    return {"num_micro_batches": policy.num_micro_batches,
            "resident_expert_fraction": policy.resident_expert_fraction}


ON_LOADED_ENGINE = "on the loaded engine"  # why a run's "auto" policy is not HRM's own (`hrm_own`)
WITHIN_POOL = "within the pinned pool sized at start for this command's largest run"


def hrm_own(args, cfg, hardware, workload: str, gen_len: int, own, why: str) -> dict:
    """HRM's own policy for a workload whose run took another (`why`: ON_LOADED_ENGINE, WITHIN_POOL), with its
    prediction."""
    prompts = workload_prompts(workload, args.num_prompts or own.batch_size, cfg.vocab_size, args.seed)
    return {"policy": bc.policy_dict(own), "tok_s": bc.job_prediction(cfg, hardware, own, prompts, gen_len, args.dtype)["tok_s"],
            "why": why}


def host_limits_batch(args, cfg, hardware, cap: float, workload: str, gen_len: int, own) -> bool:
    """Whether host memory (the KV cache's, beside the pinned pool's experts) caps the batch of HRM's own policy
    `own` for this workload: with twice the profile's host memory HRM would take more sequences."""
    from moe_jax import hrm

    hw = hrm.hardware_profile(hardware)
    more = dataclasses.replace(hw, host_memory=2 * hw.host_memory)
    try:
        return policy_for(args, cfg, more, cap, workload, gen_len, "auto", within_pool=False).batch_size > own.batch_size
    except (hrm.InfeasibleError, ValueError):
        return False


def beside_own(own: dict) -> str:
    """What a policy label adds for a run that did not take HRM's own policy (`hrm_own`)."""
    return f" {own['why']} (HRM's own: {bc.policy_label(own['policy'])}, {own['tok_s']:.1f} tok/s)"


class Runner:
    """Runs (cap, workload, policy) combinations, reusing the engine while the policy stays the same. A run that
    fails gives a row with its error (the traceback on stderr), and the next run goes on. Each run's GPU probe
    runs before its engine is loaded, or for a run on a kept engine (--keep-engine) before the cap's first load,
    so that no engine's memory stands beside a probe's in the process's peak, which the rows report."""

    def __init__(self, args, source, hardware, link_bw: float, runs):
        self.args, self.source, self.hardware, self.link_bw = args, source, hardware, link_bw
        self.runs = runs  # (cap, workload, gen_len, spec), in the order `run` takes them
        self.llm, self.load_s = None, 0.0
        self.first_at = {}  # --keep-engine: the policy of the first workload run at each cap
        self.probes = {}  # policy -> GPU seconds of one decode layer (`bc.probe_gpu_layer_seconds`)

    def reusable(self, policy) -> bool:
        """Whether the loaded engine runs `policy` as it is or rebatched (only N and μ differ)."""
        from moe_jax.offload_engine import layout_changes

        return self.llm is not None and (self.llm.policy == policy or not layout_changes(self.llm.policy, policy))

    def engine_for(self, policy):
        """The engine for `policy`: the loaded one as it is, or rebatched where only N and μ differ, else a new one."""
        if self.reusable(policy):
            if self.llm.policy != policy:
                self.llm.rebatch(policy)
                bc.log(f"  the loaded engine rebatched to {policy} (no reload)")
            return self.llm, 0.0
        self.drop_engine()
        self.llm, self.load_s = bc.build_llm(self.source, policy, self.args.dtype, self.args.moe_impl)
        bc.log(f"  load: {self.load_s:.1f} s ({self.source.cfg.num_layers} layers materialised and placed)")
        return self.llm, self.load_s

    def drop_engine(self) -> None:
        self.llm = None
        gc.collect()

    def probe(self, policy) -> float | None:
        if self.args.no_gpu_probe:
            return None
        if policy not in self.probes:
            self.probes[policy] = bc.probe_gpu_layer_seconds(self.source, policy, self.args.dtype, self.args.moe_impl)
        return self.probes[policy]

    def probe_kept_runs(self, i: int, first) -> None:
        """--keep-engine, before the load for run i, the first at its cap: probe the later runs at that cap that
        will run on its engine ('auto' on its layout, fixed policies that keep it)."""
        from moe_jax import hrm
        from moe_jax.offload_engine import layout_changes

        for cap, w, g, spec in self.runs[i + 1:]:
            if cap != self.runs[i][0]:
                continue
            try:
                policy = policy_for(self.args, self.source.cfg, self.hardware, cap, w, g, spec, first)
            except (hrm.InfeasibleError, ValueError):  # that run reports it
                continue
            if not layout_changes(first, policy):
                self.probe(policy)

    def run(self, i: int) -> dict:
        """Run i of `runs`: its row."""
        from moe_jax import hrm

        args, cfg = self.args, self.source.cfg
        cap, workload, gen_len, spec = self.runs[i]
        head = {"workload": workload, "gen_len": gen_len, "gpu_memory_gb": cap, "spec": spec}
        loaded = self.first_at.get(cap) if args.keep_engine else None
        try:
            policy = policy_for(args, cfg, self.hardware, cap, workload, gen_len, spec, loaded)
        except (hrm.InfeasibleError, ValueError) as e:
            return {**head, "error": f"{type(e).__name__}: {e}"}
        own, why = policy, None
        if spec == "auto":  # HRM's own policy for this workload, reported beside where the run took another
            why = ON_LOADED_ENGINE if loaded is not None else WITHIN_POOL
            try:
                own = policy_for(args, cfg, self.hardware, cap, workload, gen_len, spec, within_pool=False)
            except (hrm.InfeasibleError, ValueError) as e:
                bc.log(f"  HRM's own policy for this workload: {type(e).__name__}: {e}")
        prompts = workload_prompts(workload, args.num_prompts or policy.batch_size, cfg.vocab_size, args.seed)
        bc.log(f"{workload} gen {gen_len}, cap {cap:g} GiB, policy {spec}: {policy}; {len(prompts)} prompts")
        try:
            load = not self.reusable(policy)
            if load:
                self.drop_engine()  # before the probe: the peak is then this run's alone
            gpu_s = self.probe(policy)
            if load and args.keep_engine and loaded is None:
                self.probe_kept_runs(i, policy)
            llm, load_s = self.engine_for(policy)
            self.first_at.setdefault(cap, policy)  # a loaded engine: the later workloads at this cap keep it
            row = bc.measure_policy(llm, self.source, prompts, gen_len, dtype=args.dtype, link_bw=self.link_bw,
                                    hardware=self.hardware, gpu_s=gpu_s)
        except Exception as e:  # reported in its row; the other runs go on
            bc.log(f"  ERROR: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            return {**head, "policy": bc.policy_dict(policy), "error": f"{type(e).__name__}: {e}"}
        row.update(head, load_s=load_s)
        try:  # the measured figures stand without these
            if own != policy:  # what HRM would have loaded for this workload
                row["hrm_own"] = hrm_own(args, cfg, self.hardware, workload, gen_len, own, why)
            if spec == "auto":
                row["host_limits_batch"] = host_limits_batch(args, cfg, self.hardware, cap, workload, gen_len, own)
        except Exception as e:
            row["hrm_error"] = f"{type(e).__name__}: {e}"
            bc.log(f"  ERROR: HRM's own policy for this workload: {row['hrm_error']}")
        bc.log(f"  {row['stats_summary']}")
        return row

    def run_baseline_workload(self, cap: float, spec: str, prompts, gen_len: int) -> dict:
        """Ours on the baseline's prompts, with `spec`'s policy for that workload (HRM: at most that batch); a
        policy that cannot run gives {"error"}, so that the baseline's figure is still reported."""
        args = self.args
        job = bc.engine_lengths(prompts, gen_len, self.source.cfg.max_positions)
        try:
            policy = bc.resolve_policy(spec, self.source.cfg, self.hardware, job, cap, len(prompts), args.dtype,
                                       **bc.policy_options(args))
            bc.log(f"baseline workload ({len(prompts)} prompts, gen {gen_len}), cap {cap:g} GiB, policy {spec}: {policy}")
            llm, load_s = self.engine_for(policy)
            run = bc.timed_generate(llm, prompts, gen_len)
        except SystemExit as e:  # a setup error, e.g. 'auto' with no HRM profile
            return {"error": f"SystemExit: {e}"}
        except Exception as e:
            bc.log(f"  ERROR: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            return {"error": f"{type(e).__name__}: {e}"}
        if run.get("interrupted"):  # the comparison needs the whole run
            raise KeyboardInterrupt
        return {"policy": bc.policy_dict(policy), "prompts": len(prompts), "gen_len": gen_len, "load_s": load_s,
                "tokens": run["tokens"], "wall_s": run["wall_s"], "tok_s": run["tok_s"],
                "decode_tok_s": run["decode_tok_s"], "first_tokens": [c.token_ids[0] for c in run["completions"]]}


def versus_published(row: dict, model: str, full: bool, link_bw: float) -> dict | None:
    """Our figure at the published one's link over it, where model and workload are the same: {system, ours at
    their link, ratio}. None for a run interrupted before its end (its figures cover its first steps only)."""
    if row.get("interrupted"):
        return None
    for pub in PUBLISHED:
        if model == pub["model"] and full and (row["workload"], row["gen_len"]) == pub["workload"] \
                and row.get(pub["metric"]) is not None:
            ours = row[pub["metric"]] * pub["link"] / link_bw
            return {"system": pub["system"], "metric": pub["metric"], "ours_at_their_link": ours,
                    "published": pub["value"], "ratio": ours / pub["value"], "bound": run_bound(row),
                    "lossy_kv": row.get("policy", {}).get("kv_cache_dtype", "auto") != "auto"}
    return None


def run_bound(row: dict) -> str | None:
    """The largest of the run's measured per-layer terms ("h2d", "cpu" or "gpu"), or None where unmeasured."""
    terms = {k: (row.get("per_layer_s") or {}).get(m) for k, m in (("h2d", "h2d_est"), ("cpu", "cpu"), ("gpu", "gpu_probe"))}
    terms = {k: v for k, v in terms.items() if v is not None}
    return max(terms, key=terms.get) if terms else None


def published_cell(vs: dict | None) -> str:
    if vs is None:
        return ""
    what = "decode" if vs["metric"] == "decode_tok_s" else "e2e"
    lossy = ", ours with a lossy int8 KV cache" if vs.get("lossy_kv") else ""
    bound = f"; our run {vs['bound']}-bound" if vs.get("bound") else ""
    return (f"{vs['ratio']:.2f}× {vs['system']} ({what} {vs['ours_at_their_link']:.0f} vs {vs['published']:g}"
            f"{lossy}{bound})")


MAIN_HEADERS = ["workload", "gen", "cap GiB", "policy", "prompts", "tok/s e2e", "tok/s decode", "HRM tok/s",
                "e2e meas/HRM", "per layer-step ms: H2D est. / CPU / GPU / step (meas/HRM)", "held back by", "overlap",
                "peak GiB", bc.SETUP_HEADER, "vs published, at its link"]


def terms_cell(r: dict) -> str:
    """The decode's measured terms and step per layer (`bc.per_layer_terms`), each with its ratio to HRM's."""
    t, ratio = r["per_layer_s"], r.get("measured_over_predicted") or {}
    cells = [bc.fmt(t[m], ".1f", 1e3) + (f" ({ratio[k]:.2f})" if ratio.get(k) else "")
             for k, m in (("h2d", "h2d_est"), ("cpu", "cpu"), ("gpu", "gpu_probe"))]
    step_ratio = ratio.get("step")
    return " / ".join(cells + [bc.fmt(t["step"], ".1f", 1e3) + (f" ({step_ratio:.2f})" if step_ratio else "")])


def held_back_by(r: dict) -> str:
    """What holds the run back: the decode's largest measured term (and where the step is over 1.2x it, the share
    of the step no term explains: waits between them), the prefill where it ran over 1.1x HRM's, and host memory
    for the KV cache where it caps HRM's batch (`host_limits_batch`)."""
    ratio, bound = r.get("measured_over_predicted") or {}, run_bound(r)
    parts = [f"decode: {bound}"] if bound else []
    if bound and r.get("overlap_efficiency") and r["overlap_efficiency"] > 1.2:
        parts[-1] += f" ({1 - 1 / r['overlap_efficiency']:.0%} of the step unexplained by any term)"
    if ratio.get("prefill") and ratio["prefill"] > 1.1:
        parts.append(f"prefill {ratio['prefill']:.1f}x HRM's")
    if r.get("host_limits_batch"):
        parts.append("N: host memory for KV")
    return "; ".join(parts)


def main_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        label = ("HRM: " if r["spec"] == "auto" else "") + (bc.policy_label(r["policy"]) if "policy" in r else r["spec"])
        if r.get("hrm_own"):
            label += beside_own(r["hrm_own"])
        if r.get("interrupted"):
            label += f" (interrupted after {r['decode_steps']} decode steps)"
        if r.get("compiles"):  # the warm-up missed shapes: the figures carry their compile stalls
            label += f" (the timed run compiled {r['compiles']} shapes, {r.get('compile_s', 0):.1f} s)"
        head = [r["workload"], str(r["gen_len"]), f"{r['gpu_memory_gb']:g}", label]
        if "error" in r or "tok_s" not in r:
            out.append(head + [r.get("error", "").splitlines()[0][:120]] + [""] * (len(MAIN_HEADERS) - 5))
            continue
        ratio = r["measured_over_predicted"]
        out.append(head + [str(r["prompts"]), bc.fmt(r["tok_s"]), bc.fmt(r["decode_tok_s"]),
                           bc.fmt(r["hrm"] and r["hrm"]["tok_s"]), bc.fmt(ratio and ratio["tok_s"], ".2f"),
                           terms_cell(r), held_back_by(r), bc.fmt(r["overlap_efficiency"], ".2f"), bc.peak_cell(r),
                           bc.setup_cell(r), published_cell(r.get("vs_published"))])
    return bc.markdown_table(MAIN_HEADERS, out)


def baseline_table(base: dict, ours: dict | None, layers: int, full: bool) -> str:
    headers = ["system", "how", "layers run", "prompts x gen", "tok/s measured", "tok/s full model"]
    if "error" in base:
        rows = [["transformers + accelerate", f"failed: {base['error'][:150]}", "", "", "", ""]]
    else:
        rows = [["transformers " + base["transformers"],
                 f"{base['mode']}, experts {base['experts_implementation']}; full model: {base['full_model_resident_layers']} "
                 f"layers resident (counted free), time x {base['scale_to_full']:.2f}",
                 str(base["layers_run"]), f"{base['prompts']} x {base['gen_len']}", bc.fmt(base["tok_s_measured"], ".2f"),
                 bc.fmt(base["tok_s_full_model"], ".2f")]]
    if ours and "error" in ours:
        rows.append(["moe-jax offload", f"failed: {ours['error'][:150]}", "", "", "", ""])
    elif ours:
        rows.append(["moe-jax offload", bc.policy_label(ours["policy"]), str(layers),
                     f"{ours['prompts']} x {ours['gen_len']}", bc.fmt(ours["tok_s"], ".2f"),
                     bc.fmt(ours["tok_s"] if full else None, ".2f")])
    return bc.markdown_table(headers, rows)


def first_token_agreement(base: dict, ours: dict | None, layers: int):
    """Fraction of prompts whose first generated token is the same in both (same model only)."""
    if not ours or "first_tokens" not in base or "first_tokens" not in ours or base["layers_run"] != layers:
        return None
    same = [a == b for a, b in zip(base["first_tokens"], ours["first_tokens"])]
    return sum(same) / len(same)


def plot(path: str, rows: list[dict], base: dict | None, ours_base: dict | None, full: bool) -> None:
    """Measured vs HRM per run; and the baseline workload's tok/s, ours beside transformers' full-model
    estimate only where ours ran the full model too (`full`; else the table says n/a, and so does the plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("tok_s") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [max(len(ok), 1), 2]})
    labels = [f"{r['workload']}:{r['gen_len']}\n{r['gpu_memory_gb']:g} GiB\n{'HRM' if r['spec'] == 'auto' else r['spec']}"
              for r in ok]
    x = range(len(ok))
    axes[0].bar([i - 0.2 for i in x], [r["tok_s"] for r in ok], 0.4, label="measured")
    axes[0].bar([i + 0.2 for i in x], [r["hrm"]["tok_s"] if r["hrm"] else 0 for r in ok], 0.4, label="HRM predicted")
    axes[0].set_xticks(list(x), labels, fontsize=8)
    axes[0].set_ylabel("generated tok/s (prefill + decode)")
    axes[0].set_title("moe-jax offload engine")
    axes[0].legend()
    bars = []  # (label, tok/s, colour)
    if base and base.get("tok_s_full_model") is not None and full:
        how = "accelerate offload\n(full model, est.)" if base["mode"].startswith("accelerate") else "on CPU, no offload"
        bars.append((f"transformers\n{how}", base["tok_s_full_model"], "tab:gray"))
    if ours_base and "tok_s" in ours_base and full:
        bars.append(("moe-jax", ours_base["tok_s"], "tab:blue"))
    axes[1].bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    shape = f" ({base['prompts']} x {base['gen_len']})" if base and "prompts" in base else ""
    axes[1].set_title("baseline workload" + (shape if bars else ": full model not run (see the table)"))
    axes[1].set_ylabel("generated tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    bc.log(f"wrote {path}")


def report(rows, base, ours_base, agreement, layers: int, full: bool, link_bw: float, hardware,
           interrupted: bool) -> str:
    """The markdown tables and notes."""
    parts = []
    if rows:
        sources = "; ".join(f"{p['system']} {p['value']:g} ({p['source']})" for p in PUBLISHED)
        parts.append(main_table(rows) + f"\n\nlink {link_bw / 1e9:.1f} GB/s (pinned host -> device); "
                     f"HRM profile {hardware or 'none'}; vs published = our figure on the published metric x their "
                     f"link / ours, over theirs (our system with their link: our link measured at its best, theirs "
                     f"as published): about exact for a link-bound (h2d) run, a lower bound for one bound by our CPU "
                     f"or GPU (their slower link would slow it less). Published: {sources}")
    if base is not None:
        parts.append("PyTorch baseline, same random weights, same prompts:\n\n" + baseline_table(base, ours_base, layers, full))
        offloaded = base.get("mode", "").startswith("accelerate")
        if full and ours_base and ours_base.get("tok_s") and base.get("tok_s_full_model") and offloaded:
            parts.append(f"moe-jax / transformers on that workload, full model: "
                         f"**{ours_base['tok_s'] / base['tok_s_full_model']:.1f}x**")
        elif "mode" in base and not offloaded:
            parts.append(f"no moe-jax / transformers ratio: the baseline ran without offload ({base['mode']})")
        if agreement is not None:
            parts.append(f"first generated token identical for {agreement:.0%} of prompts (same model in both)")
    if interrupted:
        parts.append("INTERRUPTED (timeout): later runs not made")
    return "\n\n".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    workloads = parse_workloads(args.workloads)
    caps = parse_caps(args.gpu_memory_gb)
    specs = args.specs
    source = bc.open_source(args.model, args.layers, args.seed)
    cfg = source.cfg
    full_layers = bc.open_source(args.model, seed=args.seed).cfg.num_layers
    if args.baseline and not args.predict_only and args.baseline_layers > full_layers:
        raise SystemExit(f"--baseline-layers must be at most {args.model}'s {full_layers} layers, got {args.baseline_layers}")
    if args.predict_only:
        print(f"\n## HRM predictions: {source.name}, profile {args.hardware}\n\n`{bc.run_command()}`\n\n"
              + predictions(args, cfg, caps, workloads, specs))
        return 0
    full = cfg.num_layers == full_layers
    base_prompts = workload_prompts(args.baseline_workload, args.baseline_batch, cfg.vocab_size, args.seed + 1)
    runs = [(cap, w, g, spec) for cap in caps for w, g in workloads for spec in specs]
    # with --keep-engine an 'auto' run after a cap's first streams what the first does: its own policy never runs
    pool_runs = [r for i, r in enumerate(runs)
                 if not (args.keep_engine and r[3] == "auto" and r[0] in [q[0] for q in runs[:i]])]
    pool_for = [bc.policy_before_jax(spec, args.hardware, lambda: policy_for(args, cfg, args.hardware, cap, w, g, spec))
                for cap, w, g, spec in pool_runs]
    if args.baseline:
        pool_for.append(bc.policy_before_jax(specs[0], args.hardware, lambda: bc.resolve_policy(
            specs[0], cfg, args.hardware, bc.engine_lengths(base_prompts, args.baseline_gen_len, cfg.max_positions),
            caps[0], len(base_prompts), args.dtype, **bc.policy_options(args))))
    bc.set_memory_env(cfg, args.dtype, pool_for, args.host_pool_gb, args.expert_codec)
    try:
        base = run_baseline(args, base_prompts, caps[0]) if args.baseline else None  # before JAX takes the GPU
    except KeyboardInterrupt:
        bc.log("interrupted during the PyTorch baseline: nothing measured")
        return 130
    hardware = bc.detect_hardware_profile(args.hardware)
    device = bc.device_kind()
    link_bw = bc.probe_link_bandwidth(args.link_probe_mib)
    bc.log(f"{source.name} on {device}: link {link_bw / 1e9:.1f} GB/s, HRM profile {hardware or 'none'}")
    from moe_jax import pinned_pool

    if "auto" in specs and args.hardware is None and pinned_pool.fixed_cap_bytes() is not None:
        bc.log("WARNING: 'auto' without --hardware: the pinned pool was sized for every expert before the GPU was "
               "detected, and HRM chooses within it (the rows give HRM's own policy beside); pass --hardware to "
               "size the pool for HRM's policy")
    runner = Runner(args, source, hardware, link_bw, runs)
    rows, ours_base, interrupted, setup_error = [], None, False, None
    try:
        if base is not None:  # ours on its workload, whether or not the baseline ran
            ours_base = runner.run_baseline_workload(caps[0], specs[0], base_prompts, args.baseline_gen_len)
            got = ours_base["error"] if "error" in ours_base else f"{ours_base['tok_s']:.2f} tok/s"
            bc.log(f"  ours on the baseline workload: {got}")
        for i in range(len(runs)):
            rows.append(runner.run(i))
            if rows[-1].get("interrupted"):  # its decode steps so far are in the row; stop here
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
        bc.log("interrupted: reporting what was measured")
    except SystemExit as e:  # a setup error (e.g. 'auto' with no HRM profile): the baseline's figure is still reported
        setup_error = str(e.code)
        bc.log(f"error: {setup_error}")
    for r in rows:
        if "tok_s" in r:
            r["vs_published"] = versus_published(r, args.model, full, link_bw)
    agreement = first_token_agreement(base, ours_base, cfg.num_layers) if base else None
    title = f"bench_throughput: {source.name}, caps {args.gpu_memory_gb} GiB, workloads {args.workloads or 'none'}"
    body = report(rows, base, ours_base, agreement, cfg.num_layers, full, link_bw, hardware, interrupted)
    if setup_error:
        body += f"\n\nERROR: {setup_error}"
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": bc.run_command(), "device": device, "model": source.name, "layers": cfg.num_layers,
                       "hardware": hardware, "link_bytes_per_s": link_bw, "published": PUBLISHED,
                       "interrupted": interrupted, "runs": rows, "baseline": base, "ours_on_baseline_workload": ours_base,
                       "first_token_agreement": agreement}, f, indent=1)
    if args.append_results:
        bc.append_results(args.append_results, title, device, body)
    print(f"\n## {title} ({device})\n\n{body}")
    failed = setup_error or any("error" in r for r in (*rows, base or {}, ours_base or {}))
    if args.plot:  # last: the figures are written whatever befalls the chart
        try:
            plot(args.plot, rows, base, ours_base, full)
        except Exception as e:
            bc.log(f"ERROR: the chart ({args.plot}): {type(e).__name__}: {e}")
            failed = True
    return 130 if interrupted else int(bool(failed))


if __name__ == "__main__":
    sys.exit(main())
