// Shared pieces of the dsfp4 TensorRT plugins: logging, field parsing and serialization, the
// IPluginV3 base that carries the boilerplate, and the creator base. Each plugin class only
// states its fields, shapes, formats and enqueue.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dsfp4/common.h"

namespace dsfp4 {
namespace trt {

constexpr const char* kPluginVersion = "1";
constexpr const char* kPluginNamespace = "dsfp4";

// ---- logging ------------------------------------------------------------------------------

void set_logger_finder(nvinfer1::ILoggerFinder* finder);
// Logs an error through TensorRT's logger (stderr when no logger finder was set) and keeps it
// as this thread's last error.
void log_error(const std::string& message);
const std::string& last_error();

// ---- fields -------------------------------------------------------------------------------

const char* field_type_name(nvinfer1::PluginFieldType type);

// Reads a PluginFieldCollection. Every accessor checks name, type and length and records the
// first problem as "<plugin>: field '<name>' ..."; ok() is false after any problem.
class FieldReader {
 public:
  FieldReader(const char* plugin, const nvinfer1::PluginFieldCollection* fc,
              const std::vector<std::string>& known_names);

  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  void fail(const std::string& message);  // records "<plugin>: message" if no error yet
  bool has(const char* name) const { return find(name) != nullptr; }

  // Scalars (length 1). A missing optional field leaves *out unchanged.
  void get(const char* name, int32_t* out, bool required = true);
  void get(const char* name, int64_t* out, bool required = true);
  void get(const char* name, float* out, bool required = true);
  void get_string(const char* name, std::string* out, bool required = true);
  // Arrays of any length ≥ 1; the caller checks the length against the other fields.
  void get_array(const char* name, std::vector<int32_t>* out, bool required = true);
  void get_array(const char* name, std::vector<int8_t>* out, bool required = true);
  void get_array(const char* name, std::vector<float>* out, bool required = true);

 private:
  const nvinfer1::PluginField* find(const char* name) const;
  const nvinfer1::PluginField* expect(const char* name, nvinfer1::PluginFieldType type, bool scalar, bool required);

  std::string plugin_;
  const nvinfer1::PluginFieldCollection* fc_;
  std::string error_;
};

// Builds the PluginFieldCollection a plugin serializes; data pointers refer to the plugin's own
// members, so the collection lives as long as the plugin is unchanged.
class FieldWriter {
 public:
  void clear() { fields_.clear(); }
  void add(const char* name, const int32_t* v, int32_t n = 1) { push(name, v, nvinfer1::PluginFieldType::kINT32, n); }
  void add(const char* name, const int64_t* v, int32_t n = 1) { push(name, v, nvinfer1::PluginFieldType::kINT64, n); }
  void add(const char* name, const float* v, int32_t n = 1) { push(name, v, nvinfer1::PluginFieldType::kFLOAT32, n); }
  void add(const char* name, const int8_t* v, int32_t n) { push(name, v, nvinfer1::PluginFieldType::kINT8, n); }
  void add(const char* name, const std::string& s) {
    push(name, s.c_str(), nvinfer1::PluginFieldType::kCHAR, static_cast<int32_t>(s.size() + 1));
  }
  const nvinfer1::PluginFieldCollection* collection();

 private:
  void push(const char* name, const void* data, nvinfer1::PluginFieldType type, int32_t n) {
    fields_.emplace_back(name, data, type, n);
  }
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection fc_{};
};

// ---- tensors ------------------------------------------------------------------------------

const char* data_type_name(nvinfer1::DataType type);
int64_t volume(const nvinfer1::Dims& d, int begin = 0, int end = -1);
std::string dims_string(const nvinfer1::Dims& d);

// A field-given array copied to the device once and shared by the clones of a plugin.
class DeviceArray {
 public:
  explicit DeviceArray(std::vector<uint8_t> host) : host_(std::move(host)) {}
  ~DeviceArray();
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  // Device copy (made on the first call, on the current device, synchronously: call it from
  // onShapeChange, outside any stream capture); null on failure.
  const void* device(std::string* error);
  const std::vector<uint8_t>& host() const { return host_; }

