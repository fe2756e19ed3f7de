#!/usr/bin/env bash
# The first thing a GPU session runs: the GPU tests, then the benchmarks in scripts/.
#
#   bash scripts/gpu_suite.sh                             # the core steps: one device command (< 10 min)
#   bash scripts/gpu_suite.sh bench_throughput_g64_exp4 bench_offload   # the named steps, in that order
#   bash scripts/gpu_suite.sh all                         # every step (more than one command allows)
#
# A device command is capped at 10 minutes and a session has 15 minutes of device time, the machine's start
# included (about 30 s), and a warm machine goes back after 30 s idle. GPU sessions so far (all on an H200;
# benchmarks/RESULTS.md): 2026-11-26 (two): the GPU tests, the expert kernel's sweep, calibrate, both host
# attention steps, bench_offload_quick(_exp4) and bench_offload (issue 5: all 32 layers at 16 GiB, 737 tok/s,
# overlap 1.08); 2026-11-27 (two): the contention steps, bench_offload_quick against _threads/_blocking/_exp4/
# _mgpu/_triton, bench_policies (issue 6), calibrate; then bench_prefetch_whole (split 1.16x whole: issue 5),
# bench_cpu_idle and the engine under OpenMP's passive/active waits and numba's workqueue layer (none cuts the
# CPU term), and bench_throughput_g64_exp4 (issue 7: 856.9 tok/s, 0.90x MoE-Lightning normalised, CPU-bound:
# the prompts' k/v writes 40 s, the decode's CPU 68.9 ms a layer-step; page faults suspected). What is left,
# one device command each, in this order, on an H200 (the device tool's kind nvidia-h200: the measured profile
# benchmarks/profiles/h200-measured.json and 2026-11-27's run are that machine's; an H100 would be priced with the
# uncalibrated h100-80gb profile, on another host CPU, for a run that was CPU-bound):
#   1. `MOE_JAX_COMMIT=<git describe --always --dirty, run here> bash scripts/gpu_suite.sh` (timeout_s 600; the
#      device copy has no .git, and the results record that commit): the core steps, in order:
#      - bench_throughput_g64_g128_exp4 (issue 7's two headline runs in one process, ~8-9.5 min: g64 on HRM's
#        policy, N=2715 μ=905 n_ub=3 r_w=0.0234, 1738.2 tok/s predicted; then g128 on the same loaded engine,
#        rebatched to HRM's best N and μ for it (--keep-engine: N=1827 μ=609, 1276.3 predicted, HRM's own g128
#        policy 1328.5 reported beside), with no second load and, where the g64 cache holds it, no second KV
#        fault-in. If the budget cuts g128, its row reports the decode steps it measured; rerun it alone
#        (bench_throughput_g128_exp4) in a later command or session.
#      - bench_kv_pages and bench_offload_quick, if time is left (skipped under 60 s).
#      Read, for g64 against 2026-11-27's run (856.9 tok/s, CPU-bound): "load + KV s" (83.5 s of load before its
#      random weights' copy ran on every core and exp4 coded into pinned memory through views, saving a copy of
#      2.1 GB a layer; the KV cache's fault-in of ~50 GB, in 4 KiB pages where env.log's kv_pages probe found huge
#      pages over 30 s slower for it), the CPU column (kernel 36.55 / writes 18.28 / hand-off 11.78 ms a
#      layer-step then; since: no page faults, views of pinned memory (hand-off ~0), parallel writes, the kernel
#      reading bf16 q and writing bf16 out itself), the new "fetch of q/k/v", "N page faults" a layer-step, the
#      prefill (seconds and calls: 40.29 s then, about half the calls now), "peak GiB" against the 16 GiB cap (the
#      plan's margin over the last measured peak shrank to ~1.2 GiB), env.log's "host_views" line (where the probe
#      fails every step copies, MOE_JAX_HOST_VIEWS=0, and the summary line says "copies"), the warm-up's compile
#      seconds (the log's "run:" line; 35-40 s of the 4-layer runs' warm-ups were compiles) and any WARNING that a
#      timed run compiled, the new "held back by" column, and g128's peak GiB (its probe now runs before g64's load).
#   2. the same session, ~4 min left: `GPU_SUITE_BUDGET_S=220 bash scripts/gpu_suite.sh bench_kv_pages` unless step 1
#      ran it (timeout_s 240): the kernel alone at g64's 880 x 109 from DRAM (against the engine's kernel ms per
#      call: its CPU column's kernel / 3 micro-batches), and beside the link's DMA, one layer re-read against 2 GiB
#      of layers: if the DMA slows the kernel from DRAM, that is the engine's 1.9x and HRM lacks a shared host-DRAM
#      roof; env.log gives the L3's size. Then, if ~3 min are left: bench_offload_quick_copies (the 4-layer run
#      with views off: its CPU column against bench_offload_quick's).
#   3. later sessions, one command each: bench_vs_pytorch (the PyTorch baseline's first GPU run; its placement,
#      accelerate's dispatch_model bringing each offloaded layer in whole, is rehearsed on the CPU only), then
#      bench_throughput_g128_exp4 if step 1 cut it, bench_throughput_g64 and _g128 (uncoded); bench_dsv2_lite
#      (DeepSeek's latent attention on the CPU); calibrate (~1.5 min; it also measures the CPU kernel's time per
#      query row, attention_row_seconds, which HRM adds to its CPU term: commit its JSON as
#      benchmarks/profiles/h200-measured.json, or h100-80gb-measured.json on an H100).
# Add `tests` in front of step 1 when GPU code (pallas_kernels/, the engine's jitted steps) changed since the
# last GPU session (the tests last ran at commit ce8e362; pallas_kernels/ and the jitted steps have not changed
# since; the engine's jitted calls take a tuple of chunks since c38b34c, run by every offload step).
# The steps share a time budget, GPU_SUITE_BUDGET_S seconds from the start (default 570, inside one device
# command's 600): each step's limit shrinks to what is left, and a step with less than GPU_SUITE_MIN_STEP_S
# left (default 60) is skipped.
# PYTHON picks the interpreter (default: python3).
#
# What comes back: a device command returns at most 8 files from $OUT, so every step's log and result files
# go to $GPU_SUITE_LOGS (default /tmp/gpu_suite_logs), and $OUT receives two files, rewritten after each
# step so that a killed command still returns what ran: summary.md (the table) and gpu_suite_logs.tgz (the
# whole log folder, which keeps earlier runs' files on a warm machine; `tar -xzf gpu_suite_logs.tgz -C DIR`).
# A step that passes its own time limit is interrupted (SIGINT: the benchmarks still print what they
# measured) and reported as "timeout", a failure; one ended by the budget is reported as "cut", not one.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_suite_out}"
LOGS="${GPU_SUITE_LOGS:-/tmp/gpu_suite_logs}"
BUDGET="${GPU_SUITE_BUDGET_S:-570}"
MIN_STEP="${GPU_SUITE_MIN_STEP_S:-60}"
PY="${PYTHON:-$(command -v python3 || echo python)}"  # the device image's python3 holds jax, torch and transformers
mkdir -p "$OUT" "$LOGS"
case "$(cd "$LOGS" && pwd -P)/" in
  "$(cd "$OUT" && pwd -P)/"*) echo "GPU_SUITE_LOGS ($LOGS) must lie outside OUT ($OUT): OUT returns at most 8 files" >&2; exit 2 ;;
