// The online softmax of a LiSA shared layer's CPU kernel, one tile row at a time (shared_attention.cpp; docs/method.md,
// "The CPU kernel of a shared layer"), on GCC/Clang vector types, with AVX-512 and AVX512-BF16 instructions where the
// build targets them (-march=native) and portable vector code elsewhere (tested by builds without AVX-512 and AVX).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lisa_softmax {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The widest vectors the build targets (GCC/Clang vector extensions): sixteen float32 lanes with AVX-512, eight with
// AVX2, four elsewhere (SSE, AVX without AVX2's integer lanes, NEON), so that every operation is one SIMD
// instruction, and the softmax's loops, including their sums and maxima, do not depend on what the compiler
// auto-vectorizes (an OpenMP simd reduction left each row's sum and maximum to a chain of sixteen scalar
// instructions). Vectors wider than the target's registers
// are split by the compiler through the stack: sixteen lanes on AVX2 took one layer's attention core at 1 x 2048
// 1.76x the base's sdpa time instead of 1.08x (docs/benchmark/cpu_kernel/README.md, "Without AVX-512").
#if defined(__AVX512F__)
#define LISA_VECTOR_BYTES 64
#elif defined(__AVX2__)
#define LISA_VECTOR_BYTES 32
#else
#define LISA_VECTOR_BYTES 16
#endif
typedef float Floats __attribute__((vector_size(LISA_VECTOR_BYTES)));
typedef int32_t Ints __attribute__((vector_size(LISA_VECTOR_BYTES)));
typedef uint32_t Bits __attribute__((vector_size(LISA_VECTOR_BYTES)));
typedef int16_t Shorts __attribute__((vector_size(LISA_VECTOR_BYTES / 2)));
typedef float QuarterFloats __attribute__((vector_size(16)));
constexpr int64_t kLanes = sizeof(Floats) / sizeof(float);

// The instructions of this build's softmax beyond the portable vector code (what the compiler was told to target).
#if defined(__AVX512BF16__)
constexpr const char* kInstructions = "avx512-bf16";
#elif defined(__AVX512F__)
constexpr const char* kInstructions = "avx512";
#else
constexpr const char* kInstructions = "portable";
#endif

