// kvtier HACK kernels (arXiv 2502.03589): write K/V as 2/4/8-bit codes, decode attention on the codes.
//
// Layout, packing and arithmetic are those of kernels/hack.py (see its docstring); quantization is
// bit-identical to the reference (same IEEE operations, round half to even). Decode attention is
// flash-decoding style: per (sequence, KV head, segment of blocks) one pass over the blocks with an
// online softmax; per block of pi tokens Q.K^T and P.V are integer dot products of 8-bit Q / P codes
// with the unpacked K / V codes, finished by the four-term formula; segments merge by log-sum-exp.
//
// Instruction sets: the integer dot products (codes unpacked in registers), the four-term epilogues (float16 meta
// converted on the fly, once for a head group) and the per-block softmax with P's quantization have three
// versions, the best the CPU has chosen at run time (set_isa forces one, for tests): AVX-512 with VNNI and VBMI
// (vpdpbusd on codes gathered by vpmultishiftqb or vpermb; 16-lane softmax and epilogues), AVX2+FMA+F16C (maddubs)
// and a portable one; the remaining float loops use KV_CLONES. No dequantized K or V is ever formed.

#include "common.h"
#include "vec.h"

#include <string>
#include <unordered_map>


namespace {

using namespace kvtier;

constexpr int kMaxG = 16;
constexpr int kMaxD = 256;
constexpr int kMaxPi = 128;
constexpr int64_t kPreparedPerCode = 8;  // bytes of prepared a-codes per code, at most (PrepareFn; AVX-512: 8)
constexpr int64_t kPrepared = kMaxG * kMaxPi * kPreparedPerCode;

// ---- quantization, bit-identical to hack.quantize --------------------------------------------------

struct QParams {
  float scale, minimum;
  int32_t sum;
};

inline float half_round(float x) { return static_cast<float>(c10::Half(x)); }

// codes of x[0..n); scale and minimum rounded to float16 first when half_meta (stored K/V meta).
// Cloned so that the rounding and the division vectorize (the baseline build has neither: once per call
// for Q, it was a fifth of a short decode call).
KV_CLONES QParams quantize_row(const float* x, int64_t n, int qmax, uint8_t* codes, bool half_meta) {
  float mn = x[0], mx = x[0];
#pragma omp simd reduction(min : mn) reduction(max : mx)
  for (int64_t i = 1; i < n; ++i) {
    mn = mn < x[i] ? mn : x[i];
    mx = mx > x[i] ? mx : x[i];
  }
  float s = (mx - mn) / static_cast<float>(qmax);
  if (half_meta) {
    s = half_round(s);
    mn = half_round(mn);
  }
  const float div = s > 0.f ? s : 1.f;
  const float top = static_cast<float>(qmax);
  int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const int32_t c = static_cast<int32_t>(std::min(std::max(std::rint((x[i] - mn) / div), 0.f), top));
    codes[i] = static_cast<uint8_t>(c);
    sum += c;
  }
  return {s, mn, sum};
}

// Pair-vertical layout (kernels/hack.py): a matrix of rows x n codes is, per group of 16 rows, a run of
// 32-byte chunks; chunk k holds in byte 2 r + e the codes of row r at 2 (c k + s) + e, slot s = bits
// [s * bits, (s + 1) * bits), c = 8 / bits. Writes row r's n codes into the matrix at m.
void pack_row(const uint8_t* codes, int64_t n, int bits, int64_t r, uint8_t* m) {
  const int64_t c = 8 / bits, chunks = n / (2 * c);
  uint8_t* group = m + (r / 16) * chunks * 32 + 2 * (r % 16);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t e = 0; e < 2; ++e) {
      int byte = 0;
      for (int64_t s = 0; s < c; ++s) byte |= codes[2 * (c * k + s) + e] << (s * bits);
      group[k * 32 + e] = static_cast<uint8_t>(byte);
    }
}

// ---- instruction-set specific pieces ----------------------------------------------------------------

// G rows of n 8-bit a-codes (Q or P) -> the form DotFn takes (at most kPrepared bytes)
using PrepareFn = void (*)(const uint8_t* a, int64_t G, int64_t n, int bits, void* prepared);
// out[g * out_stride + r] = sum_j a[g][j] * code(r, j) over the rows x n matrix m (pair-vertical, rows % 16 == 0)
using DotFn = void (*)(const uint8_t* m, int64_t rows, int64_t n, int bits, const void* prepared, int64_t G,
                       int32_t* out, int64_t out_stride);
// one K partition's share of the G heads' scores, its float16 meta converted on the fly:
// sc[g][t] (+)= ks[t] * (A[g] * dot[g * pi + t] + Bq[g] * ksum[t]) + km[t] * C[g]
using KEpilogueFn = void (*)(float (*sc)[kMaxPi], const int32_t* dot, const c10::Half* ks, const c10::Half* km,
                             const int16_t* ksum, const float* A, const float* Bq, const float* C, int64_t G,
                             int64_t pi, bool first);
// a full block's P.V into the G heads' accumulators, rescaled by alpha (the softmax's) on the way:
// acc[g][d] = alpha[g] acc[g][d] + sP (vs[d] dv[g * D + d] + vm[d] psum) + mP (vs[d] vsum[d] + pi vm[d]),
// sP, mP, psum: P's scale, minimum and code sum for head g (pq[g])
using VEpilogueFn = void (*)(float (*acc)[kMaxD], const int32_t* dv, const c10::Half* vs, const c10::Half* vm,
                             const int16_t* vsum, const float* alpha, const QParams* pq, int64_t G, int64_t D,
                             float pi);
// the G heads of a block, sc[g][0..pi): e = exp(sc - m_new) in place over n of the pi scores (the others are
// -inf), m[g] and l[g] updated, alpha[g] the rescale of the old state. With `codes` (a full block, n == pi), e is
// taken against the head's own block max instead, its 8-bit codes go to codes[g * pi..] / qp[g] (sc is then
// scratch: only the codes are read), and qp's scale and minimum carry exp(block max - m_new): the codes depend on
// the block alone, not on where a segment or a memory tier starts (placement stays lossless).
using SoftmaxFn = void (*)(float (*sc)[kMaxPi], int64_t G, int64_t n, int64_t pi, float* m, float* l,
                          uint8_t* codes, QParams* qp, float* alpha);

void prepare_generic(const uint8_t* a, int64_t G, int64_t n, int, void* prepared) {
  std::memcpy(prepared, a, G * n);
}

KV_CLONES void dot_generic(const uint8_t* m, int64_t rows, int64_t n, int bits, const void* prepared, int64_t G,
                           int32_t* out, int64_t out_stride) {
  const uint8_t* a = static_cast<const uint8_t*>(prepared);
  const int64_t c = 8 / bits, chunks = n / (2 * c);
  const int mask = (1 << bits) - 1;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* group = m + (r / 16) * chunks * 32 + 2 * (r % 16);
    uint8_t row[kMaxPi];  // n == pi
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t e = 0; e < 2; ++e)
        for (int64_t s = 0; s < c; ++s) row[2 * (c * k + s) + e] = (group[k * 32 + e] >> (s * bits)) & mask;
    for (int64_t g = 0; g < G; ++g) {
      int32_t acc = 0;
      for (int64_t j = 0; j < n; ++j) acc += static_cast<int32_t>(a[g * n + j]) * row[j];
      out[g * out_stride + r] = acc;
    }
  }
}

// float16 scale, float16 minimum and int16 sum of n groups -> float
KV_CLONES void meta_generic(const c10::Half* scale, const c10::Half* mn, const int16_t* sum, int64_t n, float* fs,
                           float* fm, float* fsum) {
  for (int64_t i = 0; i < n; ++i) {
    fs[i] = static_cast<float>(scale[i]);
    fm[i] = static_cast<float>(mn[i]);
    fsum[i] = static_cast<float>(sum[i]);
  }
}

KV_CLONES float softmax_head(float* sc, int64_t n, int64_t pi, float& m, float& l, uint8_t* codes, QParams* qp) {
  float block_max = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) block_max = block_max > sc[t] ? block_max : sc[t];
  const float mx = std::max(m, block_max), ref = codes ? block_max : mx;
  const float alpha = fast_exp(m - mx), carry = codes ? fast_exp(block_max - mx) : 1.f;
  float sum = 0.f;
  for (int64_t t = 0; t < pi; ++t) {
    sc[t] = t < n ? fast_exp(sc[t] - ref) : 0.f;
    sum += sc[t];
  }
  l = l * alpha + carry * sum;
  m = mx;
  if (codes) {
    float lo = sc[0], hi = sc[0];
    for (int64_t t = 1; t < pi; ++t) {
      lo = lo < sc[t] ? lo : sc[t];
      hi = hi > sc[t] ? hi : sc[t];
    }
    const float s = (hi - lo) / 255.f, inv = s > 0.f ? 1.f / s : 0.f;
    int32_t csum = 0;
    for (int64_t t = 0; t < pi; ++t) {
      codes[t] = static_cast<uint8_t>(std::min(std::rint((sc[t] - lo) * inv), 255.f));
      csum += codes[t];
    }
    *qp = {s * carry, lo * carry, csum};
  }
  return alpha;
}

void softmax_generic(float (*sc)[kMaxPi], int64_t G, int64_t n, int64_t pi, float* m, float* l, uint8_t* codes,
                     QParams* qp, float* alpha) {
  for (int64_t g = 0; g < G; ++g) alpha[g] = softmax_head(sc[g], n, pi, m[g], l[g], codes ? codes + g * pi : nullptr, qp + g);
}