esac
SUITE_START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The HRM profile by name on an H100 or H200: the offload benchmarks then size the pinned-host pool for
# HRM's policy before JAX starts (detected after it starts, the pool must hold every expert).
# These machines have 128 GiB (125 usable, as the profiles say) even where the VM's MemTotal starts lower
# and grows with use: MOE_JAX_HOST_MEMORY_GB tells the engine's host checks (moe_jax/host_memory.py).
# A profile measured on such a machine (the `calibrate` step's JSON, committed as
# benchmarks/profiles/NAME-measured.json) replaces the named one: HRM then predicts with measured figures.
case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)" in
  *"H100 80GB"*) PROFILE=h100-80gb ;;
  *H200*) PROFILE=h200 ;;
  *) PROFILE="" ;;
esac
HW=""
if [ -n "$PROFILE" ]; then
  export MOE_JAX_HOST_MEMORY_GB="${MOE_JAX_HOST_MEMORY_GB:-125}"
  MEASURED="benchmarks/profiles/$PROFILE-measured.json"
  if [ -f "$MEASURED" ]; then HW="--hardware $MEASURED"; else HW="--hardware $PROFILE"; fi
fi

# MemTotal and MemAvailable in GiB: the offload steps plan with the HRM profile's 125 GiB, and a VM may show
# less until its memory is used; each step's row records them after it ran.
mem() { awk '/^MemTotal|^MemAvailable/ {printf "%s %.1f ", $1, $2 / 1048576}' /proc/meminfo; }

