# Run by ctest (cpp_example_installed, through run_with_cmake.sh): installs the build tree into a
# scratch prefix, builds examples/cpp against the installed package and runs it.
#   cmake -DBUILD_DIR=... -DSOURCE_DIR=... -DWORK_DIR=... [-DGENERATOR=...] [-DMAKE_PROGRAM=...]
#         [-DCXX_COMPILER=...] [-DCUDA_BIN_DIR=...] [-DTENSORRT_INCLUDE=...] -P build_and_run.cmake
file(REMOVE_RECURSE "${WORK_DIR}")

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}")
  endif()
endfunction()

run(${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${WORK_DIR}/prefix")
set(args -S "${SOURCE_DIR}/examples/cpp" -B "${WORK_DIR}/build" "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix")
# The build's generator, unless its make program is gone (pip's throwaway build environment);
# then ninja from PATH, else CMake's default.
if(GENERATOR AND MAKE_PROGRAM AND EXISTS "${MAKE_PROGRAM}")
  list(APPEND args -G "${GENERATOR}" "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
else()
  find_program(_ninja ninja)
  if(_ninja)
    list(APPEND args -G Ninja "-DCMAKE_MAKE_PROGRAM=${_ninja}")
  endif()
endif()
if(CXX_COMPILER)
  list(APPEND args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
if(CUDA_BIN_DIR)
  get_filename_component(_cuda_root "${CUDA_BIN_DIR}" DIRECTORY)
  list(APPEND args "-DCUDAToolkit_ROOT=${_cuda_root}")
endif()
if(TENSORRT_INCLUDE)
  get_filename_component(_trt_root "${TENSORRT_INCLUDE}" DIRECTORY)
  list(APPEND args "-DTENSORRT_ROOT=${_trt_root}")
endif()
run(${CMAKE_COMMAND} ${args})
run(${CMAKE_COMMAND} --build "${WORK_DIR}/build")
run("${WORK_DIR}/build/moe_layer")
