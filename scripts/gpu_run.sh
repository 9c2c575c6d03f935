#!/usr/bin/env bash
# The GPU run: tests, kernel tuning and benchmarks in one call, logs under $OUT, short table last.
#   bash scripts/gpu_run.sh [stage ...]     stages: info tests ptests multitests tune kt diag hostprof mprof profile ncu mncu msweep gprobe fsweep ssweep pfsweep dsweep sanitize extout
#                                                   bench cli e2e multi
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
    ptests)  # the whole suite (or TESTS_ARGS) in PTESTS_N processes: kernel compiles are CPU-bound
      run_stage ptests ${TESTS_LIMIT:-300} python scripts/par_pytest.py -n ${PTESTS_N:-6} --log-dir /tmp/ptests -- \
        ${TESTS_ARGS:-tests} ${PTESTS_K:+-k "$PTESTS_K"}
      grep -E "tests in|^FAILED|^ERROR|part " "$OUT/ptests.log" | head -n 40 >> "$summary"
      grep -h -B2 -A25 "^___" /tmp/ptests/*.log 2>/dev/null | head -n 400 >> "$OUT/ptests.log"
      grep -h -E "^E |^FAILED" /tmp/ptests/*.log 2>/dev/null | head -n 200 >> "$OUT/ptests.log"  # the assertions themselves
      for f in /tmp/ptests/*.log; do  # a part without a summary line crashed: keep its last lines
        grep -qE "[0-9]+ (passed|failed|skipped)" "$f" || { echo "== $f"; tail -n 60 "$f"; } >> "$OUT/ptests.log"
      done ;;
    kt)  # each kernel with the config table's choice, at the e2e model's shapes, bf16 vs fp32 adapters
      for adt in bfloat16 float32; do
        run_stage "kt_$adt" ${KT_LIMIT:-90} python benchmarks/tune_lora_linear.py --table-only --adapter-dtype $adt \
          ${KT_SHAPES:---shape 8192x4096x4096x16 --shape 8192x2048x2048x16 --shape 8192x2048x512x16 --shape 8192x2048x8192x16 --shape 8192x8192x2048x16}
        grep -E "^==|table|op |gemm" "$OUT/kt_$adt.log" >> "$summary"
      done ;;
    diag)
      run_stage diag ${DIAG_LIMIT:-90} python scripts/diag_model_precision.py
      grep -E "grads err" "$OUT/diag.log" >> "$summary" ;;
    hostprof)
      run_stage hostprof ${HOSTPROF_LIMIT:-90} python benchmarks/profile_host.py 8192 1024 1024 16
      head -n 60 "$OUT/hostprof.log" >> "$summary" ;;
    mprof)  # the mixed-batch model: host vs wall, syncs, kernel time by kind per setting
      run_stage mprof ${MPROF_LIMIT:-240} python benchmarks/profile_multi_model.py --layers ${PROFILE_LAYERS:-4}
      sed -n '/^== /,$p' "$OUT/mprof.log" | grep -v -- "--" | grep -v "^  .*us  *[0-9]*  \[" >> "$summary" ;;
    profile)
      run_stage profile ${PROFILE_LIMIT:-150} python benchmarks/profile_e2e.py --layers ${PROFILE_LAYERS:-4}
      sed -n '/^CUDA ms/,/TOTAL/p' "$OUT/profile.log" >> "$summary" ;;
    ncu)
      run_stage ncu ${NCU_LIMIT:-120} ncu --clock-control none --kernel-name regex:_lora_ --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section WarpStateStats --section LaunchStats ${NCU_EXTRA:-} python benchmarks/ncu_kernels.py ${NCU_SHAPE:-}
      grep -E "^  _lora|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Block Limit|Dynamic Shared" \
        "$OUT/ncu.log" >> "$summary" ;;
    mncu)  # the multi-adapter forward kernels of three decode cases under Nsight Compute
      run_stage mncu ${NCU_LIMIT:-150} ncu --clock-control none --kernel-name regex:"rows_|sort_segments|bgmv|sgmv" \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        --section LaunchStats ${NCU_EXTRA:-} python benchmarks/ncu_multi.py ${MNCU_CASES:-}
      grep -E "^case|^  [a-z_]+.*\(|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Block Limit Reg|Waves Per SM" \
        "$OUT/mncu.log" >> "$summary" ;;
    msweep)  # grid targets of the register kernels on decode cases
      run_stage msweep ${MSWEEP_LIMIT:-150} python benchmarks/sweep_multi_rows.py ${MSWEEP_CASES:-}
      cat "$OUT/msweep.log" >> "$summary" ;;
    dsweep)  # the fused op's inference path at few rows: Triton kernels vs cuBLAS vs naive
      run_stage dsweep ${DSWEEP_LIMIT:-150} python benchmarks/sweep_decode.py ${DSWEEP_SHAPE:-}
      cat "$OUT/dsweep.log" >> "$summary" ;;
    fsweep)  # the fused op with the LoRA expansion in a Triton GEMM's epilogue vs expand + cuBLAS
      run_stage fsweep ${FSWEEP_LIMIT:-300} python benchmarks/sweep_fused_gemm.py
      cat "$OUT/fsweep.log" >> "$summary" ;;
    ssweep)  # the shrink pass alone: pointer loads vs TMA tiles
      run_stage ssweep ${SSWEEP_LIMIT:-240} python benchmarks/sweep_shrink.py
      cat "$OUT/ssweep.log" >> "$summary" ;;
    gprobe)  # a persistent Triton GEMM (with / without warp specialization) against cuBLAS
      run_stage gprobe ${GPROBE_LIMIT:-240} python benchmarks/probe_triton_gemm.py
      cat "$OUT/gprobe.log" >> "$summary" ;;
    pfsweep)  # the register shrink's L2 prefetch budget on decode cases that sort in the call
      run_stage pfsweep ${PFSWEEP_LIMIT:-150} python benchmarks/sweep_multi_prefetch.py ${PFSWEEP_CASES:-}
      cat "$OUT/pfsweep.log" >> "$summary" ;;
    sanitize)  # the multi-adapter kernels' small case under compute-sanitizer (memory, races, barriers)
      for tool in memcheck racecheck synccheck; do
        run_stage "san_$tool" ${SAN_LIMIT:-200} compute-sanitizer --tool $tool --error-exitcode 9 \
          python -m pytest tests/test_multi_lora.py -q -m gpu -k sanitizer -p no:cacheprovider
        grep -E "ERROR SUMMARY|passed|failed" "$OUT/san_$tool.log" | tail -n 3 >> "$summary"
      done ;;
    extout)  # bring the built extension back (carry .build into later calls while csrc/ is unchanged)
      tar czf "$OUT/ext.tgz" .build/ext 2>/dev/null && ls -la "$OUT/ext.tgz" | tee -a "$summary" ;;
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
