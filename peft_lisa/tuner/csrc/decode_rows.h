// A few query rows of a LiSA layer's attention on CPU (decode steps), inference only (docs/method.md, "Decoding").
// For query head h of sequence b and query row i:
//   S[h, i] = sum_g mix[h, g] handed[b, g, i] + q[b, h, i] k[b, h / (H / H_e)]^T      (softcapped where asked)
//   out[b, i, h] = softmax(S[h, i] + M) v[b, h / (H / H_kv)]
// A source layer has no handed logits: its term is its own q k^T, scaled. A shared layer mixes the row its source
// handed on by P and adds its rank-r term. S (before the mask) is written out where asked: the layer hands it on.
// One task takes the query heads that read one value head (or one query head, where there are fewer such groups than
// twice the threads), holds their rows' logits whole in a thread's scratch buffer (T_k floats a row), and reads each
// key and value row once for all its rows: a decode step reads the cache once, as the base's sdpa does, in one call
// instead of a dozen torch operations.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernel_common.h"
#include "softmax_lanes.h"

namespace lisa_decode {

using lisa_softmax::Floats;
using lisa_softmax::kLanes;
using lisa_softmax::load_lanes;
using lisa_softmax::load_partial;
using lisa_softmax::reduce_lanes;

typedef uint16_t Halves __attribute__((vector_size(LISA_VECTOR_BYTES / 2)));  // kLanes 16-bit lanes
typedef uint32_t Words __attribute__((vector_size(LISA_VECTOR_BYTES)));

// Keys per tile of the A V pass: a tile of values (64 keys x 128 bf16 or float32 values: 16-32 KB) stays in the
// core's L1 cache while every row of the task reads it.
constexpr int64_t kValueTile = 64;
// Output values per pass over a tile: four vectors of float32 lanes, held in registers.
constexpr int64_t kChunk = 4 * kLanes;

// n <= kLanes values at p as float32 lanes, zeros beyond n: float32 as is, bf16 by a shift of its bits, any other
// type one value at a time.
template <typename T>
inline Floats float_lanes(const T* p, int64_t n = kLanes) {
  if constexpr (std::is_same_v<T, float>) {
    return n == kLanes ? load_lanes(p) : load_partial(p, n, 0.f);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (n == kLanes) {
#if defined(__AVX512F__)  // one widening load and a shift (GCC's code for the vector types below is slower)
      const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return (Floats)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
#else
      Halves raw;
      std::memcpy(&raw, p, sizeof(raw));
      const Words bits = __builtin_convertvector(raw, Words) << 16;
      Floats x;
      std::memcpy(&x, &bits, sizeof(x));
      return x;
#endif
    }
  }
  float lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = l < n ? static_cast<float>(p[l]) : 0.f;
  return load_lanes(lanes);
}

// q . k over width values (q float32, k any type).
template <typename T>
inline float dot(const float* q, const T* k, int64_t width) {
  Floats sum = {};
  int64_t c = 0;
  for (; c + kLanes <= width; c += kLanes) sum += load_lanes(q + c) * float_lanes(k + c);
  float total = c > 0 ? reduce_lanes<false>(sum) : 0.f;
  for (; c < width; ++c) total += q[c] * static_cast<float>(k[c]);
  return total;
}

// The even and the odd lanes of a and b side by side, added: lanes [0, kLanes / 2) hold a's lanes summed in pairs,
// the others b's.
#if LISA_VECTOR_BYTES == 64
#define LISA_EVEN_LANES 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define LISA_ODD_LANES 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#elif LISA_VECTOR_BYTES == 32
#define LISA_EVEN_LANES 0, 2, 4, 6, 8, 10, 12, 14
#define LISA_ODD_LANES 1, 3, 5, 7, 9, 11, 13, 15
#else
#define LISA_EVEN_LANES 0, 2, 4, 6
#define LISA_ODD_LANES 1, 3, 5, 7
#endif
inline Floats pair_sums(Floats a, Floats b) {
#if defined(__clang__) || __GNUC__ >= 12
  return __builtin_shufflevector(a, b, LISA_EVEN_LANES) + __builtin_shufflevector(a, b, LISA_ODD_LANES);
#else
  return __builtin_shuffle(a, b, lisa_softmax::Ints{LISA_EVEN_LANES}) +
         __builtin_shuffle(a, b, lisa_softmax::Ints{LISA_ODD_LANES});
#endif
}

// The sums of n consecutive lanes of n vectors x (overwritten; n a power of two up to kLanes), in order: lane l holds
// the sum of x[l / (kLanes / n)]'s (l % (kLanes / n))-th group of n lanes; for n = kLanes, the sum of x[l]'s lanes.
// n - 1 pair_sums, where a sum of each vector alone takes log2(kLanes) dependent steps and leaves a scalar.
inline Floats sum_each(Floats* x, int64_t n) {
  for (; n > 1; n /= 2) {
    for (int64_t j = 0; j < n / 2; ++j) x[j] = pair_sums(x[2 * j], x[2 * j + 1]);
  }
  return x[0];
}

// acc[0 .. n) += sum over the tile's keys t of p[t] v[t, 0 .. n), n <= kChunk: the n outputs stay in registers
// while the tile's value rows (leading dimension ld) are read.
template <typename scalar_t>
inline void accumulate_chunk(const float* p, const scalar_t* v, int64_t ld, int64_t keys, float* acc, int64_t n) {
  Floats x[4];
  const int64_t vectors = (n + kLanes - 1) / kLanes;
  auto lanes = [&](int64_t j) { return std::min(kLanes, n - j * kLanes); };  // of vector j
  for (int64_t j = 0; j < 4; ++j) x[j] = j < vectors ? float_lanes(acc + j * kLanes, lanes(j)) : Floats{};
  if (n == kChunk) {  // the common case (head sizes 64, 128, 256): four full vectors, unrolled
    for (int64_t t = 0; t < keys; ++t) {
      const scalar_t* row = v + t * ld;
      x[0] += p[t] * float_lanes(row);
      x[1] += p[t] * float_lanes(row + kLanes);
      x[2] += p[t] * float_lanes(row + 2 * kLanes);
      x[3] += p[t] * float_lanes(row + 3 * kLanes);
    }
  } else {
    for (int64_t t = 0; t < keys; ++t) {
      for (int64_t j = 0; j < vectors; ++j) x[j] += p[t] * float_lanes(v + t * ld + j * kLanes, lanes(j));
    }
  }
  for (int64_t j = 0; j < vectors; ++j) std::memcpy(acc + j * kLanes, &x[j], lanes(j) * sizeof(float));
}

// Rows of a task the A V pass takes together (kRowsAtOnce x 4 accumulators, with the four value vectors, fit the
// registers: 32 with AVX-512, 16 on narrower x86 builds; NEON's 32 registers would hold four rows too, untried).
constexpr int kRowsAtOnce = LISA_VECTOR_BYTES == 64 ? 4 : 2;

// accumulate_chunk for kRows rows at once (probabilities p + j p_ld, outputs acc + j acc_ld) over a whole chunk
// (kChunk values): each value vector is read and widened once for all the rows (the query heads of a KV group).
template <int kRows, typename scalar_t>
inline void accumulate_rows(const float* p, int64_t p_ld, const scalar_t* v, int64_t ld, int64_t keys, float* acc,
                            int64_t acc_ld) {
  Floats x[kRows][4];
  for (int64_t j = 0; j < kRows; ++j) {
    for (int64_t u = 0; u < 4; ++u) x[j][u] = load_lanes(acc + j * acc_ld + u * kLanes);
  }
  for (int64_t t = 0; t < keys; ++t) {
    const scalar_t* row = v + t * ld;
    const Floats v0 = float_lanes(row), v1 = float_lanes(row + kLanes);
    const Floats v2 = float_lanes(row + 2 * kLanes), v3 = float_lanes(row + 3 * kLanes);
    for (int64_t j = 0; j < kRows; ++j) {
      const float w = p[j * p_ld + t];
      x[j][0] += w * v0;
      x[j][1] += w * v1;
      x[j][2] += w * v2;
      x[j][3] += w * v3;
    }
  }
  for (int64_t j = 0; j < kRows; ++j) std::memcpy(acc + j * acc_ld, x[j], sizeof(x[j]));
}

// The operands of one call, with their strides (elements); see decode_rows below for their shapes.
template <typename scalar_t, typename key_type, typename mask_t>
struct Rows {
  const float* handed;  // null: no handed logits
  int64_t handed_heads, handed_b, handed_h, handed_q;
  const float* mix;
  const float* query;
  int64_t width;
  const key_type* key;
  int64_t key_heads, key_stride_b, key_stride_h, key_stride_t;
  const scalar_t* value;
  int64_t value_heads, value_b, value_h, value_t, value_dim;
  const mask_t* mask;  // null: causal
  int64_t mask_b, mask_q, mask_k;
  float softcap;  // 0: none
  int64_t batch, heads, q_len, k_len;
  float* logits;  // null: not asked
  scalar_t* out;

