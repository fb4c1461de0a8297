// gemma3n::gqa_attention{,_int8}.out and gemma3n::sliding_gqa_attention{,_int8}.out: causal
// grouped-query attention over a static KV cache for ExecuTorch's portable runtime.
//
//   query    [1, n, H, D] float32           (the call's tokens, at positions start_pos + t)
//   k/v      [1, S, KV, D] float32 | float16 | int8 (int8: value = (q - zero_point) * scale,
//            scales float32 [1, S, KV, 1], zero points int8 [1, S, KV, 1])
//   out      [1, n, H, D] float32 = softmax(q . k) v over positions [0, start_pos + t]; scale 1.
//            int8: q is first rounded to int8 per token and head (symmetric, max |q| / 127).
//   sliding: over positions (start_pos + t - window, start_pos + t] only, position p held in slot
//            p % S (a ring: S >= window + n - 1 keeps every visible position; a smaller S must
//            hold all positions). Slots never written are never read.
//
// Every query head of a KV head (H / KV of them) and a block of tokens share each K/V row as it is
// read; the positions are split across work items (flash-decoding: each item keeps its own running
// max, sum and accumulator, merged at the end), so one decode token deep in the cache is spread
// over every thread and read at memory speed. The float arithmetic uses GCC/Clang vector
// extensions (8 floats), which compile to AVX/AVX2+FMA on x86-64 and NEON on aarch64, except the
// value sums, 16 floats wide in AVX-512 intrinsics where the CPU has them; int8 keys are scored
// with integer dot products (intrinsics: VNNI, AVX2, SDOT; plain C elsewhere; with AVX-512 VNNI a
// chunk's rows are scored and softmaxed 16 to a vector), and int8 values are widened to floats in
// registers as they are summed.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON) || defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace gemma3n {
namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned loads/stores
typedef int32_t v8i __attribute__((vector_size(32)));

constexpr int kTile = 64;        // positions per tile (K and V tiles stay in L1/L2)
constexpr int kRowBlock = 64;    // query rows (token x head) per work item
constexpr int kMinPart = 512;    // fewest positions worth a work item of their own
constexpr int kTargetItems = 32; // enough work items to balance any thread count we run

inline v8 load(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }
// 8 int8 values as floats (by intrinsics: GCC's vector conversions widen int8 one lane at a time).
inline v8 widen(const int8_t* p) {
#if defined(__AVX2__)
  return reinterpret_cast<v8>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__aarch64__)
  const int16x8_t wide = vmovl_s8(vld1_s8(p));
  const float32x4_t lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(wide))), hi = vcvtq_f32_s32(vmovl_high_s16(wide));
  v8 out;
  std::memcpy(&out, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof(lo), &hi, sizeof(hi));
  return out;
#else
  v8 out;
  for (int k = 0; k < 8; ++k) out[k] = static_cast<float>(p[k]);
  return out;
#endif
}
inline float hsum(v8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// Softmax weights below exp(-kNegligible) of the row's largest are 0: beside that one (weight 1) they
// cannot move a float sum (even 32768 of them: 3e-22 against an ulp of 1.2e-7), and kept they were
// as small as 1e-38, whose products with the value scales and rows are subnormal floats: an x86 core
// takes a microcode assist on each (measured: a 4096-token prompt of distinct tokens prefilled at
// 0.83x the speed of one token repeated, whose weights are all equal).
constexpr float kNegligible = 60.0f;

// exp(x) for x <= 0 (Cephes' expf polynomial on a 2^n range reduction), written so GCC
// vectorizes it; relative error ~1e-7; 0 below -kNegligible.
inline float fast_exp(float x) {
  if (x < -kNegligible) return 0.0f;
  float t = x * 1.44269504088896341f;
  float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// fast_exp on 8 (or 16) lanes at once (the softmax's exps were scalar: the loop's sum is a reduction,
// which GCC keeps in order without -ffast-math).
template <typename V, typename VI>
inline V fast_exp_lanes(V x) {
  const V floor_value = V{} - kNegligible;
  const auto negligible = x < floor_value;
  x = negligible ? floor_value : x;
  V t = x * 1.44269504088896341f;
  V n = (t + 12582912.0f) - 12582912.0f;
  V r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return negligible ? V{} : p * scale;
}
inline v8 fast_exp8(v8 x) { return fast_exp_lanes<v8, v8i>(x); }

inline float hmax(v8 v) {
  float m = v[0];
  for (int k = 1; k < 8; ++k) m = std::max(m, v[k]);
  return m;
}

constexpr v8i kLane = {0, 1, 2, 3, 4, 5, 6, 7};

enum class Format { F32, F16, I8 };

struct Problem {
  const float* query;  // [n, H, D]
  const void* k;       // [S, KV, D]
  const void* v;
  const float* k_scales = nullptr;  // [S, KV] (int8 only)
  const int8_t* k_zero_points = nullptr;
  const float* v_scales = nullptr;
  const int8_t* v_zero_points = nullptr;
  float* out;  // [n, H, D]
  int64_t n, H, KV, D, start_pos;
  int64_t slots;          // S: position p is in slot p % S
  int64_t window = 0;     // positions a token sees (itself included); 0: all before it
  int64_t rows_per_head;  // H / KV: query heads sharing a KV head
  int64_t rows;           // n * rows_per_head per KV head
  int64_t row_blocks, parts;
};

inline float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal
    int shift = 0;
    while (!(mant & 0x400)) { mant <<= 1; ++shift; }
    bits = sign | ((113 - shift) << 23) | ((mant & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void convert_row(const uint16_t* src, float* dst, int64_t D) {
  int64_t d = 0;
#if defined(__F16C__)
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d))));
#elif defined(__aarch64__)
  for (; d + 4 <= D; d += 4)
    vst1q_f32(dst + d, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + d))));
#endif
  for (; d < D; ++d) dst[d] = half_to_float(src[d]);
}

