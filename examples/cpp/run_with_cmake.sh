#!/bin/sh
# ctest runs the example check through this: pip builds in a throwaway environment whose cmake
# is gone by the time the tests run, so fall back to the cmake next to the running ctest.
cmake_bin=$1
shift
if [ ! -x "$cmake_bin" ]; then
  cmake_bin=$(command -v cmake || true)
  if [ -z "$cmake_bin" ] && command -v ctest >/dev/null 2>&1; then
    cmake_bin="$(dirname "$(command -v ctest)")/cmake"
  fi
fi
if [ -z "$cmake_bin" ] || [ ! -x "$cmake_bin" ]; then
  echo "no cmake found to build the example" >&2
  exit 1
fi
exec "$cmake_bin" "$@"