  // s[r, t] += q_r . k[t] for n rows reading the keys k (T_k x W, row stride key_stride_t), each tile of kLanes keys
  // read once for all the rows (from L1 after the first): a key a vector or more where W is a multiple of kLanes
  // (wide_tile), kLanes / W keys a vector where W divides kLanes (a rank-r term: packed_tile), the tile transposed
  // for other W < kLanes (transposed_tile), one key at a time for other W (dot). A key's sum takes the same steps
  // wherever it lies: the last keys are padded to a whole tile with zeros, and keys that do not lie packed are copied
  // packed first, so that a logit depends neither on the number of keys nor on the cache's layout.
  void add_term(float* s, const float* const* q, int64_t n, const key_type* k) const {
    const bool packs = packed_width();
    if (!wide_width() && !packs && width >= kLanes) {
      for (int64_t t = 0; t < k_len; ++t) {
        for (int64_t r = 0; r < n; ++r) s[r * k_len + t] += dot(q[r], k + t * key_stride_t, width);
      }
      return;
    }
    const auto repeated = lisa_kernel::scratch<float>(4, n * kLanes);  // each row's q, kLanes / W times (packs)
    for (int64_t r = 0; packs && r < n; ++r) {
      for (int64_t l = 0; l < kLanes; ++l) repeated[r * kLanes + l] = q[r][l % width];
    }
    int64_t t0 = 0;
    if (!packs || key_stride_t == width) {  // whole tiles, read where they lie
      for (; t0 + kLanes <= k_len; t0 += kLanes) {
        const key_type* tile = k + t0 * key_stride_t;
        for (int64_t r = 0; r < n; ++r) {
          float* row = s + r * k_len + t0;
          const Floats x = load_lanes(row) + tile_logits(q[r], repeated.data() + r * kLanes, tile, key_stride_t);
          std::memcpy(row, &x, sizeof(x));
        }
      }
    }
    const auto copied = lisa_kernel::scratch<key_type>(5, kLanes * width);  // a tile's keys packed, zeros after them
    for (; t0 < k_len; t0 += kLanes) {
      const int64_t keys = std::min(kLanes, k_len - t0);
      const key_type* tile = k + t0 * key_stride_t;
      for (int64_t l = 0; l < kLanes; ++l) {
        for (int64_t c = 0; c < width; ++c) {
          copied[l * width + c] = l < keys ? tile[l * key_stride_t + c] : key_type(0);
        }
      }
      for (int64_t r = 0; r < n; ++r) {
        float* row = s + r * k_len + t0;
        const Floats x = load_partial(row, keys, 0.f) +
                         tile_logits(q[r], repeated.data() + r * kLanes, copied.data(), width);
        std::memcpy(row, &x, keys * sizeof(float));
      }
    }
  }