inline Floats load_lanes(const float* p) {
  Floats x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

// The first n < kLanes lanes from p, fill in the others.
inline Floats load_partial(const float* p, int64_t n, float fill) {
  float lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = l < n ? p[l] : fill;
  return load_lanes(lanes);
}

// The maximum or the sum of a vector's lanes, by halves (four steps for sixteen lanes rather than a chain of fifteen).
template <bool maximum, typename Vector>
inline float reduce_lanes(Vector x) {
  if constexpr (sizeof(Vector) == sizeof(QuarterFloats)) {
    return maximum ? std::max(std::max(x[0], x[2]), std::max(x[1], x[3])) : (x[0] + x[2]) + (x[1] + x[3]);
  } else {
    typedef float Half __attribute__((vector_size(sizeof(Vector) / 2)));
    Half a, b;
    std::memcpy(&a, &x, sizeof(Half));
    std::memcpy(&b, reinterpret_cast<const char*>(&x) + sizeof(Half), sizeof(Half));
    return reduce_lanes<maximum>(maximum ? (a > b ? a : b) : a + b);
  }
}

// A softmax row's running maximum stays until a logit exceeds it by more than kSlack: probabilities up to
// exp(kSlack) ~ 3000 before the normalization, which float32 sums and bf16/fp16 probabilities hold.
constexpr float kSlack = 8.f;

// The lane-wise maximum of a and b (b where a is NaN).
inline Floats max_lanes(Floats a, Floats b) {
#if defined(__AVX512F__)
  return (Floats)_mm512_max_ps((__m512)a, (__m512)b);
#else
  return a > b ? a : b;
#endif
}

// exp(f) for |f| <= ln(2) / 2 by a polynomial: of degree 6 (relative error 2e-7) for float32 probabilities, of degree
// 4 (5.4e-6, a weighted least-squares fit) where they are rounded to bf16/fp16 next (relative steps of 3.9e-3 and
// 4.9e-4).
template <bool rounded>
inline Floats exp_reduced(Floats f) {
  Floats p;
  if constexpr (rounded) {
    p = f * 4.127774760e-2f + 1.675351560e-1f;
    p = p * f + 5.000511408e-1f;
  } else {
    p = f * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
  }
  p = p * f + 1.f;
  return p * f + 1.f;
}

// exp(x) lane-wise for x <= kSlack (a logit minus its row's running maximum): exp(x) = 2^n exp(f) with n the nearest
// integer to x / ln 2 and f = x - n ln 2 (exp_reduced); 0 below -87 (and for -inf). Branch-free. x is clamped to 88
// above (a tile's first pass may see logits far above a stale maximum; it is redone, but 2^n must stay finite). With
// AVX-512, n is rounded by one instruction and 2^n applied by scalef; elsewhere both by integer lanes.
template <bool rounded>
inline Floats exp_below(Floats x) {
#if defined(__AVX512F__)
  const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  x = (Floats)_mm512_min_ps(_mm512_max_ps((__m512)x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const Floats n = (Floats)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT);
  const Floats p = exp_reduced<rounded>(x - n * 0.693359375f + n * 2.12194440e-4f);  // x - n ln 2 in two parts
  return (Floats)_mm512_maskz_scalef_ps(keep, (__m512)p, (__m512)n);
#else
  const Ints keep = x >= -87.f;
  x = keep ? x : -87.f;
  x = x <= 88.f ? x : 88.f;
  const Floats shift = x * 1.44269504088896341f + 12582912.f;  // 1.5 2^23: rounds x / ln 2 to an integer
  const Floats n = shift - 12582912.f;
  const Floats p = exp_reduced<rounded>(x - n * 0.693359375f + n * 2.12194440e-4f);  // x - n ln 2 in two parts
  const Ints bits = (__builtin_convertvector(n, Ints) + 127) << 23;  // 2^n
  Floats scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return keep ? p * scale : 0.f;
#endif
}

// The maximum of s[0 .. n) (-inf for n = 0).
inline float row_maximum(const float* s, int64_t n) {
  Floats lanes = Floats{} + kNegInf;
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    lanes = max_lanes(load_lanes(s + c), lanes);
  }
  if (c < n) lanes = max_lanes(load_partial(s + c, n - c, kNegInf), lanes);
  return reduce_lanes<true>(lanes);
}

// The first n <= kLanes lanes of x stored as out_t, rounded to nearest even (bf16 by integer lanes, a NaN kept a
// quiet NaN; others one at a time); returns x as stored (the lanes beyond n as the rounding would store them).
template <typename out_t>
inline Floats store_lanes(out_t* out, Floats x, int64_t n = kLanes) {
  if constexpr (std::is_same_v<out_t, float>) {
    std::memcpy(out, &x, n * sizeof(float));
    return x;
  } else if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    Bits bits;
    std::memcpy(&bits, &x, sizeof(bits));
    const Bits nan = x != x;
    bits = nan ? ((bits >> 16) | 0x40u) : (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const Shorts high = __builtin_convertvector(bits, Shorts);
    std::memcpy(out, &high, n * sizeof(int16_t));
    bits <<= 16;
    std::memcpy(&x, &bits, sizeof(x));
    return x;
  } else {
    for (int64_t l = 0; l < kLanes; ++l) {
      if (l < n) out[l] = static_cast<out_t>(x[l]);
      x[l] = l < n ? static_cast<float>(out[l]) : 0.f;
    }
    return x;
  }
}

// out[c] = exp(s[c] - m) for c < n (s[c] <= m + kSlack), zeros on to width; returns the sum of out[0 .. n) as stored,
// rounded to out_t (so that the weights A V applies are normalized by their own sum), and the maximum of s[0 .. n) in
// *maximum where given.
template <typename out_t>
inline float exp_row(const float* s, int64_t n, int64_t width, float m, out_t* out, float* maximum = nullptr) {
  Floats sum = {}, lanes = Floats{} + kNegInf;
  int64_t c = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<out_t, c10::BFloat16>) {  // two vectors at a time, rounded together to bf16 and
    const __m512bh ones = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.f), _mm512_set1_ps(1.f));  // summed as rounded
    __m512 pair_sums = _mm512_setzero_ps();  // lane l: the sum of bf16 lanes 2 l and 2 l + 1
    for (; c + 2 * kLanes <= n; c += 2 * kLanes) {
      const Floats x = load_lanes(s + c), y = load_lanes(s + c + kLanes);
      lanes = max_lanes(y, max_lanes(x, lanes));
      const __m512bh p = _mm512_cvtne2ps_pbh((__m512)exp_below<true>(y - m), (__m512)exp_below<true>(x - m));
      _mm512_storeu_si512(out + c, (__m512i)p);
      pair_sums = _mm512_dpbf16_ps(pair_sums, p, ones);
    }
    sum = (Floats)pair_sums;
  }
#endif
  for (; c + kLanes <= n; c += kLanes) {
    const Floats x = load_lanes(s + c);
    lanes = max_lanes(x, lanes);
    sum += store_lanes(out + c, exp_below<!std::is_same_v<out_t, float>>(x - m));
  }
  if (c < n) {  // the partial vector
    const Floats x = load_partial(s + c, n - c, kNegInf);
    lanes = max_lanes(x, lanes);
    sum += store_lanes(out + c, exp_below<!std::is_same_v<out_t, float>>(x - m), std::min(kLanes, width - c));
    c += kLanes;
  }
  for (; c < width; c += kLanes) store_lanes(out + c, Floats{}, std::min(kLanes, width - c));
  if (maximum) *maximum = reduce_lanes<true>(lanes);
  return reduce_lanes<false>(sum);
}

// One tile row of the online softmax: out = exp(s - m) for the row's n logits s (zeros on to width), with the row's
// running maximum m, sum l of exp(logit - m) and output acc (d floats), rescaled where m changes. m is not raised
// while the row's logits stay within kSlack of it: exp(s - m) then takes one pass that also finds the tile's maximum,
// and only a tile that exceeds m + kSlack (or a row's first) takes a second pass from its own maximum.
template <typename out_t>
inline void softmax_row(const float* s, int64_t n, int64_t width, float& m, float& l, float* acc, int64_t d,
                        out_t* out) {
  float tile_max;
  if (m != kNegInf) {
    const float sum = exp_row(s, n, width, m, out, &tile_max);
    if (tile_max - m <= kSlack) {
      l += sum;
      return;
    }
  } else {
    tile_max = row_maximum(s, n);
  }
  if (tile_max == kNegInf) {  // nothing seen yet in the row: it contributes nothing so far
    exp_row(s, 0, width, 0.f, out);
    return;
  }
  const float rescale = (m == kNegInf) ? 0.f : std::exp(m - tile_max);
  l = l * rescale + exp_row(s, n, width, tile_max, out);
  m = tile_max;
  for (int64_t c = 0; c < d; ++c) acc[c] *= rescale;
}

}  // namespace lisa_softmax
