// kvtier weight-only linear layers on CPU: y[M, N] = x[M, K] W^T (+ bias), x and y float32.
//
// Weight formats (packed by kernels/qlinear.py, whose docstring shows the layouts):
//  - int4: groups of 32 along K, asymmetric: w = d q + m, q in 0..15, d and m float16 (GGUF Q4_1 as it is;
//    Q4_0 is m = -8 d);
//  - int8: groups of 32 along K, symmetric: w = d q, q in -127..127, d float16 (GGUF Q8_0 as it is);
//  - bf16: bfloat16 weights, float32 activations and accumulation;
//  - f32: float32 weights (the float32 format's batches, where the avx512 kernels run).
//
// int4 / int8: every activation row is quantized per group of 32 to int8 (s = max|x| / 127, q = round(x / s),
// plus the exact float sum of the group for the asymmetric term), as llama.cpp does with its Q8 blocks; the
// dot product of a group is then an integer one. Weights are stored per panel of 8 output columns and group:
// one 32-byte vector holds 4 consecutive k of each of the 8 columns (byte 4 c + kk), so a broadcast quad of
// activation bytes multiplies 8 columns at once: AVX2 vpmaddubsw (u8 x s8 -> s16 pairs) and vpmaddwd. Per
// group and row: acc[c] = fma(float(isum[c]), d[c] s, acc[c]), then acc[c] = fma(m[c], sum(x), acc[c]), in this
// order on every path, so the portable path gives the same bits as the AVX2 one and rows do not depend
// on M. (The two terms nearly cancel where activations are large; folding each into the running sum at
// once keeps its low bits: summing them apart lost 2% of perplexity.) One row keeps its sums in
// registers, more rows keep them in memory and unpack each group once.
//
// bf16: panels of 16 output columns, [K][16] per panel, the 16 columns stored interleaved (element 2 i is
// column i, 2 i + 1 column 8 + i) so one 32-byte load widens to columns 0..7 and 8..15 by a shift and a mask;
// one broadcast of x[m][k] and two FMAs per row and k.
//
// f32: panels of 48 output columns (three AVX-512 vectors), [K][48] per panel; tiles of 8 rows x 48 columns
// keep 24 accumulators in registers, each column's sum one fused multiply-add per k in k order, so every
// path gives the same bits and a row's result does not depend on M. A panel's first tile prefetches the
// next panel: batches are bound by how fast the weights stream in (oneDNN's packed GEMM, which did not
// prefetch, reached 280-360 GFLOP/s at 32 rows on Zen 5, these panels 380-390; at 8 rows 1.4-1.7x).
//
// The AVX2 versions are chosen at run time when the CPU has AVX2+FMA+F16C (set_isa forces one, for tests);
// the portable ones are compiled per instruction set (KV_CLONES). CPUs with AVX-512 VNNI+VBMI run the int4/int8
// batches with vpdpbusd (the same integer sums, so the same bits), the rest as on AVX2.

#include "common.h"

#include <string>


namespace {

using namespace kvtier;

constexpr int64_t kGroup = 32;                  // weights and activations are quantized per 32 along K
constexpr int64_t kPanel = 8;                   // output columns per int panel
constexpr int64_t kInt4Block = 128 + 16 + 16;   // codes, d[8], m[8] (float16) per panel and group
constexpr int64_t kInt8Block = 256 + 16;        // codes, d[8] per panel and group
constexpr int64_t kBf16Panel = 16;              // output columns per bf16 panel
constexpr int64_t kF32Panel = 48;               // output columns per f32 panel
constexpr int64_t kRowChunk = 64;               // activation rows per pass over a thread's panels
#ifndef KV_QL_AHEAD
#define KV_QL_AHEAD 1536
#endif
constexpr int64_t kPrefetchAhead = KV_QL_AHEAD;  // bytes of weights prefetched ahead of the group in use

// ---- activations ---------------------------------------------------------------------------------------

struct ActQ {
  int64_t M = 0, K = 0, G = 0;
  std::vector<int8_t> q;        // [M, K]
  std::vector<float> s, sum;    // [M, G]: scale and float sum of each group
};

KV_CLONES void quantize_rows(const float* x, int64_t m0, int64_t m1, ActQ& a) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t g = 0; g < a.G; ++g) {
      const float* xg = x + m * a.K + g * kGroup;
      int8_t* qg = a.q.data() + m * a.K + g * kGroup;
      float amax = 0.f, total = 0.f;
      for (int64_t i = 0; i < kGroup; ++i) amax = std::max(amax, std::fabs(xg[i]));
      for (int64_t i = 0; i < kGroup; ++i) total += xg[i];
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t i = 0; i < kGroup; ++i)
        qg[i] = static_cast<int8_t>(std::min(std::max(std::rint(xg[i] * inv), -127.f), 127.f));
      a.s[m * a.G + g] = amax / 127.f;
      a.sum[m * a.G + g] = total;
    }
}