  // The logits of one row's query q (repeated: q kLanes / W times, for packed_tile) against a tile of kLanes keys
  // (rows stride apart), by the tile kind add_term takes for W.
  Floats tile_logits(const float* q, const float* repeated, const key_type* tile, int64_t stride) const {
    if (wide_width()) return wide_tile(q, tile, stride);
    if (packed_width()) return packed_tile(load_lanes(repeated), tile);
    return transposed_tile(q, tile, stride);
  }

  // The tile kinds by W: a multiple of kLanes (wide_tile), or below it and dividing it (packed_tile).
  bool wide_width() const { return width % kLanes == 0; }
  bool packed_width() const { return !wide_width() && kLanes % width == 0; }

  // q . k[l] in lane l, for kLanes keys of W values (rows stride apart), W a multiple of kLanes: one accumulator a key,
  // each key read in order. (Rows of a KV group taken together here, a key widened once for all of them, took a source
  // layer's call at 7B shapes 1.15x longer without GQA, and gained 5% with it: docs/benchmark/cpu_kernel/README.md.)
  Floats wide_tile(const float* q, const key_type* tile, int64_t stride) const {
    Floats sums[kLanes] = {};
#pragma GCC unroll 16
    for (int64_t l = 0; l < kLanes; ++l) {
      const key_type* key_row = tile + l * stride;
      for (int64_t c = 0; c < width; c += kLanes) sums[l] += load_lanes(q + c) * float_lanes(key_row + c);
    }
    return sum_each(sums, kLanes);
  }