 private:
  std::mutex mu_;
  std::vector<uint8_t> host_;
  void* device_ = nullptr;
  bool tried_ = false;
};

template <typename T>
std::shared_ptr<DeviceArray> make_device_array(const std::vector<T>& v) {
  std::vector<uint8_t> bytes(v.size() * sizeof(T));
  if (!bytes.empty()) std::memcpy(bytes.data(), v.data(), bytes.size());
  return std::make_shared<DeviceArray>(std::move(bytes));
}

// ---- plugin and creator bases --------------------------------------------------------------

// IPluginV3 with the OneCore / OneBuild / OneRuntime capabilities. Derived supplies kName,
// a copy constructor (clone), write_fields() and the shape, format and enqueue methods.
template <typename Derived>
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime {
 public:
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override {
    switch (type) {
      case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
      case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
      case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  nvinfer1::IPluginV3* clone() noexcept override {
    try {
      return new Derived(static_cast<const Derived&>(*this));
    } catch (const std::exception& e) {
      log_error(std::string(Derived::kName) + ": clone failed: " + e.what());
      return nullptr;
    }
  }
  const char* getPluginName() const noexcept override { return Derived::kName; }
  const char* getPluginVersion() const noexcept override { return kPluginVersion; }
  const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

  int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc*, int32_t, const nvinfer1::DynamicPluginTensorDesc*,
                          int32_t) noexcept override {
    return 0;
  }
  int32_t onShapeChange(const nvinfer1::PluginTensorDesc*, int32_t, const nvinfer1::PluginTensorDesc*,
                        int32_t) noexcept override {
    return 0;
  }
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override { return clone(); }
  const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override {
    writer_.clear();
    static_cast<Derived*>(this)->write_fields(writer_);
    return writer_.collection();
  }

 protected:
  PluginBase() = default;
  PluginBase(const PluginBase&) : writer_() {}

  // Logs "<name>: message" and returns the error code for TensorRT.
  int32_t fail(const std::string& message) const {
    log_error(std::string(Derived::kName) + ": " + message);
    return -1;
  }
  int32_t fail(const Status& st) const { return fail(st.message()); }

 private:
  FieldWriter writer_;
};

// A field a creator advertises: name, type and length (0: variable).
struct FieldSpec {
  std::string name;
  nvinfer1::PluginFieldType type;
  int32_t length;
};

// IPluginCreatorV3One over Plugin::create(FieldReader&) (null when a field is bad) and
// Plugin::field_specs() (the fields the creator advertises, and the only ones it accepts).
template <typename Plugin>
class CreatorBase : public nvinfer1::IPluginCreatorV3One {
 public:
  CreatorBase() : specs_(Plugin::field_specs()) {
    for (const auto& s : specs_) names_.push_back(s.name);
    for (const auto& s : specs_) fields_.emplace_back(s.name.c_str(), nullptr, s.type, s.length);
    fc_.nbFields = static_cast<int32_t>(fields_.size());
    fc_.fields = fields_.data();
  }
  nvinfer1::IPluginV3* createPlugin(const char*, const nvinfer1::PluginFieldCollection* fc,
                                    nvinfer1::TensorRTPhase) noexcept override {
    try {
      FieldReader reader(Plugin::kName, fc, names_);
      std::unique_ptr<Plugin> p;
      if (reader.ok()) p = Plugin::create(reader);
      if (!reader.ok() || !p) {
        log_error(reader.ok() ? std::string(Plugin::kName) + ": invalid fields" : reader.error());
        return nullptr;
      }
      return p.release();
    } catch (const std::exception& e) {
      log_error(std::string(Plugin::kName) + ": createPlugin failed: " + e.what());
      return nullptr;
    }
  }
  const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override { return &fc_; }
  const char* getPluginName() const noexcept override { return Plugin::kName; }
  const char* getPluginVersion() const noexcept override { return kPluginVersion; }
  const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

 private:
  std::vector<FieldSpec> specs_;
  std::vector<std::string> names_;
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection fc_{};
};

}  // namespace trt
}  // namespace dsfp4
