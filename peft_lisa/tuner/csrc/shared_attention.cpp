// A LiSA shared layer's attention on CPU, inference only (docs/method.md, "The CPU kernel of a shared layer").
//
// For query head h of sequence b:
//   S[h] = sum_i sum_g mix_i[h, g] q_i[g] k_i[kv_i(g)]^T + sum_e q_e[h] k_e[h / (H / H_e)]^T
//   out[h] = softmax(S[h] + M) v[h / (H / H_kv)]
// with kv_i(g) = g / (H / H_i) for a part's H_i key heads: the mixed parts i are the chain's source and its earlier
// links' rank-r terms (each with its H x H mixing), the terms e its unmixed ones.
// computed flash-style: one tile of block_q queries x block_k keys at a time, with an online softmax, so no
// T_q x T_k tensor is ever held and a tile's logits stay in the core's cache. The online softmax keeps a row's running
// maximum until a tile exceeds it by more than kSlack, so that most tiles take one pass over their logits (exp, sum
// and maximum together) and no rescaling (its helpers, softmax_lanes.h, on GCC/Clang vector types). The products are
// torch's own small-GEMM kernel (at::native::cpublas::brgemm). bf16/fp16 inputs: where torch packs them for its own
// flash attention (cpublas::could_pack, e.g. a CPU with AMX) and the caller asks (pack), q k^T (parts and terms) and
// A V run in that precision on keys and values packed once per call, with float32 sums and the probabilities rounded
// to the values' dtype for A V, as torch's sdpa does; queries mixed in float32 (a spread part's, a term's) are rounded
// to that dtype, as a bf16 model's own projections round theirs (round_row). Elsewhere they are converted to float32
// one tile at a time. The head mixing and the softmax are float32.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "decode_rows.h"
#include "kernel_common.h"
#include "softmax_lanes.h"

namespace {

using at::native::cpublas::brgemm;
using lisa_kernel::add_mask_row;
using lisa_kernel::scratch;
using lisa_softmax::Floats;
using lisa_softmax::kLanes;
using lisa_softmax::kNegInf;
using lisa_softmax::load_lanes;
using lisa_softmax::load_partial;
using lisa_softmax::softmax_row;
using lisa_softmax::store_lanes;

// rows x cols of a row-major matrix (leading dimension ld) as float32: a float32 input in place (leading dimension
// ld), any other converted into out (leading dimension cols).
template <typename scalar_t>
const float* as_float(const scalar_t* in, int64_t rows, int64_t cols, int64_t ld, float* out) {
  if constexpr (std::is_same_v<scalar_t, float>) return in;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = static_cast<float>(in[i * ld + j]);
  }
  return out;
}

// rows x cols of a matrix in[i, j] = in[i row_stride + j col_stride] in the pair-interleaved ("VNNI") layout that the
// reduced-precision brgemm reads as its right operand, out_rows (even) x out_cols with zeros beyond rows x cols:
// out[(i / 2) * 2 out_cols + 2 j + i % 2] = in[i, j]. Keys are read as they lie (B x H_k x T_k x D: row_stride 1,
// col_stride their T_k stride), values with col_stride 1.
template <typename scalar_t>
void pack_pairs(const scalar_t* in, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                int64_t out_rows, int64_t out_cols, scalar_t* out) {
  for (int64_t i = 0; i < out_rows; i += 2) {
    scalar_t* dst = out + i * out_cols;
    for (int64_t j = 0; j < out_cols; ++j) {
      dst[2 * j] = (i < rows && j < cols) ? in[i * row_stride + j * col_stride] : scalar_t(0);
      dst[2 * j + 1] = (i + 1 < rows && j < cols) ? in[(i + 1) * row_stride + j * col_stride] : scalar_t(0);
    }
  }
}

// Keys B x H_k x T_k x D as given (last dim contiguous, any other strides), and on the unpacked route their transposed
// copy B x H_k x D x T_k, contiguous (null on the packed route, which packs the keys as they lie).
template <typename T>
struct Keys {
  const T* key;
  int64_t k_b, k_h, k_t;
  const T* key_t;
  const T* at(int64_t b, int64_t j, int64_t t) const { return key + b * k_b + j * k_h + t * k_t; }  // key head j
};