  // The same for W dividing kLanes and the tile's keys packed (kLanes W values): W vectors of kLanes / W keys each,
  // times q repeated kLanes / W times.
  Floats packed_tile(Floats repeated_query, const key_type* tile) const {
    Floats products[kLanes];
    for (int64_t v = 0; v < width; ++v) products[v] = repeated_query * float_lanes(tile + v * kLanes);
    return sum_each(products, width);
  }

  // The same for W < kLanes: the tile transposed (W x kLanes), then one vector of keys per value of q.
  Floats transposed_tile(const float* q, const key_type* tile, int64_t stride) const {
    float keys_t[kLanes * kLanes];
    for (int64_t c = 0; c < width; ++c) {
      for (int64_t l = 0; l < kLanes; ++l) keys_t[c * kLanes + l] = static_cast<float>(tile[l * stride + c]);
    }
    Floats x = {};
    for (int64_t c = 0; c < width; ++c) x += q[c] * load_lanes(keys_t + c * kLanes);
    return x;
  }

  // Rows out + j ld (j < kHeads, heads' rows of one query position) = sum_g mix[j, g] source[g]: the handed rows read
  // once for all kHeads rows, eight vector accumulators in all, so that the sums over g are eight independent chains.
  template <int kHeads>
  void mix_rows(float* out, int64_t ld, const float* mixing, const float* source) const {
    constexpr int64_t kVectors = 8 / kHeads;
    int64_t t = 0;
    for (; t + kVectors * kLanes <= k_len; t += kVectors * kLanes) {
      Floats x[kHeads][kVectors] = {};
      for (int64_t g = 0; g < handed_heads; ++g) {
        const float* lanes = source + g * handed_h + t;
        for (int64_t v = 0; v < kVectors; ++v) {
          const Floats in = load_lanes(lanes + v * kLanes);
          for (int64_t j = 0; j < kHeads; ++j) x[j][v] += mixing[j * handed_heads + g] * in;
        }
      }
      for (int64_t j = 0; j < kHeads; ++j) std::memcpy(out + j * ld + t, x[j], sizeof(x[j]));
    }
    for (; t < k_len; t += kLanes) {  // the last keys, a vector at a time
      const int64_t n = std::min(kLanes, k_len - t);
      for (int64_t j = 0; j < kHeads; ++j) {
        Floats x = {};
        for (int64_t g = 0; g < handed_heads; ++g) {
          x += mixing[j * handed_heads + g] * (n == kLanes ? load_lanes(source + g * handed_h + t)
                                                           : load_partial(source + g * handed_h + t, n, 0.f));
        }
        std::memcpy(out + j * ld + t, &x, n * sizeof(float));
      }
    }
  }