ActQ quantize_activations(const float* x, int64_t M, int64_t K) {
  ActQ a;
  a.M = M, a.K = K, a.G = K / kGroup;
  a.q.resize(M * K);
  a.s.resize(M * a.G);
  a.sum.resize(M * a.G);
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) { quantize_rows(x, b, e, a); });
  return a;
}

// One panel of 8 columns over all groups, rows [m0, m1): acc[(m - m0) * 16 + c] += the scale term of row m .
// column c, acc[(m - m0) * 16 + 8 + c] += its min term (int4; int8 leaves it zero).
using PanelFn = void (*)(const uint8_t* panel, const ActQ& a, int64_t m0, int64_t m1, float* acc);

void load_halves(const uint8_t* p, float* out) {
  const c10::Half* h = reinterpret_cast<const c10::Half*>(p);
  for (int c = 0; c < kPanel; ++c) out[c] = static_cast<float>(h[c]);
}

// ---- portable int kernels ------------------------------------------------------------------------------

KV_CLONES void int4_generic(const uint8_t* panel, const ActQ& a, int64_t m0, int64_t m1, float* acc) {
  for (int64_t g = 0; g < a.G; ++g) {
    const uint8_t* b = panel + g * kInt4Block;
    uint8_t q[kPanel][kGroup];
    for (int j = 0; j < 4; ++j)
      for (int c = 0; c < kPanel; ++c)
        for (int kk = 0; kk < 4; ++kk) {
          const uint8_t byte = b[32 * j + 4 * c + kk];
          q[c][4 * j + kk] = byte & 15;
          q[c][16 + 4 * j + kk] = byte >> 4;
        }
    float d[kPanel], mn[kPanel];
    load_halves(b + 128, d);
    load_halves(b + 144, mn);
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* xq = a.q.data() + m * a.K + g * kGroup;
      const float s = a.s[m * a.G + g], total = a.sum[m * a.G + g];
      float* o = acc + (m - m0) * kPanel;
      for (int c = 0; c < kPanel; ++c) {
        int32_t t = 0;
        for (int k = 0; k < kGroup; ++k) t += static_cast<int32_t>(q[c][k]) * xq[k];
        o[c] = std::fma(static_cast<float>(t), d[c] * s, o[c]);
        o[c] = std::fma(mn[c], total, o[c]);
      }
    }
  }
}

KV_CLONES void int8_generic(const uint8_t* panel, const ActQ& a, int64_t m0, int64_t m1, float* acc) {
  for (int64_t g = 0; g < a.G; ++g) {
    const uint8_t* b = panel + g * kInt8Block;
    const int8_t* w = reinterpret_cast<const int8_t*>(b);
    float d[kPanel];
    load_halves(b + 256, d);
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* xq = a.q.data() + m * a.K + g * kGroup;
      const float s = a.s[m * a.G + g];
      float* o = acc + (m - m0) * kPanel;
      for (int c = 0; c < kPanel; ++c) {
        int32_t t = 0;
        for (int j = 0; j < 8; ++j)
          for (int kk = 0; kk < 4; ++kk) t += static_cast<int32_t>(w[32 * j + 4 * c + kk]) * xq[4 * j + kk];
        o[c] = std::fma(static_cast<float>(t), d[c] * s, o[c]);
      }
    }
  }
}