// Int8 caches: the query is quantized per row (symmetric, max |q| / 127; ExecuTorch's own int8
// kernel quantizes it too, asymmetrically) so that q . k is an exact integer dot product, which every CPU we target does on
// int8 directly (VNNI on x86, SDOT on ARM), instead of widening each cached key to float.
inline int32_t dot_i8(const int8_t* __restrict q, const int8_t* __restrict k, int64_t D) {
  int64_t d = 0;
  int32_t sum = 0;
#if defined(__ARM_FEATURE_DOTPROD)
  int32x4_t acc = vdupq_n_s32(0);
  for (; d + 16 <= D; d += 16) acc = vdotq_s32(acc, vld1q_s8(q + d), vld1q_s8(k + d));
  sum = vaddvq_s32(acc);
#elif defined(__AVX2__)
  // |k| (unsigned) times q with k's sign: pairs of products fit int16 (2 * 128 * 127).
  __m256i acc = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (; d + 32 <= D; d += 32) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + d));
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + d));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(x, x),
                                                                       _mm256_sign_epi8(y, x)), ones));
  }
  const __m128i half = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  const __m128i quarter = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0x4e));
  sum = _mm_cvtsi128_si32(_mm_add_epi32(quarter, _mm_shuffle_epi32(quarter, 0xb1)));
#endif
  for (; d < D; ++d) sum += int32_t(q[d]) * int32_t(k[d]);
  return sum;
}

// Integer scores of 4 query rows (contiguous, stride D; qsum: each row's sum) against one key row.
inline void dot_i8_4x1(const int8_t* __restrict q, int64_t D, const int32_t* qsum, const int8_t* __restrict k,
                       int32_t* out) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  // vpdpbusd multiplies unsigned by signed bytes: k + 128 as unsigned, then 128 * sum(q) taken off.
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t d = 0; d < D; d += 64) {
    const __mmask64 m = D - d >= 64 ? ~__mmask64(0) : (__mmask64(1) << (D - d)) - 1;
    const __m512i x = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, k + d), flip);
    const __m512i y0 = _mm512_maskz_loadu_epi8(m, q + d), y1 = _mm512_maskz_loadu_epi8(m, q + D + d);
    const __m512i y2 = _mm512_maskz_loadu_epi8(m, q + 2 * D + d), y3 = _mm512_maskz_loadu_epi8(m, q + 3 * D + d);
    a0 = _mm512_dpbusd_epi32(a0, x, y0);
    a1 = _mm512_dpbusd_epi32(a1, x, y1);
    a2 = _mm512_dpbusd_epi32(a2, x, y2);
    a3 = _mm512_dpbusd_epi32(a3, x, y3);
  }
  // Four horizontal sums at once: lane r of the result is row r's.
  const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
  const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
  const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
  const __m128i offset = _mm_slli_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qsum)), 7);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_sub_epi32(_mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)), offset));
#elif defined(__AVX2__)
  // dot_i8's products, each key vector's |k| taken once for the 4 rows, and one horizontal sum for all.
  (void)qsum;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + d));
    const __m256i ax = _mm256_sign_epi8(x, x);
    const auto products = [&](const int8_t* row) {
      const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d));
      return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(y, x)), ones);
    };
    a0 = _mm256_add_epi32(a0, products(q));
    a1 = _mm256_add_epi32(a1, products(q + D));
    a2 = _mm256_add_epi32(a2, products(q + 2 * D));
    a3 = _mm256_add_epi32(a3, products(q + 3 * D));
  }
  const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)));
  for (; d < D; ++d)
    for (int r = 0; r < 4; ++r) out[r] += int32_t(q[r * D + d]) * int32_t(k[d]);
#elif defined(__ARM_FEATURE_DOTPROD)
  // Each key vector loaded once for the 4 rows, and one pairwise reduction for all.
  (void)qsum;
  int32x4_t a0 = vdupq_n_s32(0), a1 = a0, a2 = a0, a3 = a0;
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const int8x16_t x = vld1q_s8(k + d);
    a0 = vdotq_s32(a0, vld1q_s8(q + d), x);
    a1 = vdotq_s32(a1, vld1q_s8(q + D + d), x);
    a2 = vdotq_s32(a2, vld1q_s8(q + 2 * D + d), x);
    a3 = vdotq_s32(a3, vld1q_s8(q + 3 * D + d), x);
  }
  vst1q_s32(out, vpaddq_s32(vpaddq_s32(a0, a1), vpaddq_s32(a2, a3)));
  for (; d < D; ++d)
    for (int r = 0; r < 4; ++r) out[r] += int32_t(q[r * D + d]) * int32_t(k[d]);
#else
  (void)qsum;
  for (int r = 0; r < 4; ++r) out[r] = dot_i8(q + r * D, k, D);
#endif
}

// Scores of 4 query rows (contiguous, stride D) against 2 key rows.
inline void dot_4x2(const float* __restrict q, int64_t D, const float* __restrict k0,
                    const float* __restrict k1, float* o0, float* o1) {
  v8 a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
  const float *q0 = q, *q1 = q + D, *q2 = q + 2 * D, *q3 = q + 3 * D;
  for (int64_t d = 0; d < D; d += 8) {
    v8 x0 = load(k0 + d), x1 = load(k1 + d);
    v8 y = load(q0 + d);
    a00 += y * x0; a01 += y * x1;
    y = load(q1 + d);
    a10 += y * x0; a11 += y * x1;
    y = load(q2 + d);
    a20 += y * x0; a21 += y * x1;
    y = load(q3 + d);
    a30 += y * x0; a31 += y * x1;
  }
  o0[0] = hsum(a00); o0[1] = hsum(a10); o0[2] = hsum(a20); o0[3] = hsum(a30);
  o1[0] = hsum(a01); o1[1] = hsum(a11); o1[2] = hsum(a21); o1[3] = hsum(a31);
}

inline float dot_1x1(const float* __restrict q, const float* __restrict k, int64_t D) {
  v8 a = {}, b = {};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) { a += load(q + d) * load(k + d); b += load(q + d + 8) * load(k + d + 8); }
  for (; d < D; d += 8) a += load(q + d) * load(k + d);
  return hsum(a + b);
}

// The slot of position p in a cache of S slots, dividing only where a ring has wrapped: a 64-bit
// division for every row read and prefetched took ~5% of a deep int8 decode call's samples (Zen 3).
inline int64_t slot_of(int64_t p, int64_t S) { return p < S ? p : p % S; }
inline int64_t next_slot(int64_t slot, int64_t S) { return slot + 1 == S ? 0 : slot + 1; }

inline void prefetch_rows(const char* cache, int64_t g, int64_t KV, int64_t S, int64_t row_bytes, int64_t begin,
                          int64_t end) {
  for (int64_t p = begin, slot = slot_of(begin, S); p < end; ++p, slot = next_slot(slot, S)) {
    const int64_t at = (slot * KV + g) * row_bytes;
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(cache + at + b, 0, 3);
  }
}