KV_CLONES void k_epilogue_generic(float (*sc)[kMaxPi], const int32_t* dot, const c10::Half* ks, const c10::Half* km,
                                  const int16_t* ksum, const float* A, const float* Bq, const float* C, int64_t G,
                                  int64_t pi, bool first) {
  float fs[kMaxPi], fm[kMaxPi], fsum[kMaxPi];
  meta_generic(ks, km, ksum, pi, fs, fm, fsum);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < pi; ++t) {
      const float v = fs[t] * (A[g] * static_cast<float>(dot[g * pi + t]) + Bq[g] * fsum[t]) + fm[t] * C[g];
      sc[g][t] = first ? v : sc[g][t] + v;
    }
}

KV_CLONES void v_epilogue_generic(float (*acc)[kMaxD], const int32_t* dv, const c10::Half* vs, const c10::Half* vm,
                                  const int16_t* vsum, const float* alpha, const QParams* pq, int64_t G, int64_t D,
                                  float pi) {
  float fs[kMaxD], fm[kMaxD], fsum[kMaxD];
  meta_generic(vs, vm, vsum, D, fs, fm, fsum);
  for (int64_t g = 0; g < G; ++g) {
    const float sP = pq[g].scale, mP = pq[g].minimum, psum = static_cast<float>(pq[g].sum);
    for (int64_t d = 0; d < D; ++d)
      acc[g][d] = acc[g][d] * alpha[g] + sP * (fs[d] * static_cast<float>(dv[g * D + d]) + fm[d] * psum) +
                  mP * (fs[d] * fsum[d] + pi * fm[d]);
  }
}

#ifdef KV_X86
#define KV_AVX2 __attribute__((target("avx2,fma,f16c")))

// per a-row g and pair j, the 4-byte word at prepared + (g * n / 2 + j) * 4 that the dots broadcast: the byte pair
// (a[2j], a[2j+1]) twice (2/4-bit codes: bytes for maddubs) or as two int16 (8-bit codes: for madd); n % 16 == 0
KV_AVX2 void prepare_avx2(const uint8_t* a, int64_t G, int64_t n, int bits, void* prepared) {
  auto* out = static_cast<__m128i*>(prepared);
  for (int64_t i = 0; i < G * n / 16; ++i) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a) + i);
    out[2 * i] = bits == 8 ? _mm_cvtepu8_epi16(b) : _mm_unpacklo_epi16(b, b);
    out[2 * i + 1] = bits == 8 ? _mm_cvtepu8_epi16(_mm_srli_si128(b, 8)) : _mm_unpackhi_epi16(b, b);
  }
}

// word i of the prepared a-codes in every 32-bit lane: vpbroadcastd from memory, a plain load
KV_AVX2 inline __m256i pair_at(const void* prepared, int64_t i) {
  int32_t word;
  std::memcpy(&word, static_cast<const uint8_t*>(prepared) + 4 * i, 4);
  return _mm256_set1_epi32(word);
}

// pairs whose maddubs products one 16-bit lane sums before widening: every product is a code (<= 255) times a
// code (< 2^Bits), so a sum of F pairs is at most 2 * 255 * (2^Bits - 1) * F < 2^16, exact as an unsigned 16-bit
// lane (vpaddw wraps past 2^15, widening zero-extends); F divides half
template <int Bits, int Half>
constexpr int pairs_per_sum() {
  constexpr int F = std::min(Half, Bits == 2 ? 32 : 8);
  static_assert(2 * 255 * ((1 << Bits) - 1) * F < (1 << 16) && Half % F == 0);
  return F;
}

// 2/4-bit, n = N: per group of 16 rows the N/2 pair vectors are unpacked once (a shift and a mask), then
// per a-row one maddubs per pair (16 rows x 2 positions), summed in 16 bits and widened every F pairs
template <int Bits, int N>
KV_AVX2 void dot_narrow_avx2(const uint8_t* m, int64_t rows, const void* ab, int64_t G, int32_t* out,
                             int64_t out_stride) {
  constexpr int c = 8 / Bits, chunks = N / (2 * c), half = N / 2;
  constexpr int F = pairs_per_sum<Bits, half>();
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << Bits) - 1));
  for (int64_t rg = 0; rg < rows / 16; ++rg) {
    __m256i u[half];
    for (int k = 0; k < chunks; ++k) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + (rg * chunks + k) * 32));
      for (int s = 0; s < c; ++s) u[c * k + s] = _mm256_and_si256(_mm256_srli_epi16(x, s * Bits), mask);
    }
    for (int64_t g = 0; g < G; ++g) {
      __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
      for (int j0 = 0; j0 < half; j0 += F) {
        __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();  // two chains
        for (int j = 0; j < F; j += 2) {
          acc0 = _mm256_add_epi16(acc0, _mm256_maddubs_epi16(pair_at(ab, g * half + j0 + j), u[j0 + j]));
          acc1 = _mm256_add_epi16(acc1, _mm256_maddubs_epi16(pair_at(ab, g * half + j0 + j + 1), u[j0 + j + 1]));
        }
        const __m256i acc = _mm256_add_epi16(acc0, acc1);
        lo = _mm256_add_epi32(lo, _mm256_cvtepu16_epi32(_mm256_castsi256_si128(acc)));
        hi = _mm256_add_epi32(hi, _mm256_cvtepu16_epi32(_mm256_extracti128_si256(acc, 1)));
      }
      int32_t* o = out + g * out_stride + rg * 16;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), hi);
    }
  }
}

// the same with G a-rows known at compile time, RG groups of 16 rows per pass: each unpacked pair vector,
// kept in a register, feeds all G accumulators, and each pair of a-codes, loaded once, feeds the RG groups;
// int32 sums build up in out
template <int Bits, int N, int G, int RG>
KV_AVX2 void dot_narrow_g_avx2(const uint8_t* m, int64_t rows, const void* ab, int32_t* out, int64_t out_stride) {
  constexpr int c = 8 / Bits, half = N / 2, chunks = N / (2 * c), F = pairs_per_sum<Bits, half>();
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << Bits) - 1));
  int64_t rg = 0;
  for (; rg + RG <= rows / 16; rg += RG) {
    for (int j0 = 0; j0 < half; j0 += F) {
      __m256i acc[RG][G];
      for (int r = 0; r < RG; ++r)
        for (int g = 0; g < G; ++g) acc[r][g] = _mm256_setzero_si256();
      for (int k = j0 / c; k < (j0 + F) / c; ++k) {
        __m256i x[RG];
        for (int r = 0; r < RG; ++r)
          x[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + ((rg + r) * chunks + k) * 32));
        for (int s = 0; s < c; ++s) {
          __m256i u[RG];
          for (int r = 0; r < RG; ++r) u[r] = _mm256_and_si256(_mm256_srli_epi16(x[r], s * Bits), mask);
          for (int g = 0; g < G; ++g) {
            const __m256i a = pair_at(ab, g * half + c * k + s);
            for (int r = 0; r < RG; ++r) {
              acc[r][g] = _mm256_add_epi16(acc[r][g], _mm256_maddubs_epi16(a, u[r]));
              asm("" : "+x"(acc[r][g]));  // keep each sum a chain in its register: no reassociated tree, no spills
            }
          }
        }
      }
      for (int r = 0; r < RG; ++r)
        for (int g = 0; g < G; ++g) {  // widen to int32: rows 0-7, 8-15
          __m256i* o = reinterpret_cast<__m256i*>(out + g * out_stride + (rg + r) * 16);
          __m256i lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(acc[r][g]));
          __m256i hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(acc[r][g], 1));
          if (j0 > 0) {
            lo = _mm256_add_epi32(lo, _mm256_loadu_si256(o));
            hi = _mm256_add_epi32(hi, _mm256_loadu_si256(o + 1));
          }
          _mm256_storeu_si256(o, lo);
          _mm256_storeu_si256(o + 1, hi);
        }
    }
  }
  if constexpr (RG > 1)
    if (rg < rows / 16)  // an odd group left
      dot_narrow_g_avx2<Bits, N, G, 1>(m + rg * chunks * 32, rows - rg * 16, ab, out + rg * 16, out_stride);
}

template <int Bits, int N>
KV_AVX2 void dot_narrow_any_avx2(const uint8_t* m, int64_t rows, const void* ab, int64_t G, int32_t* out,
                                 int64_t out_stride) {
  switch (G) {
    case 1: return dot_narrow_g_avx2<Bits, N, 1, 2>(m, rows, ab, out, out_stride);
    case 2: return dot_narrow_g_avx2<Bits, N, 2, 2>(m, rows, ab, out, out_stride);
    case 3: return dot_narrow_g_avx2<Bits, N, 3, 2>(m, rows, ab, out, out_stride);
    case 4: return dot_narrow_g_avx2<Bits, N, 4, 2>(m, rows, ab, out, out_stride);
    case 6: return dot_narrow_g_avx2<Bits, N, 6, 1>(m, rows, ab, out, out_stride);
    case 8: return dot_narrow_g_avx2<Bits, N, 8, 1>(m, rows, ab, out, out_stride);
    default: return dot_narrow_avx2<Bits, N>(m, rows, ab, G, out, out_stride);
  }
}

// 8-bit, n = N: codes widened to int16 once per group, then madd with the (a[2j], a[2j+1]) pairs into int32
template <int N>
KV_AVX2 void dot_wide_avx2(const uint8_t* m, int64_t rows, const void* ab, int64_t G, int32_t* out,
                           int64_t out_stride) {
  constexpr int half = N / 2;
  for (int64_t rg = 0; rg < rows / 16; ++rg) {
    __m256i w[N];  // per pair: rows 0-7, rows 8-15
    for (int j = 0; j < half; ++j) {
      const uint8_t* chunk = m + (rg * half + j) * 32;
      w[2 * j] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk)));
      w[2 * j + 1] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk + 16)));
    }
    for (int64_t g = 0; g < G; ++g) {
      __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
      for (int j = 0; j < half; ++j) {
        const __m256i a = pair_at(ab, g * half + j);
        lo = _mm256_add_epi32(lo, _mm256_madd_epi16(a, w[2 * j]));
        hi = _mm256_add_epi32(hi, _mm256_madd_epi16(a, w[2 * j + 1]));
      }
      int32_t* o = out + g * out_stride + rg * 16;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), hi);
    }
  }
}