# numba's thread count (its default: the cores it may use), which the thread counts of the steps below lie under
NPROC=$($PY -c 'import numba; print(numba.config.NUMBA_NUM_THREADS)' 2>/dev/null | tail -n 1)
[[ "$NPROC" =~ ^[0-9]+$ ]] || NPROC=$(nproc)
# One step per line: name|time limit in seconds|command. Add your benchmark here; CORE steps run by default.
# bench_expert_kernel writes each row as it goes and prints the table of those measured when the budget's end
# interrupts it (Mixtral's rows first).
CORE="bench_throughput_g64_g128_exp4 bench_kv_pages bench_offload_quick"
STEPS=(
  "tests|300|$PY -m pytest -m gpu tests -q -rs"
  # HRM's hardware profile measured here (~1 min): commit it as benchmarks/profiles/<profile>-measured.json
  "calibrate|150|$PY -m moe_jax.hrm.calibrate \${MOE_IMPL:-} --output $LOGS/${PROFILE:-gpu}-measured.json"
  # the host KV cache in 4 KiB pages against 2 MiB huge pages (the engine's, as NumPy's large arrays): the
  # fault-in of fresh memory (on the 2-core VM, 4 KiB 6x faster) and attention over each (huge 2-9% faster
  # there). First of the core steps, while this machine's memory is fresh, as the engine's cache finds it.
  # All at g64's decode micro-batch (880 rows, context ~109), each figure from DRAM (going round 2 GiB of layers, as
  # the engine's calls read KV no recent call read). Then the kernel alone (and at 256 x 128), against the engine's
  # kernel time per call, and beside the link's DMA (--link-load), which shares the host's DRAM with it: on the
  # 2-core VM the engine's kernel ran 1.14x its time alone when nothing else ran, so the H200's 1.9x is what runs
  # beside it; the DMA is the suspect (HRM counts the link and the kernel's DRAM reads apart).
  "bench_kv_pages|150|$PY scripts/bench_host_attention.py --pages 4 --kv-dtype bfloat16 --batch 256 880 --context 109 128 --engine-shape 880 109 --stream-gib 2 --link-load"
  # with DeepSeek's latent attention (compute-bound) against the same kernel at LLVM's own vector width, and
  # the engine's decode shape with one core busy (as the engine's dispatching thread keeps one)
  "bench_host_attention|120|$PY scripts/bench_host_attention.py --batch 64 256 512 --context 128 1024 4096 --stream-gib 8 --max-kv-gib 16 --kv-dtype bfloat16 --latent 64 1024 256 128 1024 128 --busy-cores 1"
  # the engine's decode micro-batch (g64's: 880 x 109) with one core busy at fewer threads than cores, and beside the
  # link's DMA (the two share the host's DRAM): one layer re-read (as these steps measured before 2026-11-27's sixth
  # session: it may sit in the last-level cache) against 2 GiB of layers (from DRAM, as the engine reads KV)
  "bench_cpu_contention|150|$PY scripts/bench_host_attention.py --kv-dtype bfloat16 --batch 880 --context 109 --engine-shape 880 109 --stream-gib 8 --busy-cores 1 --busy-threads $(( NPROC > 2 ? NPROC - 1 : 1 )) $(( NPROC > 3 ? NPROC - 2 : 1 )) $(( NPROC > 5 ? NPROC - 4 : 1 )) --link-load"
  # the link-load figure again with CUDA's waits blocking instead of spinning on a core (XLA reads this variable
  # when it creates the GPU context; with one context on 16 cores CUDA spins by default)
  "bench_cpu_contention_blocking|90|TF_CUDA_PLATFORM_GPU_DEVICE_SCHEDULE=blocking_sync $PY scripts/bench_host_attention.py --kv-dtype bfloat16 --batch 880 --context 109 --engine-shape 880 109 --stream-gib 8 --link-load"
  # the engine's decode micro-batch after idle gaps (the engine's worker waits for the GPU between its calls, and
  # OpenMP's threads spin, then sleep, between parallel regions) under each threading setting: does waking costs?
  # (the entries: comma-separated variables; "active" at cores - 2 threads, as bench_offload_quick_active runs)
  "bench_cpu_idle|150|for e in default OMP_WAIT_POLICY=passive OMP_WAIT_POLICY=active,NUMBA_NUM_THREADS=$(( NPROC > 3 ? NPROC - 2 : 1 )) NUMBA_THREADING_LAYER=workqueue; do [ \$e = default ] && e=; env \${e//,/ } $PY scripts/bench_host_attention.py --kv-dtype bfloat16 --batch 256 --context 128 --stream-gib 2 --idle-gap 1 5 20 || exit 1; done"
  # the same beside an int8 cache (--kv-cache-dtype int8): its speed-up where the 16 cores are memory-bound
  "bench_host_attention_int8|150|$PY scripts/bench_host_attention.py --batch 64 256 512 --context 128 1024 4096 --stream-gib 8 --max-kv-gib 16"
  "bench_expert_kernel_core|160|$PY scripts/bench_expert_kernel.py --tokens 1024 4096 --json $LOGS/bench_expert_kernel_core.json --out $LOGS/bench_expert_kernel_core.md"
  "bench_expert_kernel|420|$PY scripts/bench_expert_kernel.py --json $LOGS/bench_expert_kernel.json --out $LOGS/bench_expert_kernel.md"
  # Offload engine benchmarks (scripts/bench_offload.py, scripts/bench_throughput.py): Mixtral 8x7B shapes,
  # random weights. Each step fits one 10-minute device command; --append-results writes the markdown
  # section to paste into benchmarks/RESULTS.md. Limits stay under 600 s so that the suite's SIGINT comes
  # first and the scripts still print what they measured.
  "bench_offload_quick|160|$PY scripts/bench_offload.py $HW \${MOE_IMPL:-} --layers 4 --gpu-memory-gb 10 --max-batch-size 512 --json $LOGS/bench_offload_quick.json --append-results $LOGS/bench_offload_quick.md"
  # bench_offload_quick with the host attention kernel on all but 2 cores (NUMBA_NUM_THREADS), leaving them to the
  # engine's dispatching thread and XLA's runtime: compare its CPU column (kernel) with bench_offload_quick's
  "bench_offload_quick_threads|160|NUMBA_NUM_THREADS=$(( NPROC > 3 ? NPROC - 2 : 1 )) $PY scripts/bench_offload.py $HW \${MOE_IMPL:-} --layers 4 --gpu-memory-gb 10 --max-batch-size 512 --json $LOGS/bench_offload_quick_threads.json --append-results $LOGS/bench_offload_quick_threads.md"
  # bench_offload_quick with CUDA's waits blocking (see bench_cpu_contention_blocking): compare its CPU column too
  "bench_offload_quick_blocking|160|TF_CUDA_PLATFORM_GPU_DEVICE_SCHEDULE=blocking_sync $PY scripts/bench_offload.py $HW \${MOE_IMPL:-} --layers 4 --gpu-memory-gb 10 --max-batch-size 512 --json $LOGS/bench_offload_quick_blocking.json --append-results $LOGS/bench_offload_quick_blocking.md"
  # bench_offload_quick under the other threading settings of bench_cpu_idle: compare the CPU column (kernel/writes/hand-off/fetch)
  "bench_offload_quick_passive|160|OMP_WAIT_POLICY=passive $PY scripts/bench_offload.py $HW \${MOE_IMPL:-} --layers 4 --gpu-memory-gb 10 --max-batch-size 512 --json $LOGS/bench_offload_quick_passive.json --append-results $LOGS/bench_offload_quick_passive.md"
  "bench_offload_quick_active|160|OMP_WAIT_POLICY=active NUMBA_NUM_THREADS=$(( NPROC > 3 ? NPROC - 2 : 1 )) $PY scripts/bench_offload.py $HW \${MOE_IMPL:-} --layers 4 --gpu-memory-gb 10 --max-batch-size 512 --json $LOGS/bench_offload_quick_active.json --append-results $LOGS/bench_offload_quick_active.md"
  # bench_offload_quick with the CPU worker copying q/k/v out of pinned memory and its output in (as before
  # host_views): the same-run reference for the views' hand-off and fetch (the CPU column)
  "bench_offload_quick_copies|160|MOE_JAX_HOST_VIEWS=0 $PY scripts/bench_offload.py $HW \${MOE_IMPL:-} --layers 4 --gpu-memory-gb 10 --max-batch-size 512 --json $LOGS/bench_offload_quick_copies.json --append-results $LOGS/bench_offload_quick_copies.md"
  "bench_offload_quick_workqueue|160|NUMBA_THREADING_LAYER=workqueue $PY scripts/bench_offload.py $HW \${MOE_IMPL:-} --layers 4 --gpu-memory-gb 10 --max-batch-size 512 --json $LOGS/bench_offload_quick_workqueue.json --append-results $LOGS/bench_offload_quick_workqueue.md"
  "bench_offload|560|$PY scripts/bench_offload.py $HW \${MOE_IMPL:-} --json $LOGS/bench_offload.json --append-results $LOGS/bench_offload.md"
  "bench_offload_quick_exp4|160|$PY scripts/bench_offload.py $HW \${MOE_IMPL:-} --layers 4 --gpu-memory-gb 10 --max-batch-size 512 --expert-codec exp4 --json $LOGS/bench_offload_quick_exp4.json --append-results $LOGS/bench_offload_quick_exp4.md"
  # the same with one expert kernel for every call: compare the GPU column with bench_offload_quick (`auto`:
  # Triton for the decode's few rows per expert, our Mosaic kernel for the prefill)
  "bench_offload_quick_mgpu|160|$PY scripts/bench_offload.py $HW --layers 4 --gpu-memory-gb 10 --max-batch-size 512 --moe-impl pallas_mgpu --json $LOGS/bench_offload_quick_mgpu.json --append-results $LOGS/bench_offload_quick_mgpu.md"
  "bench_offload_quick_triton|160|$PY scripts/bench_offload.py $HW --layers 4 --gpu-memory-gb 10 --max-batch-size 512 --moe-impl pallas_triton --json $LOGS/bench_offload_quick_triton.json --append-results $LOGS/bench_offload_quick_triton.md"
  "bench_prefetch_whole|300|$PY scripts/bench_offload.py $HW \${MOE_IMPL:-} --layers 4 --gpu-memory-gb 10 --max-batch-size 512 --prefetch whole --json $LOGS/bench_prefetch_whole.json --append-results $LOGS/bench_prefetch_whole.md"
  "bench_policies|560|$PY scripts/bench_offload.py $HW \${MOE_IMPL:-} --layers 8 --gen-len 32 --max-batch-size 1024 --policies 'auto;64,64,1,0;1024,16,64,0' --json $LOGS/bench_policies.json --append-results $LOGS/bench_policies.md"
  "bench_continuous_batching|420|$PY scripts/bench_continuous_batching.py \${MOE_IMPL:-} --layers 4 --append-results $LOGS/bench_continuous_batching.md"
  # ours with exp4 (lossless: the same tokens), as in the headline runs: on the baseline's 64 prompts both engines
  # stream every layer's experts each step, so the ratio is about the links' (52 GB/s pinned against 6-7 pageable)
  # times exp4's 2/1.5: HRM predicts 48.8 tok/s coded, 38.3 uncoded, against the baseline's ~3.8 (DESIGN.md)
  # (never run on a GPU yet; the baseline's placement, accelerate's dispatch_model bringing each offloaded layer's
  # weights in whole, is rehearsed on the CPU by tests/scripts/test_bench_smoke.py, layers offloaded to disk;
  # --baseline-require-offload: where torch sees no CUDA or accelerate is missing the baseline fails at once, not
  # run on the CPU; ours still runs on its workload)
  "bench_vs_pytorch|560|$PY scripts/bench_throughput.py $HW \${MOE_IMPL:-} --workloads '' --expert-codec exp4 --baseline-require-offload --json $LOGS/bench_vs_pytorch.json --plot $LOGS/bench_vs_pytorch.png --append-results $LOGS/bench_vs_pytorch.md"
  "bench_throughput_g64|560|$PY scripts/bench_throughput.py $HW \${MOE_IMPL:-} --workloads mtbench:64 --no-baseline --json $LOGS/bench_throughput_g64.json --plot $LOGS/bench_throughput_g64.png --append-results $LOGS/bench_throughput_g64.md"
  "bench_throughput_g64_24|560|$PY scripts/bench_throughput.py $HW \${MOE_IMPL:-} --workloads mtbench:64 --gpu-memory-gb 24 --no-baseline --json $LOGS/bench_throughput_g64_24.json --plot $LOGS/bench_throughput_g64_24.png --append-results $LOGS/bench_throughput_g64_24.md"
  # issue 7's two headline runs in one process: gen 64 on HRM's policy, then gen 128 on the same loaded engine
  # (--keep-engine: HRM's best N and μ for its micro-batch count and resident experts, 1276.3 tok/s predicted
  # where HRM's own g128 policy gives 1328.5; both reported), saving the second load and KV fault-in
  "bench_throughput_g64_g128_exp4|560|$PY scripts/bench_throughput.py $HW \${MOE_IMPL:-} --workloads mtbench:64,mtbench:128 --expert-codec exp4 --keep-engine --no-baseline --json $LOGS/bench_throughput_g64_g128_exp4.json --plot $LOGS/bench_throughput_g64_g128_exp4.png --append-results $LOGS/bench_throughput_g64_g128_exp4.md"
  "bench_throughput_g64_exp4|560|$PY scripts/bench_throughput.py $HW \${MOE_IMPL:-} --workloads mtbench:64 --expert-codec exp4 --no-baseline --json $LOGS/bench_throughput_g64_exp4.json --plot $LOGS/bench_throughput_g64_exp4.png --append-results $LOGS/bench_throughput_g64_exp4.md"
  # MoE-Gen's published setting (prompts of 512, gen 256) at 24 GiB with exp4: decode tok/s vs its 469 (A5000)
  "bench_throughput_moegen_exp4|560|$PY scripts/bench_throughput.py $HW \${MOE_IMPL:-} --workloads moegen --gpu-memory-gb 24 --expert-codec exp4 --no-baseline --json $LOGS/bench_throughput_moegen_exp4.json --append-results $LOGS/bench_throughput_moegen_exp4.md"
  # the same with an int8 host KV cache: HRM predicts about 1.8x the batch and decode tok/s where host KV binds
  "bench_throughput_moegen_exp4_int8|560|$PY scripts/bench_throughput.py $HW \${MOE_IMPL:-} --workloads moegen --gpu-memory-gb 24 --expert-codec exp4 --kv-cache-dtype int8 --no-baseline --json $LOGS/bench_throughput_moegen_exp4_int8.json --append-results $LOGS/bench_throughput_moegen_exp4_int8.md"
  # DeepSeek-V2-Lite (latent attention, 64 experts): HRM predicts the CPU attention, not the link, binds here
  "bench_dsv2_lite|560|$PY scripts/bench_throughput.py $HW \${MOE_IMPL:-} --model deepseek-v2-lite --workloads mtbench:64 --gpu-memory-gb 16 --no-baseline --json $LOGS/bench_dsv2_lite.json --append-results $LOGS/bench_dsv2_lite.md"
  "bench_throughput_g128|560|$PY scripts/bench_throughput.py $HW \${MOE_IMPL:-} --workloads mtbench:128 --no-baseline --json $LOGS/bench_throughput_g128.json --plot $LOGS/bench_throughput_g128.png --append-results $LOGS/bench_throughput_g128.md"
  "bench_throughput_g128_exp4|560|$PY scripts/bench_throughput.py $HW \${MOE_IMPL:-} --workloads mtbench:128 --expert-codec exp4 --no-baseline --json $LOGS/bench_throughput_g128_exp4.json --plot $LOGS/bench_throughput_g128_exp4.png --append-results $LOGS/bench_throughput_g128_exp4.md"
)