inline void prefetch_tile(const char* k, const char* v, int64_t g, int64_t KV, int64_t S, int64_t row_bytes,
                          int64_t begin, int64_t end) {
  prefetch_rows(k, g, KV, S, row_bytes, begin, end);
  prefetch_rows(v, g, KV, S, row_bytes, begin, end);
}

#if defined(__AVX512F__)
inline __m512 values16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 values16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// ROWS rows of accumulate_values, dims [0, D32): 2 x ROWS accumulators in registers.
template <int ROWS, typename T>
inline void accumulate_row_block(float* a, const float* Si, const float* alpha, const T* const* vrow, int64_t nt,
                                 int64_t D32, int64_t D, int64_t rs, int64_t cs) {
  for (int64_t d = 0; d < D32; d += 32) {
    __m512 sums[ROWS][2];
    for (int r = 0; r < ROWS; ++r) {
      const __m512 scale = _mm512_set1_ps(alpha[r]);
      sums[r][0] = _mm512_mul_ps(_mm512_loadu_ps(a + r * D + d), scale);
      sums[r][1] = _mm512_mul_ps(_mm512_loadu_ps(a + r * D + d + 16), scale);
    }
    for (int64_t j = 0; j < nt; ++j) {
      const __m512 x0 = values16(vrow[j] + d), x1 = values16(vrow[j] + d + 16);
      const float* Sj = Si + j * cs;
      for (int r = 0; r < ROWS; ++r) {
        const __m512 w = _mm512_set1_ps(Sj[r * rs]);
        sums[r][0] = _mm512_fmadd_ps(w, x0, sums[r][0]);
        sums[r][1] = _mm512_fmadd_ps(w, x1, sums[r][1]);
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      _mm512_storeu_ps(a + r * D + d, sums[r][0]);
      _mm512_storeu_ps(a + r * D + d + 16, sums[r][1]);
    }
  }
}

// acc_i = acc_i * alpha_i + sum_j S[i][j] v_j over a tile's nt value rows, float or int8 (each int8
// row widened in registers once for 8 or 4 query rows), in 512-bit registers: half the instructions of
// the 8-lane loop below (on CPUs with two 512-bit FMA units, half the time; Zen 4 splits them).
// S[i][j] is at S[i * rs + j * cs] (rows of a tile, or a tile's columns of rows).
template <typename T>
void accumulate_values(float* acc, const float* S, const float* alpha, const T* const* vrow, int64_t nrows,
                       int64_t nt, int64_t D, int64_t rs = kTile, int64_t cs = 1) {
  // One row, dims [d0, D) (D is a multiple of 16).
  const auto one_row = [&](int64_t i, int64_t d0) {
    float* a = acc + i * D;
    const float* Si = S + i * rs;
    for (int64_t d = d0; d < D; d += 16) {
      __m512 x = _mm512_mul_ps(_mm512_loadu_ps(a + d), _mm512_set1_ps(alpha[i]));
      for (int64_t j = 0; j < nt; ++j) x = _mm512_fmadd_ps(_mm512_set1_ps(Si[j * cs]), values16(vrow[j] + d), x);
      _mm512_storeu_ps(a + d, x);
    }
  };
  const int64_t D32 = D / 32 * 32;
  int64_t i = 0;
  // 8 rows at a time where there are (a chunk's): each value row widened once for 8 rows, not 4.
  for (; i + 8 <= nrows; i += 8) {
    accumulate_row_block<8>(acc + i * D, S + i * rs, alpha + i, vrow, nt, D32, D, rs, cs);
    for (int r = 0; r < 8; ++r) one_row(i + r, D32);
  }
  for (; i + 4 <= nrows; i += 4) {
    accumulate_row_block<4>(acc + i * D, S + i * rs, alpha + i, vrow, nt, D32, D, rs, cs);
    for (int r = 0; r < 4; ++r) one_row(i + r, D32);
  }
  for (; i < nrows; ++i) one_row(i, 0);
}
#else
inline v8 values8(const float* p) { return load(p); }
inline v8 values8(const int8_t* p) { return widen(p); }

// The same, 8 lanes wide (AVX2, NEON; plain C elsewhere).
template <typename T>
void accumulate_values(float* acc, const float* S, const float* alpha, const T* const* vrow, int64_t nrows,
                       int64_t nt, int64_t D) {
  int64_t i = 0;
  for (; i + 4 <= nrows; i += 4) {
    float* a = acc + i * D;
    const float* Si = S + i * kTile;
    const float al0 = alpha[i], al1 = alpha[i + 1], al2 = alpha[i + 2], al3 = alpha[i + 3];
    for (int64_t d = 0; d < D; d += 16) {
      v8 a00 = load(a + d) * al0, a01 = load(a + d + 8) * al0;
      v8 a10 = load(a + D + d) * al1, a11 = load(a + D + d + 8) * al1;
      v8 a20 = load(a + 2 * D + d) * al2, a21 = load(a + 2 * D + d + 8) * al2;
      v8 a30 = load(a + 3 * D + d) * al3, a31 = load(a + 3 * D + d + 8) * al3;
      for (int64_t j = 0; j < nt; ++j) {
        const v8 x0 = values8(vrow[j] + d), x1 = values8(vrow[j] + d + 8);
        float w = Si[j];
        a00 += w * x0; a01 += w * x1;
        w = Si[kTile + j];
        a10 += w * x0; a11 += w * x1;
        w = Si[2 * kTile + j];
        a20 += w * x0; a21 += w * x1;
        w = Si[3 * kTile + j];
        a30 += w * x0; a31 += w * x1;
      }
      store(a + d, a00); store(a + d + 8, a01);
      store(a + D + d, a10); store(a + D + d + 8, a11);
      store(a + 2 * D + d, a20); store(a + 2 * D + d + 8, a21);
      store(a + 3 * D + d, a30); store(a + 3 * D + d + 8, a31);
    }
  }
  for (; i < nrows; ++i) {
    float* a = acc + i * D;
    const float* Si = S + i * kTile;
    for (int64_t d = 0; d < D; d += 8) {
      v8 x = load(a + d) * alpha[i];
      for (int64_t j = 0; j < nt; ++j) x += Si[j] * values8(vrow[j] + d);
      store(a + d, x);
    }
  }
}

#endif

struct Scratch {
  std::vector<float> q, kbuf, vbuf, scores;
  std::vector<int8_t> q8;
};

// Row i of q as int8 at q8 (symmetric: q ~ q8 * scale); returns the scale, and the row's sum in qsum.
inline float quantize_row(const float* q, int64_t D, int8_t* q8, int32_t* qsum) {
  float amax = 0.0f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(q[d]));
  // Divided, not multiplied by the inverse, and rounded half to even: as the reference computes it.
  const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
  int32_t sum = 0;
  for (int64_t d = 0; d < D; ++d) {
    q8[d] = static_cast<int8_t>(std::nearbyint(q[d] / scale));
    sum += q8[d];
  }
  *qsum = sum;
  return scale;
}

