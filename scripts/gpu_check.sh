#!/usr/bin/env bash
# Builds the extension for the local GPU, runs tests/gpu, a compute-sanitizer pass and the
# benchmarks, keeping logs and JSON under $OUT (default ./gpu_out).
#   scripts/gpu_check.sh [build] [tests] [sanitizer] [bench-gemm] [bench-model] [bench-paging] [tune] [trt]
#                        [serve]
# With no arguments: build tests sanitizer bench-gemm.
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

if has bench-gemm; then
  echo "== bench_fp4_gemm"
  extra=""; has tune && extra="--tune"
  timeout 300 python3 benchmarks/bench_fp4_gemm.py $extra --out "$OUT/fp4_gemm.json" > "$OUT/bench_gemm.log" 2>&1
  [ $? -eq 0 ] || status=1
  tail -28 "$OUT/bench_gemm.log"
fi

if has bench-model; then
  echo "== bench_model"
  timeout 300 python3 benchmarks/bench_model.py ${BENCH_MODEL_ARGS:-} --out "$OUT/model.json" > "$OUT/bench_model.log" 2>&1 || status=1
  tail -25 "$OUT/bench_model.log"
fi
if has bench-paging; then
  echo "== bench_paging"
  df -h "${BENCH_PAGING_DIR:-/tmp}" | tail -1
  timeout ${BENCH_PAGING_TIMEOUT:-560} python3 benchmarks/bench_paging.py --dir "${BENCH_PAGING_DIR:-/tmp/dsfp4_v3}" \
    ${BENCH_PAGING_ARGS:-} --out "$OUT/paging.json" > "$OUT/bench_paging.log" 2>&1 || status=1
  tail -25 "$OUT/bench_paging.log"
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
