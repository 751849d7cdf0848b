#!/usr/bin/env bash
# Builds llama-bench from the trimmed llama.cpp in .deps/llama.cpp (see fetch_llama_cpp.sh).
#
#   bash benchmarks/peers/build_llama_cpp.sh cuda [JOBS]   # -> .deps/llama-cuda/bin
#   bash benchmarks/peers/build_llama_cpp.sh cpu  [JOBS]   # -> .deps/llama-cpu/bin (this machine's CPU)
#
# cuda: CUDA backend for sm_90 (H100/H200) and a CPU backend for Sapphire Rapids class hosts
# (AVX-512 VNNI/BF16/VBMI, AMX-INT8), both loaded at run time (GGML_BACKEND_DL), so the binary
# needs no GPU to start. The CUDA FlashAttention kernels are left out (LLAMA_CUDA_FA=ON keeps
# them): they are much of the compile time, and with experts on the CPU the attention's share of a
# step is small; llama-bench's -fa auto then runs attention without them. cuBLAS comes from the
# CUDA toolkit, else from the nvidia-cublas wheel (found through python3, or
# CUBLAS_ROOT=<its nvidia/cu13 folder>); it is linked, not copied into the result.
# LLAMA_CPU_NATIVE=1 builds the CPU backend for the build host's CPU instead (-march=native).
# Environment: LLAMA_CPP_SRC, LLAMA_BUILD_ROOT, CUDA_HOME (default /usr/local/cuda, cuda-13.0 or nvcc's).
set -euo pipefail

kind="${1:?usage: build_llama_cpp.sh cuda|cpu [jobs]}"
jobs="${2:-$(nproc)}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
src="${LLAMA_CPP_SRC:-$root/.deps/llama.cpp}"
out="${LLAMA_BUILD_ROOT:-$root/.deps}/llama-$kind"
cuda_home="${CUDA_HOME:-}"
if [[ -z "$cuda_home" ]]; then  # the toolkit: the usual places, else where nvcc lives
  nvcc_dir="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")")"
  for d in /usr/local/cuda /usr/local/cuda-13.0 "$nvcc_dir"; do
    if [[ -x "$d/bin/nvcc" && -e "$d/include/cuda.h" ]]; then cuda_home="$d"; break; fi
  done
fi
[[ -f "$src/CMakeLists.txt" ]] || { echo "no llama.cpp source at $src: run fetch_llama_cpp.sh" >&2; exit 1; }
# the source sits inside another repository, whose commit is not llama.cpp's: name it explicitly
# (fetch_llama_cpp.sh records it) and keep git from finding the enclosing repository
commit="$(awk '$1 == "llama.cpp" {print $2}' "$src/SOURCE" 2>/dev/null || true)"
export GIT_CEILING_DIRECTORIES="$(dirname "$src")"

common=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF -DLLAMA_SUBPROCESS=OFF
        -DGGML_NATIVE=OFF -DGGML_OPENMP=ON
        -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON -DLLAMA_BUILD_COMMIT="${commit:-unknown}" -DLLAMA_BUILD_NUMBER=0)
x86_base=(-DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_F16C=ON -DGGML_FMA=ON -DGGML_AVX2=ON -DGGML_BMI2=ON)

case "$kind" in
  cuda)
    [[ -n "$cuda_home" ]] || { echo "no CUDA toolkit found: set CUDA_HOME" >&2; exit 1; }
    export PATH="$cuda_home/bin:$PATH"
    extra=(-DGGML_CUDA=ON -DGGML_CUDA_FA="${LLAMA_CUDA_FA:-OFF}" -DCMAKE_CUDA_ARCHITECTURES=90
           -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc"
           -DGGML_CUDA_NCCL=OFF "${x86_base[@]}" -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON
           -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=ON -DGGML_AMX_INT8=ON)
    if [[ "${LLAMA_CPU_NATIVE:-0}" == 1 ]]; then  # built on the host it runs on: its own CPU features
      extra+=(-DGGML_NATIVE=ON)
    fi
    if [[ ! -e "$cuda_home/include/cublas_v2.h" ]]; then
      cublas="${CUBLAS_ROOT:-}"
      if [[ -z "$cublas" ]]; then  # the nvidia-cublas wheel (a namespace package: look in each part)
        find_cublas='import nvidia, os
