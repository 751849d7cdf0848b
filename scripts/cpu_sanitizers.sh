#!/usr/bin/env bash
# The CPU side under sanitizers (no GPU needed): the C++ tests and the installed example under
# ThreadSanitizer and under AddressSanitizer + UndefinedBehaviorSanitizer, then the store's
# threads (pipeline thread, simulated copy streams, I/O pool, CPU expert lane) under
# ThreadSanitizer through the pipeline tests. Reports that name this library fail the run;
# third-party ones (torch, tokenizers: not instrumented) are counted apart.
#   scripts/cpu_sanitizers.sh [cpp] [python]      (default: both; work under $WORK, default /tmp/dsfp4_san)
set -uo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/dsfp4_san}
steps="${*:-cpp python}"
has() { [[ " $steps " == *" $1 "* ]]; }
mkdir -p "$WORK"
status=0
# gcc: the TSan runtime preloaded into Python below is gcc's
common=(-G Ninja -DCMAKE_CXX_COMPILER=g++ -DDSFP4_WITH_CUDA=OFF -DDSFP4_WITH_TRT_PLUGINS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo)

if has cpp; then
  for san in thread address,undefined; do
    dir=$WORK/cpp_${san%%,*}
    flags="-fsanitize=$san -fno-omit-frame-pointer"
    [ "$san" = thread ] || flags="$flags -fno-sanitize-recover=undefined"
    cmake -S "$src" -B "$dir" "${common[@]}" -DDSFP4_BUILD_PYTHON=OFF -DCMAKE_CXX_FLAGS="$flags" \
      -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=$san" > "$dir.log" 2>&1 && cmake --build "$dir" >> "$dir.log" 2>&1 \
      || { echo "$san: build failed (see $dir.log)"; status=1; continue; }
    for t in "$dir"/tests/cpp/test_*; do
      [ -x "$t" ] || continue
      if "$t" > "$t.log" 2>&1 && ! grep -q "Sanitizer" "$t.log"; then echo "$san $(basename "$t"): clean"
      else echo "$san $(basename "$t"): FAILED (see $t.log)"; status=1; fi
    done
    # the installed package and the example built against it, with the same flags
    cmake --install "$dir" --prefix "$dir/prefix" > /dev/null && \
      cmake -S "$src/examples/cpp" -B "$dir/example" -G Ninja -DCMAKE_PREFIX_PATH="$dir/prefix" \
        -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=$san" > /dev/null && \
      cmake --build "$dir/example" > /dev/null 2>&1
    if "$dir/example/moe_layer" > "$dir/example.log" 2>&1 && ! grep -q "Sanitizer" "$dir/example.log"; then
      echo "$san examples/cpp: clean"
    else echo "$san examples/cpp: FAILED (see $dir/example.log)"; status=1; fi
  done
fi

if has python; then
  py=$(python3 -c "import sys; print(sys.executable)")   # the interpreter itself (a shim would crash under TSan)
  tsan=$(gcc -print-file-name=libtsan.so)
  dir=$WORK/py_thread
  pkg=$WORK/py_thread_pkg
  pybind=$(python3 -c "import pybind11; print(pybind11.get_cmake_dir())")
  cmake -S "$src" -B "$dir" "${common[@]}" -DDSFP4_BUILD_TESTS=OFF -Dpybind11_DIR="$pybind" \
    -DPython_EXECUTABLE="$py" -DDSFP4_PYTHON_OUTPUT_DIR="$pkg" \
    -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread \
    > "$dir.log" 2>&1 && cmake --build "$dir" --target _C >> "$dir.log" 2>&1 || { echo "python: build failed"; exit 1; }
  # a copy of the package with the instrumented extension
  rm -rf "$WORK/snap" && mkdir -p "$WORK/snap" && cp -r "$src/python" "$src/tests" "$WORK/snap/"
  rm -f "$WORK/snap/python/deepseek_fp4_plugin/_C"*.so && cp "$pkg"/_C*.so "$WORK/snap/python/deepseek_fp4_plugin/"
  rm -rf "$WORK/tsan_logs" && mkdir -p "$WORK/tsan_logs"
  (cd "$WORK/snap" && LD_PRELOAD="$tsan" TSAN_OPTIONS="halt_on_error=0 exitcode=0 report_signal_unsafe=0 log_path=$WORK/tsan_logs/r" \
    PYTHONPATH="$WORK/snap/python" "$py" -m pytest tests/test_pipeline.py -q -p no:cacheprovider \
    -k "units_gemm or host_unit_not_refilled or table_row or mailbox or cpu_lane_equals or cpu_lane_fault or asynchronous_copies" \
    > "$WORK/tsan_pytest.log" 2>&1) || { echo "python: tests failed (see $WORK/tsan_pytest.log)"; status=1; }  # reports are judged below
  tail -1 "$WORK/tsan_pytest.log"
  python3 - "$WORK/tsan_logs" "$src" <<'EOF' || status=1
import pathlib, sys
reports = [r for f in pathlib.Path(sys.argv[1]).glob("r.*") for r in f.read_text().split("==================")
           if "WARNING: ThreadSanitizer" in r]
# a frame of this library: its namespace, or one of its source files
ours = [r for r in reports if "dsfp4::" in r or f"{sys.argv[2]}/cpp/" in r or f"{sys.argv[2]}/python/bindings/" in r]
print(f"ThreadSanitizer: {len(ours)} reports in this library, {len(reports) - len(ours)} in uninstrumented third-party code")
for r in ours[:3]:
    print("\n".join(r.strip().splitlines()[:12]))
sys.exit(1 if ours else 0)
EOF
fi
exit $status