// rows [0, rows) of x (row stride ldx) times one bf16 panel [K][16] -> out[r * 16 + column]
KV_CLONES void bf16_generic(const c10::BFloat16* w, int64_t K, const float* x, int64_t ldx, int64_t rows, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kBf16Panel] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float xv = x[r * ldx + k];
      for (int e = 0; e < kBf16Panel; ++e) acc[e] += xv * static_cast<float>(w[k * kBf16Panel + e]);
    }
    for (int i = 0; i < 8; ++i) {
      out[r * kBf16Panel + i] = acc[2 * i];
      out[r * kBf16Panel + 8 + i] = acc[2 * i + 1];
    }
  }
}

using Bf16Fn = void (*)(const c10::BFloat16* w, int64_t K, const float* x, int64_t ldx, int64_t rows, float* out);

// rows [0, rows) of x (row stride ldx) times one f32 panel [K][48] -> out[r * 48 + column]; next: the panel
// computed after this one (the vector kernels prefetch it), or null
KV_CLONES void f32_generic(const float* w, int64_t K, const float* x, int64_t ldx, int64_t rows, float* out,
                           const float* next) {
  (void)next;
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kF32Panel] = {};
    for (int64_t k = 0; k < K; ++k)
      for (int c = 0; c < kF32Panel; ++c) acc[c] = std::fma(x[r * ldx + k], w[k * kF32Panel + c], acc[c]);
    std::memcpy(out + r * kF32Panel, acc, sizeof(acc));
  }
}

using F32Fn = void (*)(const float* w, int64_t K, const float* x, int64_t ldx, int64_t rows, float* out,
                       const float* next);

// ---- AVX2 -------------------------------------------------------------------------------------------------

#ifdef KV_X86
#define KV_AVX2 __attribute__((target("avx2,fma,f16c")))

KV_AVX2 inline __m256i bcast4(const int8_t* p) {  // four activation bytes in every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

KV_AVX2 inline __m256 halves8(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// u[j]: the codes of k = 4 j .. 4 j + 3 of the 8 columns (j < 4: low nibbles, j >= 4: high nibbles, k + 16)
KV_AVX2 inline void int4_codes(const uint8_t* b, __m256i u[8]) {
  const __m256i mask = _mm256_set1_epi8(15);
  for (int j = 0; j < 4; ++j) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * j));
    u[j] = _mm256_and_si256(v, mask);
    u[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
  }
}

// the integer dot products of one group's activation codes with the 8 columns, as float
KV_AVX2 inline __m256 int4_dot(const __m256i u[8], const int8_t* xq) {
  // |pair| <= 2 * 15 * 127 and eight of them stay below 2^15: sum in int16, widen once
  __m256i s16 = _mm256_maddubs_epi16(u[0], bcast4(xq));
  for (int j = 1; j < 8; ++j) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(u[j], bcast4(xq + 4 * j)));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)));
}

// a group folded into 8 columns' running sums r
KV_AVX2 inline __m256 int4_fold(__m256 r, __m256 t, const uint8_t* b, float s, float sum) {
  r = _mm256_fmadd_ps(t, _mm256_mul_ps(halves8(b + 128), _mm256_set1_ps(s)), r);
  return _mm256_fmadd_ps(halves8(b + 144), _mm256_set1_ps(sum), r);
}

// a group's weights kPrefetchAhead bytes on: one row's GEMV streams them faster than the prefetchers guess
KV_AVX2 inline void prefetch_ahead(const uint8_t* b, int64_t bytes) {
  for (int64_t e = 0; e < bytes; e += 64) _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchAhead + e), _MM_HINT_T0);
}

// one row: the running sums stay in a register
KV_AVX2 void int4_avx2_row(const uint8_t* panel, const ActQ& a, int64_t m, float* acc) {
  const int8_t* xq = a.q.data() + m * a.K;
  const float* s = a.s.data() + m * a.G;
  const float* sum = a.sum.data() + m * a.G;
  __m256 r = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.G; ++g) {
    const uint8_t* b = panel + g * kInt4Block;
    prefetch_ahead(b, kInt4Block);
    __m256i u[8];
    int4_codes(b, u);
    r = int4_fold(r, int4_dot(u, xq + g * kGroup), b, s[g], sum[g]);
  }
  _mm256_storeu_ps(acc, r);
}