  // Query heads [h0, h1) of sequence b, all reading one value head.
  void run(int64_t b, int64_t h0, int64_t h1) const {
    const int64_t rows = (h1 - h0) * q_len;
    const auto s = lisa_kernel::scratch<float>(0, rows * k_len);  // rows x T_k: logits, then probabilities
    const auto acc = lisa_kernel::scratch<float>(1, rows * value_dim);
    const auto scale = lisa_kernel::scratch<float>(2, rows);  // 1 / a row's sum of exp
    auto head = [&](int64_t r) { return h0 + r / q_len; };

    // S: the handed rows mixed (up to four heads' rows of a query position at a time), or zeros.
    if (handed == nullptr) {
      std::fill(s.begin(), s.end(), 0.f);
    } else {
      for (int64_t i = 0; i < q_len; ++i) {
        for (int64_t h = h0; h < h1;) {
          const int64_t count = h1 - h >= 4 ? 4 : h1 - h >= 2 ? 2 : 1;  // heads mixed in this pass
          float* out = s.data() + ((h - h0) * q_len + i) * k_len;  // rows of heads h, h + 1, ...: q_len rows apart
          const float* source = handed + b * handed_b + i * handed_q;
          if (count == 4) {
            mix_rows<4>(out, q_len * k_len, mix + h * handed_heads, source);
          } else if (count == 2) {
            mix_rows<2>(out, q_len * k_len, mix + h * handed_heads, source);
          } else {
            mix_rows<1>(out, q_len * k_len, mix + h * handed_heads, source);
          }
          h += count;
        }
      }
    }
    // + the term q k^T, each key row read once for all the rows that read its key head.
    const auto queries = lisa_kernel::scratch<const float*>(3, rows);
    for (int64_t r = 0; r < rows; ++r) queries[r] = query + ((b * heads + head(r)) * q_len + r % q_len) * width;
    const int64_t heads_per_key = heads / key_heads;
    for (int64_t r0 = 0, r1 = 0; r0 < rows; r0 = r1) {
      const int64_t j = head(r0) / heads_per_key;
      for (r1 = r0 + 1; r1 < rows && head(r1) / heads_per_key == j; ++r1) {
      }
      add_term(s.data() + r0 * k_len, queries.data() + r0, r1 - r0, key + b * key_stride_b + j * key_stride_h);
    }
    // Softcap, hand on, mask, softmax (unnormalized; 1 / sum kept).
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = head(r), i = r % q_len;
      float* row = s.data() + r * k_len;
      if (softcap > 0.f) {
        for (int64_t t = 0; t < k_len; ++t) row[t] = softcap * std::tanh(row[t] / softcap);
      }
      if (logits != nullptr) std::memcpy(logits + ((b * heads + h) * q_len + i) * k_len, row, k_len * sizeof(float));
      int64_t n = k_len;
      if (mask != nullptr) {
        lisa_kernel::add_mask_row(row, mask + b * mask_b + i * mask_q, mask_k, k_len);
      } else {
        n = k_len - q_len + i + 1;  // causal: the queries are the last T_q positions
      }
      const float m = lisa_softmax::row_maximum(row, n);
      scale[r] = 1.f / lisa_softmax::exp_row<float>(row, n, n, m, row);
      std::fill(row + n, row + k_len, 0.f);
    }
    // A V, one tile of value rows at a time, read once for all rows.
    std::fill(acc.begin(), acc.end(), 0.f);
    const scalar_t* v = value + b * value_b + (h0 / (heads / value_heads)) * value_h;
    for (int64_t t0 = 0; t0 < k_len; t0 += kValueTile) {
      const int64_t keys = std::min(kValueTile, k_len - t0);
      for (int64_t c = 0; c < value_dim; c += kChunk) {
        const int64_t n = std::min(kChunk, value_dim - c);
        int64_t r = 0;
        for (; n == kChunk && r + kRowsAtOnce <= rows; r += kRowsAtOnce) {
          accumulate_rows<kRowsAtOnce>(s.data() + r * k_len + t0, k_len, v + t0 * value_t + c, value_t, keys,
                                       acc.data() + r * value_dim + c, value_dim);
        }
        for (; r < rows; ++r) {
          accumulate_chunk(s.data() + r * k_len + t0, v + t0 * value_t + c, value_t, keys,
                           acc.data() + r * value_dim + c, n);
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      scalar_t* dst = out + ((b * q_len + r % q_len) * heads + head(r)) * value_dim;
      for (int64_t c = 0; c < value_dim; c += kLanes) {
        const int64_t lanes = std::min(kLanes, value_dim - c);
        lisa_softmax::store_lanes(dst + c, load_partial(acc.data() + r * value_dim + c, lanes, 0.f) * scale[r], lanes);
      }
    }
  }

  // Every sequence and head: one task per value head of a sequence (its group of query heads), or per query head
  // where there are fewer groups than twice the threads.
  void run_all() const {
    const int64_t group = heads / value_heads;
    const int64_t per_task = batch * value_heads >= 2 * at::get_num_threads() ? group : 1;
    const int64_t tasks_per_sequence = heads / per_task;
    at::parallel_for(0, batch * tasks_per_sequence, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t h0 = (task % tasks_per_sequence) * per_task;
        run(task / tasks_per_sequence, h0, h0 + per_task);
      }
    });
  }
};