{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  # jax's version and devices, whether np.asarray of a jitted call's output in pinned host memory copies it, at g64's
  # micro-batch of q (880 x 32 x 128 bf16), and whether the engine's views of pinned memory work (moe_jax.host_views:
  # its CPU worker reads q/k/v and writes its output there without copies, or copies where they fail)
  $PY -c "$(cat <<'PY'
import time
import jax, jaxlib, numpy as np
from jax.sharding import SingleDeviceSharding
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())
dev = jax.devices()[0]
if "pinned_host" in [m.kind for m in dev.addressable_memories()]:
    f = jax.jit(lambda x: x * 2, out_shardings=SingleDeviceSharding(dev, memory_kind="pinned_host"))
    for _ in range(3):
        y = f(jax.numpy.ones((880, 32, 128), jax.numpy.bfloat16)).block_until_ready()
        t0 = time.perf_counter()
        a = np.asarray(y)
        ms = (time.perf_counter() - t0) * 1e3
    same = a.ctypes.data == y.addressable_data(0).unsafe_buffer_pointer()
    print(f"np.asarray of a pinned_host output: {'zero-copy' if same else 'a copy'}, {ms:.2f} ms for {a.nbytes / 1e6:.1f} MB")
    from moe_jax import host_views
    why = host_views.check(SingleDeviceSharding(dev, memory_kind="pinned_host"), SingleDeviceSharding(dev, memory_kind="device"))
    print(f"host_views: {'views of pinned memory work' if why is None else 'FAIL, the engine copies: ' + why}")