KV_AVX2 void int4_avx2(const uint8_t* panel, const ActQ& a, int64_t m0, int64_t m1, float* acc) {
  if (m1 - m0 == 1) return int4_avx2_row(panel, a, m0, acc);
  for (int64_t g = 0; g < a.G; ++g) {
    const uint8_t* b = panel + g * kInt4Block;
    __m256i u[8];
    int4_codes(b, u);
    for (int64_t m = m0; m < m1; ++m) {
      const __m256 t = int4_dot(u, a.q.data() + m * a.K + g * kGroup);
      float* o = acc + (m - m0) * kPanel;
      _mm256_storeu_ps(o, int4_fold(_mm256_loadu_ps(o), t, b, a.s[m * a.G + g], a.sum[m * a.G + g]));
    }
  }
}

// |w| x sign(w) x over one group's 32 codes of the 8 columns: u8 x s8, |pair| <= 2 * 128 * 127 < 2^15
KV_AVX2 inline __m256i int8_dot(const uint8_t* b, const int8_t* xq) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i s32 = _mm256_setzero_si256();
  for (int j = 0; j < 8; ++j) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * j));
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(bcast4(xq + 4 * j), w));
    s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(p, ones));
  }
  return s32;
}

// one row: the running sums stay in a register (the same operations as int8_avx2, in the same order)
KV_AVX2 void int8_avx2_row(const uint8_t* panel, const ActQ& a, int64_t m, float* acc) {
  const int8_t* xq = a.q.data() + m * a.K;
  const float* s = a.s.data() + m * a.G;
  __m256 r = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.G; ++g) {
    const uint8_t* b = panel + g * kInt8Block;
    prefetch_ahead(b, kInt8Block);
    const __m256 t = _mm256_cvtepi32_ps(int8_dot(b, xq + g * kGroup));
    r = _mm256_fmadd_ps(t, _mm256_mul_ps(halves8(b + 256), _mm256_set1_ps(s[g])), r);
  }
  _mm256_storeu_ps(acc, r);
}

// a group's codes of k = 4 j .. 4 j + 3 for the 8 columns, and their magnitudes (u8, 128 for -128); always inlined,
// so the 16 vectors stay in registers for the rows' loop
KV_AVX2 __attribute__((always_inline)) inline void int8_codes(const uint8_t* b, __m256i w[8], __m256i aw[8]) {
  for (int j = 0; j < 8; ++j) {
    w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * j));
    aw[j] = _mm256_sign_epi8(w[j], w[j]);
  }
}

KV_AVX2 void int8_avx2(const uint8_t* panel, const ActQ& a, int64_t m0, int64_t m1, float* acc) {
  if (m1 - m0 == 1) return int8_avx2_row(panel, a, m0, acc);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < a.G; ++g) {
    const uint8_t* b = panel + g * kInt8Block;
    __m256i w[8], aw[8];
    int8_codes(b, w, aw);
    const __m256 d = halves8(b + 256);
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* xq = a.q.data() + m * a.K + g * kGroup;
      __m256i s32 = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {  // |w| x sign(w) x: u8 x s8, |pair| <= 2 * 128 * 127 < 2^15
        const __m256i p = _mm256_maddubs_epi16(aw[j], _mm256_sign_epi8(bcast4(xq + 4 * j), w[j]));
        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(p, ones));
      }
      float* o = acc + (m - m0) * kPanel;
      const __m256 r = _mm256_loadu_ps(o);
      _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_mul_ps(d, _mm256_set1_ps(a.s[m * a.G + g])),
                                          r));
    }
  }
}

KV_AVX2 void bf16_rows4_avx2(const c10::BFloat16* w, int64_t K, const float* x, int64_t ldx, float* out) {
  const __m256i hi = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m256 acc[4][2];
  for (auto& r : acc) r[0] = r[1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * kBf16Panel));
    const __m256 e = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), o = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
    for (int r = 0; r < 4; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(xb, e, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, o, acc[r][1]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    _mm256_storeu_ps(out + r * kBf16Panel, acc[r][0]);
    _mm256_storeu_ps(out + r * kBf16Panel + 8, acc[r][1]);
  }
}

KV_AVX2 void bf16_row1_avx2(const c10::BFloat16* w, int64_t K, const float* x, float* out) {
  const __m256i hi = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {  // the same operations, in the same order, as one row of rows4
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * kBf16Panel));
    const __m256 xb = _mm256_broadcast_ss(x + k);
    a0 = _mm256_fmadd_ps(xb, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), a0);
    a1 = _mm256_fmadd_ps(xb, _mm256_castsi256_ps(_mm256_and_si256(v, hi)), a1);
  }
  _mm256_storeu_ps(out, a0);
  _mm256_storeu_ps(out + 8, a1);
}