// A tile's int8 rows of KV head g, positions p0 + j for j < nt, with their scales and zero points
// (zeros past nt: the 8-wide softmax reads whole vectors). Keys stay int8 (integer dot products);
// values are widened in registers as they are summed (widened once into a float tile for a chunk's
// many rows measured no faster).
struct Int8Rows {
  const int8_t* k[kTile];
  const int8_t* v[kTile];
  float kscale[kTile] = {}, kzero[kTile] = {}, vscale[kTile] = {}, vzero[kTile] = {};

  void gather(const Problem& P, int64_t g, int64_t p0, int64_t nt) {
    for (int64_t j = 0, slot = slot_of(p0, P.slots); j < nt; ++j, slot = next_slot(slot, P.slots)) {
      const int64_t at = slot * P.KV + g;
      k[j] = static_cast<const int8_t*>(P.k) + at * P.D;
      v[j] = static_cast<const int8_t*>(P.v) + at * P.D;
      kscale[j] = P.k_scales[at];
      kzero[j] = P.k_zero_points[at];
      vscale[j] = P.v_scales[at];
      vzero[j] = P.v_zero_points[at];
    }
  }
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// A chunk's int8 attention with its rows in vectors, 16 rows a vector: the scores of 16 rows against
// a key are one chain of vpdpbusd (the rows' int8 queries transposed once per work item into
// columns of 4 bytes, each key's 4 bytes broadcast), with no horizontal sums, and the online softmax
// runs on the same vectors. The same integers and float formulas as dot_i8_4x1's path; in a
// standalone loop on the Xeon with AMX (AVX-512 VNNI) these scores took 0.73x its time.
constexpr int kRowVector = 16;
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // the scores' columns, unaligned

// Integer scores of the NV row vectors of qt (4-byte columns of `width` rows, query + 128) against keys k0, k1.
template <int NV>
inline void score_pair(const uint8_t* qt, int64_t width, int64_t D4, const int8_t* k0, const int8_t* k1,
                       __m512i* s0, __m512i* s1) {
  __m512i a0[NV], a1[NV];
  for (int v = 0; v < NV; ++v) a0[v] = a1[v] = _mm512_setzero_si512();
  for (int64_t d4 = 0; d4 < D4; ++d4) {
    int32_t w0, w1;
    std::memcpy(&w0, k0 + 4 * d4, 4);
    std::memcpy(&w1, k1 + 4 * d4, 4);
    const __m512i b0 = _mm512_set1_epi32(w0), b1 = _mm512_set1_epi32(w1);
    const uint8_t* column = qt + d4 * width * 4;
    for (int v = 0; v < NV; ++v) {
      const __m512i y = _mm512_loadu_si512(column + v * 64);
      a0[v] = _mm512_dpbusd_epi32(a0[v], y, b0);
      a1[v] = _mm512_dpbusd_epi32(a1[v], y, b1);
    }
  }
  for (int v = 0; v < NV; ++v) { s0[v] = a0[v]; s1[v] = a1[v]; }
}

inline int32_t sum_i8(const int8_t* k, int64_t D) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i a = _mm512_setzero_si512();
  for (int64_t d = 0; d < D; d += 64) {
    const __mmask64 m = D - d >= 64 ? ~__mmask64(0) : (__mmask64(1) << (D - d)) - 1;
    a = _mm512_dpbusd_epi32(a, ones, _mm512_maskz_loadu_epi8(m, k + d));
  }
  return _mm512_reduce_add_epi32(a);
}