PY
)" 2>&1
  # the host KV cache's first touch in 2 MiB and in 4 KiB pages (2 GiB each, both held so that neither takes the
  # other's freed memory; on numba's threads, as the engine faults its cache in): the 2-core VM faulted huge pages
  # in 6x slower, and a g64 cache is ~50 GB. Where huge pages would cost such a cache over 30 s more, every step's
  # engine takes 4 KiB pages (below; attention over them ran 2-3% slower on the VM; bench_kv_pages measures both)
  $PY -c "$(cat <<'PY'
from host_ops import HostKVCache
huge, small = (c.storage_bytes / max(c.fault_in_s, 1e-9) / 1e9
               for c in [HostKVCache(1, 512, 1024, 8, 128, "bfloat16", huge_pages=h) for h in (True, False)])
pick = "4 KiB" if 50 / huge - 50 / small > 30 else "2 MiB"
print(f"kv_pages: first touch 2 MiB {huge:.2f} GB/s, 4 KiB {small:.2f} GB/s; a 50 GB cache {50 / huge:.0f} s "
      f"against {50 / small:.0f} s -> {pick}")
PY
)" 2>&1
  echo "host memory: $(mem)"
  echo "host CPU: $(lscpu 2>/dev/null | awk -F: '/^Model name|^CPU\(s\)|^Thread|^Core|^Socket|^NUMA node\(s\)|^L3 cache/ {gsub(/ +/, " ", $2); printf "%s:%s; ", $1, $2}')"
  echo "HRM profile: ${HW:-none (no H100/H200 detected)}"
} | tee "$LOGS/env.log"
# views of pinned memory that fail (or crash) in the probe above are not tried in the steps: their engines copy
if ! grep -q "host_views: views of pinned memory work" "$LOGS/env.log"; then
  export MOE_JAX_HOST_VIEWS=0
  echo "host_views: off for every step (MOE_JAX_HOST_VIEWS=0): the probe above did not pass" | tee -a "$LOGS/env.log"