template <int N>
KV_AVX2 void dot_n_avx2(const uint8_t* m, int64_t rows, int bits, const void* ab, int64_t G, int32_t* out,
                        int64_t out_stride) {
  if (bits == 2) dot_narrow_any_avx2<2, N>(m, rows, ab, G, out, out_stride);
  else if (bits == 4) dot_narrow_any_avx2<4, N>(m, rows, ab, G, out, out_stride);
  else dot_wide_avx2<N>(m, rows, ab, G, out, out_stride);
}

KV_AVX2 void dot_avx2(const uint8_t* m, int64_t rows, int64_t n, int bits, const void* ab, int64_t G,
                      int32_t* out, int64_t out_stride) {
  switch (n) {
    case 16: return dot_n_avx2<16>(m, rows, bits, ab, G, out, out_stride);
    case 32: return dot_n_avx2<32>(m, rows, bits, ab, G, out, out_stride);
    case 64: return dot_n_avx2<64>(m, rows, bits, ab, G, out, out_stride);
    default: return dot_n_avx2<128>(m, rows, bits, ab, G, out, out_stride);
  }
}

KV_AVX2 inline float hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

KV_AVX2 inline float hmin8(__m256 v) {
  __m128 x = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_min_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_min_ss(x, _mm_movehdup_ps(x)));
}

KV_AVX2 inline float hadd8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

// exp(x) for x <= 0 within 5e-7 relative (x < -87 gives exp(-87)), for P: its 8-bit codes and its float sum need
// no more. Short dependency chains, so the core keeps many in flight: the exponent is read from the rounding's
// bits, one ln 2 constant, a degree-5 minimax polynomial in Estrin form. exp(0) is exactly 1 (P's maximum).
KV_AVX2 inline __m256 exp_nonpos8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 shift = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23: t's low bits hold n = round(x log2 e)
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shift);
  const __m256 r = _mm256_fnmadd_ps(_mm256_sub_ps(t, shift), _mm256_set1_ps(0.693147180559945f), x);
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 p01 = _mm256_fmadd_ps(r, _mm256_set1_ps(0.99999983f), _mm256_set1_ps(1.f));
  const __m256 p23 = _mm256_fmadd_ps(r, _mm256_set1_ps(0.1666728f), _mm256_set1_ps(0.49999096f));
  const __m256 p45 = _mm256_fmadd_ps(r, _mm256_set1_ps(0.00831374f), _mm256_set1_ps(0.04190408f));
  const __m256 p = _mm256_fmadd_ps(r2, _mm256_fmadd_ps(r2, p45, p23), p01);
  const __m256i n127 = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000 - 127));  // n + 127 >= 1
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(n127, 23)));
}

// P's codes span [emin, 1] (its maximum is exp(0) = 1): their scale and its reciprocal (0 for a constant P)
inline void p_code_scale(float emin, float& scale, float& inv) {
  scale = (1.f - emin) / 255.f;
  inv = scale > 0.f ? 1.f / scale : 0.f;
}

// the per-head scalars of a full block, up to 8 heads across one vector, off the passes' path: the running max,
// the old state's rescale alpha = exp(m_old - m_new), the carry exp(block max - m_new) into l and P's parameters
KV_AVX2 void finish_block8(int64_t G, const float* bmax, const float* emin, const float* esum, const float* scale,
                           const int32_t* csum, float* m, float* l, QParams* qp, float* alpha) {
  alignas(32) float vmax[8] = {}, mold[8] = {}, ea[8], ec[8], mnew[8];
  for (int64_t g = 0; g < G; ++g) vmax[g] = bmax[g], mold[g] = m[g];
  const __m256 vb = _mm256_load_ps(vmax), vold = _mm256_load_ps(mold);
  const __m256 vnew = _mm256_max_ps(vold, vb);  // m_new (-inf old state: the block's max)
  _mm256_store_ps(ea, kvtier::exp8(_mm256_sub_ps(vold, vnew)));  // exp(-inf) clamps like fast_exp: l, acc are 0
  _mm256_store_ps(ec, kvtier::exp8(_mm256_sub_ps(vb, vnew)));
  _mm256_store_ps(mnew, vnew);
  for (int64_t g = 0; g < G; ++g) {
    l[g] = l[g] * ea[g] + ec[g] * esum[g];
    m[g] = mnew[g];
    alpha[g] = ea[g];
    qp[g] = {scale[g] * ec[g], emin[g] * ec[g], csum[g]};
  }
}

// a full block, up to 8 heads: P = exp(sc - block max) in [emin, 1], then its 8-bit codes. Three passes, so
// the exps wait only for the block max: (1) the max per head; (2) e = exp(sc - max) in place, its sum and its
// minimum; (3) the codes of e against [emin, 1]. The heads' passes are independent chains.
KV_AVX2 void softmax_codes8_avx2(float (*sc)[kMaxPi], int64_t G, int64_t pi, float* m, float* l, uint8_t* codes,
                                 QParams* qp, float* alpha) {
  float bmax[8], emin[8], esum[8], scale[8];
  int32_t csum[8];
  for (int64_t g = 0; g < G; ++g) {
    __m256 vmx = _mm256_loadu_ps(sc[g]);
    for (int64_t t = 8; t < pi; t += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(sc[g] + t));
    bmax[g] = hmax8(vmx);
  }
  for (int64_t g = 0; g < G; ++g) {
    const __m256 vm = _mm256_set1_ps(bmax[g]);
    __m256 sum = _mm256_setzero_ps(), lo = _mm256_set1_ps(1.f);
    for (int64_t t = 0; t < pi; t += 16) {  // pi % 16 == 0
      const __m256 e0 = exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(sc[g] + t), vm));
      const __m256 e1 = exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(sc[g] + t + 8), vm));
      _mm256_storeu_ps(sc[g] + t, e0);
      _mm256_storeu_ps(sc[g] + t + 8, e1);
      sum = _mm256_add_ps(sum, _mm256_add_ps(e0, e1));
      lo = _mm256_min_ps(lo, _mm256_min_ps(e0, e1));
    }
    esum[g] = hadd8(sum), emin[g] = hmin8(lo);
  }
  for (int64_t g = 0; g < G; ++g) {
    float inv;
    p_code_scale(emin[g], scale[g], inv);
    const __m256 vlo = _mm256_set1_ps(emin[g]), vi = _mm256_set1_ps(inv);
    __m256i cs = _mm256_setzero_si256();
    for (int64_t t = 0; t < pi; t += 16) {
      const __m256 e0 = _mm256_loadu_ps(sc[g] + t), e1 = _mm256_loadu_ps(sc[g] + t + 8);
      const __m256i c0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(e0, vlo), vi));  // round half to even
      const __m256i c1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(e1, vlo), vi));
      cs = _mm256_add_epi32(cs, _mm256_add_epi32(c0, c1));
      const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(c0, c1), 0xd8);  // 16 x int16 in order
      const __m128i b = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + g * pi + t), b);
    }
    __m128i c = _mm_add_epi32(_mm256_castsi256_si128(cs), _mm256_extracti128_si256(cs, 1));
    c = _mm_add_epi32(c, _mm_shuffle_epi32(c, 0x4e));
    c = _mm_add_epi32(c, _mm_shuffle_epi32(c, 0xb1));
    csum[g] = _mm_cvtsi128_si32(c);
  }
  finish_block8(G, bmax, emin, esum, scale, csum, m, l, qp, alpha);
}

// the open block of one head (no codes): e = exp(sc - m_new) in place, exp(-inf) = 0 past n
KV_AVX2 float softmax_open_avx2(float* sc, int64_t pi, float& m, float& l) {
  __m256 vmx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < pi; t += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(sc + t));  // scores past n are -inf
  const float mx = std::max(m, hmax8(vmx));
  const float alpha = fast_exp(m - mx);
  const __m256 vm = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 sum = _mm256_setzero_ps();
  for (int64_t t = 0; t < pi; t += 8) {
    const __m256 x = _mm256_loadu_ps(sc + t);
    const __m256 e = _mm256_and_ps(kvtier::exp8(_mm256_sub_ps(x, vm)), _mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ));
    _mm256_storeu_ps(sc + t, e);
    sum = _mm256_add_ps(sum, e);
  }
  l = l * alpha + hadd8(sum);
  m = mx;
  return alpha;
}

KV_AVX2 void softmax_avx2(float (*sc)[kMaxPi], int64_t G, int64_t n, int64_t pi, float* m, float* l, uint8_t* codes,
                          QParams* qp, float* alpha) {
  if (pi % 16) return softmax_generic(sc, G, n, pi, m, l, codes, qp, alpha);
  if (!codes) {
    for (int64_t g = 0; g < G; ++g) alpha[g] = softmax_open_avx2(sc[g], pi, m[g], l[g]);
    return;
  }
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(n == pi);
  for (int64_t g0 = 0; g0 < G; g0 += 8)
    softmax_codes8_avx2(sc + g0, std::min<int64_t>(8, G - g0), pi, m + g0, l + g0, codes + g0 * pi, qp + g0, alpha + g0);
}

// 8 float16 / int16 meta values as floats
KV_AVX2 inline __m256 half8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