// run_item for an int8 cache and at least kRowVector rows (see run_item).
void run_item_int8_rows(const Problem& P, int64_t g, int64_t row0, int64_t nrows, int64_t p_begin, int64_t p_end,
                        float* acc, float* m, float* l) {
  static thread_local std::vector<int8_t> q8;
  static thread_local std::vector<uint8_t> qt;
  static thread_local std::vector<float> scores;
  const int64_t D = P.D, D4 = D / 4, R = P.rows_per_head, KV = P.KV;
  const int64_t vectors = (nrows + kRowVector - 1) / kRowVector, width = vectors * kRowVector;
  q8.resize(kRowBlock * D);
  qt.resize(kRowBlock * D);
  scores.resize(kTile * kRowBlock);
  alignas(64) int32_t first[kRowBlock], limit[kRowBlock];
  alignas(64) float qscale[kRowBlock], qsum[kRowBlock], alpha[kRowBlock], corr[kRowBlock];
  for (int64_t i = 0; i < width; ++i) {
    if (i < nrows) {
      const int64_t row = row0 + i, t = row / R, h = g * R + row % R;
      int32_t sum;
      qscale[i] = quantize_row(P.query + (t * P.H + h) * D, D, q8.data() + i * D, &sum);
      qsum[i] = static_cast<float>(sum);
      limit[i] = static_cast<int32_t>(P.start_pos + t);
      first[i] = P.window ? std::max<int32_t>(0, limit[i] - static_cast<int32_t>(P.window) + 1) : 0;
    } else {  // padding: sees nothing
      std::memset(q8.data() + i * D, 0, D);
      qscale[i] = qsum[i] = 0.0f;
      first[i] = 1;
      limit[i] = 0;
    }
    for (int64_t d4 = 0; d4 < D4; ++d4) {
      uint32_t w;
      std::memcpy(&w, q8.data() + i * D + 4 * d4, 4);
      w ^= 0x80808080u;  // + 128: vpdpbusd's unsigned operand
      std::memcpy(qt.data() + (d4 * width + i) * 4, &w, 4);
    }
  }
  v16 mv[kRowBlock / kRowVector], lv[kRowBlock / kRowVector], cv[kRowBlock / kRowVector];
  for (int64_t v = 0; v < vectors; ++v) {
    mv[v] = v16{} - FLT_MAX;
    lv[v] = cv[v] = v16{};
  }
  std::memset(acc, 0, nrows * D * sizeof(float));

  Int8Rows rows;
  float ksum[kTile];
  const char* kbase = static_cast<const char*>(P.k);
  const char* vbase = static_cast<const char*>(P.v);
  float* S = scores.data();  // S[j * width + i]: a tile's columns
  prefetch_tile(kbase, vbase, g, KV, P.slots, D, p_begin, std::min<int64_t>(p_end, p_begin + kTile));
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kTile) {
    const int64_t nt = std::min<int64_t>(kTile, p_end - p0);
    const int64_t next_end = std::min<int64_t>(p_end, p0 + nt + kTile);
    rows.gather(P, g, p0, nt);
    for (int64_t j = 0; j < nt; ++j) ksum[j] = static_cast<float>(sum_i8(rows.k[j], D) << 7);  // (q + 128) . k - q . k
    for (int64_t j = 0; j < nt; j += 2) {
      for (int64_t n = p0 + nt + j; n < std::min(next_end, p0 + nt + j + 2); ++n)  // a next-tile row per key
        prefetch_tile(kbase, vbase, g, KV, P.slots, D, n, n + 1);
      const int64_t j1 = std::min(j + 1, nt - 1);
      __m512i s0[kRowBlock / kRowVector], s1[kRowBlock / kRowVector];
      switch (vectors) {
        case 1: score_pair<1>(qt.data(), width, D4, rows.k[j], rows.k[j1], s0, s1); break;
        case 2: score_pair<2>(qt.data(), width, D4, rows.k[j], rows.k[j1], s0, s1); break;
        case 3: score_pair<3>(qt.data(), width, D4, rows.k[j], rows.k[j1], s0, s1); break;
        default: score_pair<4>(qt.data(), width, D4, rows.k[j], rows.k[j1], s0, s1); break;
      }
      for (int64_t v = 0; v < vectors; ++v) {
        const v16 qs = *reinterpret_cast<const v16*>(qsum + v * kRowVector);
        const v16 qc = *reinterpret_cast<const v16*>(qscale + v * kRowVector);
        v16 x = reinterpret_cast<v16>(_mm512_cvtepi32_ps(s0[v])) - ksum[j];
        *reinterpret_cast<v16u*>(S + j * width + v * kRowVector) = rows.kscale[j] * (x - rows.kzero[j] * qs) * qc;
        if (j1 != j) {
          x = reinterpret_cast<v16>(_mm512_cvtepi32_ps(s1[v])) - ksum[j1];
          *reinterpret_cast<v16u*>(S + j1 * width + v * kRowVector) = rows.kscale[j1] * (x - rows.kzero[j1] * qs) * qc;
        }
      }
    }
    // Online softmax, 16 rows at a time.
    for (int64_t v = 0; v < vectors; ++v) {
      const v16i lo = *reinterpret_cast<const v16i*>(first + v * kRowVector);
      const v16i hi = *reinterpret_cast<const v16i*>(limit + v * kRowVector);
      v16 mx = v16{} - FLT_MAX;
      for (int64_t j = 0; j < nt; ++j) {
        const int32_t p = static_cast<int32_t>(p0 + j);
        const v16 x = *reinterpret_cast<const v16u*>(S + j * width + v * kRowVector);
        mx = p >= lo && p <= hi && x > mx ? x : mx;
      }
      const v16 m_new = mv[v] > mx ? mv[v] : mx;
      const v16 a = fast_exp_lanes<v16, v16i>(mv[v] - m_new);
      v16 sum = {}, c = {};
      for (int64_t j = 0; j < nt; ++j) {
        const int32_t p = static_cast<int32_t>(p0 + j);
        v16u* Sj = reinterpret_cast<v16u*>(S + j * width + v * kRowVector);
        v16 e = fast_exp_lanes<v16, v16i>(*Sj - m_new);
        e = p >= lo && p <= hi ? e : v16{};
        sum += e;
        e *= rows.vscale[j];
        c += e * rows.vzero[j];
        *Sj = e;
      }
      lv[v] = lv[v] * a + sum;
      cv[v] = cv[v] * a + c;
      mv[v] = m_new;
      *reinterpret_cast<v16*>(alpha + v * kRowVector) = a;
    }
    accumulate_values(acc, S, alpha, rows.v, nrows, nt, D, 1, width);
  }
  for (int64_t v = 0; v < vectors; ++v) {
    *reinterpret_cast<v16*>(corr + v * kRowVector) = cv[v];
    for (int64_t r = 0; r < kRowVector && v * kRowVector + r < nrows; ++r) {
      m[v * kRowVector + r] = mv[v][r];
      l[v * kRowVector + r] = lv[v][r];
    }
  }
  for (int64_t i = 0; i < nrows; ++i)
    for (int64_t d = 0; d < D; ++d) acc[i * D + d] -= corr[i];
}
#endif

// One work item: KV head g, query rows [row0, row0 + nrows) of that head (token-major), positions
// [p_begin, p_end). Leaves the unnormalized accumulator, running max and sum of each row.
template <Format F>
void run_item(const Problem& P, int64_t g, int64_t row0, int64_t nrows, int64_t p_begin,
              int64_t p_end, float* acc, float* m, float* l) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if constexpr (F == Format::I8) {
    if (nrows >= kRowVector) return run_item_int8_rows(P, g, row0, nrows, p_begin, p_end, acc, m, l);
  }