fi
# a KV cache in huge pages that this host faults in too slowly: 4 KiB pages in every step (unless the caller chose)
if [ -z "${MOE_JAX_KV_HUGE_PAGES:-}" ] && grep -q "^kv_pages: .*-> 4 KiB" "$LOGS/env.log"; then
  export MOE_JAX_KV_HUGE_PAGES=0
  echo "kv_pages: 4 KiB pages for every step's KV cache (MOE_JAX_KV_HUGE_PAGES=0)" | tee -a "$LOGS/env.log"
fi

declare -a SUMMARY
failed=0
table() {
  printf '| %-24s | %-12s | %6s | %s | %s |\n' step status time "host GiB after" log
  echo "|---|---|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
}
# summary.md and the log tarball in $OUT, replaced whole (a command killed mid-write leaves the previous ones).
save() {
  table >"$OUT/.summary.md.tmp" && mv "$OUT/.summary.md.tmp" "$OUT/summary.md"
  tar -czf "$OUT/.logs.tgz.tmp" -C "$LOGS" . && mv "$OUT/.logs.tgz.tmp" "$OUT/gpu_suite_logs.tgz"
}

declare -A STEP  # name -> its line
NAMES=()
for s in "${STEPS[@]}"; do STEP[${s%%|*}]=$s; NAMES+=("${s%%|*}"); done
wanted=("${@:-$CORE}")
[ "${wanted[*]}" = all ] && wanted=("${NAMES[@]}")
wanted=($(echo "${wanted[*]}"))  # "$CORE" as one argument -> its words
for name in "${wanted[@]}"; do
  if [ -z "${STEP[$name]+x}" ]; then
    echo "unknown step '$name' (steps: ${NAMES[*]})" >&2
    exit 2
  fi
