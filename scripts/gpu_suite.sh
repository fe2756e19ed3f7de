#!/usr/bin/env bash
# The first thing a GPU session runs: the GPU tests, then the benchmarks in scripts/.
#
#   bash scripts/gpu_suite.sh                             # the core steps: one device command (< 10 min)
#   bash scripts/gpu_suite.sh all                         # every step (more than one command allows)
#   bash scripts/gpu_suite.sh bench_offload               # only the named steps
#
# A device command is capped at 10 minutes and a session has 15 minutes of device time, the machine's start
# included, and a warm machine goes back after 30 s idle: run the core steps first (timeout_s 600), then at
# once one long step by name if the time left allows (bench_host_attention alone resolves issue 3; issue 4
# needs bench_expert_kernel, issue 5 bench_offload, issue 6 bench_policies, issue 7 bench_throughput_g64/g128,
# and bench_throughput_g64_exp4 for the experts coded in 12 bits, predicted to beat MoE-Lightning's figure).
# PYTHON picks the interpreter (default: python).
# Logs go to $OUT/<step>.log (OUT defaults to ./gpu_suite_out), benchmark results next to them.
# A step that passes its time limit is killed and reported as "timeout"; the table comes last.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_suite_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The HRM profile by name on an H100 or H200: the offload benchmarks then size the pinned-host pool for
# HRM's policy before JAX starts (detected after it starts, the pool must hold every expert).
# These machines have 128 GiB (125 usable, as the profiles say) even where the VM's MemTotal starts lower
# and grows with use: MOE_JAX_HOST_MEMORY_GB tells the engine's host checks (moe_jax/host_memory.py).
case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)" in
  *"H100 80GB"*) HW="--hardware h100-80gb"; export MOE_JAX_HOST_MEMORY_GB="${MOE_JAX_HOST_MEMORY_GB:-125}" ;;
  *H200*) HW="--hardware h200"; export MOE_JAX_HOST_MEMORY_GB="${MOE_JAX_HOST_MEMORY_GB:-125}" ;;
  *) HW="" ;;
esac

# MemTotal and MemAvailable in GiB: the offload steps plan with the HRM profile's 125 GiB, and a VM may show
# less until its memory is used; each step's row records them after it ran.
mem() { awk '/^MemTotal|^MemAvailable/ {printf "%s %.1f ", $1, $2 / 1048576}' /proc/meminfo; }

# One step per line: name|time limit in seconds|command. Add your benchmark here; CORE steps run by default.
CORE="tests bench_host_attention bench_expert_kernel_core bench_offload_quick"
STEPS=(
  "tests|180|$PY -m pytest -m gpu tests -q -rs"
  "bench_host_attention|60|$PY scripts/bench_host_attention.py --batch 64 256 512 --context 1024 4096 --stream-gib 8 --max-kv-gib 16"
  "bench_expert_kernel_core|160|$PY scripts/bench_expert_kernel.py --tokens 1024 4096 --json $OUT/bench_expert_kernel_core.json --out $OUT/bench_expert_kernel_core.md"
  "bench_expert_kernel|420|$PY scripts/bench_expert_kernel.py --json $OUT/bench_expert_kernel.json --out $OUT/bench_expert_kernel.md"
  # Offload engine benchmarks (scripts/bench_offload.py, scripts/bench_throughput.py): Mixtral 8x7B shapes,
  # random weights. Each step fits one 10-minute device command; --append-results writes the markdown
  # section to paste into benchmarks/RESULTS.md. Limits stay under 600 s so that the suite's SIGINT comes
  # first and the scripts still print what they measured.
  "bench_offload_quick|160|$PY scripts/bench_offload.py $HW --layers 4 --gpu-memory-gb 10 --max-batch-size 512 --json $OUT/bench_offload_quick.json --append-results $OUT/bench_offload_quick.md"
  "bench_offload|560|$PY scripts/bench_offload.py $HW --json $OUT/bench_offload.json --append-results $OUT/bench_offload.md"
  "bench_offload_quick_exp4|160|$PY scripts/bench_offload.py $HW --layers 4 --gpu-memory-gb 10 --max-batch-size 512 --expert-codec exp4 --json $OUT/bench_offload_quick_exp4.json --append-results $OUT/bench_offload_quick_exp4.md"
  "bench_prefetch_whole|300|$PY scripts/bench_offload.py $HW --layers 4 --gpu-memory-gb 10 --max-batch-size 512 --prefetch whole --json $OUT/bench_prefetch_whole.json --append-results $OUT/bench_prefetch_whole.md"
  "bench_policies|560|$PY scripts/bench_offload.py $HW --layers 8 --gen-len 32 --max-batch-size 1024 --policies 'auto;64,64,1,0;1024,16,64,0' --json $OUT/bench_policies.json --append-results $OUT/bench_policies.md"
  "bench_continuous_batching|420|$PY scripts/bench_continuous_batching.py --layers 4 --append-results $OUT/bench_continuous_batching.md"
  "bench_vs_pytorch|560|$PY scripts/bench_throughput.py $HW --workloads '' --json $OUT/bench_vs_pytorch.json --plot $OUT/bench_vs_pytorch.png --append-results $OUT/bench_vs_pytorch.md"
  "bench_throughput_g64|560|$PY scripts/bench_throughput.py $HW --workloads mtbench:64 --no-baseline --json $OUT/bench_throughput_g64.json --plot $OUT/bench_throughput_g64.png --append-results $OUT/bench_throughput_g64.md"
  "bench_throughput_g64_24|560|$PY scripts/bench_throughput.py $HW --workloads mtbench:64 --gpu-memory-gb 24 --no-baseline --json $OUT/bench_throughput_g64_24.json --plot $OUT/bench_throughput_g64_24.png --append-results $OUT/bench_throughput_g64_24.md"
  "bench_throughput_g64_exp4|560|$PY scripts/bench_throughput.py $HW --workloads mtbench:64 --expert-codec exp4 --no-baseline --json $OUT/bench_throughput_g64_exp4.json --plot $OUT/bench_throughput_g64_exp4.png --append-results $OUT/bench_throughput_g64_exp4.md"
  "bench_throughput_g128|560|$PY scripts/bench_throughput.py $HW --workloads mtbench:128 --no-baseline --json $OUT/bench_throughput_g128.json --plot $OUT/bench_throughput_g128.png --append-results $OUT/bench_throughput_g128.md"
)

{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())' 2>&1
  echo "host memory: $(mem)"
} | tee "$OUT/env.log"

declare -a SUMMARY
failed=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$step"
  wanted="${*:-$CORE}"
  if [[ " $wanted " != *" all "* && " $wanted " != *" $name "* ]]; then continue; fi
  echo "=== $name: $cmd" >"$OUT/$name.log"
  start=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" bash -c "$cmd" >>"$OUT/$name.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status="fail($rc)" ;; esac
  [ "$rc" -eq 0 ] || failed=1
  tail -n 25 "$OUT/$name.log"
  SUMMARY+=("$(printf '| %-24s | %-9s | %5ss | %s | %s |' "$name" "$status" "$secs" "$(mem)" "$OUT/$name.log")")
done

echo
printf '| %-24s | %-9s | %6s | %s | %s |\n' step status time "host GiB after" log
echo "|---|---|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
exit $failed