KV_AVX2 inline __m256 int16x8(const int16_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

KV_AVX2 void k_epilogue_avx2(float (*sc)[kMaxPi], const int32_t* dot, const c10::Half* ks, const c10::Half* km,
                             const int16_t* ksum, const float* A, const float* Bq, const float* C, int64_t G,
                             int64_t pi, bool first) {
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(pi % 8 == 0);  // pi in {16, 32, 64, 128}
  for (int64_t t = 0; t < pi; t += 8) {  // the meta of 8 tokens, converted once for the G heads
    const __m256 fs = half8(ks + t), fm = half8(km + t), fsum = int16x8(ksum + t);
    for (int64_t g = 0; g < G; ++g) {
      const __m256 dot8 = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dot + g * pi + t)));
      const __m256 x = _mm256_fmadd_ps(_mm256_set1_ps(Bq[g]), fsum, _mm256_mul_ps(_mm256_set1_ps(A[g]), dot8));
      __m256 v = _mm256_fmadd_ps(fm, _mm256_set1_ps(C[g]), _mm256_mul_ps(fs, x));
      if (!first) v = _mm256_add_ps(v, _mm256_loadu_ps(sc[g] + t));
      _mm256_storeu_ps(sc[g] + t, v);
    }
  }
}

KV_AVX2 void v_epilogue_avx2(float (*acc)[kMaxD], const int32_t* dv, const c10::Half* vs, const c10::Half* vm,
                             const int16_t* vsum, const float* alpha, const QParams* pq, int64_t G, int64_t D,
                             float pi) {
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(D % 8 == 0);  // a multiple of pi
  for (int64_t d = 0; d < D; d += 8) {  // the meta of 8 channels, converted once for the G heads
    const __m256 fs = half8(vs + d), fm = half8(vm + d);
    const __m256 base = _mm256_fmadd_ps(fs, int16x8(vsum + d), _mm256_mul_ps(_mm256_set1_ps(pi), fm));
    for (int64_t g = 0; g < G; ++g) {
      const __m256 dv8 = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dv + g * D + d)));
      const __m256 x = _mm256_fmadd_ps(fs, dv8, _mm256_mul_ps(fm, _mm256_set1_ps(static_cast<float>(pq[g].sum))));
      __m256 a = _mm256_mul_ps(_mm256_loadu_ps(acc[g] + d), _mm256_set1_ps(alpha[g]));
      a = _mm256_fmadd_ps(_mm256_set1_ps(pq[g].scale), x, a);
      a = _mm256_fmadd_ps(_mm256_set1_ps(pq[g].minimum), base, a);
      _mm256_storeu_ps(acc[g] + d, a);
    }
  }
}

// ---- AVX-512 VNNI: the 2/4-bit dots with vpdpbusd (4 byte products summed into an int32 lane, one uop) ------
//
// A 64-byte load holds chunks 2kk and 2kk+1 of a group of 16 rows. vpmultishiftqb gathers, per 8-byte lane (4
// rows of one chunk), 4 consecutive positions of 2 rows into 2 int32 lanes; masked to the code's bits they meet
// the a-codes' 4-byte words in vpdpbusd. Output (rho, h) takes rows 2 rho, 2 rho + 1 of each lane's 4 and the h-th
// run of 4 positions of a chunk (2-bit chunks hold 8 positions, 4-bit 4); its low half sums chunk 2kk, its high
// half chunk 2kk+1, and the two halves are added, and the rows put in order, once at the end of the row group.
// Sums are exact int32 (the AVX2 path's 16-bit partial sums are not needed).

// positions per chunk and runs of 4 of them: 2-bit 8 and 2, 4-bit 4 and 1
template <int Bits>
constexpr int chunk_positions() { return 16 / Bits; }

// control of vpmultishiftqb for output (rho, h): byte b of int32 lane d of each 8-byte lane is the code of row
// 2 rho + d (bits 16 (2 rho + d) of the lane) at position p = 4 h + b of the chunk, at bit 8 (p % 2) + Bits (p / 2)
template <int Bits>
KV_AVX512_VNNI inline __m512i gather_control(int rho, int h) {
  uint64_t ctrl = 0;
  for (int d = 0; d < 2; ++d)
    for (int b = 0; b < 4; ++b) {
      const int p = 4 * h + b, bit = 16 * (2 * rho + d) + 8 * (p % 2) + Bits * (p / 2);
      ctrl |= static_cast<uint64_t>(bit) << (8 * (4 * d + b));
    }
  return _mm512_set1_epi64(static_cast<long long>(ctrl));
}

// the prepared a-codes: per a-row g, pair of chunks kk and run h, a vector of the 4 a-codes at chunk 2kk's run h
// in its low 8 lanes and at chunk 2kk+1's in its high 8 (n % 16 == 0, n <= 128)
template <int Bits>
KV_AVX512_VNNI void prepare_narrow_avx512(const uint8_t* a, int64_t G, int64_t n, void* prepared) {
  constexpr int cp = chunk_positions<Bits>(), runs = cp / 4;
  auto* out = static_cast<__m512i*>(prepared);
  const __mmask64 lo_mask = n >= 64 ? ~0ULL : (1ULL << n) - 1, hi_mask = n > 64 ? ~0ULL >> (128 - n) : 0;
  for (int64_t g = 0; g < G; ++g) {
    const __m512i lo = _mm512_maskz_loadu_epi8(lo_mask, a + g * n);  // 4-byte words 0..15 of the row
    const __m512i hi = _mm512_maskz_loadu_epi8(hi_mask, a + g * n + 64);  // words 16..31
    for (int64_t kk = 0; kk < n / (2 * cp); ++kk)
      for (int h = 0; h < runs; ++h) {
        const int w0 = static_cast<int>((2 * kk * cp) / 4 + h), w1 = w0 + cp / 4;
        const __m512i idx = _mm512_mask_set1_epi32(_mm512_set1_epi32(w0), 0xFF00, w1);
        *out++ = _mm512_permutex2var_epi32(lo, idx, hi);
      }
  }
}

// 8-bit codes (0..255) do not fit vpdpbusd's signed operand, so the a-codes go there, shifted to a - 128 (a ^ 0x80
// as int8): the a-rows in order, 1 byte per code (dot_wide_g_avx512 broadcasts their 4-byte words)
KV_AVX512_VNNI void prepare_wide_avx512(const uint8_t* a, int64_t G, int64_t n, void* prepared) {
  auto* out = static_cast<uint8_t*>(prepared);
  for (int64_t i = 0; i < G * n; i += 64) {
    const __mmask64 k = G * n - i >= 64 ? ~0ULL : (1ULL << (G * n - i)) - 1;
    _mm512_mask_storeu_epi8(out + i, k, _mm512_xor_si512(_mm512_maskz_loadu_epi8(k, a + i), _mm512_set1_epi8(-128)));
  }
}

KV_AVX512_VNNI void prepare_avx512(const uint8_t* a, int64_t G, int64_t n, int bits, void* prepared) {
  if (bits == 2) prepare_narrow_avx512<2>(a, G, n, prepared);
  else if (bits == 4) prepare_narrow_avx512<4>(a, G, n, prepared);
  else prepare_wide_avx512(a, G, n, prepared);
}

// G a-rows known at compile time: per group of 16 rows, 2 accumulators per a-row (rho)
template <int Bits, int G>
KV_AVX512_VNNI void dot_narrow_g_avx512(const uint8_t* m, int64_t rows, int64_t n, const void* prepared, int32_t* out,
                                   int64_t out_stride) {
  constexpr int cp = chunk_positions<Bits>(), runs = cp / 4;
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << Bits) - 1));
  __m512i ctrl[2][runs];
  for (int rho = 0; rho < 2; ++rho)
    for (int h = 0; h < runs; ++h) ctrl[rho][h] = gather_control<Bits>(rho, h);
  const __m512i in_order_lo = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);  // row pairs 0..7 from the low halves
  const __m512i in_order_hi = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);  // ... from the high halves
  const int64_t pairs = n / (2 * cp), chunks = n / cp;
  const __m512i* ab = static_cast<const __m512i*>(prepared);
  for (int64_t rg = 0; rg < rows / 16; ++rg) {
    __m512i acc[G][2];
    for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_si512();
    for (int64_t kk = 0; kk < pairs; ++kk) {
      const __m512i x = _mm512_loadu_si512(m + (rg * chunks + 2 * kk) * 32);
      for (int h = 0; h < runs; ++h)
        for (int rho = 0; rho < 2; ++rho) {
          const __m512i u = _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl[rho][h], x), mask);
          for (int g = 0; g < G; ++g)
            acc[g][rho] = _mm512_dpbusd_epi32(acc[g][rho], _mm512_load_si512(ab + (g * pairs + kk) * runs + h), u);
        }
    }
    for (int g = 0; g < G; ++g) {
      const __m512i lo = _mm512_permutex2var_epi64(acc[g][0], in_order_lo, acc[g][1]);
      const __m512i hi = _mm512_permutex2var_epi64(acc[g][0], in_order_hi, acc[g][1]);
      _mm512_storeu_si512(out + g * out_stride + rg * 16, _mm512_add_epi32(lo, hi));
    }
  }
}

// 8-bit, G a-rows known at compile time: vpermb gathers, per row, the 4 positions of chunks 2kk and 2kk+1 (rows in
// order), the unsigned operand of vpdpbusd against each a-row's word of (a - 128); one more vpdpbusd against ones
// sums each row's codes, and 128 times that sum restores sum a c (all exact in int32)
template <int G>
KV_AVX512_VNNI void dot_wide_g_avx512(const uint8_t* m, int64_t rows, int64_t n, const void* prepared, int32_t* out,
                                 int64_t out_stride) {
  alignas(64) uint8_t order[64];
  for (int r = 0; r < 16; ++r)
    for (int b = 0; b < 4; ++b) order[4 * r + b] = static_cast<uint8_t>(32 * (b / 2) + 2 * r + b % 2);
  const __m512i gather = _mm512_load_si512(order), ones = _mm512_set1_epi8(1);
  const int32_t* ab = static_cast<const int32_t*>(prepared);
  const int64_t quads = n / 4;
  for (int64_t rg = 0; rg < rows / 16; ++rg) {
    __m512i acc[G], csum = _mm512_setzero_si512();
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_si512();
    for (int64_t kk = 0; kk < quads; ++kk) {
      const __m512i x = _mm512_permutexvar_epi8(gather, _mm512_loadu_si512(m + (rg * quads + kk) * 64));
      csum = _mm512_dpbusd_epi32(csum, x, ones);
      for (int g = 0; g < G; ++g) acc[g] = _mm512_dpbusd_epi32(acc[g], x, _mm512_set1_epi32(ab[g * quads + kk]));
    }
    const __m512i fix = _mm512_slli_epi32(csum, 7);
    for (int g = 0; g < G; ++g) _mm512_storeu_si512(out + g * out_stride + rg * 16, _mm512_add_epi32(acc[g], fix));
  }
}