#endif
  static thread_local Scratch s;
  const int64_t D = P.D, R = P.rows_per_head, KV = P.KV;
  s.q.resize(kRowBlock * D);
  s.q8.resize(F == Format::I8 ? kRowBlock * D : 0);
  s.scores.resize(kRowBlock * kTile);
  if (F == Format::F16) s.kbuf.resize(kTile * D);
  if (F == Format::F16) s.vbuf.resize(kTile * D);
  float* q = s.q.data();
  int8_t* q8 = s.q8.data();
  float* S = s.scores.data();
  int64_t first[kRowBlock], limit[kRowBlock];  // first and last visible position of each row
  float qsum[kRowBlock], qscale[kRowBlock], corr[kRowBlock], alpha[kRowBlock];
  int32_t qsum8[kRowBlock];
  for (int64_t i = 0; i < nrows; ++i) {
    const int64_t row = row0 + i, t = row / R, h = g * R + row % R;
    std::memcpy(q + i * D, P.query + (t * P.H + h) * D, D * sizeof(float));
    limit[i] = P.start_pos + t;
    first[i] = P.window ? std::max<int64_t>(0, limit[i] - P.window + 1) : 0;
    if (F == Format::I8) {
      qscale[i] = quantize_row(q + i * D, D, q8 + i * D, qsum8 + i);
      qsum[i] = static_cast<float>(qsum8[i]);
    }
    corr[i] = 0.0f;
    m[i] = -FLT_MAX;
    l[i] = 0.0f;
  }
  std::memset(acc, 0, nrows * D * sizeof(float));

  const float* krow[kTile];
  const float* vrow[kTile];
  Int8Rows rows8;
  const int64_t element = F == Format::F32 ? 4 : F == Format::F16 ? 2 : 1;
  const char* kbase = static_cast<const char*>(P.k);
  const char* vbase = static_cast<const char*>(P.v);
  prefetch_tile(kbase, vbase, g, KV, P.slots, D * element, p_begin, std::min<int64_t>(p_end, p_begin + kTile));
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kTile) {
    const int64_t nt = std::min<int64_t>(kTile, p_end - p0);
    // The next tile's rows travel while this one is computed: K and V rows of one head are D
    // elements every KV * D, which the hardware prefetchers follow poorly. fp16 and int8 prefetch
    // one row per row converted or scored: a whole tile's prefetches at once overflow the line fill
    // buffers and stall the loop (int8 decode at depth 32000: 1.8x faster). int8 fetches this tile's
    // value row there rather than the next tile's: a tile ahead, the next tile's rows evicted the
    // values from L1 before they were summed (Zen 3: the value loop's first load took 17% of the
    // kernel's samples, 7.5% after). fp32 rows are read in place, and there the burst measured
    // faster (chunks 1.2x).
    const int64_t next_end = std::min<int64_t>(p_end, p0 + nt + kTile);
    if (F == Format::F32) prefetch_tile(kbase, vbase, g, KV, P.slots, D * element, p0 + nt, next_end);
    for (int64_t j = 0, slot = slot_of(p0, P.slots); j < nt; ++j, slot = next_slot(slot, P.slots)) {
      if (F == Format::F16 && p0 + nt + j < next_end)
        prefetch_tile(kbase, vbase, g, KV, P.slots, D * element, p0 + nt + j, p0 + nt + j + 1);
      const int64_t at = slot * KV + g;
      if (F == Format::F32) {
        krow[j] = static_cast<const float*>(P.k) + at * D;
        vrow[j] = static_cast<const float*>(P.v) + at * D;
      } else if (F == Format::F16) {
        float* kd = s.kbuf.data() + j * D;
        float* vd = s.vbuf.data() + j * D;
        convert_row(static_cast<const uint16_t*>(P.k) + at * D, kd, D);
        convert_row(static_cast<const uint16_t*>(P.v) + at * D, vd, D);
        krow[j] = kd;
        vrow[j] = vd;
      }
    }
    if (F == Format::I8) rows8.gather(P, g, p0, nt);
    // Scores S[i][j] = q_i . k_j (int8: the integer dot product, scaled and corrected below).
    int64_t i = 0;
    if (F == Format::I8) {
      int32_t o[4];
      for (; i + 4 <= nrows; i += 4)
        for (int64_t j = 0; j < nt; ++j) {
          if (i == 0) {  // per key row scored, the next tile's key row and this tile's value row
            if (p0 + nt + j < next_end) prefetch_rows(kbase, g, KV, P.slots, D, p0 + nt + j, p0 + nt + j + 1);
            if (p0 != p_begin) prefetch_rows(vbase, g, KV, P.slots, D, p0 + j, p0 + j + 1);
          }
          dot_i8_4x1(q8 + i * D, D, qsum8 + i, rows8.k[j], o);
          for (int r = 0; r < 4; ++r) S[(i + r) * kTile + j] = static_cast<float>(o[r]);
        }
      for (; i < nrows; ++i)
        for (int64_t j = 0; j < nt; ++j) S[i * kTile + j] = static_cast<float>(dot_i8(q8 + i * D, rows8.k[j], D));
    }
    for (; i + 4 <= nrows; i += 4) {
      int64_t j = 0;
      float o0[4], o1[4];
      for (; j + 2 <= nt; j += 2) {
        dot_4x2(q + i * D, D, krow[j], krow[j + 1], o0, o1);
        for (int r = 0; r < 4; ++r) { S[(i + r) * kTile + j] = o0[r]; S[(i + r) * kTile + j + 1] = o1[r]; }
      }
      for (; j < nt; ++j)
        for (int r = 0; r < 4; ++r) S[(i + r) * kTile + j] = dot_1x1(q + (i + r) * D, krow[j], D);
    }
    for (; i < nrows; ++i)
      for (int64_t j = 0; j < nt; ++j) S[i * kTile + j] = dot_1x1(q + i * D, krow[j], D);

    // Online softmax: weights of this tile, rescale of what came before; 8 columns at a time (the
    // columns past nt, up to a multiple of 8, are computed and masked to 0).
    const int64_t nt8 = (nt + 7) / 8 * 8;
    for (i = 0; i < nrows; ++i) {
      float* Si = S + i * kTile;
      // Visible: tile columns [lo, hi).
      const int64_t lo = std::max<int64_t>(0, first[i] - p0);
      const int64_t hi = std::min<int64_t>(nt, std::max<int64_t>(0, limit[i] - p0 + 1));
      const v8 lowest = v8{} - FLT_MAX;
      v8 mx8 = lowest;
      for (int64_t j = 0; j < nt8; j += 8) {
        v8 x = load(Si + j);
        if (F == Format::I8) {
          x = load(rows8.kscale + j) * (x - load(rows8.kzero + j) * qsum[i]) * qscale[i];
          store(Si + j, x);
        }
        const v8i col = kLane + static_cast<int32_t>(j);
        mx8 = col >= static_cast<int32_t>(lo) && col < static_cast<int32_t>(hi) && x > mx8 ? x : mx8;
      }
      const float m_new = std::max(m[i], hmax(mx8));
      alpha[i] = lo < hi ? fast_exp(m[i] - m_new) : 1.0f;
      v8 sum8 = {}, c8 = {};
      for (int64_t j = 0; j < nt8; j += 8) {
        const v8i col = kLane + static_cast<int32_t>(j);
        v8 p = fast_exp8(load(Si + j) - m_new);
        p = col >= static_cast<int32_t>(lo) && col < static_cast<int32_t>(hi) ? p : v8{};
        sum8 += p;
        if (F == Format::I8) {
          p *= load(rows8.vscale + j);
          c8 += p * load(rows8.vzero + j);
        }
        store(Si + j, p);
      }
      l[i] = l[i] * alpha[i] + hsum(sum8);
      m[i] = m_new;
      if (F == Format::I8) corr[i] = corr[i] * alpha[i] + hsum(c8);
    }

    if constexpr (F == Format::I8) {
      accumulate_values(acc, S, alpha, rows8.v, nrows, nt, D);
    } else {
      accumulate_values(acc, S, alpha, vrow, nrows, nt, D);
    }
  }
  if (F == Format::I8)
    for (int64_t i = 0; i < nrows; ++i)
      for (int64_t d = 0; d < D; ++d) acc[i * D + d] -= corr[i];
}

