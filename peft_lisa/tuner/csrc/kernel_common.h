// What both of the CPU kernel's attention routes use (shared_attention.cpp, decode_rows.h): a thread's scratch
// buffers and the mask of one row of logits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace lisa_kernel {

// n values of T in one of a thread's scratch buffers (slot: which one), kept across calls: no allocation, page faults
// or zeroing once the thread has held a buffer of that size (a call at 128 tokens took 1.75x the base's sdpa time
// with them, 2.2x with buffers allocated per call). Holds whatever was there before.
template <typename T>
struct Scratch {
  T* ptr;
  int64_t n;
  T* data() const { return ptr; }
  T* begin() const { return ptr; }
  T* end() const { return ptr + n; }
  T& operator[](int64_t i) const { return ptr[i]; }
};

constexpr int kScratchSlots = 16;

template <typename T>
Scratch<T> scratch(int slot, int64_t n) {
  thread_local std::vector<char> slots[kScratchSlots];
  std::vector<char>& bytes = slots[slot];
  if (bytes.size() < n * sizeof(T)) bytes.resize(n * sizeof(T));
  return {reinterpret_cast<T*>(bytes.data()), n};
}

// The mask of one row of logits (n keys) added to s: a float mask as is, clamped to the lowest float, a boolean one as
// 0 where true and the lowest float where false, as the additive mask functional.additive_mask makes: a row with no
// key allowed attends evenly.
template <typename mask_t>
void add_mask_row(float* s, const mask_t* mask, int64_t stride_k, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const mask_t value = mask[c * stride_k];
    if constexpr (std::is_same_v<mask_t, bool>) {
      if (!value) s[c] = std::numeric_limits<float>::lowest();
    } else {
      s[c] = std::max(s[c] + static_cast<float>(value), std::numeric_limits<float>::lowest());  // -inf: lowest
    }
  }
}

}  // namespace lisa_kernel
