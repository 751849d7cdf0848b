# Finds TensorRT headers (NvInferRuntime.h) and, if present, its libraries.
#   TENSORRT_ROOT (CMake or environment variable): a TensorRT install or headers tree with include/.
#   Also looked at: <source>/.deps/tensorrt-* (headers copied for a machine without them).
# Sets TensorRT_FOUND, TensorRT_INCLUDE_DIRS, TensorRT_VERSION, TensorRT_LIBRARIES (may be
# empty: the plugins need only headers) and the imported target TensorRT::headers.
set(_trt_hints)
if(TENSORRT_ROOT)
  list(APPEND _trt_hints "${TENSORRT_ROOT}")
endif()
if(DEFINED ENV{TENSORRT_ROOT})
  list(APPEND _trt_hints "$ENV{TENSORRT_ROOT}")
endif()
file(GLOB _trt_deps LIST_DIRECTORIES true "${PROJECT_SOURCE_DIR}/.deps/tensorrt-*")
list(APPEND _trt_hints ${_trt_deps})

find_path(TensorRT_INCLUDE_DIR NvInferRuntime.h HINTS ${_trt_hints} PATH_SUFFIXES include NO_DEFAULT_PATH)
if(NOT TensorRT_INCLUDE_DIR)
  find_path(TensorRT_INCLUDE_DIR NvInferRuntime.h PATH_SUFFIXES include include/x86_64-linux-gnu)
endif()

if(TensorRT_INCLUDE_DIR AND EXISTS "${TensorRT_INCLUDE_DIR}/NvInferVersion.h")
  file(READ "${TensorRT_INCLUDE_DIR}/NvInferVersion.h" _trt_version_h)
  foreach(_part MAJOR MINOR PATCH)
    string(REGEX MATCH "#define TRT_${_part}_ENTERPRISE +([0-9]+)" _m "${_trt_version_h}")
    if(NOT _m)
      string(REGEX MATCH "#define NV_TENSORRT_${_part} +([0-9]+)" _m "${_trt_version_h}")
    endif()
    set(_trt_${_part} "${CMAKE_MATCH_1}")
  endforeach()
  set(TensorRT_VERSION "${_trt_MAJOR}.${_trt_MINOR}.${_trt_PATCH}")
endif()

find_library(TensorRT_nvinfer_LIBRARY NAMES nvinfer HINTS ${_trt_hints} PATH_SUFFIXES lib lib64)
find_library(TensorRT_nvinfer_lean_LIBRARY NAMES nvinfer_lean libnvinfer_lean.so.11 libnvinfer_lean.so.10
             HINTS ${_trt_hints} PATH_SUFFIXES lib lib64 tensorrt_lean_libs)
set(TensorRT_LIBRARIES)
foreach(_lib TensorRT_nvinfer_LIBRARY TensorRT_nvinfer_lean_LIBRARY)
  if(${_lib})
    list(APPEND TensorRT_LIBRARIES "${${_lib}}")
  endif()
endforeach()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(TensorRT REQUIRED_VARS TensorRT_INCLUDE_DIR VERSION_VAR TensorRT_VERSION)
if(TensorRT_FOUND)
  set(TensorRT_INCLUDE_DIRS "${TensorRT_INCLUDE_DIR}")
  if(NOT TARGET TensorRT::headers)
    add_library(TensorRT::headers INTERFACE IMPORTED)
    set_target_properties(TensorRT::headers PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${TensorRT_INCLUDE_DIR}")
  endif()
endif()