template <Format F>
void attend(Problem& P) {
  const int64_t D = P.D, R = P.rows_per_head;
  P.rows = P.n * R;
  const int64_t tokens_per_block = std::max<int64_t>(1, kRowBlock / R);
  const int64_t block_rows = tokens_per_block * R;
  P.row_blocks = (P.n + tokens_per_block - 1) / tokens_per_block;
  // Positions the last token sees (at most the window), which the parts divide.
  const int64_t length = P.window ? std::min<int64_t>(P.window + P.n - 1, P.start_pos + P.n) : P.start_pos + P.n;
  const int64_t want = (kTargetItems + P.KV * P.row_blocks - 1) / (P.KV * P.row_blocks);
  P.parts = std::max<int64_t>(1, std::min<int64_t>(want, length / kMinPart));
  const int64_t items = P.row_blocks * P.parts * P.KV;  // KV head fastest: neighbours read neighbours
  std::unique_ptr<float[]> acc(new float[items * block_rows * D]);
  std::unique_ptr<float[]> ml(new float[items * block_rows * 2]);

  executorch::extension::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item % P.KV, part = (item / P.KV) % P.parts, rb = item / (P.KV * P.parts);
      const int64_t t0 = rb * tokens_per_block, t1 = std::min(P.n, t0 + tokens_per_block);
      // Positions [low, high) some token of the block sees.
      const int64_t high = P.start_pos + t1;
      const int64_t low = P.window ? std::max<int64_t>(0, P.start_pos + t0 - P.window + 1) : 0;
      const int64_t p_begin = low + (high - low) * part / P.parts, p_end = low + (high - low) * (part + 1) / P.parts;
      float* m = ml.get() + item * block_rows * 2;
      run_item<F>(P, g, t0 * R, (t1 - t0) * R, p_begin, p_end, acc.get() + item * block_rows * D, m,
                  m + block_rows);
    }
  });

  // Merge the parts of every row and write it out.
  executorch::extension::parallel_for(0, P.row_blocks * P.KV, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t g = job % P.KV, rb = job / P.KV;
      const int64_t t0 = rb * tokens_per_block, t1 = std::min(P.n, t0 + tokens_per_block);
      for (int64_t i = 0; i < (t1 - t0) * R; ++i) {
        const int64_t row = t0 * R + i, t = row / R, h = g * R + row % R;
        float* o = P.out + (t * P.H + h) * D;
        float mx = -FLT_MAX;
        for (int64_t part = 0; part < P.parts; ++part) {
          const int64_t item = (rb * P.parts + part) * P.KV + g;
          const float* m = ml.get() + item * block_rows * 2;
          if (m[block_rows + i] > 0.0f) mx = std::max(mx, m[i]);
        }
        float total = 0.0f;
        std::memset(o, 0, D * sizeof(float));
        for (int64_t part = 0; part < P.parts; ++part) {
          const int64_t item = (rb * P.parts + part) * P.KV + g;
          const float* m = ml.get() + item * block_rows * 2;
          if (!(m[block_rows + i] > 0.0f)) continue;  // no visible position in this part
          const float w = fast_exp(m[i] - mx);
          total += w * m[block_rows + i];
          const float* a = acc.get() + item * block_rows * D + i * D;
          for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
        }
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      }
    }
  });
}

// window 0: full attention, positions are slots. window > 0: a ring (see the top of the file).
bool check_common(KernelRuntimeContext& ctx, const Tensor& query, const Tensor& k_cache,
                  const Tensor& v_cache, int64_t start_pos, int64_t window, Tensor& out) {
  ET_CHECK_OR_RETURN_FALSE(query.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4,
                           "gqa_attention: query and caches must be 4-D");
  ET_CHECK_OR_RETURN_FALSE(query.scalar_type() == ScalarType::Float, "gqa_attention: query must be float32");
  ET_CHECK_OR_RETURN_FALSE(query.size(0) == 1 && k_cache.size(0) == 1, "gqa_attention: batch must be 1");
  ET_CHECK_OR_RETURN_FALSE(k_cache.scalar_type() == v_cache.scalar_type(), "gqa_attention: k/v dtypes differ");
  for (int d = 0; d < 4; ++d)
    ET_CHECK_OR_RETURN_FALSE(k_cache.size(d) == v_cache.size(d), "gqa_attention: k/v shapes differ");
  const int64_t H = query.size(2), KV = k_cache.size(2), D = query.size(3), n = query.size(1), S = k_cache.size(1);
  ET_CHECK_OR_RETURN_FALSE(k_cache.size(3) == D && D % 16 == 0, "gqa_attention: head dim %" PRId64
                           " must match the cache and be a multiple of 16", D);
  ET_CHECK_OR_RETURN_FALSE(KV > 0 && H % KV == 0, "gqa_attention: %" PRId64 " query heads over %" PRId64
                           " KV heads", H, KV);
  ET_CHECK_OR_RETURN_FALSE(start_pos >= 0, "gqa_attention: negative start position");
  if (window == 0) {
    ET_CHECK_OR_RETURN_FALSE(start_pos + n <= S, "gqa_attention: positions [%" PRId64 ", %" PRId64
                             ") beyond the cache's %" PRId64, start_pos, start_pos + n, S);
  } else {
    // A ring shorter than the window is the whole context: its positions never wrap.
    ET_CHECK_OR_RETURN_FALSE(window > 0 && (window + n - 1 <= S || start_pos + n <= S),
                             "sliding_gqa_attention: a ring of %" PRId64
                             " slots cannot hold a window of %" PRId64 " for %" PRId64 " tokens", S, window, n);
  }
  ET_CHECK_OR_RETURN_FALSE(out.scalar_type() == ScalarType::Float, "gqa_attention: out must be float32");
  ET_CHECK_OR_RETURN_FALSE(executorch::runtime::resize_tensor(out, query.sizes()) == Error::Ok,
                           "gqa_attention: cannot resize out");
  (void)ctx;
  return true;
}