template <int Bits, int G>
KV_AVX512_VNNI void dot_g_avx512(const uint8_t* m, int64_t rows, int64_t n, const void* ab, int32_t* out,
                            int64_t out_stride) {
  if constexpr (Bits == 8) dot_wide_g_avx512<G>(m, rows, n, ab, out, out_stride);
  else dot_narrow_g_avx512<Bits, G>(m, rows, n, ab, out, out_stride);
}

template <int Bits>
KV_AVX512_VNNI void dot_bits_avx512(const uint8_t* m, int64_t rows, int64_t n, const void* ab, int64_t G, int32_t* out,
                               int64_t out_stride) {
  const int64_t per_row = Bits == 8 ? n : 8 * n;  // prepared bytes per a-row
  for (int64_t g0 = 0; g0 < G; g0 += 4) {  // at most 4 a-rows per pass: the accumulators stay in registers
    const uint8_t* a = static_cast<const uint8_t*>(ab) + g0 * per_row;
    int32_t* o = out + g0 * out_stride;
    switch (std::min<int64_t>(4, G - g0)) {
      case 1: dot_g_avx512<Bits, 1>(m, rows, n, a, o, out_stride); break;
      case 2: dot_g_avx512<Bits, 2>(m, rows, n, a, o, out_stride); break;
      case 3: dot_g_avx512<Bits, 3>(m, rows, n, a, o, out_stride); break;
      default: dot_g_avx512<Bits, 4>(m, rows, n, a, o, out_stride); break;
    }
  }
}

KV_AVX512_VNNI void dot_avx512(const uint8_t* m, int64_t rows, int64_t n, int bits, const void* ab, int64_t G,
                          int32_t* out, int64_t out_stride) {
  if (bits == 2) dot_bits_avx512<2>(m, rows, n, ab, G, out, out_stride);
  else if (bits == 4) dot_bits_avx512<4>(m, rows, n, ab, G, out, out_stride);
  else dot_bits_avx512<8>(m, rows, n, ab, G, out, out_stride);
}

enum class Lanes { kMax, kMin, kAdd };

template <Lanes Op>
KV_AVX512_VNNI inline __m512 lanes_op(__m512 a, __m512 b) {
  if constexpr (Op == Lanes::kMax) return _mm512_max_ps(a, b);
  else if constexpr (Op == Lanes::kMin) return _mm512_min_ps(a, b);
  else return _mm512_add_ps(a, b);
}

// e^(x - m) for x <= m on 16 lanes, given ml = m log2 e: 2^y with y = x log2 e - ml (one rounding, fused) split
// as n + r, n = round(y), r in [-1/2, 1/2]; 2^r by its degree-5 Taylor polynomial (relative error below 3e-6:
// P is kept as 8-bit codes) and 2^n by vscalefps, which also underflows to 0 by itself. Fewer operations than
// the AVX2 path's exp_nonpos8 (no clamp, no two-step range reduction, no exponent bit arithmetic): it runs once
// per score.
KV_AVX512_VNNI inline __m512 exp_shifted16(__m512 x, __m512 ml) {
  const __m512 y = _mm512_fmsub_ps(x, _mm512_set1_ps(1.44269504088896341f), ml);
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(1.3333558146e-3f);  // ln(2)^5 / 120, then down to ln(2)^0 / 0!
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6181291076e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5504108665e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022650696e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718056e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// e^x for x <= 0, -inf included (e^-inf = 0; below -150 the result underflows to 0 anyway)
KV_AVX512_VNNI inline __m512 exp_neg16(__m512 x) {
  return exp_shifted16(_mm512_max_ps(x, _mm512_set1_ps(-150.f)), _mm512_setzero_ps());
}

// per head g < G, v[g] reduced across its 16 lanes into lane g of the result: four heads at a time by a transposing
// butterfly (within 128-bit lanes, pairs of heads, then the four; then across the 128-bit lanes), one short chain
// for four heads instead of one per head
template <Lanes Op>
KV_AVX512_VNNI __attribute__((always_inline)) inline __m512 heads_lanes16(const __m512* v, int64_t G) {
  __m512 out = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    auto at = [&](int64_t i) { return v[std::min(g0 + i, G - 1)]; };
    const __m512 ab = lanes_op<Op>(_mm512_shuffle_ps(at(0), at(1), 0x88), _mm512_shuffle_ps(at(0), at(1), 0xdd));
    const __m512 cd = lanes_op<Op>(_mm512_shuffle_ps(at(2), at(3), 0x88), _mm512_shuffle_ps(at(2), at(3), 0xdd));
    __m512 r = lanes_op<Op>(_mm512_shuffle_ps(ab, cd, 0x88), _mm512_shuffle_ps(ab, cd, 0xdd));  // [a b c d] x 4
    r = lanes_op<Op>(r, _mm512_shuffle_f32x4(r, r, 0x4e));
    r = lanes_op<Op>(r, _mm512_shuffle_f32x4(r, r, 0xb1));
    out = _mm512_mask_mov_ps(out, static_cast<__mmask16>(0xfu << g0), r);
  }
  return out;
}

// a full block of NV * 16 tokens, up to 16 heads, in three passes with the heads' reductions batched (lane g of a
// vector: head g): (1) per head, the lane-wise max and min of the scores, reduced across the heads at once;
// (2) across the heads: emin = exp(min - max), the smallest e, and with it P's code scales, the running max, the
// old state's rescale and the carry; (3) per head, e = exp(sc - block max), its sum and its codes against
// [emin, 1] in one sweep (sc is left as it was), the sums reduced across the heads at once
template <int NV>
KV_AVX512_VNNI void softmax_codes_avx512(float (*sc)[kMaxPi], int64_t G, float* m, float* l, uint8_t* codes, QParams* qp,
                                    float* alpha) {
  __m512 hi[kMaxG], lo[kMaxG];
  for (int64_t g = 0; g < G; ++g) {
    hi[g] = lo[g] = _mm512_loadu_ps(sc[g]);
    for (int v = 1; v < NV; ++v) {
      const __m512 x = _mm512_loadu_ps(sc[g] + 16 * v);
      hi[g] = _mm512_max_ps(hi[g], x), lo[g] = _mm512_min_ps(lo[g], x);
    }
  }
  const __mmask16 heads = static_cast<__mmask16>((1u << G) - 1);
  const __m512 bmax = heads_lanes16<Lanes::kMax>(hi, G);
  const __m512 bmaxl = _mm512_mul_ps(bmax, _mm512_set1_ps(1.44269504088896341f));
  const __m512 emin = exp_shifted16(heads_lanes16<Lanes::kMin>(lo, G), bmaxl);  // the min's e, as the scores' below
  const __m512 span = _mm512_sub_ps(_mm512_set1_ps(1.f), emin);
  const __m512 scale = _mm512_div_ps(span, _mm512_set1_ps(255.f));  // p_code_scale
  const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(span, _mm512_setzero_ps(), _CMP_GT_OQ),
                                         _mm512_set1_ps(255.f), span);  // 1 / scale, beside it rather than after it
  const __m512 mold = _mm512_maskz_loadu_ps(heads, m);
  const __m512 mnew = _mm512_max_ps(mold, bmax);  // -inf old state: the block's max
  const __m512 ea = exp_neg16(_mm512_sub_ps(mold, mnew)), ec = exp_neg16(_mm512_sub_ps(bmax, mnew));
  __m512 sums[kMaxG], csums[kMaxG];
  for (int64_t g = 0; g < G; ++g) {
    const __m512i lane = _mm512_set1_epi32(static_cast<int>(g));
    const __m512 ml = _mm512_permutexvar_ps(lane, bmaxl), vi = _mm512_permutexvar_ps(lane, inv);
    const __m512 lov = _mm512_mul_ps(_mm512_permutexvar_ps(lane, emin), vi);  // code = e inv - emin inv
    __m512 sum = _mm512_setzero_ps();
    __m512i cs = _mm512_setzero_si512();
    for (int v = 0; v < NV; ++v) {
      const __m512 e = exp_shifted16(_mm512_loadu_ps(sc[g] + 16 * v), ml);
      sum = _mm512_add_ps(sum, e);
      const __m512i c = _mm512_cvtps_epi32(_mm512_fmsub_ps(e, vi, lov));  // round half to even
      cs = _mm512_add_epi32(cs, c);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + g * NV * 16 + 16 * v), _mm512_cvtusepi32_epi8(c));
    }
    sums[g] = sum, csums[g] = _mm512_cvtepi32_ps(cs);  // code sums below 2^24: exact in float
  }
  const __m512 esum = heads_lanes16<Lanes::kAdd>(sums, G), csum = heads_lanes16<Lanes::kAdd>(csums, G);
  _mm512_mask_storeu_ps(l, heads, _mm512_fmadd_ps(ec, esum, _mm512_mul_ps(_mm512_maskz_loadu_ps(heads, l), ea)));
  _mm512_mask_storeu_ps(m, heads, mnew);
  _mm512_mask_storeu_ps(alpha, heads, ea);
  // the heads' scalars out of the registers (stored as vectors and read back as floats, they waited on store
  // forwarding: a quarter of this function's time)
  const __m512 ps = _mm512_mul_ps(scale, ec), pm = _mm512_mul_ps(emin, ec);
  const __m512i pc = _mm512_cvtps_epi32(csum);
  for (int64_t g = 0; g < G; ++g) {
    const __m512i lane = _mm512_set1_epi32(static_cast<int>(g));
    qp[g] = {_mm512_cvtss_f32(_mm512_permutexvar_ps(lane, ps)), _mm512_cvtss_f32(_mm512_permutexvar_ps(lane, pm)),
             _mm_cvtsi128_si32(_mm512_castsi512_si128(_mm512_permutexvar_epi32(lane, pc)))};
  }
}