void bf16_avx2(const c10::BFloat16* w, int64_t K, const float* x, int64_t ldx, int64_t rows, float* out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) bf16_rows4_avx2(w, K, x + r * ldx, ldx, out + r * kBf16Panel);
  for (; r < rows; ++r) bf16_row1_avx2(w, K, x + r * ldx, out + r * kBf16Panel);
}

// ---- AVX-512 VNNI: batches (compute-bound) with vpdpbusd, u8 x s8 quads summed into int32 in one uop ------------
// The same integer sums as the AVX2 dots (exact either way), so the same bits; one row (memory-bound) stays AVX2.

KV_AVX512_VNNI inline __m256 int4_dot_vnni(const __m256i u[8], const int8_t* xq) {
  __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();  // two chains
  for (int j = 0; j < 8; j += 2) {
    s0 = _mm256_dpbusd_epi32(s0, u[j], bcast4(xq + 4 * j));
    s1 = _mm256_dpbusd_epi32(s1, u[j + 1], bcast4(xq + 4 * j + 4));
  }
  return _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
}

// MR rows x 48 columns of one f32 panel; pf (or null): a panel prefetched alongside, one k row per k
template <int MR>
KV_AVX512_VNNI void f32_tile_avx512(const float* w, int64_t K, const float* x, int64_t ldx, float* out,
                                    const float* pf) {
  __m512 acc[MR][3];
  for (auto& r : acc) r[0] = r[1] = r[2] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * kF32Panel;
    if (pf)
      for (int c = 0; c < 3; ++c) _mm_prefetch(reinterpret_cast<const char*>(pf + k * kF32Panel + 16 * c), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16), w2 = _mm512_loadu_ps(wk + 32);
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(xb, w2, acc[r][2]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 3; ++c) _mm512_storeu_ps(out + r * kF32Panel + 16 * c, acc[r][c]);
}

template <int MR>
KV_AVX512_VNNI void f32_tail_avx512(const float* w, int64_t K, const float* x, int64_t ldx, int64_t rows, float* out,
                                    const float* pf) {
  if constexpr (MR > 0) {
    if (rows == MR) return f32_tile_avx512<MR>(w, K, x, ldx, out, pf);
    f32_tail_avx512<MR - 1>(w, K, x, ldx, rows, out, pf);
  }
}

KV_AVX512_VNNI void f32_avx512(const float* w, int64_t K, const float* x, int64_t ldx, int64_t rows, float* out,
                               const float* next) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) f32_tile_avx512<8>(w, K, x + r * ldx, ldx, out + r * kF32Panel, r == 0 ? next : nullptr);
  f32_tail_avx512<7>(w, K, x + r * ldx, ldx, rows - r, out + r * kF32Panel, r == 0 ? next : nullptr);
}

KV_AVX512_VNNI void int4_vnni(const uint8_t* panel, const ActQ& a, int64_t m0, int64_t m1, float* acc) {
  if (m1 - m0 == 1) return int4_avx2_row(panel, a, m0, acc);
  for (int64_t g = 0; g < a.G; ++g) {  // int4_avx2's loop
    const uint8_t* b = panel + g * kInt4Block;
    __m256i u[8];
    int4_codes(b, u);
    const __m256 d = halves8(b + 128), mn = halves8(b + 144);  // int4_fold's operands, converted once a group
    for (int64_t m = m0; m < m1; ++m) {
      const __m256 t = int4_dot_vnni(u, a.q.data() + m * a.K + g * kGroup);
      float* o = acc + (m - m0) * kPanel;
      const __m256 r = _mm256_fmadd_ps(t, _mm256_mul_ps(d, _mm256_set1_ps(a.s[m * a.G + g])), _mm256_loadu_ps(o));
      _mm256_storeu_ps(o, _mm256_fmadd_ps(mn, _mm256_set1_ps(a.sum[m * a.G + g]), r));
    }
  }
}

