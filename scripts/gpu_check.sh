#!/usr/bin/env bash
# Builds the extension for the local GPU, runs tests/gpu, a compute-sanitizer pass and the
# benchmarks, keeping logs and JSON under $OUT (default ./gpu_out).
#   scripts/gpu_check.sh [prebuilt] [build] [tests] [sanitizer|sanitizer-paged] [bench-gemm] [bench-model] [bench-paging] [tune] [trt] [fp8]
#                        [peer-llama] [cpu-experts] [bench-report] [serve]
# With no arguments: build tests sanitizer bench-gemm.
# prebuilt (instead of build, when device time is short): takes the extension built elsewhere for
# this machine's Python from .prebuilt/_C.so (cmake with -DPython_EXECUTABLE=python3.12,
# DSFP4_CUDA_ARCHS=90a-real) and runs from the source tree (PYTHONPATH=python).
# fp8: the FP8 block GEMM's GPU tests, compute-sanitizer on a quick subset and bench_fp8_gemm.py
# (add tune to sweep its tactics); logs under $OUT/fp8_*.
# cpu-experts (after build): the CPU expert kernels on every instruction set of this CPU (ctest and
# tests/test_cpu_experts.py), then benchmarks/bench_cpu_experts.py → $OUT/cpu_experts.json.
# bench-report: `deepseek-fp4 bench` and `deepseek-fp4 tune` on a paged demo model (experts of 1.6 MB,
# a quarter of them on the GPU); the report and JSON land in $OUT/bench, the tuner's result in
# $OUT/tuned.json. Screenshot the report elsewhere: python tests/headless_browser.py
# $OUT/bench/perf_report.html docs/perf_report.png
# trt: builds with the TensorRT plugins (headers from TENSORRT_ROOT, else .deps/tensorrt-11.1),
# runs ctest (the C++ example from the installed package, the expert runner), the plugin tests
# (tests/test_trt_plugins.py with the lean runtime's registry, tests/gpu/test_trt_plugins_gpu.py)
# and compute-sanitizer on the expert runner and the paging store as its source; logs under
# $OUT/trt_*.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
steps="${*:-build tests sanitizer bench-gemm}"
has() { [[ " $steps " == *" $1 "* ]]; }
status=0