KV_AVX512_VNNI void softmax_avx512(float (*sc)[kMaxPi], int64_t G, int64_t n, int64_t pi, float* m, float* l,
                              uint8_t* codes, QParams* qp, float* alpha) {
  if (!codes || pi % 16) return softmax_avx2(sc, G, n, pi, m, l, codes, qp, alpha);
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(n == pi);
  switch (pi) {
    case 16: return softmax_codes_avx512<1>(sc, G, m, l, codes, qp, alpha);
    case 32: return softmax_codes_avx512<2>(sc, G, m, l, codes, qp, alpha);
    case 64: return softmax_codes_avx512<4>(sc, G, m, l, codes, qp, alpha);
    default: return softmax_codes_avx512<8>(sc, G, m, l, codes, qp, alpha);
  }
}

// 16 float16 / int16 meta values as floats
KV_AVX512_VNNI inline __m512 half16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

KV_AVX512_VNNI inline __m512 int16x16(const int16_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}

KV_AVX512_VNNI inline __m512 int32x16(const int32_t* p) { return _mm512_cvtepi32_ps(_mm512_loadu_si512(p)); }

// k_epilogue_avx2 on 16 tokens at a time (pi % 16 == 0)
KV_AVX512_VNNI void k_epilogue_avx512(float (*sc)[kMaxPi], const int32_t* dot, const c10::Half* ks, const c10::Half* km,
                                 const int16_t* ksum, const float* A, const float* Bq, const float* C, int64_t G,
                                 int64_t pi, bool first) {
  for (int64_t t = 0; t < pi; t += 16) {
    const __m512 fs = half16(ks + t), fm = half16(km + t), fsum = int16x16(ksum + t);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 x = _mm512_fmadd_ps(_mm512_set1_ps(Bq[g]), fsum,
                                       _mm512_mul_ps(_mm512_set1_ps(A[g]), int32x16(dot + g * pi + t)));
      __m512 v = _mm512_fmadd_ps(fm, _mm512_set1_ps(C[g]), _mm512_mul_ps(fs, x));
      if (!first) v = _mm512_add_ps(v, _mm512_loadu_ps(sc[g] + t));
      _mm512_storeu_ps(sc[g] + t, v);
    }
  }
}

// v_epilogue_avx2 on 16 channels at a time (D % 16 == 0)
KV_AVX512_VNNI void v_epilogue_avx512(float (*acc)[kMaxD], const int32_t* dv, const c10::Half* vs, const c10::Half* vm,
                                 const int16_t* vsum, const float* alpha, const QParams* pq, int64_t G, int64_t D,
                                 float pi) {
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 fs = half16(vs + d), fm = half16(vm + d);
    const __m512 base = _mm512_fmadd_ps(fs, int16x16(vsum + d), _mm512_mul_ps(_mm512_set1_ps(pi), fm));
    for (int64_t g = 0; g < G; ++g) {
      const __m512 x = _mm512_fmadd_ps(fs, int32x16(dv + g * D + d),
                                       _mm512_mul_ps(fm, _mm512_set1_ps(static_cast<float>(pq[g].sum))));
      __m512 a = _mm512_mul_ps(_mm512_loadu_ps(acc[g] + d), _mm512_set1_ps(alpha[g]));
      a = _mm512_fmadd_ps(_mm512_set1_ps(pq[g].scale), x, a);
      a = _mm512_fmadd_ps(_mm512_set1_ps(pq[g].minimum), base, a);
      _mm512_storeu_ps(acc[g] + d, a);
    }
  }
}

#endif  // KV_X86

struct Isa {
  const char* name;
  PrepareFn prepare;
  DotFn dot;
  SoftmaxFn softmax;
  KEpilogueFn k_epilogue;
  VEpilogueFn v_epilogue;
};

const Isa kGeneric{"generic", prepare_generic, dot_generic, softmax_generic, k_epilogue_generic, v_epilogue_generic};
#ifdef KV_X86
const Isa kAvx2{"avx2", prepare_avx2, dot_avx2, softmax_avx2, k_epilogue_avx2, v_epilogue_avx2};
const Isa kAvx512{"avx512", prepare_avx512, dot_avx512, softmax_avx512, k_epilogue_avx512, v_epilogue_avx512};
#endif

Isa pick_isa(const std::string& name) {
#ifdef KV_X86
  if ((name == "auto" || name == "avx512") && has_avx512_vnni()) return kAvx512;
  if ((name == "auto" || name == "avx2") && has_avx2()) return kAvx2;
#endif
  TORCH_CHECK(name == "auto" || name == "generic", "instruction set '", name, "' is not available on this CPU");
  return kGeneric;
}

Isa g_isa = pick_isa("auto");

// ---- float loops of one block (vectorized by the compiler, one clone per instruction set) ----------