KV_AVX512_VNNI void int8_vnni(const uint8_t* panel, const ActQ& a, int64_t m0, int64_t m1, float* acc) {
  if (m1 - m0 == 1) return int8_avx2_row(panel, a, m0, acc);
  for (int64_t g = 0; g < a.G; ++g) {  // int8_avx2's loop
    const uint8_t* b = panel + g * kInt8Block;
    __m256i w[8], aw[8];
    int8_codes(b, w, aw);
    const __m256 d = halves8(b + 256);
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* xq = a.q.data() + m * a.K + g * kGroup;
      __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
      for (int j = 0; j < 8; j += 2) {  // |w| x sign(w) x: u8 x s8
        s0 = _mm256_dpbusd_epi32(s0, aw[j], _mm256_sign_epi8(bcast4(xq + 4 * j), w[j]));
        s1 = _mm256_dpbusd_epi32(s1, aw[j + 1], _mm256_sign_epi8(bcast4(xq + 4 * j + 4), w[j + 1]));
      }
      float* o = acc + (m - m0) * kPanel;
      const __m256 t = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
      _mm256_storeu_ps(o, _mm256_fmadd_ps(t, _mm256_mul_ps(d, _mm256_set1_ps(a.s[m * a.G + g])), _mm256_loadu_ps(o)));
    }
  }
}

#endif  // KV_X86

// ---- instruction-set choice ----------------------------------------------------------------------------

struct Isa {
  const char* name;
  PanelFn int4;
  PanelFn int8;
  Bf16Fn bf16;
  F32Fn f32;  // the portable one outside AVX-512: the float32 layers then use oneDNN (kernels/linear.py)
};

const Isa kGeneric{"generic", int4_generic, int8_generic, bf16_generic, f32_generic};

Isa pick_isa(const std::string& name) {
#ifdef KV_X86
  if ((name == "auto" || name == "avx512") && has_avx512_vnni()) return Isa{"avx512", int4_vnni, int8_vnni, bf16_avx2, f32_avx512};
  if ((name == "auto" || name == "avx2") && has_avx2()) return Isa{"avx2", int4_avx2, int8_avx2, bf16_avx2, f32_generic};
#endif
  TORCH_CHECK(name == "auto" || name == "generic", "instruction set '", name, "' is not available on this CPU");
  return kGeneric;
}

Isa g_isa = pick_isa("auto");

// ---- drivers ----------------------------------------------------------------------------------------------

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x: [M, K] float32");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " features, the weight ", K);
}

const float* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == N,
              "bias: [N] contiguous float32");
  return bias->data_ptr<float>();
}

// blob: [P, G, block] uint8, P = ceil(N / 8), G = K / 32
torch::Tensor int_linear(const torch::Tensor& x, const torch::Tensor& blob, const c10::optional<torch::Tensor>& bias,
                         int64_t N, int64_t block, PanelFn fn) {
  TORCH_CHECK(blob.dim() == 3 && blob.scalar_type() == torch::kUInt8 && blob.is_contiguous() && blob.size(2) == block,
              "packed weight: [panels, groups, ", block, "] contiguous uint8");
  const int64_t P = blob.size(0), G = blob.size(1), K = G * kGroup, M = x.size(0);
  TORCH_CHECK(P * kPanel >= N && (P - 1) * kPanel < N, N, " columns do not fill ", P, " panels of ", kPanel);
  check_x(x, K);
  const float* bp = bias_ptr(bias, N);
  auto xc = x.contiguous();
  const ActQ a = quantize_activations(xc.data_ptr<float>(), M, K);
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = blob.data_ptr<uint8_t>();
  auto store = [&](const float* acc, int64_t p, int64_t m0, int64_t m1) {
    const int64_t n0 = p * kPanel, cols = std::min(kPanel, N - n0);
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t c = 0; c < cols; ++c) yp[m * N + n0 + c] = acc[(m - m0) * kPanel + c] + (bp ? bp[n0 + c] : 0.f);
  };
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> acc(kRowChunk * kPanel);
    for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
      const int64_t m1 = std::min(M, m0 + kRowChunk);
      for (int64_t p = p0; p < p1; ++p) {
        std::fill(acc.begin(), acc.end(), 0.f);
        fn(wp + p * G * block, a, m0, m1, acc.data());
        store(acc.data(), p, m0, m1);
      }
    }
  });
  return y;
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor blob, c10::optional<torch::Tensor> bias, int64_t N) {
  return int_linear(x, blob, bias, N, kInt4Block, g_isa.int4);
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor blob, c10::optional<torch::Tensor> bias, int64_t N) {
  return int_linear(x, blob, bias, N, kInt8Block, g_isa.int8);
}

