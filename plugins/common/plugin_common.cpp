#include "plugin_common.h"

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdio>

namespace dsfp4 {
namespace trt {

namespace {
std::atomic<nvinfer1::ILoggerFinder*> g_finder{nullptr};
thread_local std::string t_last_error;
}  // namespace

void set_logger_finder(nvinfer1::ILoggerFinder* finder) { g_finder.store(finder); }

void log_error(const std::string& message) {
  t_last_error = message;
  nvinfer1::ILoggerFinder* finder = g_finder.load();
  nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
  if (logger != nullptr)
    logger->log(nvinfer1::ILogger::Severity::kERROR, message.c_str());
  else
    std::fprintf(stderr, "[dsfp4 TensorRT plugins] %s\n", message.c_str());
}

const std::string& last_error() { return t_last_error; }

const char* field_type_name(nvinfer1::PluginFieldType type) {
  using T = nvinfer1::PluginFieldType;
  switch (type) {
    case T::kFLOAT16: return "FLOAT16";
    case T::kFLOAT32: return "FLOAT32";
    case T::kFLOAT64: return "FLOAT64";
    case T::kINT8: return "INT8";
    case T::kINT16: return "INT16";
    case T::kINT32: return "INT32";
    case T::kCHAR: return "CHAR";
    case T::kDIMS: return "DIMS";
    case T::kUNKNOWN: return "UNKNOWN";
    case T::kBF16: return "BF16";
    case T::kINT64: return "INT64";
    case T::kFP8: return "FP8";
    case T::kINT4: return "INT4";
    case T::kFP4: return "FP4";
  }
  return "invalid";
}

FieldReader::FieldReader(const char* plugin, const nvinfer1::PluginFieldCollection* fc,
                         const std::vector<std::string>& known_names)
    : plugin_(plugin), fc_(fc) {
  if (fc_ == nullptr) {
    fail("no field collection");
    return;
  }
  if (fc_->nbFields < 0 || (fc_->nbFields > 0 && fc_->fields == nullptr)) {
    fail("malformed field collection");
    return;
  }
  for (int32_t i = 0; i < fc_->nbFields; ++i) {
    const nvinfer1::PluginField& f = fc_->fields[i];
    if (f.name == nullptr) {
      fail("field " + std::to_string(i) + " has no name");
      return;
    }
    bool known = false;
    for (const auto& n : known_names) known = known || n == f.name;
    if (!known) {
      fail(std::string("unknown field '") + f.name + "'");
      return;
    }
    for (int32_t j = 0; j < i; ++j)
      if (std::strcmp(fc_->fields[j].name, f.name) == 0) {
        fail(std::string("field '") + f.name + "' is given twice");
        return;
      }
    if (f.length < 0 || (f.length > 0 && f.data == nullptr)) {
      fail(std::string("field '") + f.name + "' has no data");
      return;
    }
  }
}

void FieldReader::fail(const std::string& message) {
  if (error_.empty()) error_ = plugin_ + ": " + message;
}

const nvinfer1::PluginField* FieldReader::find(const char* name) const {
  if (fc_ == nullptr || fc_->fields == nullptr) return nullptr;
  for (int32_t i = 0; i < fc_->nbFields; ++i)
    if (fc_->fields[i].name != nullptr && std::strcmp(fc_->fields[i].name, name) == 0) return &fc_->fields[i];
  return nullptr;
}

const nvinfer1::PluginField* FieldReader::expect(const char* name, nvinfer1::PluginFieldType type, bool scalar,
                                                 bool required) {
  if (!ok()) return nullptr;
  const nvinfer1::PluginField* f = find(name);
  if (f == nullptr) {
    if (required) fail(std::string("missing field '") + name + "'");
    return nullptr;
  }
  if (f->type != type) {
    fail(std::string("field '") + name + "' has type " + field_type_name(f->type) + ", expected " +
         field_type_name(type));
    return nullptr;
  }
  if (scalar ? f->length != 1 : f->length < 1) {
    fail(std::string("field '") + name + "' has length " + std::to_string(f->length) + ", expected " +
         (scalar ? "1" : "at least 1"));
    return nullptr;
  }
  return f;
}

void FieldReader::get(const char* name, int32_t* out, bool required) {
  if (auto* f = expect(name, nvinfer1::PluginFieldType::kINT32, true, required))
    std::memcpy(out, f->data, sizeof(int32_t));
}
void FieldReader::get(const char* name, int64_t* out, bool required) {
  if (auto* f = expect(name, nvinfer1::PluginFieldType::kINT64, true, required))
    std::memcpy(out, f->data, sizeof(int64_t));
}
void FieldReader::get(const char* name, float* out, bool required) {
  if (auto* f = expect(name, nvinfer1::PluginFieldType::kFLOAT32, true, required))
    std::memcpy(out, f->data, sizeof(float));
}
void FieldReader::get_string(const char* name, std::string* out, bool required) {
  if (auto* f = expect(name, nvinfer1::PluginFieldType::kCHAR, false, required)) {
    const char* c = static_cast<const char*>(f->data);
    size_t n = 0;
    while (n < static_cast<size_t>(f->length) && c[n] != '\0') ++n;  // with or without a terminating NUL
    out->assign(c, n);
  }
}

template <typename T>
static void read_array(FieldReader& r, const nvinfer1::PluginField* f, std::vector<T>* out) {
  (void)r;
  out->resize(static_cast<size_t>(f->length));
  std::memcpy(out->data(), f->data, out->size() * sizeof(T));
}

void FieldReader::get_array(const char* name, std::vector<int32_t>* out, bool required) {
  if (auto* f = expect(name, nvinfer1::PluginFieldType::kINT32, false, required)) read_array(*this, f, out);
}
void FieldReader::get_array(const char* name, std::vector<int8_t>* out, bool required) {
  if (auto* f = expect(name, nvinfer1::PluginFieldType::kINT8, false, required)) read_array(*this, f, out);
}
void FieldReader::get_array(const char* name, std::vector<float>* out, bool required) {
  if (auto* f = expect(name, nvinfer1::PluginFieldType::kFLOAT32, false, required)) read_array(*this, f, out);
}

const nvinfer1::PluginFieldCollection* FieldWriter::collection() {
  fc_.nbFields = static_cast<int32_t>(fields_.size());
  fc_.fields = fields_.data();
  return &fc_;
}

const char* data_type_name(nvinfer1::DataType type) {
  using T = nvinfer1::DataType;
  switch (type) {
    case T::kFLOAT: return "FLOAT";
    case T::kHALF: return "HALF";
    case T::kINT8: return "INT8";
    case T::kINT32: return "INT32";
    case T::kBOOL: return "BOOL";
    case T::kUINT8: return "UINT8";
    case T::kFP8: return "FP8";
    case T::kBF16: return "BF16";
    case T::kINT64: return "INT64";
    case T::kINT4: return "INT4";
    case T::kFP4: return "FP4";
    case T::kE8M0: return "E8M0";
  }
  return "invalid";
}

int64_t volume(const nvinfer1::Dims& d, int begin, int end) {
  if (end < 0) end = d.nbDims;
  int64_t v = 1;
  for (int i = begin; i < end; ++i) v *= d.d[i];
  return v;
}

std::string dims_string(const nvinfer1::Dims& d) {
  std::string s = "[";
  for (int i = 0; i < d.nbDims; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
  return s + "]";
}

DeviceArray::~DeviceArray() {
  if (device_ != nullptr) cudaFree(device_);
}

const void* DeviceArray::device(std::string* error) {
  std::lock_guard<std::mutex> lock(mu_);
  if (device_ != nullptr) return device_;
  if (tried_) {
    *error = "copying the weights to the device failed earlier";
    return nullptr;
  }
  tried_ = true;
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, host_.size() + 16);
  if (err == cudaSuccess) err = cudaMemcpy(p, host_.data(), host_.size(), cudaMemcpyHostToDevice);
  if (err != cudaSuccess) {
    if (p != nullptr) cudaFree(p);
    *error = std::string("copying the weights to the device failed: ") + cudaGetErrorString(err);
    return nullptr;
  }
  device_ = p;
  return device_;
}

}  // namespace trt
}  // namespace dsfp4