done
# Our Mosaic GPU expert kernel (pallas_kernels/mgpu.py, the default on Hopper) passed its GPU tests on an
# H200 (2026-11-26); each new machine checks it again, as code may have changed: before the first step that
# runs it by default (those whose command takes ${MOE_IMPL:-}), on a Hopper GPU, its GPU tests must have
# passed: in this run's `tests` step, or else run now (~30 s). If they fail, skip or hang, those steps run with jax's shipped kernel instead
# (--moe-impl jax_mgpu), and the table says so. The outcome is kept in $LOGS/mgpu_check.status, so that a
# later command on the same warm machine without a tests step does not pay for the check again (one with a
# tests step decides afresh); a MOE_IMPL given to the suite (e.g. MOE_IMPL="--moe-impl jax_mgpu") is used as
# it is, unchecked.
export MOE_IMPL="${MOE_IMPL:-}"
kernel_checked=0
[ -n "$MOE_IMPL" ] && kernel_checked=1
HOPPER=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | grep -c '^9\.0')
check_kernel() {
  local start=$(date +%s) status how=mgpu_check.log
  if [ "${tests_status:-}" = ok ] && ! grep -q "SKIPPED.*test_mgpu.py" "$LOGS/tests.log"; then
    status=ok how="the tests step"
  elif [ -z "${tests_status:-}" ] && [ -s "$LOGS/mgpu_check.status" ]; then  # this command ran no tests step
    status=$(cat "$LOGS/mgpu_check.status") how="an earlier command's check on this machine"
  elif timeout --kill-after=10 100 $PY -m pytest -q -m gpu -k ours tests/pallas_kernels/test_mgpu.py \
         >"$LOGS/mgpu_check.log" 2>&1 && grep -Eq '^[0-9]+ passed' "$LOGS/mgpu_check.log" \
         && ! grep -q skipped "$LOGS/mgpu_check.log"; then
    status=ok
  else
    status=fail failed=1
  fi
  echo "$status" >"$LOGS/mgpu_check.status"
  [ "$status" = ok ] || MOE_IMPL="--moe-impl jax_mgpu"
  echo "expert kernel check: $status ($how); later steps run with ${MOE_IMPL:-the default kernel}" | tee -a "$LOGS/env.log"
  SUMMARY+=("$(printf '| %-24s | %-12s | %5ss | %s | %s |' mgpu_check "$status" $(( $(date +%s) - start )) "$(mem)" \
    "$how; later steps: ${MOE_IMPL:-default kernel}")")
  save
}