wheels=$(ls .whl/*.whl .whl-build/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then  # wheels carried to a machine without a registry
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

if has prebuilt; then
  suffix=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  cp .prebuilt/_C.so "python/deepseek_fp4_plugin/_C$suffix" || exit 1
  export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
  python3 -c "import deepseek_fp4_plugin as p; print('prebuilt extension, CUDA kernels:', p.has_cuda_kernels())" || exit 1
fi

if has build; then
  arch=$(python3 -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}' + ('a' if c[0]==9 else ''))")
  echo "== build for sm_$arch"
  start=$(date +%s)
  DSFP4_CUDA_ARCHS="${arch}-real" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  echo "build ok in $(( $(date +%s) - start )) s"
  (cd build && ctest --output-on-failure > "$OUT/ctest.log" 2>&1) || { status=1; tail -20 "$OUT/ctest.log"; }
fi

if has trt; then
  echo "== TensorRT plugins, C++ example"
  trt_root=${TENSORRT_ROOT:-}
  if [ -z "$trt_root" ] && [ -f .deps/tensorrt-11.1/include/NvInferRuntime.h ]; then trt_root=$PWD/.deps/tensorrt-11.1; fi
  if [ -z "$trt_root" ]; then
    echo "no TensorRT headers: set TENSORRT_ROOT or copy them to .deps/tensorrt-11.1"; status=1
  else
    export TENSORRT_ROOT=$trt_root
    trt_lib=$(find /tmp/site -name 'libnvinfer_lean.so.*' 2>/dev/null | sort | head -1)
    arch=$(python3 -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}' + ('a' if c[0]==9 else ''))")
    start=$(date +%s)
    DSFP4_CUDA_ARCHS="${arch}-real" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/trt_build.log" 2>&1
    if [ $? -ne 0 ] || [ ! -f build/plugins/libdsfp4_trt_plugins.so ]; then
      tail -40 "$OUT/trt_build.log"; grep "dsfp4:" "$OUT/trt_build.log"; status=1
    else
      echo "build ok in $(( $(date +%s) - start )) s; $(grep -o 'dsfp4: TensorRT plugins.*' "$OUT/trt_build.log" | head -1)"
      (cd build && timeout 600 ctest --output-on-failure -V > "$OUT/trt_ctest.log" 2>&1) || status=1
      grep -E "Test +#|tests passed|MISMATCH|checks passed|not run" "$OUT/trt_ctest.log" | tail -20
      echo "lean runtime: ${trt_lib:-none found under /tmp/site}"
      # separate processes: once the lean runtime's registry has loaded the library, plugin
      # messages go to TensorRT's logger rather than the test driver's
      DSFP4_TRT_LIB="$trt_lib" timeout 600 python3 -m pytest tests/test_trt_plugins.py -v -rs > "$OUT/trt_tests.log" 2>&1
      [ $? -eq 0 ] || status=1
      timeout 600 python3 -m pytest tests/gpu/test_trt_plugins_gpu.py -v -rs >> "$OUT/trt_tests.log" 2>&1
      [ $? -eq 0 ] || status=1
      tail -8 "$OUT/trt_tests.log"
      for t in test_moe_experts_cpp test_expert_store_source_cpp; do
        timeout 600 compute-sanitizer --tool memcheck --error-exitcode 3 "build/tests/cpp/$t" \
          > "$OUT/trt_sanitizer_$t.log" 2>&1
        rc=$?; tail -3 "$OUT/trt_sanitizer_$t.log"; echo "sanitizer ($t) exit $rc"; [ $rc -eq 0 ] || status=1
      done
    fi
  fi
fi

if has tests; then
  echo "== tests/gpu"
  timeout ${GPU_TESTS_TIMEOUT:-480} python3 -m pytest ${GPU_TESTS:-tests/gpu} -q -rs --durations=8 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if has sanitizer; then
  echo "== compute-sanitizer memcheck (quick sizes)"
  DSFP4_QUICK=1 timeout 600 compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q -x \
    "tests/gpu/test_fp4_gemm_gpu.py::test_every_tactic" "tests/gpu/test_fp4_gemm_gpu.py::test_grouped_gemm" \
    "tests/gpu/test_moe_gpu.py::test_permute_combine_cuda_equal_cpu" \
    "tests/gpu/test_moe_gpu.py::test_combine_invalid_perm_cuda_is_nan_not_a_crash" \
    "tests/gpu/test_moe_gpu.py::test_route_cuda_equals_cpu" \
    "tests/gpu/test_paging_gpu.py::test_grouped_gemm_units_gpu_and_host_memory" \
    "tests/gpu/test_paging_gpu.py::test_paged_equals_resident[ssd_paged_layers-graph]" \
    "tests/gpu/test_paging_gpu.py::test_paged_equals_resident[zero_copy-eager]" \
    "tests/gpu/test_paging_gpu.py::test_read_error_mid_generation" -k "not 4096 and not 1024" \
    > "$OUT/sanitizer.log" 2>&1
  rc=$?; tail -6 "$OUT/sanitizer.log"; echo "sanitizer exit $rc"; [ $rc -eq 0 ] || status=1
fi
if has sanitizer || has sanitizer-paged; then
  echo "== compute-sanitizer: the paged engine (decode pipeline, ready words) and the waiting GEMM"
  DSFP4_QUICK=1 timeout ${SANITIZER_TIMEOUT:-900} compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q -x \
    "tests/gpu/test_pipeline_gpu.py::test_units_gemm_computes_each_expert_as_its_copy_lands" \
    "tests/gpu/test_pipeline_gpu.py::test_units_gemm_wait_times_out_as_nan_and_flag" \
    "tests/gpu/test_paging_gpu.py::test_paged_equals_resident[ssd_paged-graph]" \
    "tests/gpu/test_paging_gpu.py::test_paged_equals_resident[ssd_paged_no_pipeline-eager]" \
    "tests/gpu/test_pipeline_gpu.py::test_cpu_lane_auto_equals_off_under_replay" \
    > "$OUT/sanitizer_paged.log" 2>&1
  rc=$?; tail -4 "$OUT/sanitizer_paged.log"; echo "sanitizer (paged engine) exit $rc"; [ $rc -eq 0 ] || status=1
  for tool in racecheck synccheck; do
    timeout ${SANITIZER_TIMEOUT:-600} compute-sanitizer --tool $tool --error-exitcode 3 python3 -m pytest -q -x \
      "tests/gpu/test_pipeline_gpu.py::test_units_gemm_computes_each_expert_as_its_copy_lands" \
      "tests/gpu/test_paging_gpu.py::test_grouped_gemm_units_gpu_and_host_memory" > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?; tail -2 "$OUT/sanitizer_$tool.log"; echo "$tool exit $rc"; [ $rc -eq 0 ] || status=1
  done
fi

if has bench-gemm; then
  echo "== bench_fp4_gemm"
  extra=""; has tune && extra="--tune"
  timeout 300 python3 benchmarks/bench_fp4_gemm.py $extra --out "$OUT/fp4_gemm.json" > "$OUT/bench_gemm.log" 2>&1
  [ $? -eq 0 ] || status=1
  tail -28 "$OUT/bench_gemm.log"
fi

if has fp8; then
  echo "== fp8: tests/gpu/test_fp8_gemm_gpu.py"
  timeout 300 python3 -m pytest tests/gpu/test_fp8_gemm_gpu.py tests/gpu/test_paged_fp8_gpu.py -q -rs --durations=5 2>&1 |
    tee "$OUT/fp8_tests.log" | tail -12
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "== fp8: compute-sanitizer memcheck (quick sizes)"
  DSFP4_QUICK=1 timeout 300 compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q -x \
    "tests/gpu/test_fp8_gemm_gpu.py::test_every_tactic" "tests/gpu/test_fp8_gemm_gpu.py::test_grouped_gemm" \
    "tests/gpu/test_fp8_gemm_gpu.py::test_grouped_gemm_units_gpu_and_host_memory" \
    "tests/gpu/test_fp8_gemm_gpu.py::test_blockscaled_on_hopper" \
    "tests/gpu/test_fp8_gemm_gpu.py::test_quantization_bit_exact_with_cpu" > "$OUT/fp8_sanitizer.log" 2>&1
  rc=$?; tail -4 "$OUT/fp8_sanitizer.log"; echo "fp8 sanitizer exit $rc"; [ $rc -eq 0 ] || status=1
  echo "== bench_fp8_gemm"
  extra=""; has tune && extra="--tune"
  timeout 240 python3 benchmarks/bench_fp8_gemm.py $extra --out "$OUT/fp8_gemm.json" > "$OUT/fp8_bench.log" 2>&1
  [ $? -eq 0 ] || status=1
  tail -30 "$OUT/fp8_bench.log"
fi

if has cpu-experts; then
  echo "== CPU experts: every instruction set of this CPU against the reference, then the kernel benchmark"
  (cd build && timeout 300 ctest -R cpu_experts --output-on-failure -V) > "$OUT/cpu_experts_ctest.log" 2>&1 || status=1
  grep -E "skipped isa|bit-equal|checks passed|check\(s\) failed|CHECK failed" "$OUT/cpu_experts_ctest.log" | tail -20
  timeout 300 python3 -m pytest tests/test_cpu_experts.py -q -rs > "$OUT/cpu_experts_tests.log" 2>&1 || status=1
  tail -4 "$OUT/cpu_experts_tests.log"
  timeout 480 python3 benchmarks/bench_cpu_experts.py ${BENCH_CPU_EXPERTS_ARGS:-} --out "$OUT/cpu_experts.json" \
    > "$OUT/bench_cpu_experts.log" 2>&1 || status=1
  tail -18 "$OUT/bench_cpu_experts.log"
fi

if has bench-model; then
  echo "== bench_model"
  timeout 300 python3 benchmarks/bench_model.py ${BENCH_MODEL_ARGS:-} --out "$OUT/model.json" > "$OUT/bench_model.log" 2>&1 || status=1
  tail -25 "$OUT/bench_model.log"
fi
if has bench-paging; then
  echo "== bench_paging"
  df -h "${BENCH_PAGING_DIR:-/tmp}" | tail -1
  if [ -n "${TESTS_DURING_WRITE:-}" ]; then
    # GPU tests while the model is written (disk-bound), before anything is timed
    ( timeout ${GPU_TESTS_TIMEOUT:-300} python3 -m pytest $TESTS_DURING_WRITE -q -rs --durations=8 > "$OUT/gpu_tests.log" 2>&1
      echo "pytest exit $?" >> "$OUT/gpu_tests.log" ) &
    tests_pid=$!
    start=$(date +%s)
    python3 benchmarks/bench_paging.py --dir "${BENCH_PAGING_DIR:-/tmp/dsfp4_v3}" --write-only 2>&1 | tail -2
    echo "model written in $(( $(date +%s) - start )) s"
    wait $tests_pid
    tail -15 "$OUT/gpu_tests.log"; grep -q "pytest exit 0" "$OUT/gpu_tests.log" || status=1
  fi
  timeout ${BENCH_PAGING_TIMEOUT:-560} python3 benchmarks/bench_paging.py --dir "${BENCH_PAGING_DIR:-/tmp/dsfp4_v3}" \
    --cpu-experts "${BENCH_PAGING_CPU:-auto}" ${BENCH_PAGING_ARGS:-} --out "$OUT/paging.json" \
    > "$OUT/bench_paging.log" 2>&1 || status=1
  tail -25 "$OUT/bench_paging.log"
fi
if has peer-llama; then  # llama.cpp, experts on the CPU (docs/peers.md): $OUT/llama_cpp.json
  echo "== llama.cpp peer"
  timeout ${PEER_LLAMA_TIMEOUT:-560} bash benchmarks/peers/run_on_gpu.sh > "$OUT/peer_llama.log" 2>&1 \
    || status=1
  tail -25 "$OUT/peer_llama.log"
fi
if has bench-report; then
  echo "== deepseek-fp4 bench + tune (paged demo model)"
  demo=${BENCH_REPORT_MODEL:-/tmp/dsfp4_demo}
  [ -f "$demo/config.json" ] || python3 -c "from deepseek_fp4_plugin.tiny import make_tiny; make_tiny('$demo', \
seed=4, hidden_size=1024, moe_intermediate_size=1024, n_routed_experts=64, num_hidden_layers=4, n_group=8, \
topk_group=4, num_experts_per_tok=8)" || status=1
  limit=$(python3 -c "from deepseek_fp4_plugin.bench import memory_limit_for as m; print(m('$demo', 0.25))")
  echo "memory limit $limit GiB (a quarter of the experts on the GPU)"
  timeout 300 python3 -m deepseek_fp4_plugin.cli bench --model "$demo" --memory-limit "$limit" --cpu-cache-size 4 \
    --use-cuda-graph on --requests 8 --prompt-tokens 256 --decode-tokens 96 --out "$OUT/bench" \
    > "$OUT/bench_report.log" 2>&1 || status=1
  grep -v "it/s\]\|batch/s\]\|s/batch\]" "$OUT/bench_report.log" | tail -16
  timeout ${TUNE_TIMEOUT:-330} python3 -m deepseek_fp4_plugin.cli tune --model "$demo" --memory-limit "$limit" \
    --time-budget ${TUNE_BUDGET:-240} --out "$OUT/tuned.json" > "$OUT/tune.log" 2>&1 || status=1
  tail -4 "$OUT/tune.log"
fi
if has serve; then
  # continuous batching on CUDA, then the server benchmark (tiny model unless BENCH_SERVER_ARGS
  # names one). The server needs fastapi, uvicorn, prometheus-client and openai: on a machine
  # without a registry, carry them in .whl/ (pip download --only-binary=:all: --python-version 3.12
  # --platform manylinux2014_x86_64 --platform any -d .whl fastapi uvicorn prometheus-client openai)
  echo "== serve"
  timeout 600 python3 -m pytest tests/gpu/test_server_gpu.py -q -s -rs 2>&1 | tee "$OUT/serve_tests.log" | tail -14
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  timeout ${BENCH_SERVER_TIMEOUT:-560} python3 benchmarks/bench_server.py --device cuda --use-cuda-graph \
    ${BENCH_SERVER_ARGS:-} --out "$OUT/server.json" > "$OUT/bench_server.log" 2>&1 || status=1
  tail -8 "$OUT/bench_server.log"
fi
exit $status
