// SlotCache: key → slot maps under LRU or LRFU, with pinned and held keys.
#include <cmath>
#include <limits>
#include <set>
#include <utility>

#include "dsfp4/paging.h"

namespace dsfp4 {
namespace paging {

namespace {
constexpr uint8_t kPinned = 1, kHeld = 2;
constexpr double kNever = -1e300;
}  // namespace

struct SlotCache::Impl {
  std::set<std::pair<double, int64_t>> order;  // evictable cached keys, lowest score first
  std::vector<double> in_order;                // score the key is filed under (NaN: not filed)
};

SlotCache::SlotCache(int64_t num_keys, int capacity, CachePolicy policy, double lambda)
    : policy_(policy), lambda_(lambda) {
  key_slot_.assign(static_cast<size_t>(num_keys), -1);
  slot_key_.assign(static_cast<size_t>(capacity), -1);
  crf_.assign(static_cast<size_t>(num_keys), 0.0);
  last_.assign(static_cast<size_t>(num_keys), 0.0);
  flags_.assign(static_cast<size_t>(num_keys), 0);
  order_ = std::make_shared<Impl>();
  order_->in_order.assign(static_cast<size_t>(num_keys), std::numeric_limits<double>::quiet_NaN());
  for (int s = capacity - 1; s >= 0; --s) free_.push_back(s);
}

double SlotCache::score(int64_t key) const {
  if (policy_ == CachePolicy::kLru) return last_[key];
  if (crf_[key] <= 0.0) return kNever;
  return std::log2(crf_[key]) + lambda_ * last_[key];
}

double SlotCache::priority(int64_t key) const {
  if (policy_ == CachePolicy::kLru) return last_[key];
  return crf_[key] * std::exp2(-lambda_ * (now_ - last_[key]));
}

void SlotCache::reindex(int64_t key) {
  Impl& o = *order_;
  double& filed = o.in_order[key];
  if (!std::isnan(filed)) {
    o.order.erase({filed, key});
    filed = std::numeric_limits<double>::quiet_NaN();
  }
  if (key_slot_[key] >= 0 && flags_[key] == 0) {
    filed = score(key);
    o.order.insert({filed, key});
  }
}

void SlotCache::touch(int64_t key) {
  if (policy_ == CachePolicy::kLrfu) crf_[key] = 1.0 + crf_[key] * std::exp2(-lambda_ * (now_ - last_[key]));
  last_[key] = now_;
  reindex(key);
}

int64_t SlotCache::victim() const {
  if (!free_.empty() || order_->order.empty()) return -1;
  return order_->order.begin()->second;
}

int SlotCache::insert(int64_t key, int64_t* evicted) {
  *evicted = -1;
  if (key_slot_[key] >= 0) return key_slot_[key];
  int slot;
  if (!free_.empty()) {
    slot = free_.back();
    free_.pop_back();
  } else {
    if (order_->order.empty()) return -1;
    const int64_t v = order_->order.begin()->second;
    slot = key_slot_[v];
    erase(v);
    free_.pop_back();  // erase() returned the slot to the free list
    *evicted = v;
  }
  key_slot_[key] = slot;
  slot_key_[slot] = key;
  ++used_;
  reindex(key);
  return slot;
}

void SlotCache::erase(int64_t key) {
  const int slot = key_slot_[key];
  if (slot < 0) return;
  flags_[key] &= static_cast<uint8_t>(~kHeld);
  key_slot_[key] = -1;
  reindex(key);
  slot_key_[slot] = -1;
  free_.push_back(slot);
  --used_;
}

void SlotCache::hold(int64_t key) {
  if (flags_[key] & kHeld) return;
  flags_[key] |= kHeld;
  held_.push_back(key);
  reindex(key);
}

void SlotCache::release_holds() {
  for (int64_t k : held_) {
    flags_[k] &= static_cast<uint8_t>(~kHeld);
    reindex(k);
  }
  held_.clear();
}

int SlotCache::available() const { return static_cast<int>(free_.size() + order_->order.size()); }

void SlotCache::demote(int64_t key) {
  crf_[key] = 0.0;
  last_[key] = kNever;
  reindex(key);
}

bool SlotCache::held(int64_t key) const { return (flags_[key] & kHeld) != 0; }

void SlotCache::set_pinned(int64_t key, bool pinned) {
  if (pinned)
    flags_[key] |= kPinned;
  else
    flags_[key] &= static_cast<uint8_t>(~kPinned);
  reindex(key);
}

bool SlotCache::pinned(int64_t key) const { return (flags_[key] & kPinned) != 0; }

}  // namespace paging
}  // namespace dsfp4
