// Experts served by a weight store (the paging store, or any other owner of expert weights) to
// the MoE expert runner (moe_experts_units_cuda) and the Dsfp4MoeExperts TensorRT plugin.
//
// An expert's weights lie in one "unit": a block of memory the GPU can read (device memory or
// mapped pinned host memory) holding its gate_up [2·inter, hidden] and down [hidden, inter]
// NVFP4 weights in the tiled layout (nvfp4.h) and their float32 global scales, at the byte
// offsets given by ExpertUnitLayout. Each step, the runner names the experts it will read;
// the source makes them readable and answers with a device table of unit addresses.
#pragma once

#include <cstdint>

#include "dsfp4/common.h"

namespace dsfp4 {

// Byte offsets of an expert's parts from the start of its unit. The paging store
// (paging.h: expert_unit_layout) lays its units out this way, with per-tile scales for both
// weights (gate and up keep their own global scales).
struct ExpertUnitLayout {
  int64_t hidden = 0;                // H; gate_up is [2·inter, H], down is [H, inter]
  int64_t inter = 0;                 // I
  int64_t gate_up_qweight = 0;       // tiled_weight_bytes(2I, H) bytes, 16-byte aligned
  int64_t gate_up_qscale = 0;        // tiled_scale_bytes(2I, H) bytes, 16-byte aligned
  int64_t gate_up_global_scale = 0;  // float32 [1], or [ceil(2I/16)] when per tile; 4-byte aligned
  bool gate_up_scale_per_tile = false;
  int64_t down_qweight = 0;          // tiled_weight_bytes(H, I) bytes, 16-byte aligned
  int64_t down_qscale = 0;           // tiled_scale_bytes(H, I) bytes, 16-byte aligned
  int64_t down_global_scale = 0;     // float32 [1], or [ceil(H/16)] when per tile
  bool down_scale_per_tile = false;
  int64_t bytes = 0;                 // the whole unit, when the source states it (0: unstated)
};

// Checks alignments, that the layout is for [hidden, inter] experts and, when bytes is set,
// that every part lies inside the unit; the message names the offending member.
Status check_expert_unit_layout(const ExpertUnitLayout& layout, int64_t hidden, int64_t inter);

// The experts of one step. unit_addr[e] is the GPU-visible address of expert e's unit
// (16-byte aligned) for every expert the step named; other entries are not read.
struct ExpertTable {
  const uint64_t* unit_addr = nullptr;  // device memory, [num_experts]
  int num_experts = 0;
  ExpertUnitLayout layout;
};

class ExpertSource {
 public:
  virtual ~ExpertSource() = default;

  // Makes the experts named by expert_ids (device int32 [count]; values in [0, num_experts),
  // negative entries name none) readable by work queued on `stream` after this call, and
  // fills *table. The table and the units stay valid until release() on the same layer.
  // May block the host (e.g. to read the ids) but must not synchronize other streams.
  virtual Status acquire(int layer, const int32_t* expert_ids, int64_t count, Stream stream,
                         ExpertTable* table) = 0;

  // Every read of this step's units is queued on `stream`: the units may be evicted once
  // the stream has passed this point.
  virtual Status release(int layer, Stream stream) = 0;
};

}  // namespace dsfp4
