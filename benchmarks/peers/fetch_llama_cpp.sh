#!/usr/bin/env bash
# Downloads the llama-cpp-python sdist (which vendors llama.cpp) and keeps only what llama-bench
# needs: ggml core, the CPU and CUDA backends, libllama, common, the llama-bench tool, gguf-py and
# the licenses. Result: .deps/llama.cpp (ignored by git), about 40 MB of source.
#
#   bash benchmarks/peers/fetch_llama_cpp.sh [VERSION]     # default: the version below
set -euo pipefail

version="${1:-0.3.36}"   # vendors llama.cpp 0c1e57098 (its CHANGELOG)
root="$(cd "$(dirname "$0")/../.." && pwd)"
deps="$root/.deps"
dest="$deps/llama.cpp"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --no-build-isolation: pip only reads the sdist's metadata (scikit-build-core must be installed);
# with isolation it would build CMake from source just to do that.
python3 -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
    -d "$work" "llama-cpp-python==$version"
tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
sdist="$work/llama_cpp_python-$version"
src="$sdist/vendor/llama.cpp"
commit="$(sed -n 's/.*update llama.cpp to ggml-org\/llama.cpp@\([0-9a-f]*\).*/\1/p' "$sdist/CHANGELOG.md" \
          | head -1)"

rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
(cd "$src" && cp -r LICENSE CMakeLists.txt cmake include src common vendor licenses gguf-py "$dest.tmp/")
mkdir -p "$dest.tmp/ggml/src" "$dest.tmp/tools"
(cd "$src/ggml" && cp -r CMakeLists.txt cmake include "$dest.tmp/ggml/")
(cd "$src/ggml/src" && find . -maxdepth 1 -type f -exec cp {} "$dest.tmp/ggml/src/" \; \
    && cp -r ggml-cpu ggml-cuda "$dest.tmp/ggml/src/")
cp -r "$src/tools/llama-bench" "$dest.tmp/tools/"
# only the benchmark tool (upstream's list builds every tool)
printf 'find_package(Threads REQUIRED)\nllama_add_compile_flags()\nadd_subdirectory(llama-bench)\n' \
    > "$dest.tmp/tools/CMakeLists.txt"
# the build must not take the commit of an enclosing repository for llama.cpp's
sed -i "s/^set(BUILD_COMMIT \"unknown\")/set(BUILD_COMMIT \"${commit:-unknown}\")/" \
    "$dest.tmp/cmake/build-info.cmake"
printf 'llama-cpp-python %s\nllama.cpp %s\n' "$version" "${commit:-unknown}" > "$dest.tmp/SOURCE"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "llama.cpp ${commit:-unknown} (llama-cpp-python $version) -> $dest ($(du -sh "$dest" | cut -f1))"