// y [M, N] = x W^T (+ bias) over panels [P, K, C] of C output columns (the last one padded), threads over
// panels; kernel(panel, K, x rows, ldx, rows, out [rows, C], the thread's next panel or null)
template <typename W, int64_t C, typename Kernel>
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels, const c10::optional<torch::Tensor>& bias,
                           int64_t N, torch::ScalarType dtype, Kernel kernel) {
  TORCH_CHECK(panels.dim() == 3 && panels.scalar_type() == dtype && panels.is_contiguous() && panels.size(2) == C,
              "packed weight: [panels, K, ", C, "] contiguous ", dtype);
  const int64_t P = panels.size(0), K = panels.size(1), M = x.size(0);
  TORCH_CHECK(P * C >= N && (P - 1) * C < N, N, " columns do not fill ", P, " panels of ", C);
  check_x(x, K);
  const float* bp = bias_ptr(bias, N);
  auto xc = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const W* wp = static_cast<const W*>(panels.data_ptr());
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> out(kRowChunk * C);
    for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, M - m0);
      for (int64_t p = p0; p < p1; ++p) {
        kernel(wp + p * K * C, K, xp + m0 * K, K, rows, out.data(), p + 1 < p1 ? wp + (p + 1) * K * C : nullptr);
        const int64_t n0 = p * C, cols = std::min(C, N - n0);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) yp[(m0 + r) * N + n0 + c] = out[r * C + c] + (bp ? bp[n0 + c] : 0.f);
      }
    }
  });
  return y;
}

// panels: [P, K, 16] bfloat16, P = ceil(N / 16)
torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor panels, c10::optional<torch::Tensor> bias, int64_t N) {
  const Bf16Fn fn = g_isa.bf16;
  return panel_linear<c10::BFloat16, kBf16Panel>(
      x, panels, bias, N, torch::kBFloat16,
      [fn](const c10::BFloat16* w, int64_t K, const float* xr, int64_t ldx, int64_t rows, float* out,
           const c10::BFloat16*) { fn(w, K, xr, ldx, rows, out); });
}

// panels: [P, K, 48] float32, P = ceil(N / 48)
torch::Tensor f32_linear(torch::Tensor x, torch::Tensor panels, c10::optional<torch::Tensor> bias, int64_t N) {
  return panel_linear<float, kF32Panel>(x, panels, bias, N, torch::kFloat, g_isa.f32);
}

// the int8 activation codes the int kernels use (tests): q [M, K] int8, scales [M, K/32], sums [M, K/32]
std::vector<torch::Tensor> quantize_act(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.size(1) % kGroup == 0, "x: [M, K % 32 == 0] float32");
  auto xc = x.contiguous();
  const ActQ a = quantize_activations(xc.data_ptr<float>(), x.size(0), x.size(1));
  auto q = torch::from_blob(const_cast<int8_t*>(a.q.data()), {a.M, a.K}, torch::kInt8).clone();
  auto s = torch::from_blob(const_cast<float*>(a.s.data()), {a.M, a.G}, torch::kFloat).clone();
  auto sum = torch::from_blob(const_cast<float*>(a.sum.data()), {a.M, a.G}, torch::kFloat).clone();
  return {q, s, sum};
}

std::string isa() { return g_isa.name; }

void set_isa(const std::string& name) { g_isa = pick_isa(name); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_linear", &int4_linear, "x [M, K] float32 times packed int4 weights (group 32, asymmetric)");
  m.def("int8_linear", &int8_linear, "x [M, K] float32 times packed int8 weights (group 32, symmetric)");
  m.def("bf16_linear", &bf16_linear, "x [M, K] float32 times packed bfloat16 weights");
  m.def("f32_linear", &f32_linear, "x [M, K] float32 times float32 weights in panels of 48 columns");
  m.def("quantize_act", &quantize_act, "the int8 activation codes of the int kernels (for tests)");
  m.def("isa", &isa, "instruction set of the kernels in use");
  m.def("set_isa", &set_isa, "choose the kernels: 'auto', 'avx512', 'avx2' or 'generic' (tests)");
}
