// A LiSA shared layer's attention on CPU, inference only (docs/method.md, "The CPU kernel of a shared layer").
//
// For query head h of sequence b:
//   S[h] = sum_g mix[h, g] q_src[g] k_src[kv(g)]^T + sum_e q_e[h] k_e[h / (H / H_e)]^T   (kv(g) = g / (H / H_kv))
//   out[h] = softmax(S[h] + M) v[kv(h)]
// computed flash-style: one tile of block_q queries x block_k keys at a time, with an online softmax, so no
// T_q x T_k tensor is ever held and a tile's logits stay in the core's cache. The products are torch's own small-GEMM
// kernel (at::native::cpublas::brgemm), in float32; bf16/fp16 inputs are converted one tile at a time.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using at::native::cpublas::brgemm;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (a logit minus its row's maximum), within 2e-7 relative: exp(x) = 2^n exp(f) with n the nearest
// integer to x / ln 2 and a degree-6 polynomial for exp(f), |f| <= ln(2) / 2; 0 below -87 (and for -inf).
// Branch-free, so that the compiler vectorizes the softmax loop (the C library's expf is a scalar call per logit).
inline float exp_nonpositive(float x) {
  const bool underflow = !(x >= -87.f);
  x = underflow ? -87.f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float f = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln 2, in two parts for accuracy
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.f : p * scale;
}

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

// The mask of one tile row (n keys) added to s: a float mask as is, a boolean one as 0 where true and the lowest float
// where false, as an additive mask made from it (functional.additive_mask): a row with no key allowed attends evenly.
template <typename mask_t>
void add_mask_row(float* s, const mask_t* mask, int64_t stride_k, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const mask_t value = mask[c * stride_k];
    if constexpr (std::is_same_v<mask_t, bool>) {
      if (!value) s[c] = std::numeric_limits<float>::lowest();
    } else {
      s[c] += static_cast<float>(value);
    }
  }
}

struct Extra {  // one term q_e k_e^T: float32 queries B x H x T_q x W and transposed keys B x H_e x W x T_k
  const float* query;
  const float* key_t;
  int64_t width, heads;
};