KV_CLONES void scale_row(float* x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

template <typename T16>
KV_CLONES void tail_accumulate(float* acc, const float* e, const T16* vt, int64_t n, int64_t D) {
  for (int64_t t = 0; t < n; ++t) {
    const float p = e[t];
    for (int64_t d = 0; d < D; ++d) acc[d] += p * to_f(vt[t * D + d]);
  }
}

// ---- decode attention -------------------------------------------------------------------------------

// One layer: per (block, KV head) bh a slab of `slab` bytes whose parts start at o[] (kernels/hack.py).
struct Cache {
  uint8_t* base;
  void* v_tail;
  int64_t slab, o[8];
  uint8_t* at(int64_t bh, int part) const { return base + bh * slab + o[part]; }
  uint8_t* k_codes(int64_t bh) const { return at(bh, 0); }
  c10::Half* k_scale(int64_t bh) const { return reinterpret_cast<c10::Half*>(at(bh, 1)); }
  c10::Half* k_min(int64_t bh) const { return reinterpret_cast<c10::Half*>(at(bh, 2)); }
  int16_t* k_sum(int64_t bh) const { return reinterpret_cast<int16_t*>(at(bh, 3)); }
  uint8_t* v_codes(int64_t bh) const { return at(bh, 4); }
  c10::Half* v_scale(int64_t bh) const { return reinterpret_cast<c10::Half*>(at(bh, 5)); }
  c10::Half* v_min(int64_t bh) const { return reinterpret_cast<c10::Half*>(at(bh, 6)); }
  int16_t* v_sum(int64_t bh) const { return reinterpret_cast<int16_t*>(at(bh, 7)); }
};

struct DecodeArgs {
  Cache c;
  const uint8_t* qc;  // [B, Hq, D] 8-bit Q codes
  const float* qp;    // [B, Hq, P, 3]: scale, minimum, code sum
  const int64_t *tables, *ctx, *slots;
  float* out;  // [B, Hkv, S, G, D]
  float* lse;  // [B, Hkv, S, G]
  int64_t Hkv, G, D, P, pi, bits, W, S, seg_blocks;
};

struct Scratch {
  alignas(64) int32_t kdot[kMaxG * kMaxPi], vdot[kMaxG * kMaxD];  // one each: a block's scores overlap the last P.V
  alignas(64) float sc[2][kMaxG][kMaxPi];                         // scores of two blocks, likewise
  alignas(64) uint8_t pc[kMaxG * kMaxPi];                // P codes of a block, [G][pi]
  alignas(64) uint8_t qprep[kMaxG * kMaxD * kPreparedPerCode];  // Q prepared, per partition (q_prepared)
  alignas(64) uint8_t pprep[kPrepared];                  // P prepared
  alignas(64) float acc[kMaxG][kMaxD];
  float qa[kMaxD / 16][kMaxG], qb[kMaxD / 16][kMaxG], qc[kMaxD / 16][kMaxG];  // per partition and head: A, Bq, C
  float m[kMaxG], l[kMaxG];
  QParams pq[kMaxG];
  uint8_t* q_prepared(int64_t p, int64_t G, int64_t pi) { return qprep + p * G * pi * kPreparedPerCode; }
};

// scores of block `blk` (n valid tokens) into sc, -inf past n
void block_scores(const DecodeArgs& a, Scratch& w, int64_t h, int64_t blk, int64_t n, float (*sc)[kMaxPi]) {
  const int64_t G = a.G, P = a.P, pi = a.pi, M = pi * pi * a.bits / 8;  // bytes of one partition's matrix
  const int64_t bh = blk * a.Hkv + h;
  for (int64_t p = 0; p < P; ++p) {
    g_isa.dot(a.c.k_codes(bh) + p * M, pi, pi, static_cast<int>(a.bits), w.q_prepared(p, G, pi), G, w.kdot, pi);
    g_isa.k_epilogue(sc, w.kdot, a.c.k_scale(bh) + p * pi, a.c.k_min(bh) + p * pi, a.c.k_sum(bh) + p * pi,
                     w.qa[p], w.qb[p], w.qc[p], G, pi, p == 0);
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = n; t < pi; ++t) sc[g][t] = -std::numeric_limits<float>::infinity();
}

// P.V of a full block from codes into w.acc, rescaled by alpha: w.pc holds P's 8-bit codes per head, w.pq their
// parameters
void block_pv_codes(const DecodeArgs& a, Scratch& w, int64_t h, int64_t blk, const float* alpha) {
  const int64_t G = a.G, D = a.D, pi = a.pi, bh = blk * a.Hkv + h;
  const int bits = static_cast<int>(a.bits);
  g_isa.prepare(w.pc, G, pi, bits, w.pprep);
  g_isa.dot(a.c.v_codes(bh), D, pi, bits, w.pprep, G, w.vdot, D);
  g_isa.v_epilogue(w.acc, w.vdot, a.c.v_scale(bh), a.c.v_min(bh), a.c.v_sum(bh), alpha, w.pq, G, D,
                   static_cast<float>(pi));
}

inline void prefetch_range(const void* p, int64_t bytes) {  // into L2: a block is used well after this
  for (int64_t e = 0; e < bytes; e += 64) __builtin_prefetch(static_cast<const char*>(p) + e, 0, 2);
}

// blocks are scattered: fetch the next one's codes and meta while this one is computed
void prefetch_block(const DecodeArgs& a, int64_t h, int64_t blk, bool full) {
  prefetch_range(a.c.at(blk * a.Hkv + h, 0), full ? a.c.slab : a.c.o[4]);  // an open block: K only
}

constexpr int64_t kAhead = 2;  // blocks prefetched ahead

template <typename T16>
void decode_one(const DecodeArgs& a, int64_t b, int64_t h, int64_t s) {
  thread_local Scratch w;
  const int64_t G = a.G, D = a.D, pi = a.pi;
  const int64_t ctx = a.ctx[b], nfull = ctx / pi;
  const int64_t j0 = s * a.seg_blocks, j1 = std::min((ctx + pi - 1) / pi, j0 + a.seg_blocks);
  for (int64_t g = 0; g < G; ++g) {
    w.m[g] = -std::numeric_limits<float>::infinity();
    w.l[g] = 0.f;
    std::fill(w.acc[g], w.acc[g] + D, 0.f);
  }
  for (int64_t p = 0; p < a.P; ++p) {  // this (sequence, KV head)'s Q codes, per partition, in the dot's form
    const uint8_t* qg = a.qc + (b * a.Hkv + h) * G * D + p * pi;  // head g at qg + g * D
    for (int64_t g = 0; g < G; ++g) std::memcpy(w.pc + g * pi, qg + g * D, pi);
    g_isa.prepare(w.pc, G, pi, static_cast<int>(a.bits), w.q_prepared(p, G, pi));
    for (int64_t g = 0; g < G; ++g) {  // the four-term formula's Q factors: scale, minimum, code sum
      const float* qp = a.qp + (((b * a.Hkv + h) * G + g) * a.P + p) * 3;
      w.qa[p][g] = qp[0], w.qb[p][g] = qp[1], w.qc[p][g] = qp[0] * qp[2] + static_cast<float>(pi) * qp[1];
    }
  }
  auto block_at = [&](int64_t j) { return a.tables[b * a.W + j]; };
  auto tokens = [&](int64_t j) { return std::min(pi, ctx - j * pi); };
  for (int64_t j = j0; j < std::min(j1, j0 + kAhead + 1); ++j) prefetch_block(a, h, block_at(j), j < nfull);
  if (j0 < j1) block_scores(a, w, h, block_at(j0), tokens(j0), w.sc[0]);
  for (int64_t j = j0; j < j1; ++j) {  // block j's scores are in sc: its softmax, block j + 1's scores, its P.V
    const int64_t blk = block_at(j), n = tokens(j);
    float (*sc)[kMaxPi] = w.sc[(j - j0) % 2];
    if (j + kAhead + 1 < j1) prefetch_block(a, h, block_at(j + kAhead + 1), j + kAhead + 1 < nfull);
    const bool full = j < nfull;
    float alpha[kMaxG];
    g_isa.softmax(sc, G, n, pi, w.m, w.l, full ? w.pc : nullptr, w.pq, alpha);
    // the next scores do not wait for this softmax (a chain of short reductions): the core runs them meanwhile
    if (j + 1 < j1) block_scores(a, w, h, block_at(j + 1), tokens(j + 1), w.sc[(j + 1 - j0) % 2]);
    if (full) {
      block_pv_codes(a, w, h, blk, alpha);
    } else {  // the open block: V from the sequence's 16-bit tail
      const T16* vt = static_cast<const T16*>(a.c.v_tail) + (a.slots[b] * a.Hkv + h) * pi * D;
      for (int64_t g = 0; g < G; ++g) {
        scale_row(w.acc[g], alpha[g], D);
        tail_accumulate(w.acc[g], sc[g], vt, n, D);
      }
    }
  }
  const int64_t base = ((b * a.Hkv + h) * a.S + s) * G;
  for (int64_t g = 0; g < G; ++g) {
    float* o = a.out + (base + g) * D;
    const float inv = w.l[g] > 0.f ? 1.f / w.l[g] : 0.f;
    for (int64_t d = 0; d < D; ++d) o[d] = w.acc[g][d] * inv;
    a.lse[base + g] = w.l[g] > 0.f ? w.m[g] + std::log(w.l[g]) : -std::numeric_limits<float>::infinity();
  }
}

// Segments per sequence. Items (sequence, KV head, segment) of equal length, when every context is the
// same (one sequence above all), are dealt evenly: the fewest segments giving a multiple of the threads
// (B=1 x 8192, 2 threads: 2 segments, 3 items each, against 6 by the general rule: 40.3 vs 41.4 us,
// 13.3 vs 14.5 at 2048); otherwise enough items that uneven contexts still balance.
int64_t choose_segments(int64_t B, int64_t Hkv, int64_t max_blocks, bool same_contexts) {
  const int64_t threads = at::get_num_threads(), heads = B * Hkv;
  int64_t S;
  if (same_contexts) {  // every thread gets the same number of items (S = threads gets there)
    S = (threads + heads - 1) / heads;
    while (heads * S % threads != 0) ++S;
  } else {
    S = (8 * threads + heads - 1) / heads;  // enough work items to balance the threads
  }
  S = std::min(S, max_blocks / 2);  // segments of at least 2 blocks
  return std::max<int64_t>(1, S);
}

Cache cache_ptrs(const torch::Tensor& blocks, const torch::Tensor& v_tail, const std::vector<int64_t>& parts) {
  TORCH_CHECK(blocks.dim() == 3 && blocks.scalar_type() == torch::kByte && blocks.is_contiguous() &&
              blocks.device().is_cpu(), "HACK blocks: contiguous uint8 [NB, Hkv, slab] on the CPU");
  TORCH_CHECK(v_tail.dim() == 4 && v_tail.is_contiguous() && v_tail.size(1) == blocks.size(1) &&
              (v_tail.scalar_type() == torch::kHalf || v_tail.scalar_type() == torch::kBFloat16),
              "HACK tail: contiguous 16-bit [S, Hkv, pi, D]");
  TORCH_CHECK(parts.size() == 9 && parts[8] == blocks.size(2), "slab offsets do not match the blocks");
  Cache c{blocks.data_ptr<uint8_t>(), v_tail.data_ptr(), parts[8], {}};
  for (int i = 0; i < 8; ++i) c.o[i] = parts[i];
  return c;
}

// Q * scale quantized per (b, hq, partition): qc [B, Hq, D], qp [B, Hq, P, 3] (scale, minimum, code sum);
// the same float operations as hack.py's quantize(q.float() * scale)
template <typename T>
void quantize_q(const T* q, float scale, int64_t rows, int64_t D, int64_t pi, uint8_t* qc, float* qp) {
  const int64_t P = D / pi;
  for (int64_t i = 0; i < rows * P; ++i) {
    float x[kMaxPi];
    for (int64_t e = 0; e < pi; ++e) x[e] = to_f(q[i * pi + e]) * scale;  // stored: no fused multiply-add below
    const QParams r = quantize_row(x, pi, 255, qc + i * pi, false);
    qp[i * 3] = r.scale, qp[i * 3 + 1] = r.minimum, qp[i * 3 + 2] = static_cast<float>(r.sum);
  }
}

}  // namespace

