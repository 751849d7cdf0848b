// Status → Python exception, shared by the binding files.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "dsfp4/common.h"

namespace dsfp4 {
namespace py_bind {

// Raises the Python exception that matches a failed status; returns normally on success.
inline void throw_if_error(const Status& st) {
  if (st.ok()) return;
  switch (st.code()) {
    case StatusCode::kInvalidArgument: throw pybind11::value_error(st.message());
    case StatusCode::kUnsupported:
      PyErr_SetString(PyExc_NotImplementedError, st.message().c_str());
      throw pybind11::error_already_set();
    case StatusCode::kOutOfMemory:  // MemoryError with the message (std::bad_alloc would drop it)
      PyErr_SetString(PyExc_MemoryError, st.message().c_str());
      throw pybind11::error_already_set();
    default: throw std::runtime_error(st.message());
  }
}

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline Stream stream(std::uintptr_t s) { return reinterpret_cast<Stream>(s); }

void bind_nvfp4(pybind11::module_& m);
void bind_gemm(pybind11::module_& m);
void bind_fp8(pybind11::module_& m);
void bind_moe(pybind11::module_& m);
void bind_paging(pybind11::module_& m);
void bind_cpu_experts(pybind11::module_& m);

}  // namespace py_bind
}  // namespace dsfp4