template <typename scalar_t, typename mask_t>
void attend(const at::Tensor& q_src, const at::Tensor& k_src_t, const at::Tensor& mix, const std::vector<Extra>& extras,
            const at::Tensor& value, const c10::optional<at::Tensor>& mask, at::Tensor& out, int64_t block_q,
            int64_t block_k) {
  const int64_t batch = q_src.size(0), heads = q_src.size(1), q_len = q_src.size(2), dim = q_src.size(3);
  const int64_t kv_heads = k_src_t.size(1), k_len = k_src_t.size(3), value_dim = value.size(3);
  const int64_t group = heads / kv_heads;
  const bool causal = !mask.has_value();
  const scalar_t* q_ptr = q_src.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_src_t.data_ptr<scalar_t>();
  const scalar_t* v_ptr = value.data_ptr<scalar_t>();
  const float* mix_ptr = mix.data_ptr<float>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t qs_b = q_src.stride(0), qs_h = q_src.stride(1), qs_t = q_src.stride(2);
  const int64_t v_b = value.stride(0), v_h = value.stride(1), v_t = value.stride(2);
  const mask_t* m_ptr = causal ? nullptr : mask->data_ptr<mask_t>();
  const int64_t m_b = causal ? 0 : mask->stride(0), m_q = causal ? 0 : mask->stride(1);
  const int64_t m_k = causal ? 0 : mask->stride(2);
  const int64_t q_blocks = (q_len + block_q - 1) / block_q;
  const int64_t tile = block_q * block_k;

  at::parallel_for(0, batch * q_blocks, 1, [&](int64_t begin, int64_t end) {
    // Per thread: the source's per-head scores and the mixed logits of one tile (H x block_q x block_k each), the
    // running output, maximum and sum of every query row, and float32 copies of a reduced-precision tile.
    std::vector<float> scores(heads * tile), logits(heads * tile), acc(heads * block_q * value_dim);
    std::vector<float> row_max(heads * block_q), row_sum(heads * block_q);
    std::vector<float> q_tile(std::is_same_v<scalar_t, float> ? 0 : heads * block_q * dim);
    std::vector<float> k_tile(std::is_same_v<scalar_t, float> ? 0 : kv_heads * dim * block_k);
    std::vector<float> v_tile(std::is_same_v<scalar_t, float> ? 0 : kv_heads * block_k * value_dim);
    for (int64_t item = begin; item < end; ++item) {
      // Query blocks zig-zag (0, last, 1, last - 1, ...): a thread's contiguous range of items holds cheap (early)
      // and costly (late) causal blocks alike.
      const int64_t b = item / q_blocks, i = item % q_blocks;
      const int64_t qb = (i % 2 == 0) ? i / 2 : q_blocks - 1 - i / 2;
      const int64_t q0 = qb * block_q, bq = std::min(block_q, q_len - q0);
      const int64_t first_pos = k_len - q_len + q0;  // the position of the block's first query
      const int64_t k_stop = causal ? first_pos + bq : k_len;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      // The block's queries of every head, float32, leading dimension ld_q.
      std::vector<const float*> queries(heads);
      int64_t ld_q = qs_t;
      for (int64_t h = 0; h < heads; ++h) {
        const scalar_t* q = q_ptr + b * qs_b + h * qs_h + q0 * qs_t;
        queries[h] = as_float(q, bq, dim, qs_t, q_tile.data() + h * block_q * dim);
        if constexpr (!std::is_same_v<scalar_t, float>) ld_q = dim;
      }
      for (int64_t k0 = 0; k0 < k_stop; k0 += block_k) {
        const int64_t bk = std::min(block_k, k_stop - k0);
        // scores[g] (bq x bk, leading dimension block_k) = q_src[g] (bq x D) @ k_src^T[kv(g)] (D x bk)
        for (int64_t j = 0; j < kv_heads; ++j) {
          const scalar_t* k = k_ptr + ((b * kv_heads + j) * dim) * k_len + k0;
          int64_t ld_k = k_len;
          const float* key_t = as_float(k, dim, bk, k_len, k_tile.data() + j * dim * block_k);
          if constexpr (!std::is_same_v<scalar_t, float>) ld_k = bk;
          for (int64_t g = j * group; g < (j + 1) * group; ++g) {
            brgemm(bq, bk, dim, ld_q, ld_k, block_k, false, queries[g], key_t, scores.data() + g * tile, false);
          }
        }
        // The head mixing, one product over the head axis: logits (H x tile) = mix (H x H) @ scores (H x tile)
        brgemm(heads, tile, heads, heads, tile, tile, false, mix_ptr, scores.data(), logits.data(), false);
        for (const Extra& e : extras) {  // logits[h] += q_e[h] (bq x W) @ k_e^T (W x bk)
          const int64_t e_group = heads / e.heads;
          for (int64_t h = 0; h < heads; ++h) {
            const float* q = e.query + ((b * heads + h) * q_len + q0) * e.width;
            const float* k = e.key_t + ((b * e.heads + h / e_group) * e.width) * k_len + k0;
            brgemm(bq, bk, e.width, e.width, k_len, block_k, true, q, k, logits.data() + h * tile, false);
          }
        }
        // float32 values of this tile, per KV head
        std::vector<const float*> values(kv_heads);
        int64_t ld_v = v_t;
        for (int64_t j = 0; j < kv_heads; ++j) {
          const scalar_t* v = v_ptr + b * v_b + j * v_h + k0 * v_t;
          values[j] = as_float(v, bk, value_dim, v_t, v_tile.data() + j * block_k * value_dim);
          if constexpr (!std::is_same_v<scalar_t, float>) ld_v = value_dim;
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
            float tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
            for (int64_t c = 0; c < n; ++c) tile_max = std::max(tile_max, s[c]);
            float& m_old = row_max[h * block_q + r];
            const float m_new = std::max(m_old, tile_max);
            float sum = 0.f;
            if (m_new == kNegInf) {  // nothing seen yet in this row: it contributes nothing so far
              n = 0;
            } else {
#pragma omp simd reduction(+ : sum)
              for (int64_t c = 0; c < n; ++c) {
                s[c] = exp_nonpositive(s[c] - m_new);
                sum += s[c];
              }
            }
            for (int64_t c = n; c < bk; ++c) s[c] = 0.f;
            const float rescale = (m_old == kNegInf) ? 0.f : std::exp(m_old - m_new);
            row_sum[h * block_q + r] = row_sum[h * block_q + r] * rescale + sum;
            m_old = m_new;
            if (rescale != 1.f) {
              float* o = acc.data() + (h * block_q + r) * value_dim;
              for (int64_t c = 0; c < value_dim; ++c) o[c] *= rescale;
            }
          }
          // acc[h] (bq x D_v) += p[h] (bq x bk) @ v[kv(h)] (bk x D_v)
          brgemm(bq, value_dim, bk, block_k, ld_v, value_dim, true, logits.data() + h * tile, values[h / group],
                 acc.data() + h * block_q * value_dim, false);
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
    at::native::cpublas::brgemm_release(false);
  });
}

}  // namespace

// q_src B x H x T_q x D (any strides, last dim contiguous), k_src_t B x H_kv x D x T_k contiguous, both of the
// values' dtype; mix H x H float32; q_extra[e] B x H x T_q x W_e and k_extra_t[e] B x H_e x W_e x T_k float32
// contiguous; value B x H_kv x T_k x D_v (last dim contiguous); mask: none (causal: the queries are the last T_q of
// the T_k positions) or B_m x T_q x T_k (B_m 1 or B, any strides), bool (true: attend) or float32 (additive).
// Returns B x T_q x H x D_v in the values' dtype.
at::Tensor shared_attention(const at::Tensor& q_src, const at::Tensor& k_src_t, const at::Tensor& mix,
                            const std::vector<at::Tensor>& q_extra, const std::vector<at::Tensor>& k_extra_t,
                            const at::Tensor& value, const c10::optional<at::Tensor>& mask, int64_t block_q,
                            int64_t block_k) {
  TORCH_CHECK(q_src.dim() == 4 && k_src_t.dim() == 4 && value.dim() == 4, "q_src, k_src_t, value: 4-d tensors");
  TORCH_CHECK(q_src.scalar_type() == k_src_t.scalar_type() && q_src.scalar_type() == value.scalar_type(),
              "q_src, k_src_t and value must share a dtype");
  TORCH_CHECK(k_src_t.is_contiguous() && mix.is_contiguous() && mix.scalar_type() == at::kFloat,
              "k_src_t contiguous, mix float32 contiguous");
  TORCH_CHECK(q_src.stride(3) == 1 && value.stride(3) == 1, "q_src and value: last dim contiguous");
  TORCH_CHECK(q_src.size(1) % k_src_t.size(1) == 0 && value.size(1) == k_src_t.size(1), "GQA head counts");
  TORCH_CHECK(q_extra.size() == k_extra_t.size(), "one key per extra query");
  std::vector<Extra> extras;
  for (size_t e = 0; e < q_extra.size(); ++e) {
    TORCH_CHECK(q_extra[e].is_contiguous() && k_extra_t[e].is_contiguous(), "extras contiguous");
    TORCH_CHECK(q_extra[e].scalar_type() == at::kFloat && k_extra_t[e].scalar_type() == at::kFloat, "extras float32");
    TORCH_CHECK(q_src.size(1) % k_extra_t[e].size(1) == 0, "extra key heads must divide the query heads");
    extras.push_back({q_extra[e].data_ptr<float>(), k_extra_t[e].data_ptr<float>(), q_extra[e].size(3),
                      k_extra_t[e].size(1)});
  }
  auto out = at::empty({q_src.size(0), q_src.size(2), q_src.size(1), value.size(3)}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q_src.scalar_type(), "lisa_shared_attention", [&] {
    if (!mask.has_value() || mask->scalar_type() == at::kFloat) {
      attend<scalar_t, float>(q_src, k_src_t, mix, extras, value, mask, out, block_q, block_k);
    } else {
      TORCH_CHECK(mask->scalar_type() == at::kBool, "mask: bool or float32");
      attend<scalar_t, bool>(q_src, k_src_t, mix, extras, value, mask, out, block_q, block_k);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("shared_attention", &shared_attention, "A LiSA shared layer's attention on CPU (inference)");
}