// q: [B, Hq, D]; blocks, v_tail, parts: HackCache.kernel_args(); tables [B, W], ctx [B], slots [B] int64.
// Returns (out [B, Hq, D] in q's dtype, lse [B, Hq] float32, natural log).
std::vector<torch::Tensor> hack_decode_attention(torch::Tensor q, torch::Tensor blocks, torch::Tensor v_tail,
                                                 std::vector<int64_t> parts, torch::Tensor tables, torch::Tensor ctx,
                                                 torch::Tensor slots, double scale, int64_t bits, int64_t num_segments) {
  const Cache c = cache_ptrs(blocks, v_tail, parts);
  TORCH_CHECK(q.dim() == 3, "q: [B, Hq, D]");
  TORCH_CHECK(tables.scalar_type() == torch::kLong && ctx.scalar_type() == torch::kLong &&
              slots.scalar_type() == torch::kLong, "int64 tables, context lengths and slots");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = blocks.size(1), pi = v_tail.size(2), P = D / pi;
  TORCH_CHECK(v_tail.size(3) == D && P * pi == D && Hq % Hkv == 0, "q does not match the cache");
  TORCH_CHECK(parts[1] == pi * D * bits / 8, "bits do not match the cache's codes");
  const int64_t G = Hq / Hkv;
  TORCH_CHECK(G <= kMaxG && D <= kMaxD && pi <= kMaxPi, "head group, head dim or partition too large");
  auto tables_c = tables.contiguous(), ctx_c = ctx.contiguous(), slots_c = slots.contiguous();
  const int64_t W = tables_c.size(1);
  const int64_t* cp = ctx_c.data_ptr<int64_t>();
  const bool same = std::all_of(cp, cp + B, [&](int64_t n) { return n == cp[0]; });
  const int64_t S = num_segments > 0 ? num_segments : choose_segments(B, Hkv, W, same);
  auto qcont = q.contiguous();
  std::vector<uint8_t> qc(B * Hq * D);
  std::vector<float> qp(B * Hq * P * 3);
  dispatch(q.scalar_type(), [&](auto tag) {
    quantize_q(static_cast<const decltype(tag)*>(qcont.data_ptr()), static_cast<float>(scale), B * Hq, D, pi, qc.data(),
               qp.data());
  });
  auto opts = q.options().dtype(torch::kFloat);
  auto part = torch::empty({B, Hkv, S, G, D}, opts);
  auto plse = torch::empty({B, Hkv, S, G}, opts);
  DecodeArgs a{c, qc.data(), qp.data(), tables_c.data_ptr<int64_t>(),
               ctx_c.data_ptr<int64_t>(), slots_c.data_ptr<int64_t>(), part.data_ptr<float>(), plse.data_ptr<float>(),
               Hkv, G, D, P, pi, bits, W, S, (W + S - 1) / S};
  const bool bf16_tail = v_tail.scalar_type() == torch::kBFloat16;
  at::parallel_for(0, B * Hkv * S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (Hkv * S), h = (i / S) % Hkv, s = i % S;
      if (bf16_tail) decode_one<c10::BFloat16>(a, b, h, s);
      else decode_one<c10::Half>(a, b, h, s);
    }
  });
  if (S == 1) return {part.view({B, Hq, D}).to(q.scalar_type()), plse.view({B, Hq})};
  auto out = torch::empty({B, Hq, D}, opts);
  auto lse = torch::empty({B, Hq}, opts);
  merge_segments(part.data_ptr<float>(), plse.data_ptr<float>(), B, Hkv, S, G, D, out.data_ptr<float>(),
                 lse.data_ptr<float>());
  return {out.to(q.scalar_type()), lse};
}

// ---- writing new tokens -----------------------------------------------------------------------------

namespace {

struct Run {  // consecutive tokens [lo, hi) of one sequence in one block, from offset off0
  int64_t slot, block, lo, hi, off0;
};

std::vector<Run> find_runs(const int64_t* blocks, const int64_t* offsets, const int64_t* slots, int64_t T, int64_t pi) {
  std::vector<Run> runs;
  int64_t lo = 0;
  for (int64_t i = 1; i <= T; ++i) {
    if (i < T && slots[i] == slots[lo] && blocks[i] == blocks[lo] && offsets[i] == offsets[lo] + i - lo) continue;
    TORCH_CHECK(offsets[lo] >= 0 && offsets[lo] + (i - lo) <= pi, "token offsets run past the block");
    runs.push_back({slots[lo], blocks[lo], lo, i, offsets[lo]});
    lo = i;
  }
  std::unordered_map<int64_t, size_t> last;  // a sequence's later runs follow a completed block, from offset 0
  for (size_t r = 0; r < runs.size(); ++r) {
    auto it = last.find(runs[r].slot);
    if (it != last.end()) {
      const Run& e = runs[it->second];
      TORCH_CHECK(e.off0 + e.hi - e.lo == pi && runs[r].off0 == 0, "tokens of a sequence must be written in order");
    }
    last[runs[r].slot] = r;
  }
  return runs;
}

template <typename TIn>
void write_k(const Cache& c, const TIn* k, int64_t T, int64_t Hkv, int64_t D, int64_t pi, int bits,
             const int64_t* blocks, const int64_t* offsets) {
  const int64_t P = D / pi, M = pi * pi * bits / 8;
  at::parallel_for(0, T * Hkv * P, 64, [&](int64_t begin, int64_t end) {
    float x[kMaxPi];
    uint8_t q[kMaxPi];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / (Hkv * P), h = (i / P) % Hkv, p = i % P;
      for (int64_t e = 0; e < pi; ++e) x[e] = to_f(k[(t * Hkv + h) * D + p * pi + e]);
      const QParams qp = quantize_row(x, pi, (1 << bits) - 1, q, true);
      const int64_t bh = blocks[t] * Hkv + h, meta = p * pi + offsets[t];
      pack_row(q, pi, bits, offsets[t], c.k_codes(bh) + p * M);  // the token is row offsets[t] of matrix p
      c.k_scale(bh)[meta] = c10::Half(qp.scale);
      c.k_min(bh)[meta] = c10::Half(qp.minimum);
      c.k_sum(bh)[meta] = static_cast<int16_t>(qp.sum);
    }
  });
}

// quantize the V of a completed block: rows [0, off0) from the tail, the rest from v (rounded to T16)
template <typename TIn, typename T16>
void complete_v_block(const Cache& c, const Run& r, const TIn* v, int64_t Hkv, int64_t D, int64_t pi, int bits) {
  const T16* tail = static_cast<const T16*>(c.v_tail) + r.slot * Hkv * pi * D;
  std::vector<float> col(pi);
  uint8_t q[kMaxPi];
  for (int64_t h = 0; h < Hkv; ++h)
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t t = 0; t < pi; ++t)
        col[t] = t < r.off0 ? to_f(tail[(h * pi + t) * D + d])
                            : to_f(from_f<T16>(to_f(v[((r.lo + t - r.off0) * Hkv + h) * D + d])));
      const QParams qp = quantize_row(col.data(), pi, (1 << bits) - 1, q, true);
      const int64_t bh = r.block * Hkv + h;
      pack_row(q, pi, bits, d, c.v_codes(bh));  // channel d is row d of the block's matrix
      c.v_scale(bh)[d] = c10::Half(qp.scale);
      c.v_min(bh)[d] = c10::Half(qp.minimum);
      c.v_sum(bh)[d] = static_cast<int16_t>(qp.sum);
    }
}

template <typename TIn, typename T16>
void append_tail(const Cache& c, const Run& r, const TIn* v, int64_t Hkv, int64_t D, int64_t pi) {
  T16* tail = static_cast<T16*>(c.v_tail) + r.slot * Hkv * pi * D;
  for (int64_t t = r.lo; t < r.hi; ++t)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t d = 0; d < D; ++d) tail[(h * pi + r.off0 + t - r.lo) * D + d] = from_f<T16>(to_f(v[(t * Hkv + h) * D + d]));
}

}  // namespace

// cache_blocks, v_tail, parts: HackCache.kernel_args(); k, v: [T, Hkv, D]; blocks, offsets, slots: [T] int64.
void hack_write(torch::Tensor cache_blocks, torch::Tensor v_tail, std::vector<int64_t> parts, torch::Tensor k,
                torch::Tensor v, torch::Tensor blocks, torch::Tensor offsets, torch::Tensor slots, int64_t bits) {
  const Cache c = cache_ptrs(cache_blocks, v_tail, parts);
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(), "k, v: [T, Hkv, D]");
  auto kc = k.contiguous(), vc = v.contiguous();
  auto bl = blocks.contiguous(), of = offsets.contiguous(), sl = slots.contiguous();
  TORCH_CHECK(bl.scalar_type() == torch::kLong && of.scalar_type() == torch::kLong && sl.scalar_type() == torch::kLong,
              "int64 blocks, offsets and slots");
  const int64_t T = k.size(0), Hkv = k.size(1), D = k.size(2), pi = v_tail.size(2);
  TORCH_CHECK(cache_blocks.size(1) == Hkv && v_tail.size(3) == D && D % pi == 0, "k/v do not match the cache");
  TORCH_CHECK(parts[1] == pi * D * bits / 8 && pi <= kMaxPi, "bits do not match the cache's codes");
  const auto runs = find_runs(bl.data_ptr<int64_t>(), of.data_ptr<int64_t>(), sl.data_ptr<int64_t>(), T, pi);
  const bool bf16_tail = v_tail.scalar_type() == torch::kBFloat16;
  dispatch(k.scalar_type(), [&](auto tag) {
    using TIn = decltype(tag);
    const TIn* kp = static_cast<const TIn*>(kc.data_ptr());
    const TIn* vp = static_cast<const TIn*>(vc.data_ptr());
    write_k(c, kp, T, Hkv, D, pi, static_cast<int>(bits), bl.data_ptr<int64_t>(), of.data_ptr<int64_t>());
    auto v_runs = [&](auto t16) {
      using T16 = decltype(t16);
      // completed blocks first (they read the tail), then the open ones (they write it)
      at::parallel_for(0, static_cast<int64_t>(runs.size()), 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i)
          if (runs[i].off0 + runs[i].hi - runs[i].lo == pi)
            complete_v_block<TIn, T16>(c, runs[i], vp, Hkv, D, pi, static_cast<int>(bits));
      });
      for (const Run& r : runs)
        if (r.off0 + r.hi - r.lo < pi) append_tail<TIn, T16>(c, r, vp, Hkv, D, pi);
    };
    if (bf16_tail) v_runs(c10::BFloat16{});
    else v_runs(c10::Half{});
  });
}

std::string isa() { return g_isa.name; }

std::vector<std::string> isas() {  // those this CPU can run, best first
  std::vector<std::string> names;
  if (has_avx512_vnni()) names.push_back("avx512");
  if (has_avx2()) names.push_back("avx2");
  names.push_back("generic");
  return names;
}

void set_isa(const std::string& name) { g_isa = pick_isa(name); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hack_decode_attention", &hack_decode_attention, "HACK decode attention on 2/4/8-bit codes");
  m.def("hack_write", &hack_write, "quantize new K/V tokens into a HACK cache");
  m.def("isa", &isa, "instruction set of the integer kernels in use");
  m.def("isas", &isas, "instruction sets this CPU can run, best first");
  m.def("set_isa", &set_isa, "choose the integer kernels: 'auto', 'avx512', 'avx2' or 'generic' (tests)");
}
