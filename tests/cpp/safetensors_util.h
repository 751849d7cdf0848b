// Test helper: writes routed experts as a ModelOpt NVFP4 safetensors checkpoint (8-byte
// little-endian header length, JSON header, data) with plain file I/O, and returns where each
// expert's tensors lie, as paging::ExpertStore reads them.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "dsfp4/paging.h"
#include "moe_test_util.h"

namespace dsfp4_test {

struct StoredTensor {
  std::string name, dtype;  // safetensors dtype: U8, F8_E4M3, F32
  std::vector<int64_t> shape;
  const uint8_t* data;
  int64_t nbytes;
};

// Writes the tensors to `path`; offsets[i] is the absolute file offset of tensor i's bytes.
inline bool write_safetensors(const std::string& path, const std::vector<StoredTensor>& tensors,
                              std::vector<int64_t>* offsets) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  int64_t data_off = 0;
  for (const StoredTensor& t : tensors) {
    header += ",\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":[";
    for (size_t i = 0; i < t.shape.size(); ++i) header += (i ? "," : "") + std::to_string(t.shape[i]);
    header += "],\"data_offsets\":[" + std::to_string(data_off) + "," + std::to_string(data_off + t.nbytes) + "]}";
    data_off += t.nbytes;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  const uint64_t n = header.size();
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return false;
  bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(header.data(), 1, n, f) == n;
  offsets->clear();
  int64_t at = 8 + static_cast<int64_t>(n);
  for (const StoredTensor& t : tensors) {
    ok = ok && std::fwrite(t.data, 1, static_cast<size_t>(t.nbytes), f) == static_cast<size_t>(t.nbytes);
    offsets->push_back(at);
    at += t.nbytes;
  }
  return std::fclose(f) == 0 && ok;
}

// Writes layers[l]'s experts (ModelOpt tensors) as model.layers.<first_layer + l>.mlp.experts.<e>.*
// into `path` (file index 0) and fills `stored` ([layers][experts], the ExpertStore's order:
// gate, up, down × weight, weight_scale, weight_scale_2).
inline bool write_expert_checkpoint(const std::string& path, const std::vector<Experts>& layers, int first_layer,
                                    std::vector<dsfp4::paging::StoredExpert>* stored) {
  static const char* const kProj[3] = {"gate_proj", "up_proj", "down_proj"};
  std::vector<StoredTensor> tensors;
  for (size_t l = 0; l < layers.size(); ++l) {
    const Experts& ex = layers[l];
    for (int e = 0; e < ex.experts; ++e)
      for (int part = 0; part < 3; ++part) {
        const int64_t rows = part < 2 ? ex.inter : ex.hidden, cols = part < 2 ? ex.hidden : ex.inter;
        const std::string base = "model.layers." + std::to_string(first_layer + static_cast<int>(l)) +
                                 ".mlp.experts." + std::to_string(e) + "." + kProj[part] + ".";
        const size_t i = static_cast<size_t>(e) * 3 + part;
        tensors.push_back({base + "weight", "U8", {rows, cols / 2}, ex.mo_packed[i].data(),
                           static_cast<int64_t>(ex.mo_packed[i].size())});
        tensors.push_back({base + "weight_scale", "F8_E4M3", {rows, cols / 16}, ex.mo_scale[i].data(),
                           static_cast<int64_t>(ex.mo_scale[i].size())});
        tensors.push_back({base + "weight_scale_2", "F32", {}, reinterpret_cast<const uint8_t*>(&ex.mo_global[i]), 4});
      }
  }
  std::vector<int64_t> offsets;
  if (!write_safetensors(path, tensors, &offsets)) return false;
  stored->assign(tensors.size() / 9, dsfp4::paging::StoredExpert());
  for (size_t i = 0; i < tensors.size(); ++i) {
    dsfp4::paging::TensorRange& r = (*stored)[i / 9].part[i % 9];
    r.file = 0;
    r.offset = offsets[i];
    r.nbytes = tensors[i].nbytes;
    r.name = tensors[i].name;
  }
  return true;
}

}  // namespace dsfp4_test