// handed: B x H_s x T_q x T_k float32 (last dim contiguous) with mix H x H_s
// float32 contiguous, or neither; query B x H x T_q x W float32 contiguous (scaled); key B x H_e x T_k x W (last dim
// contiguous; float32 or the values' dtype); value B x H_kv x T_k x D_v (last dim contiguous); mask none (causal: the
// queries are the last T_q of the T_k positions) or B_m x T_q x T_k (B_m 1 or B), bool (true: attend) or float32
// (additive); softcap 0 for none. Returns {B x T_q x H x D_v in the values' dtype, the logits before the mask
// B x H x T_q x T_k float32 (want_logits) or an empty tensor}. Sums, the mixing and the softmax are float32.
inline std::vector<at::Tensor> decode_rows(const c10::optional<at::Tensor>& handed,
                                           const c10::optional<at::Tensor>& mix, const at::Tensor& query,
                                           const at::Tensor& key, const at::Tensor& value,
                                           const c10::optional<at::Tensor>& mask, double softcap, bool want_logits) {
  TORCH_CHECK(value.dim() == 4 && value.stride(3) == 1, "value: B x H_kv x T_k x D_v, last dim contiguous");
  const int64_t batch = value.size(0), k_len = value.size(2);
  TORCH_CHECK(query.dim() == 4 && query.is_contiguous() && query.scalar_type() == at::kFloat,
              "query: B x H x T_q x W float32, contiguous");
  const int64_t heads = query.size(1), q_len = query.size(2);
  TORCH_CHECK(query.size(0) == batch && heads % value.size(1) == 0 && query.size(3) > 0,
              "query: B x H x T_q x W, H a multiple of H_kv, W > 0");
  TORCH_CHECK(key.dim() == 4 && key.stride(3) == 1 && key.size(0) == batch && heads % key.size(1) == 0 &&
                  key.size(2) == k_len && key.size(3) == query.size(3),
              "key: B x H_e x T_k x W, last dim contiguous, H a multiple of H_e");
  TORCH_CHECK(key.scalar_type() == at::kFloat || key.scalar_type() == value.scalar_type(),
              "key: float32 or the values' dtype");
  TORCH_CHECK(handed.has_value() == mix.has_value(), "handed logits and their mixing come together");
  if (handed.has_value()) {
    TORCH_CHECK(handed->dim() == 4 && handed->stride(3) == 1 && handed->scalar_type() == at::kFloat &&
                    handed->size(0) == batch && handed->size(2) == q_len && handed->size(3) == k_len,
                "handed: B x H_s x T_q x T_k float32, last dim contiguous");
    TORCH_CHECK(mix->is_contiguous() && mix->scalar_type() == at::kFloat && mix->size(0) == heads &&
                    mix->size(1) == handed->size(1), "mix: H x H_s float32, contiguous");
  }
  TORCH_CHECK(!mask.has_value() || (mask->dim() == 3 && (mask->size(0) == 1 || mask->size(0) == batch) &&
                                    mask->size(1) == q_len && mask->size(2) == k_len &&
                                    (mask->scalar_type() == at::kBool || mask->scalar_type() == at::kFloat)),
              "mask: B_m x T_q x T_k with B_m 1 or B, bool or float32");
  TORCH_CHECK(q_len <= k_len, "more queries than keys");
  auto out = at::empty({batch, q_len, heads, value.size(3)}, value.options());
  auto logits = want_logits ? at::empty({batch, heads, q_len, k_len}, value.options().dtype(at::kFloat)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "lisa_decode_rows", [&] {
    auto launch = [&](auto key_zero, auto mask_zero) {
      using key_type = decltype(key_zero);
      using mask_t = decltype(mask_zero);
      Rows<scalar_t, key_type, mask_t> rows{};
      if (handed.has_value()) {
        rows.handed = handed->data_ptr<float>();
        rows.handed_heads = handed->size(1);
        rows.handed_b = handed->stride(0);
        rows.handed_h = handed->stride(1);
        rows.handed_q = handed->stride(2);
        rows.mix = mix->data_ptr<float>();
      }
      rows.query = query.data_ptr<float>();
      rows.width = query.size(3);
      rows.key = key.data_ptr<key_type>();
      rows.key_heads = key.size(1);
      rows.key_stride_b = key.stride(0);
      rows.key_stride_h = key.stride(1);
      rows.key_stride_t = key.stride(2);
      rows.value = value.data_ptr<scalar_t>();
      rows.value_heads = value.size(1);
      rows.value_b = value.stride(0);
      rows.value_h = value.stride(1);
      rows.value_t = value.stride(2);
      rows.value_dim = value.size(3);
      if (mask.has_value()) {
        rows.mask = mask->data_ptr<mask_t>();
        rows.mask_b = mask->size(0) == 1 ? 0 : mask->stride(0);
        rows.mask_q = mask->stride(1);
        rows.mask_k = mask->stride(2);
      }
      rows.softcap = static_cast<float>(softcap);
      rows.batch = batch;
      rows.heads = heads;
      rows.q_len = q_len;
      rows.k_len = k_len;
      rows.logits = want_logits ? logits.data_ptr<float>() : nullptr;
      rows.out = out.data_ptr<scalar_t>();
      rows.run_all();
    };
    const bool bool_mask = mask.has_value() && mask->scalar_type() == at::kBool;
    if (key.scalar_type() == at::kFloat) {
      bool_mask ? launch(float{}, bool{}) : launch(float{}, float{});
    } else {
      bool_mask ? launch(scalar_t{}, bool{}) : launch(scalar_t{}, float{});
    }
  });
  return {out, logits};
}

}  // namespace lisa_decode
