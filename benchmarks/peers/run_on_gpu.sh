#!/usr/bin/env bash
# The llama.cpp peer on a GPU host (no network needed): experts on the CPU, the rest on the GPU.
#
# Needs, copied from the build machine (paths relative to the repository root):
#   .deps/llama-cuda/bin        llama-bench, its libraries and backend modules (build_llama_cpp.sh cuda)
#   .deps/llama.cpp/gguf-py     the gguf package that make_gguf.py writes with
# or .deps/llama-cuda-pack/ (the parts an earlier build here wrote to $OUT), or, if neither is
# there but the source is (.deps/llama.cpp), it builds them first (all cores; a few minutes) and
# writes them to $OUT/llama_cuda_bin.tar.xz.part-* for next time.
#
# Writes one GGUF per expert type to $LLAMA_GGUF_DIR (default /dev/shm: the file and llama.cpp's
# copy of its experts both sit in RAM: 21.8 + 19 GB for 3 layers), checks that the model gives
# finite logits, benches it, deletes it, and writes $OUT/llama_cpp.json (run_peer's result); the
# tables go to stdout.
#
#   bash benchmarks/peers/run_on_gpu.sh > llama_cpp.log   # LLAMA_LAYERS=3 LLAMA_EXPERT_TYPES=q4_0,nvfp4
#   scripts/gpu_check.sh peer-llama                      # the same, log in $OUT/peer_llama.log
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${LLAMA_BIN:-$root/.deps/llama-cuda/bin}"
out="${OUT:-$root/bench_out}"
mkdir -p "$out"

pack="$root/.deps/llama-cuda-pack"  # the binaries as an earlier run here sent them back
if [[ ! -x "$bin/llama-bench" ]] && compgen -G "$pack/llama_cuda_bin.tar.xz.part-*" > /dev/null; then
  mkdir -p "$root/.deps/llama-cuda"
  cat "$pack"/llama_cuda_bin.tar.xz.part-* | xz -d | tar -x -C "$root/.deps/llama-cuda"
  bin="$root/.deps/llama-cuda/bin"
fi
if [[ ! -x "$bin/llama-bench" ]]; then
  if [[ -f "$root/.deps/llama.cpp/CMakeLists.txt" ]]; then
    echo "no llama-bench in $bin: building it here"
    LLAMA_CPU_NATIVE=1 bash "$root/benchmarks/peers/build_llama_cpp.sh" cuda "$(nproc)" 2>&1 | tail -n 3
    bin="$root/.deps/llama-cuda/bin"
    # send the binaries back (parts of at most 15 MiB) so that later runs can skip the build:
    # put the parts in .deps/llama-cuda-pack/ and bring that folder along
    { tar -c -C "$root/.deps/llama-cuda" bin | xz -T0 | split -b 15M - "$out/llama_cuda_bin.tar.xz.part-" \
      && ls -la "$out"/llama_cuda_bin.tar.xz.part-*; } || echo "could not pack the binaries (no xz?)"
  else
    echo "no llama-bench in $bin and no llama.cpp source in .deps: copy .deps/llama-cuda/bin here" >&2
    exit 1
  fi
fi
python3 - <<EOF
import sys; sys.path.insert(0, "$root/benchmarks/peers")
from llama_cpp import cuda_library_path; print("CUDA libraries:", cuda_library_path() or "none found")
EOF

# threads: all cores and half of them (if the cores are hyper-threads, half can be faster)
threads="${LLAMA_THREADS:-$(nproc),$(( $(nproc) / 2 ))}"
extra=()
[[ "${LLAMA_CHECK:-1}" == 1 ]] && extra+=(--check)  # check_logits on each model (one more load)
[[ "${LLAMA_TINY:-0}" == 1 ]] && extra+=(--tiny)    # the reduced shape, to try the script on a CPU
PYTHONUNBUFFERED=1 python3 "$root/benchmarks/peers/llama_cpp.py" --bin "$bin" \
  --make "${LLAMA_GGUF_DIR:-/dev/shm}" --layers "${LLAMA_LAYERS:-3}" \
  --expert-types "${LLAMA_EXPERT_TYPES:-q4_0,nvfp4}" --threads "$threads" "${extra[@]}" \
  --prompts "${LLAMA_PROMPTS:-512,2048}" --out "$out/llama_cpp.json"