template <typename scalar_t>
struct Part {  // one mixed term: queries B x H x T_q x D (any strides, last dim contiguous) and keys B x H_i x T_k x D,
               // both in the values' dtype, and its H x H float32 mixing
  const scalar_t* query;
  int64_t q_b, q_h, q_t;
  Keys<scalar_t> keys;
  int64_t key_heads, dim;
  const float* mix;
};

struct Extra {  // one term q_e k_e^T: queries B x H x T_q x W, float32, contiguous, and keys B x H_e x T_k x W, float32
               // or, on the packed route, in the values' dtype
  const float* query;
  Keys<void> keys;
  int64_t width, heads;
};

// Keys and values packed for the reduced-precision brgemm, once per call: per part and per term, its transposed keys
// by blocks of block_k keys (B x H_i x key blocks x D x block_k, packed), and the values
// likewise (B x H_kv x key blocks x block_k x D_v, packed); zeros beyond the last key.
struct PackedOperands {
  std::vector<at::Tensor> keys, term_keys;
  at::Tensor spread_keys, values;  // spread_keys: the spread parts' keys side by side, B x key blocks x (W block_k)
};

// Keys B x H_i x T_k x D (D even) transposed and packed by blocks of block_k keys: B x H_i x key blocks x (D block_k).
template <typename scalar_t>
at::Tensor pack_keys(const Keys<scalar_t>& keys, int64_t batch, int64_t key_heads, int64_t dim, int64_t k_len,
                     int64_t block_k, const at::TensorOptions& options) {
  const int64_t k_blocks = (k_len + block_k - 1) / block_k;
  at::Tensor packed = at::empty({batch, key_heads, k_blocks, dim * block_k}, options);
  scalar_t* out = packed.data_ptr<scalar_t>();
  at::parallel_for(0, batch * key_heads * k_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (key_heads * k_blocks), j = item / k_blocks % key_heads, k0 = item % k_blocks * block_k;
      pack_pairs(keys.at(b, j, k0), dim, std::min(block_k, k_len - k0), 1, keys.k_t, dim, block_k,
                 out + item * dim * block_k);
    }
  });
  return packed;
}

template <typename scalar_t>
PackedOperands pack_operands(const std::vector<Part<scalar_t>>& parts, const std::vector<bool>& spread,
                             int64_t spread_dims, const std::vector<Extra>& extras, const at::Tensor& value,
                             int64_t block_k) {
  const int64_t batch = value.size(0), kv_heads = value.size(1), k_len = value.size(2), value_dim = value.size(3);
  const int64_t k_blocks = (k_len + block_k - 1) / block_k;
  const auto options = value.options();
  PackedOperands packed;
  for (size_t p = 0; p < parts.size(); ++p) {
    packed.keys.push_back(spread[p] ? at::Tensor() : pack_keys(parts[p].keys, batch, parts[p].key_heads,
                                                                parts[p].dim, k_len, block_k, options));
  }
  // The spread parts' keys (spread_dims rows in all), each all its key heads side by side, one after another (each
  // part's size is even, so a part's rows are whole packed pairs).
  if (spread_dims > 0) {
    packed.spread_keys = at::empty({batch, k_blocks, spread_dims * block_k}, options);
    scalar_t* out = packed.spread_keys.data_ptr<scalar_t>();
    at::parallel_for(0, batch * k_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / k_blocks, k0 = (item % k_blocks) * block_k;
        int64_t row = 0;
        for (size_t p = 0; p < parts.size(); ++p) {
          if (!spread[p]) continue;
          const Keys<scalar_t>& keys = parts[p].keys;
          for (int64_t j = 0; j < parts[p].key_heads; ++j, row += parts[p].dim) {  // rows j D .. (j + 1) D
            pack_pairs(keys.at(b, j, k0), parts[p].dim, std::min(block_k, k_len - k0), 1, keys.k_t, parts[p].dim,
                       block_k, out + (item * spread_dims + row) * block_k);
          }
        }
      }
    });
  }
  for (const Extra& e : extras) {
    const Keys<scalar_t> keys{static_cast<const scalar_t*>(e.keys.key), e.keys.k_b, e.keys.k_h, e.keys.k_t, nullptr};
    packed.term_keys.push_back(pack_keys(keys, batch, e.heads, e.width, k_len, block_k, options));
  }
  packed.values = at::empty({batch, kv_heads, k_blocks, block_k * value_dim}, options);
  const scalar_t* v_ptr = value.data_ptr<scalar_t>();
  scalar_t* out = packed.values.data_ptr<scalar_t>();
  at::parallel_for(0, batch * kv_heads * k_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (kv_heads * k_blocks), j = item / k_blocks % kv_heads, k0 = item % k_blocks * block_k;
      pack_pairs(v_ptr + b * value.stride(0) + j * value.stride(1) + k0 * value.stride(2),
                 std::min(block_k, k_len - k0), value_dim, value.stride(2), 1, block_k, value_dim,
                 out + item * block_k * value_dim);
    }
  });
  return packed;
}

