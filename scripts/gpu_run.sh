#!/usr/bin/env bash
# The GPU run: tests, kernel tuning and benchmarks in one call, logs under $OUT, short table last.
#   bash scripts/gpu_run.sh [stage ...]     stages: info tests multitests tune bench cli e2e multi
#                                           (default: info tests tune bench cli)
# Each stage has its own time limit, so one stage that hangs cannot eat the whole call.
set -uo pipefail
OUT=${OUT:-/tmp/lora_kernels_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# the multi-adapter extension's build cache: inside the checkout (ignored by git) so it can be carried
export LORA_KERNELS_EXT_DIR=${LORA_KERNELS_EXT_DIR:-$PWD/.build/ext}
stages=${*:-info tests tune bench cli}
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

run_stage() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  note "stage $name: rc=$rc in $((SECONDS - t0))s"
  tail -n 25 "$OUT/$name.log"
}

for s in $stages; do
  case $s in
    info)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee -a "$summary"
      python -m lora_kernels info | tee -a "$summary" ;;
    tests)
      run_stage tests ${TESTS_LIMIT:-240} python -m pytest tests -q -p no:cacheprovider --durations=8 -rfE ${TESTS_ARGS:-}
      grep -E "passed|failed|error|^FAILED|^ERROR" "$OUT/tests.log" | tail -n 30 >> "$summary" ;;
    multitests)
      run_stage multitests ${MULTITESTS_LIMIT:-480} python -m pytest tests/test_multi_lora.py -q -m gpu \
        -p no:cacheprovider --durations=8 -rfE
      grep -E "passed|failed|error|^FAILED|^ERROR" "$OUT/multitests.log" | tail -n 30 >> "$summary" ;;
    tune)
      run_stage tune ${TUNE_LIMIT:-150} python benchmarks/tune_lora_linear.py --shapes ${TUNE_SHAPES:-5} --json "$OUT/tune.json"
      grep -E "BEST|gemm|op |copy|host us" "$OUT/tune.log" >> "$summary" ;;
    bench)
      run_stage bench ${BENCH_LIMIT:-400} python -m pytest benchmarks -q -p no:cacheprovider --benchmark-only \
        --benchmark-json="$OUT/bench.json" --benchmark-disable-gc
      python benchmarks/summarize.py "$OUT/bench.json" > "$OUT/bench_table.txt" 2>&1
      cat "$OUT/bench_table.txt" >> "$summary" ;;
    cli)
      run_stage cli ${CLI_LIMIT:-150} python -m lora_kernels bench --quick --json "$OUT/cli.json"
      sed -n '/^bench /,$p' "$OUT/cli.log" >> "$summary" ;;
    e2e)
      run_stage e2e ${E2E_LIMIT:-200} python -m lora_kernels bench --only e2e --json "$OUT/e2e.json"
      sed -n '/^bench /,$p' "$OUT/e2e.log" >> "$summary" ;;
    multi)
      run_stage multi ${MULTI_LIMIT:-200} python -m lora_kernels bench --only multi ${MULTI_QUICK:+--quick} --json "$OUT/multi.json"
      sed -n '/^bench /,$p' "$OUT/multi.log" >> "$summary" ;;
    *) echo "unknown stage $s" ;;
  esac
done
echo "================ summary"
cat "$summary"