print(next((os.path.join(p, "cu13") for p in nvidia.__path__
            if os.path.exists(os.path.join(p, "cu13", "include", "cublas_v2.h"))), ""))'
        cublas="$(python3 -c "$find_cublas" 2>/dev/null || true)"
      fi
      [[ -e "$cublas/include/cublas_v2.h" ]] || { echo "no cuBLAS: set CUBLAS_ROOT" >&2; exit 1; }
      lib="$(ls "$cublas"/lib/libcublas.so* | head -1)"
      liblt="$(ls "$cublas"/lib/libcublasLt.so* | head -1)"
      extra+=(-DCUDA_cublas_LIBRARY="$lib" -DCUDA_cublasLt_LIBRARY="$liblt"
              "-DCMAKE_CUDA_FLAGS=-I$cublas/include" "-DCMAKE_CXX_FLAGS=-I$cublas/include")
    fi
    if [[ ! -e "$cuda_home/lib64/stubs/libcuda.so" ]] && ! ldconfig -p | grep -q 'libcuda\.so '; then
      # no linkable libcuda.so (no driver, or only the driver's libcuda.so.1): an empty
      # libcuda.so.1 to link against; the module's cu* symbols resolve against the driver at load
      mkdir -p "$out/stubs"
      echo 'void dsfp4_cuda_stub(void) {}' > "$out/stubs/stub.c"
      gcc -shared -Wl,-soname,libcuda.so.1 -o "$out/stubs/libcuda.so" "$out/stubs/stub.c"
      extra+=(-DCUDA_cuda_driver_LIBRARY="$out/stubs/libcuda.so")
    fi
    target=(llama-bench ggml-cuda ggml-cpu)
    ;;
  cpu)
    # this machine's CPU; AVX-512 added where it has it
    extra=("${x86_base[@]}")
    if grep -q avx512f /proc/cpuinfo; then extra+=(-DGGML_AVX512=ON); fi
    target=(llama-bench ggml-cpu)
    ;;
  *) echo "unknown build kind '$kind' (cuda|cpu)" >&2; exit 1 ;;
esac

start=$(date +%s)
cmake -S "$src" -B "$out/build" "${common[@]}" "${extra[@]}" >"$out.configure.log"
cmake --build "$out/build" --target "${target[@]}" -j "$jobs"
rm -rf "$out/bin"
mkdir -p "$out/bin"
cp "$out/build/bin/llama-bench" "$out/bin/"
# each library once, under the name the loader asks for (its soname; backend modules have none)
for f in "$out"/build/bin/*.so*; do
  [[ -L "$f" ]] && continue
  soname="$(readelf -d "$f" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')"
  cp "$f" "$out/bin/${soname:-$(basename "$f")}"
done
# the finite-logits check of the random model, against the same libllama
g++ -O2 -std=c++17 "$root/benchmarks/peers/check_logits.cpp" -I"$src/include" -I"$src/ggml/include" \
    -L"$out/build/bin" -lllama -lggml -lggml-base -Wl,-rpath,'$ORIGIN' -o "$out/bin/check_logits"
strip --strip-unneeded "$out"/bin/*
if [[ "$kind" == cuda ]]; then
  # the C++ and OpenMP runtimes it was linked with (llama_cpp.py puts this folder first on
  # LD_LIBRARY_PATH), for hosts with an older libstdc++; the CUDA runtime and cuBLAS are the host's
  for l in libstdc++.so.6 libgomp.so.1; do cp -L "$(g++ -print-file-name=$l)" "$out/bin/"; done
fi
echo "built $kind in $(( $(date +%s) - start )) s: $(du -sh "$out/bin" | cut -f1) in $out/bin"