// A block's queries of one part, all heads' rows one after another: out[h] (block_q x D) = q[b, h, q0 .. q0 + bq) in
// out_t, zeros beyond bq.
template <typename scalar_t, typename out_t>
void block_queries(const Part<scalar_t>& part, int64_t b, int64_t q0, int64_t bq, int64_t block_q, int64_t heads,
                   out_t* out) {
  for (int64_t h = 0; h < heads; ++h) {
    const scalar_t* q = part.query + b * part.q_b + h * part.q_h + q0 * part.q_t;
    for (int64_t r = 0; r < block_q; ++r) {
      out_t* row = out + (h * block_q + r) * part.dim;
      if (r >= bq) {
        std::fill(row, row + part.dim, out_t(0));
      } else if constexpr (std::is_same_v<scalar_t, out_t>) {
        std::memcpy(row, q + r * part.q_t, part.dim * sizeof(out_t));
      } else {
        for (int64_t d = 0; d < part.dim; ++d) row[d] = static_cast<out_t>(q[r * part.q_t + d]);
      }
    }
  }
}

// n float32 values x rounded to scalar_t (to nearest even) at row[0, n). A query mixed in float32 is rounded once, as
// a bf16 model rounds its projections' outputs: on SmolLM2 the merged model's next-token KL to its float32 self stayed
// that of the bf16 base (docs/method.md, "Rounding the mixed queries").
template <typename scalar_t>
void round_row(const float* x, int64_t n, scalar_t* row) {
  for (int64_t c = 0; c < n; c += kLanes) {
    const int64_t m = std::min(kLanes, n - c);
    store_lanes(row + c, m == kLanes ? load_lanes(x + c) : load_partial(x + c, m, 0.f), m);
  }
}

// A block's queries of one spread part, mixed and rounded: row h block_q + r of out (leading dimension ld) holds
// x[j] = sum_{g of key head j} mix[h, g] q[g, r] for each key head j (H_i D values, round_row). block: the part's
// queries of the block in float32 (H x block_q x D, zeros beyond the block's queries: block_queries); x: a scratch row
// of H_i D floats.
template <typename scalar_t>
void spread_block_queries(const Part<scalar_t>& part, const float* block, int64_t block_q, int64_t heads, int64_t ld,
                          float* x, scalar_t* out) {
  const int64_t size = heads / part.key_heads, width = part.key_heads * part.dim;  // size: query heads per key head
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t r = 0; r < block_q; ++r) {
      std::fill(x, x + width, 0.f);
      for (int64_t j = 0; j < part.key_heads; ++j) {
        for (int64_t g = j * size; g < (j + 1) * size; ++g) {
          const float c = part.mix[h * heads + g];
          const float* q = block + (g * block_q + r) * part.dim;
          for (int64_t d = 0; d < part.dim; ++d) x[j * part.dim + d] += c * q[d];
        }
      }
      round_row(x, width, out + (h * block_q + r) * ld);
    }
  }
}