Problem make_problem(const Tensor& query, const Tensor& k_cache, const Tensor& v_cache, int64_t start_pos,
                     int64_t window, Tensor& out) {
  Problem P;
  P.query = query.const_data_ptr<float>();
  P.k = k_cache.const_data_ptr();
  P.v = v_cache.const_data_ptr();
  P.out = out.mutable_data_ptr<float>();
  P.n = query.size(1);
  P.H = query.size(2);
  P.D = query.size(3);
  P.KV = k_cache.size(2);
  P.slots = k_cache.size(1);
  P.start_pos = start_pos;
  P.window = window;
  P.rows_per_head = P.H / P.KV;
  return P;
}

Tensor& float_attention(KernelRuntimeContext& ctx, const Tensor& query, const Tensor& k_cache,
                        const Tensor& v_cache, int64_t start_pos, int64_t window, Tensor& out) {
  ET_KERNEL_CHECK(ctx, check_common(ctx, query, k_cache, v_cache, start_pos, window, out), InvalidArgument, out);
  if (query.size(1) == 0) return out;
  Problem P = make_problem(query, k_cache, v_cache, start_pos, window, out);
  if (k_cache.scalar_type() == ScalarType::Float) {
    attend<Format::F32>(P);
  } else if (k_cache.scalar_type() == ScalarType::Half) {
    attend<Format::F16>(P);
  } else {
    ET_KERNEL_CHECK_MSG(ctx, false, InvalidArgument, out, "gqa_attention: caches must be float32 or float16");
  }
  return out;
}

Tensor& int8_attention(KernelRuntimeContext& ctx, const Tensor& query, const Tensor& k_cache,
                       const Tensor& v_cache, const Tensor& k_scales, const Tensor& k_zero_points,
                       const Tensor& v_scales, const Tensor& v_zero_points, int64_t start_pos, int64_t window,
                       Tensor& out) {
  ET_KERNEL_CHECK(ctx, check_common(ctx, query, k_cache, v_cache, start_pos, window, out), InvalidArgument, out);
  ET_KERNEL_CHECK_MSG(ctx, k_cache.scalar_type() == ScalarType::Char, InvalidArgument, out,
                      "gqa_attention_int8: caches must be int8");
  const Tensor* scales[] = {&k_scales, &v_scales};
  const Tensor* zeros[] = {&k_zero_points, &v_zero_points};
  for (int w = 0; w < 2; ++w) {
    ET_KERNEL_CHECK_MSG(ctx, scales[w]->scalar_type() == ScalarType::Float && zeros[w]->scalar_type() == ScalarType::Char,
                        InvalidArgument, out, "gqa_attention_int8: scales float32, zero points int8");
    ET_KERNEL_CHECK_MSG(ctx, scales[w]->numel() == k_cache.size(1) * k_cache.size(2) &&
                        zeros[w]->numel() == scales[w]->numel(), InvalidArgument, out,
                        "gqa_attention_int8: one scale and zero point per position and head");
  }
  if (query.size(1) == 0) return out;
  Problem P = make_problem(query, k_cache, v_cache, start_pos, window, out);
  P.k_scales = k_scales.const_data_ptr<float>();
  P.v_scales = v_scales.const_data_ptr<float>();
  P.k_zero_points = k_zero_points.const_data_ptr<int8_t>();
  P.v_zero_points = v_zero_points.const_data_ptr<int8_t>();
  attend<Format::I8>(P);
  return out;
}

Tensor& gqa_attention_out(KernelRuntimeContext& ctx, const Tensor& query, const Tensor& k_cache,
                          const Tensor& v_cache, int64_t start_pos, Tensor& out) {
  return float_attention(ctx, query, k_cache, v_cache, start_pos, 0, out);
}

Tensor& gqa_attention_int8_out(KernelRuntimeContext& ctx, const Tensor& query, const Tensor& k_cache,
                               const Tensor& v_cache, const Tensor& k_scales, const Tensor& k_zero_points,
                               const Tensor& v_scales, const Tensor& v_zero_points, int64_t start_pos,
                               Tensor& out) {
  return int8_attention(ctx, query, k_cache, v_cache, k_scales, k_zero_points, v_scales, v_zero_points, start_pos,
                        0, out);
}

Tensor& sliding_gqa_attention_out(KernelRuntimeContext& ctx, const Tensor& query, const Tensor& k_cache,
                                  const Tensor& v_cache, int64_t start_pos, int64_t window, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, window > 0, InvalidArgument, out, "sliding_gqa_attention: window must be positive");
  return float_attention(ctx, query, k_cache, v_cache, start_pos, window, out);
}

Tensor& sliding_gqa_attention_int8_out(KernelRuntimeContext& ctx, const Tensor& query, const Tensor& k_cache,
                                       const Tensor& v_cache, const Tensor& k_scales, const Tensor& k_zero_points,
                                       const Tensor& v_scales, const Tensor& v_zero_points, int64_t start_pos,
                                       int64_t window, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, window > 0, InvalidArgument, out, "sliding_gqa_attention: window must be positive");
  return int8_attention(ctx, query, k_cache, v_cache, k_scales, k_zero_points, v_scales, v_zero_points, start_pos,
                        window, out);
}

}  // namespace
}  // namespace gemma3n

EXECUTORCH_LIBRARY(gemma3n, "gqa_attention.out", gemma3n::gqa_attention_out);
EXECUTORCH_LIBRARY(gemma3n, "gqa_attention_int8.out", gemma3n::gqa_attention_int8_out);
EXECUTORCH_LIBRARY(gemma3n, "sliding_gqa_attention.out", gemma3n::sliding_gqa_attention_out);
EXECUTORCH_LIBRARY(gemma3n, "sliding_gqa_attention_int8.out", gemma3n::sliding_gqa_attention_int8_out);