for name in "${wanted[@]}"; do
  IFS='|' read -r name limit cmd <<<"${STEP[$name]}"
  if [ "$kernel_checked" -eq 0 ] && [ "$HOPPER" -eq 1 ] && [[ "$cmd" == *MOE_IMPL* ]] \
     && [ $(( BUDGET - ($(date +%s) - SUITE_START) )) -ge "$MIN_STEP" ]; then
    check_kernel
    kernel_checked=1
  fi
  left=$(( BUDGET - ($(date +%s) - SUITE_START) ))
  if [ "$left" -lt "$MIN_STEP" ]; then
    SUMMARY+=("$(printf '| %-24s | %-12s | %5ss | %s | %s |' "$name" "skipped" 0 "$(mem)" "(${left} s of the budget left)")")
    failed=1
    continue
  fi
  cut=0
  [ "$limit" -gt "$left" ] && limit=$left && cut=1
  echo "=== $name (limit ${limit} s, MOE_IMPL='$MOE_IMPL'): $cmd" >"$LOGS/$name.log"
  start=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" bash -c "$cmd" >>"$LOGS/$name.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  # timeout: past its own limit (a failure); cut: ended by the budget (what it printed is what it measured)
  case $rc in 0) status=ok ;; 124|137) status=$([ "$cut" -eq 1 ] && echo cut || echo timeout) ;; *) status="fail($rc)" ;; esac
  [ "$rc" -eq 0 ] || [ "$status" = cut ] || failed=1
  [ "$name" = tests ] && tests_status=$status
  tail -n 25 "$LOGS/$name.log"
  SUMMARY+=("$(printf '| %-24s | %-12s | %5ss | %s | %s |' "$name" "$status" "$secs" "$(mem)" "$name.log")")
  save
done

save
echo
echo "logs: $LOGS (all of them in $OUT/gpu_suite_logs.tgz)"
table
exit $failed