template <typename scalar_t, typename mask_t>
void attend(const std::vector<Part<scalar_t>>& parts, const std::vector<Extra>& extras, const at::Tensor& value,
            const c10::optional<at::Tensor>& mask, at::Tensor& out, int64_t heads, int64_t q_len, int64_t block_q,
            int64_t block_k, bool packed) {
  const int64_t batch = value.size(0), kv_heads = value.size(1), k_len = value.size(2), value_dim = value.size(3);
  const int64_t group = heads / kv_heads;
  const bool causal = !mask.has_value();
  const scalar_t* v_ptr = value.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t v_b = value.stride(0), v_h = value.stride(1), v_t = value.stride(2);
  const mask_t* m_ptr = causal ? nullptr : mask->data_ptr<mask_t>();
  const int64_t m_b = (causal || mask->size(0) == 1) ? 0 : mask->stride(0), m_q = causal ? 0 : mask->stride(1);
  const int64_t m_k = causal ? 0 : mask->stride(2);
  const int64_t q_blocks = (q_len + block_q - 1) / block_q, k_blocks = (k_len + block_k - 1) / block_k;
  const int64_t tile = block_q * block_k;
  constexpr bool is_float = std::is_same_v<scalar_t, float>;
  constexpr bool is_reduced = std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>;
  const bool convert = !is_float && !packed;  // reduced precision, converted to float32 one tile at a time
  // On the packed route a chain's earlier links (mixed parts no wider than the source when laid against all their key
  // heads side by side) are spread: their queries mixed per block, one product against all their key heads, so that
  // the float32 H x H mixing over every tile is left to the source.
  std::vector<bool> spread(parts.size(), false);
  int64_t spread_dims = 0;
  for (size_t p = 1; p < parts.size() && packed; ++p) {
    spread[p] = parts[p].key_heads * parts[p].dim <= parts[0].dim;
    if (spread[p]) spread_dims += parts[p].key_heads * parts[p].dim;
  }
  PackedOperands operands;
  if (packed) operands = pack_operands(parts, spread, spread_dims, extras, value, block_k);
  int64_t part_dims = 0, max_key_width = 0, term_dims = 0;  // a block's queries of all parts and terms; float32
  for (const auto& part : parts) {                            // copies of a converted tile's keys
    part_dims += part.dim;
    max_key_width = std::max(max_key_width, part.key_heads * part.dim);
  }
  for (const Extra& e : extras) term_dims += e.width;

  at::parallel_for(0, batch * q_blocks, 1, [&](int64_t begin, int64_t end) {
    // Per thread (scratch): a part's per-head scores and the mixed logits of one tile (H x block_q x block_k each),
    // the running output, maximum and sum of every query row, the block's queries (float32, or the values' dtype if
    // packed), float32 copies of a converted tile's keys and values, the tile's probabilities (in the values' dtype
    // for a packed A V), the terms' and spread parts' rounded queries and a spread part's float32 block and row. Their
    // contents are left from earlier calls: every value a result depends on is written first (a short key tile's
    // columns beyond bk in scores and logits are mixed, column by column, but never read by the softmax).
    const auto scores = scratch<float>(0, heads * tile), logits = scratch<float>(1, heads * tile);
    const auto acc = scratch<float>(2, heads * block_q * value_dim);
    const auto row_max = scratch<float>(3, heads * block_q), row_sum = scratch<float>(4, heads * block_q);
    const auto q_tile = scratch<float>(5, packed ? 0 : heads * block_q * part_dims);
    const auto q_packed = scratch<scalar_t>(6, packed ? heads * block_q * part_dims : 0);
    const auto k_tile = scratch<float>(7, convert ? max_key_width * block_k : 0);
    const auto v_tile = scratch<float>(8, convert ? kv_heads * block_k * value_dim : 0);
    const auto p_tile = scratch<scalar_t>(9, packed ? heads * tile : 0);
    const auto p_float = scratch<float>(10, packed ? 0 : heads * tile);
    const auto term_q = scratch<scalar_t>(11, packed ? heads * block_q * term_dims : 0);
    const auto spread_q = scratch<scalar_t>(12, heads * block_q * spread_dims);
    const auto spread_block = scratch<float>(13, spread_dims > 0 ? heads * block_q * parts[0].dim : 0);
    const auto spread_row = scratch<float>(14, parts[0].dim);
    std::vector<const float*> values(kv_heads);
    for (int64_t item = begin; item < end; ++item) {
      // Query blocks zig-zag (0, last, 1, last - 1, ...): a thread's contiguous range of items holds cheap (early)
      // and costly (late) causal blocks alike.
      const int64_t b = item / q_blocks, i = item % q_blocks;
      const int64_t qb = (i % 2 == 0) ? i / 2 : q_blocks - 1 - i / 2;
      const int64_t q0 = qb * block_q, bq = std::min(block_q, q_len - q0);
      const int64_t first_pos = k_len - q_len + q0;  // the position of the block's first query
      const int64_t k_stop = causal ? first_pos + bq : k_len;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t h = 0; h < heads && bq < block_q; ++h) {  // probability rows beyond the block's queries: zeros
        if (packed) {                                          // for A V (their output rows are never written out)
          std::fill(p_tile.data() + h * tile + bq * block_k, p_tile.data() + (h + 1) * tile, scalar_t(0));
        } else {
          std::fill(p_float.data() + h * tile + bq * block_k, p_float.data() + (h + 1) * tile, 0.f);
        }
      }
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      // The block's queries of every part, all heads' rows one after another (block_q rows of D per head, zeros
      // beyond bq), so that the query heads reading one key head are one product: in the values' dtype if packed,
      // else float32; a spread part's mixed and rounded, at its columns of spread_q (H block_q x spread_dims).
      int64_t spread_column = 0;
      for (size_t p = 0, offset = 0; p < parts.size(); offset += heads * block_q * parts[p].dim, ++p) {
        const Part<scalar_t>& part = parts[p];
        if (spread[p]) {
          block_queries(part, b, q0, bq, block_q, heads, spread_block.data());
          spread_block_queries(part, spread_block.data(), block_q, heads, spread_dims, spread_row.data(),
                               spread_q.data() + spread_column);
          spread_column += part.key_heads * part.dim;
        } else if (packed) {
          block_queries(part, b, q0, bq, block_q, heads, q_packed.data() + offset);
        } else {
          block_queries(part, b, q0, bq, block_q, heads, q_tile.data() + offset);
        }
      }
      if (packed) {  // likewise the terms' queries, rounded (round_row), zeros beyond bq
        scalar_t* dst = term_q.data();
        for (const Extra& e : extras) {
          for (int64_t h = 0; h < heads; ++h, dst += block_q * e.width) {
            const float* q = e.query + ((b * heads + h) * q_len + q0) * e.width;
            round_row(q, bq * e.width, dst);
            std::fill(dst + bq * e.width, dst + block_q * e.width, scalar_t(0));
          }
        }
      }
      for (int64_t k0 = 0; k0 < k_stop; k0 += block_k) {
        const int64_t bk = std::min(block_k, k_stop - k0), kb = k0 / block_k;
        for (size_t p = 0, offset = 0; p < parts.size(); offset += heads * block_q * parts[p].dim, ++p) {
          const Part<scalar_t>& part = parts[p];
          if (spread[p]) continue;  // after the parts, all in one product
          const int64_t part_group = heads / part.key_heads, rows = part_group * block_q;
          // scores[g] (block_q x bk, leading dimension block_k) = q_p[g] (block_q x D) @ k_p^T[kv_p(g)] (D x bk),
          // one product for the part_group query heads g of key head j
          for (int64_t j = 0; j < part.key_heads; ++j) {
            const int64_t q_at = offset + j * rows * part.dim;
            float* scores_j = scores.data() + j * part_group * tile;
            if constexpr (is_reduced) {
              if (packed) {
                const scalar_t* key_t = operands.keys[p].data_ptr<scalar_t>() +
                                        ((b * part.key_heads + j) * k_blocks + kb) * part.dim * block_k;
                brgemm(rows, bk, part.dim, part.dim, block_k, block_k, false, q_packed.data() + q_at, key_t,
                       scores_j, true);
                continue;
              }
            }
            const scalar_t* k = part.keys.key_t + ((b * part.key_heads + j) * part.dim) * k_len + k0;
            const float* key_t = as_float(k, part.dim, bk, k_len, k_tile.data() + j * part.dim * block_k);
            brgemm(rows, bk, part.dim, part.dim, convert ? bk : k_len, block_k, false, q_tile.data() + q_at, key_t,
                   scores_j, false);
          }
          // The part's head mixing, one product over the head axis: logits (H x tile) (+)= mix (H x H) @ scores
          brgemm(heads, tile, heads, heads, tile, tile, p > 0, part.mix, scores.data(), logits.data(), false);
        }
        if constexpr (is_reduced) {
          if (spread_dims > 0) {  // logits (all heads' rows, block_q each) += spread_q (H block_q x W) @ k^T (W x bk)
            const scalar_t* key_t = operands.spread_keys.data_ptr<scalar_t>() +
                                    (b * k_blocks + kb) * spread_dims * block_k;
            brgemm(heads * block_q, bk, spread_dims, spread_dims, block_k, block_k, true, spread_q.data(),
                   key_t, logits.data(), true);
          }
        }
        const scalar_t* term_q_e = term_q.data();
        for (size_t t = 0; t < extras.size(); ++t) {  // logits[h] += q_e[h] (bq x W) @ k_e^T (W x bk)
          const Extra& e = extras[t];
          const int64_t e_group = heads / e.heads;
          if constexpr (is_reduced) {
            if (packed) {  // one product for the e_group query heads of key head j
              const int64_t size = e.width;
              for (int64_t j = 0; j < e.heads; ++j) {
                const scalar_t* key_t = operands.term_keys[t].data_ptr<scalar_t>() +
                                        ((b * e.heads + j) * k_blocks + kb) * size * block_k;
                brgemm(e_group * block_q, bk, size, size, block_k, block_k, true,
                       term_q_e + j * e_group * block_q * size, key_t, logits.data() + j * e_group * tile, true);
              }
              term_q_e += heads * block_q * size;
              continue;
            }
          }
          for (int64_t h = 0; h < heads; ++h) {
            const float* q = e.query + ((b * heads + h) * q_len + q0) * e.width;
            const float* k = static_cast<const float*>(e.keys.key_t) + ((b * e.heads + h / e_group) * e.width) * k_len +
                             k0;
            brgemm(bq, bk, e.width, e.width, k_len, block_k, true, q, k, logits.data() + h * tile, false);
          }
        }
        // float32 values of this tile, per KV head (unless packed)
        const int64_t ld_v = convert ? value_dim : v_t;
        for (int64_t j = 0; j < kv_heads && !packed; ++j) {
          const scalar_t* v = v_ptr + b * v_b + j * v_h + k0 * v_t;
          values[j] = as_float(v, bk, value_dim, v_t, v_tile.data() + j * block_k * value_dim);
        }
        for (int64_t h = 0; h < heads; ++h) {
          for (int64_t r = 0; r < bq; ++r) {
            float* s = logits.data() + h * tile + r * block_k;
            int64_t n = bk;  // the keys this row sees in the tile (causal: up to its own position)
            if (causal) {
              n = std::clamp<int64_t>(first_pos + r - k0 + 1, 0, bk);
            } else {
              add_mask_row(s, m_ptr + b * m_b + (q0 + r) * m_q + k0 * m_k, m_k, bk);
            }
            // the probabilities for A V: in the values' dtype if packed (zeros up to an even number of keys), else
            // float32
            float* o = acc.data() + (h * block_q + r) * value_dim;
            float &m = row_max[h * block_q + r], &l = row_sum[h * block_q + r];
            if (packed) {
              softmax_row(s, n, bk + bk % 2, m, l, o, value_dim, p_tile.data() + h * tile + r * block_k);
            } else {
              softmax_row(s, n, bk, m, l, o, value_dim, p_float.data() + h * tile + r * block_k);
            }
          }
        }
        // acc[h] (block_q x D_v) += p[h] (block_q x bk) @ v[j] (bk x D_v), one product for the query heads h of
        // KV head j (their rows beyond bq are never written out)
        for (int64_t j = 0; j < kv_heads; ++j) {
          float* acc_j = acc.data() + j * group * block_q * value_dim;
          if constexpr (is_reduced) {
            if (packed) {
              const scalar_t* v = operands.values.data_ptr<scalar_t>() +
                                  ((b * kv_heads + j) * k_blocks + kb) * block_k * value_dim;
              brgemm(group * block_q, value_dim, bk + bk % 2, block_k, value_dim, value_dim, true,
                     p_tile.data() + j * group * tile, v, acc_j, true);
              continue;
            }
          }
          brgemm(group * block_q, value_dim, bk, block_k, ld_v, value_dim, true, p_float.data() + j * group * tile,
                 values[j], acc_j, false);
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t r = 0; r < bq; ++r) {
          const float inv = 1.f / row_sum[h * block_q + r];
          const float* o = acc.data() + (h * block_q + r) * value_dim;
          scalar_t* dst = out_ptr + ((b * q_len + q0 + r) * heads + h) * value_dim;
          for (int64_t c = 0; c < value_dim; ++c) dst[c] = static_cast<scalar_t>(o[c] * inv);
        }
      }
    }
    at::native::cpublas::brgemm_release(packed);
  });
}

}  // namespace

// Whether q k^T and A V run in dtype on packed operands (bf16/fp16 where torch packs them for its own flash attention,
// e.g. on a CPU with AMX) rather than converted to float32.
bool packs(at::ScalarType dtype) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && at::native::cpublas::could_pack(dtype);
}

// mixed_queries[i] B x H x T_q x D_i and mixed_keys[i] B x H_i x T_k x D_i (any strides, last dim contiguous), in the
// values' dtype, mixes[i] H x H float32 (the source first); term_queries[e] B x H x T_q x W_e float32 contiguous and
// term_keys[e] B x H_e x T_k x W_e (last dim contiguous), float32 or with pack in the values' dtype; value
// B x H_kv x T_k x D_v (last dim contiguous); mask: none (causal: the queries are the last T_q of the T_k positions) or
// B_m x T_q x T_k (B_m 1 or B, any strides), bool (true: attend) or float32 (additive); pack: run the products q k^T
// (parts and terms, the terms' queries rounded to that dtype) and A V in the values' dtype on packed
// operands, which needs packs(dtype) and every D_i and W_e even; else they are float32. Returns B x T_q x H x D_v in
// the values' dtype.
at::Tensor shared_attention(const std::vector<at::Tensor>& mixed_queries, const std::vector<at::Tensor>& mixed_keys,
                            const std::vector<at::Tensor>& mixes, const std::vector<at::Tensor>& term_queries,
                            const std::vector<at::Tensor>& term_keys, const at::Tensor& value,
                            const c10::optional<at::Tensor>& mask, int64_t block_q, int64_t block_k, bool pack) {
  TORCH_CHECK(!mixed_queries.empty() && mixed_queries.size() == mixed_keys.size() &&
                  mixed_queries.size() == mixes.size(), "one key and one mixing per mixed part, at least one part");
  TORCH_CHECK(term_queries.size() == term_keys.size(), "one key per term");
  TORCH_CHECK(value.dim() == 4 && value.stride(3) == 1, "value: B x H_kv x T_k x D_v, last dim contiguous");
  const int64_t batch = value.size(0), k_len = value.size(2);
  const int64_t heads = mixed_queries[0].size(1), q_len = mixed_queries[0].size(2);
  TORCH_CHECK(heads % value.size(1) == 0, "the value heads must divide the query heads");
  for (size_t i = 0; i < mixed_queries.size(); ++i) {
    const at::Tensor &q = mixed_queries[i], &k = mixed_keys[i], &mix = mixes[i];
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.stride(3) == 1 && k.stride(3) == 1, "mixed part layouts");
    TORCH_CHECK(q.scalar_type() == value.scalar_type() && k.scalar_type() == value.scalar_type(),
                "mixed parts in the values' dtype");
    TORCH_CHECK(q.size(0) == batch && q.size(1) == heads && q.size(2) == q_len && k.size(0) == batch &&
                    heads % k.size(1) == 0 && k.size(3) == q.size(3) && k.size(2) == k_len, "mixed part shapes");
    TORCH_CHECK(mix.is_contiguous() && mix.scalar_type() == at::kFloat && mix.size(0) == heads && mix.size(1) == heads,
                "mixing: H x H float32 contiguous");
  }
  if (pack) {
    TORCH_CHECK(packs(value.scalar_type()) && block_k % 2 == 0, "pack: this CPU does not pack ",
                value.scalar_type(), " for brgemm (see packs(dtype)), or block_k is odd");
    for (const auto& q : mixed_queries) TORCH_CHECK(q.size(3) % 2 == 0, "pack: the mixed parts' sizes must be even");
    for (const auto& q : term_queries) TORCH_CHECK(q.size(3) % 2 == 0, "pack: the terms' widths must be even");
  }
  const at::ScalarType key_dtype = pack ? value.scalar_type() : at::kFloat;
  // The unpacked route reads the keys transposed, B x H_k x D x T_k contiguous: copied once per call, kept here.
  std::vector<at::Tensor> transposed;
  auto key_t = [&](const at::Tensor& k) {
    if (pack) return static_cast<const void*>(nullptr);
    transposed.push_back(k.transpose(2, 3).contiguous());
    return static_cast<const void*>(transposed.back().data_ptr());
  };
  std::vector<Extra> extras;
  for (size_t e = 0; e < term_queries.size(); ++e) {
    const at::Tensor &q = term_queries[e], &k = term_keys[e];
    TORCH_CHECK(q.is_contiguous() && k.dim() == 4 && k.stride(3) == 1 && q.scalar_type() == at::kFloat &&
                    k.scalar_type() == key_dtype, "terms: float32 queries, contiguous, and float32 keys (with pack: in "
                "the values' dtype), last dim contiguous");
    TORCH_CHECK(q.size(0) == batch && q.size(1) == heads && q.size(2) == q_len && k.size(0) == batch &&
                    heads % k.size(1) == 0 && k.size(3) == q.size(3) && k.size(2) == k_len, "term shapes");
    extras.push_back({q.data_ptr<float>(), {k.data_ptr(), k.stride(0), k.stride(1), k.stride(2), key_t(k)}, q.size(3),
                      k.size(1)});
  }
  TORCH_CHECK(!mask.has_value() || (mask->dim() == 3 && (mask->size(0) == 1 || mask->size(0) == batch) &&
                                    mask->size(1) == q_len && mask->size(2) == k_len),
              "mask: B_m x T_q x T_k with B_m 1 or B");
  auto out = at::empty({batch, q_len, heads, value.size(3)}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "lisa_shared_attention", [&] {
    std::vector<Part<scalar_t>> parts;
    for (size_t i = 0; i < mixed_queries.size(); ++i) {
      const at::Tensor &q = mixed_queries[i], &k = mixed_keys[i];
      const Keys<scalar_t> keys{k.data_ptr<scalar_t>(), k.stride(0), k.stride(1), k.stride(2),
                                static_cast<const scalar_t*>(key_t(k))};
      parts.push_back({q.data_ptr<scalar_t>(), q.stride(0), q.stride(1), q.stride(2), keys, k.size(1), k.size(3),
                       mixes[i].data_ptr<float>()});
    }
    if (!mask.has_value() || mask->scalar_type() == at::kFloat) {
      attend<scalar_t, float>(parts, extras, value, mask, out, heads, q_len, block_q, block_k, pack);
    } else {
      TORCH_CHECK(mask->scalar_type() == at::kBool, "mask: bool or float32");
      attend<scalar_t, bool>(parts, extras, value, mask, out, heads, q_len, block_q, block_k, pack);
    }
  });
  return out;
}

// The instructions of this build's softmax: "avx512-bf16", "avx512" or "portable" (softmax_lanes.h).
std::string vector_instructions() { return lisa_softmax::kInstructions; }

// The width of this build's vectors in bytes: 64 (AVX-512), 32 (AVX2) or 16 (softmax_lanes.h).
int64_t vector_bytes() { return sizeof(lisa_softmax::Floats); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("shared_attention", &shared_attention, "A LiSA shared layer's attention on CPU (inference)");
  m.def("decode_rows", &lisa_decode::decode_rows, "A few query rows of a LiSA layer's attention on CPU (inference)");
  m.def("packs", &packs, "Whether bf16/fp16 products run on packed operands on this CPU");
  m.def("vector_instructions", &vector_instructions, "The instructions of this build's softmax");
  m.def("vector_bytes", &vector_bytes, "The width of this build's vectors in bytes");
}
