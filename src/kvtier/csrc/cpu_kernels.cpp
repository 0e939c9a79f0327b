// kvtier CPU kernels: paged decode attention, KV cache writes, RMSNorm, RoPE, SiLU-and-mul.
//
// Portable C++ that the compiler vectorizes; hot loops are compiled once per instruction set
// (target_clones: AVX-512, AVX2+FMA, baseline) and the CPU picks its clone at load time, so one
// build runs on any x86-64. Threads come from ATen's pool (at::parallel_for).
//
// Cache layout (one layer): k_cache, v_cache: [num_blocks, Hkv, block_size, D].

#include "common.h"
#include "vec.h"

#include <numeric>
#include <string>

namespace {

using namespace kvtier;

// ---- paged decode attention -------------------------------------------------------------------

struct DecodeArgs {
  const float* q;            // [B, Hq, D] fp32, not scaled
  const void* k;             // [NB, Hkv, bs, D]
  const void* v;
  const int64_t* tables;     // [B, W]
  const int64_t* ctx;        // [B]
  float* out;                // [B, Hkv, S, G, D] partial outputs (normalized)
  float* lse;                // [B, Hkv, S, G]
  float* blse;               // [B, Hq, W] log-sum-exp of each block's scores, or null
  int64_t Hkv, G, D, bs, W, S, seg_blocks;
  float scale;
};

constexpr int kMaxG = 16;   // query heads per KV head handled in one pass
constexpr int kMaxD = 256;
constexpr int kMaxBS = 64;

// One (sequence, KV head, segment): online softmax over the segment's blocks.
// Online softmax over n new scores of one query: sc[t] becomes exp(sc[t] - max), the running max m
// and sum l are updated, the block's log-sum-exp goes to *blse (if given); returns the factor
// exp(old max - new max) that the output accumulator must be scaled by.
__attribute__((always_inline)) inline float softmax_update(float* sc, int64_t n, float& m, float& l, float* blse) {
  float mx = m;
#pragma omp simd reduction(max : mx)
  for (int64_t t = 0; t < n; ++t) mx = mx > sc[t] ? mx : sc[t];  // std::max does not vectorize
  const float alpha = fast_exp(m - mx);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) {
    sc[t] = fast_exp(sc[t] - mx);
    sum += sc[t];
  }
  l = l * alpha + sum;
  if (blse) *blse = mx + std::log(sum);
  m = mx;
  return alpha;
}

template <typename T>
KV_CLONES void decode_one(const DecodeArgs& a, int64_t b, int64_t h, int64_t s) {
  const int64_t G = a.G, D = a.D, bs = a.bs;
  const int64_t ctx = a.ctx[b];
  const int64_t nblocks = (ctx + bs - 1) / bs;
  const int64_t j0 = s * a.seg_blocks, j1 = std::min(nblocks, j0 + a.seg_blocks);
  float acc[kMaxG][kMaxD];
  float m[kMaxG], l[kMaxG];
  float sc[kMaxG][kMaxBS];
  for (int64_t g = 0; g < G; ++g) {
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.f;
    for (int64_t d = 0; d < D; ++d) acc[g][d] = 0.f;
  }
  float q[kMaxG * kMaxD];
  for (int64_t i = 0; i < G * D; ++i) q[i] = a.q[(b * a.Hkv + h) * G * D + i] * a.scale;
  const T* kbase = static_cast<const T*>(a.k);
  const T* vbase = static_cast<const T*>(a.v);
  const int64_t line = 64 / sizeof(T);
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t blk = a.tables[b * a.W + j];
    const int64_t n = std::min(bs, ctx - j * bs);
    const T* kb = kbase + (blk * a.Hkv + h) * bs * D;
    const T* vb = vbase + (blk * a.Hkv + h) * bs * D;
    if (j + 1 < j1) {  // blocks are scattered: fetch the next one while this one is computed
      const int64_t next = (a.tables[b * a.W + j + 1] * a.Hkv + h) * bs * D;
      const int64_t n_next = std::min(bs, ctx - (j + 1) * bs) * D;
      for (int64_t e = 0; e < n_next; e += line) {
        __builtin_prefetch(kbase + next + e);
        __builtin_prefetch(vbase + next + e);
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      const T* kt = kb + t * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + g * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qg[d] * to_f(kt[d]);
        sc[g][t] = dot;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float* blse = a.blse ? a.blse + ((b * a.Hkv + h) * G + g) * a.W + j : nullptr;
      const float alpha = softmax_update(sc[g], n, m[g], l[g], blse);
      float* ag = acc[g];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] *= alpha;
      for (int64_t t = 0; t < n; ++t) {
        const T* vt = vb + t * D;
        const float p = sc[g][t];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] += p * to_f(vt[d]);
      }
    }
  }
  const int64_t base = ((b * a.Hkv + h) * a.S + s) * G;
  for (int64_t g = 0; g < G; ++g) {
    float* o = a.out + (base + g) * D;
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int64_t d = 0; d < D; ++d) o[d] = acc[g][d] * inv;
    a.lse[base + g] = l[g] > 0.f ? m[g] + std::log(l[g]) : -std::numeric_limits<float>::infinity();
  }
}

// The G queries of one (sequence, KV head), scaled, in the order the rows are read in: as they are (InOrder),
// or deinterleaved per 16 elements as load16 reads bfloat16 and float16 rows (a dot product is unchanged if q
// is permuted alike).
template <bool InOrder, int NV>
inline void load_queries(const float* q, int64_t G, float scale, float* qs) {
  constexpr int D = 8 * NV;
  const v8i ev = {0, 2, 4, 6, 8, 10, 12, 14}, od = {1, 3, 5, 7, 9, 11, 13, 15};
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < NV / 2; ++c) {
      const v8f x = load8(q + g * D + 16 * c) * splat8(scale), y = load8(q + g * D + 16 * c + 8) * splat8(scale);
      const bool same = InOrder;
      store8(qs + g * D + 16 * c, same ? x : __builtin_shuffle(x, y, ev));
      store8(qs + g * D + 16 * c + 8, same ? y : __builtin_shuffle(x, y, od));
    }
}

// acc * inv back in the natural element order (the inverse of load_queries' permutation)
template <bool InOrder, int NV>
inline void store_row(float* out, const v8f* acc, v8f inv) {
  const v8i lo = {0, 8, 1, 9, 2, 10, 3, 11}, hi = {4, 12, 5, 13, 6, 14, 7, 15};
  for (int c = 0; c < NV / 2; ++c) {
    const v8f x = acc[2 * c] * inv, y = acc[2 * c + 1] * inv;
    const bool same = InOrder;
    store8(out + 16 * c, same ? x : __builtin_shuffle(x, y, lo));
    store8(out + 16 * c + 8, same ? y : __builtin_shuffle(x, y, hi));
  }
}

// ---- decode attention with head_dim = 8 * NV and block_size a multiple of 8 ------------------------------
//
// Blocks are taken in chunks of up to kChunkTokens tokens: scores of the chunk, one online-softmax step
// over it, then P.V. Each K or V row is widened once for a group of query heads (GQA), so its loads
// and conversions are shared, and the accumulators stay in registers. Groups are sized so that at least
// eight independent FMA chains are in flight (an FMA's latency is four cycles, two issue per cycle) and
// everything fits in 16 vector registers: scores of 3 or 2 heads x 4 rows, or 1 head x 8 rows; P.V of
// 4 or 3 heads x 16 elements, 2 heads x 32 or 1 head x 64. Rows past a context are read (within their
// block) and their scores dropped. q arrives, and the output leaves, in the order load16 reads rows in.
//
// Each phase prefetches what the next one reads, one cache line per row it reads itself, so the
// requests spread over the compute: the scores of a block fetch its V rows, the P.V of a block the K
// rows of the block one chunk ahead, and the P.V of an item's last chunk the K rows of the first chunk
// of the thread's next item (a short context is only a few chunks: each would start on a stall). Every
// block is fetched, also one that follows its predecessor in memory: the hardware prefetchers, whose
// misses the fetched lines no longer train, did not keep up (engine-like step, 32 x 264 tokens, 30
// layers, Zen 5: 1.10x in float32 with every block, 1.07x more from the next item's).

constexpr int kChunkTokens = 64;    // tokens per online-softmax step

// sums of the lanes of a0..a3 -> out[0..4)
inline void reduce4_store(v8f a0, v8f a1, v8f a2, v8f a3, float* out) {
  const v8i ev = {0, 2, 8, 10, 4, 6, 12, 14}, od = {1, 3, 9, 11, 5, 7, 13, 15};
  const v8f t0 = __builtin_shuffle(a0, a1, ev) + __builtin_shuffle(a0, a1, od);
  const v8f t1 = __builtin_shuffle(a2, a3, ev) + __builtin_shuffle(a2, a3, od);
  v8f u = __builtin_shuffle(t0, t1, ev) + __builtin_shuffle(t0, t1, od);
  u += __builtin_shuffle(u, v8i{4, 5, 6, 7, 0, 1, 2, 3});
  std::memcpy(out, &u, 4 * sizeof(float));
}

// scores of GB heads (queries qs[g * D]) against rows k[0..U): sc[g * ld + u]; U is 4 or 8.
// pf (or null): U rows laid out as k's, prefetched
template <typename T, int NV, int GB, int U>
__attribute__((always_inline)) inline void scores_rows(const float* qs, const T* k, float* sc, int64_t ld,
                                                       const T* pf) {
  constexpr int D = 8 * NV;
  v8f d[GB][U];
  for (int g = 0; g < GB; ++g)
    for (int u = 0; u < U; ++u) d[g][u] = splat8(0.f);
  for (int c = 0; c < NV / 2; ++c)
    for (int u = 0; u < U; ++u) {
      if (pf && 16 * c * sizeof(T) % 64 == 0) __builtin_prefetch(pf + u * D + 16 * c);  // a line's first step
      v8f x, y;
      load16(k + u * D + 16 * c, x, y);
      for (int g = 0; g < GB; ++g) {
        d[g][u] += load8(qs + g * D + 16 * c) * x;
        d[g][u] += load8(qs + g * D + 16 * c + 8) * y;
      }
    }
  for (int g = 0; g < GB; ++g) {
    if constexpr (U == 8) store8(sc + g * ld, reduce8(d[g][0], d[g][1], d[g][2], d[g][3], d[g][4], d[g][5], d[g][6], d[g][7]));
    else reduce4_store(d[g][0], d[g][1], d[g][2], d[g][3], sc + g * ld);
  }
}

// acc[g] += sum over rows t < n of p[g * ld + t] v[t], GB heads, VC vectors (VC / 2 load16) per pass.
// pf (or null): n rows laid out as vb's, prefetched
template <typename T, int NV, int GB, int VC>
__attribute__((always_inline)) inline void pv_rows(v8f (*acc)[NV], const float* p, int64_t ld, const T* vb,
                                                   int64_t n, const T* pf) {
  constexpr int D = 8 * NV;
  for (int c0 = 0; c0 < NV; c0 += VC) {
    v8f o[GB][VC];
    for (int g = 0; g < GB; ++g)
      for (int v = 0; v < VC; ++v) o[g][v] = acc[g][c0 + v];
    for (int64_t t = 0; t < n; ++t)
      for (int v = 0; v < VC; v += 2) {
        if (pf && 8 * (c0 + v) * sizeof(T) % 64 == 0) __builtin_prefetch(pf + t * D + 8 * (c0 + v));
        v8f x, y;
        load16(vb + t * D + 8 * (c0 + v), x, y);
        for (int g = 0; g < GB; ++g) {  // vector * scalar: one broadcast from memory
          o[g][v] += x * p[g * ld + t];
          o[g][v + 1] += y * p[g * ld + t];
        }
      }
    for (int g = 0; g < GB; ++g)
      for (int v = 0; v < VC; ++v) acc[g][c0 + v] = o[g][v];
  }
}

template <int N>
using Int = std::integral_constant<int, N>;

// ---- rows in order on sixteen-float vectors ----------------------------------------------------------
//
// On AVX-512 CPUs (decode_vec_wide), a float32 row is read one 64-byte line per vector: half the loads and
// FMAs of the eight-float passes, whose compute (3.8 ms of 8.4 at B=32 x 8192 on Zen 5) did not hide under
// the memory reads. bfloat16 rows take the same passes, widened 16 elements at a time by one zero-extension
// and a shift, and float16 rows (HalfF16C) by one conversion.

typedef float v16f __attribute__((vector_size(64)));
typedef short v16s __attribute__((vector_size(32)));

inline v16f load16f(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

#ifdef KV_X86_BUILTINS
__attribute__((always_inline)) inline v16f load16f(const HalfF16C* p) {  // AVX-512 code only (see HalfF16C)
  v16s h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_ia32_vcvtph2ps512_mask(h, v16f{}, -1, 4);  // 4: the current rounding mode
}
#endif

typedef uint16_t v16u16 __attribute__((vector_size(32)));
typedef int32_t v16i __attribute__((vector_size(64)));

// bfloat16 is the top half of a float32. always_inline: the builtin compiles only inside AVX-512 code.
__attribute__((always_inline)) inline v16f load16f(const c10::BFloat16* p) {
  v16u16 h;
  std::memcpy(&h, p, sizeof(h));
#ifdef KV_X86_BUILTINS  // one zero-extension (GCC splits the portable form below in halves)
  const v16i w = __builtin_ia32_pmovzxwd512_mask((v16s)h, v16i{}, -1) << 16;
#else
  const v16i w = __builtin_convertvector(h, v16i) << 16;
#endif
  v16f v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

inline void store16f(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }

inline v8f fold16(v16f a) {  // lane i + lane i + 8
  return __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
}

// scores_rows on rows in order, 16 elements per load; pf as there
template <typename T, int NV, int GB, int U>
__attribute__((always_inline)) inline void scores_rows16(const float* qs, const T* k, float* sc, int64_t ld,
                                                         const T* pf) {
  constexpr int D = 8 * NV;
  v16f d[GB][U];
  for (int g = 0; g < GB; ++g)
    for (int u = 0; u < U; ++u) d[g][u] = v16f{};
  for (int c = 0; c < NV / 2; ++c)
    for (int u = 0; u < U; ++u) {
      if (pf && 16 * c * sizeof(T) % 64 == 0) __builtin_prefetch(pf + u * D + 16 * c);  // a line's first step
      const v16f x = load16f(k + u * D + 16 * c);
      for (int g = 0; g < GB; ++g) d[g][u] += load16f(qs + g * D + 16 * c) * x;
    }
  for (int g = 0; g < GB; ++g) {
    v8f f[U];
    for (int u = 0; u < U; ++u) f[u] = fold16(d[g][u]);
    if constexpr (U == 8) store8(sc + g * ld, reduce8(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]));
    else reduce4_store(f[0], f[1], f[2], f[3], sc + g * ld);
  }
}

// pv_rows on rows in order: acc[g * D + d] += sum over t < n of p[g * ld + t] vb[t * D + d], GB heads, NW
// vectors (16 elements each) of a row per pass; pf as there
template <typename T, int NV, int GB, int NW>
__attribute__((always_inline)) inline void pv_rows16(float* acc, const float* p, int64_t ld, const T* vb,
                                                     int64_t n, const T* pf) {
  constexpr int D = 8 * NV;
  static_assert((D / 16) % NW == 0, "a pass covers whole vectors of the row");
  for (int c0 = 0; c0 < D; c0 += 16 * NW) {
    v16f o[GB][NW];
    for (int g = 0; g < GB; ++g)
      for (int w = 0; w < NW; ++w) o[g][w] = load16f(acc + g * D + c0 + 16 * w);
    for (int64_t t = 0; t < n; ++t)
      for (int w = 0; w < NW; ++w) {
        if (pf && (c0 + 16 * w) * sizeof(T) % 64 == 0) __builtin_prefetch(pf + t * D + c0 + 16 * w);
        const v16f x = load16f(vb + t * D + c0 + 16 * w);
        for (int g = 0; g < GB; ++g) o[g][w] += x * p[g * ld + t];
      }
    for (int g = 0; g < GB; ++g)
      for (int w = 0; w < NW; ++w) store16f(acc + g * D + c0 + 16 * w, o[g][w]);
  }
}

// P.V passes of pv_rows16 over G heads: f(g0, heads, vectors per pass), at most 16 accumulators
template <int NV, typename F>
__attribute__((always_inline)) inline void pv_groups16(int64_t G, F&& f) {
  constexpr int L = NV / 2;  // sixteen-float vectors per row
  constexpr int N4 = L < 4 ? L : 4, N8 = L < 8 ? L : 8;
  int64_t g = 0;
  for (; G - g >= 4; g += 4) f(g, Int<4>{}, Int<N4>{});
  if (G - g == 3) f(g, Int<3>{}, Int<N4>{});
  else if (G - g == 2) f(g, Int<2>{}, Int<N8>{});
  else if (G - g == 1) f(g, Int<1>{}, Int<N8>{});
}

// Score passes over G heads: f(g0, heads, rows per call)
template <typename F>
__attribute__((always_inline)) inline void score_groups(int64_t G, F&& f) {
  int64_t g = 0;
  for (; G - g >= 5 || G - g == 3; g += 3) f(g, Int<3>{}, Int<4>{});
  for (; G - g >= 2; g += 2) f(g, Int<2>{}, Int<4>{});
  if (G - g == 1) f(g, Int<1>{}, Int<8>{});
}

// P.V passes over G heads: f(g0, heads, vectors per pass)
template <typename F>
__attribute__((always_inline)) inline void pv_groups(int64_t G, F&& f) {
  int64_t g = 0;
  for (; G - g >= 4; g += 4) f(g, Int<4>{}, Int<2>{});
  if (G - g == 3) f(g, Int<3>{}, Int<2>{});
  else if (G - g == 2) f(g, Int<2>{}, Int<4>{});
  else if (G - g == 1) f(g, Int<1>{}, Int<8>{});
}

// One online-softmax step over a chunk of nb blocks (sc: the chunk's scores, block i at i * bs, the last
// block holding n_last): sc becomes exp(sc - max), zero past n_last; blse[i] per block if given.
__attribute__((always_inline)) inline float softmax_chunk(float* sc, int64_t nb, int64_t bs, int64_t n_last,
                                                          float& m, float& l, float* blse) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t ntok = (nb - 1) * bs + n_last, n8 = (ntok + 7) & ~int64_t{7};
  for (int64_t t = ntok; t < n8; ++t) sc[t] = ninf;
  v8f vmx = splat8(m);
  for (int64_t t = 0; t < n8; t += 8) vmx = max8(vmx, load8(sc + t));
  const float mx = hmax8(vmx);
  const float alpha = fast_exp(m - mx);
  float total = 0.f;
  for (int64_t i = 0; i < nb; ++i) {
    v8f sum = splat8(0.f);
    for (int64_t t = i * bs; t < std::min(n8, (i + 1) * bs); t += 8) {
      const v8f x = load8(sc + t);
      const v8f e = x == splat8(ninf) ? splat8(0.f) : exp8(x - splat8(mx));  // padding counts zero
      store8(sc + t, e);
      sum += e;
    }
    const float bsum = hsum8(sum);
    total += bsum;
    if (blse) blse[i] = mx + std::log(bsum);
  }
  l = l * alpha + total;
  m = mx;
  return alpha;
}

// n floats on a 64-byte boundary (std::vector of vector types does not promise their alignment)
struct AlignedFloats {
  float* p;
  explicit AlignedFloats(int64_t n) : p(static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64))) {
    TORCH_CHECK(p != nullptr, "out of memory");
  }
  ~AlignedFloats() { std::free(p); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
};

// Blocks [j0, j1) of work item `item` (one segment of one sequence)
struct ItemBlocks {
  const int64_t* table;
  int64_t j0, j1;
};

inline ItemBlocks item_blocks(const DecodeArgs& a, int64_t item) {
  const int64_t b = item / a.S, s = item % a.S;
  const int64_t nblocks = (a.ctx[b] + a.bs - 1) / a.bs;
  return {a.tables + b * a.W, s * a.seg_blocks, std::min(nblocks, (s + 1) * a.seg_blocks)};
}

// One segment of one sequence, all KV heads: a block's K (and V) of every head is one contiguous
// [Hkv, bs, D] slab, so the reads stream through memory (per-head items would jump between 2 KB pieces
// and defeat the hardware prefetchers). Per-head state (accumulators, max, sum) lives across chunks.
// next: the item this thread computes next (its first blocks are prefetched), or -1.
template <typename T, int NV, bool Wide>
__attribute__((always_inline)) inline void decode_vec_body(const DecodeArgs& a, int64_t item, int64_t next) {
  constexpr bool InOrder = Wide || !kDeinterleaved<T>;  // the order rows (and so q and acc) are read in
  constexpr int D = 8 * NV;
  const int64_t b = item / a.S, s = item % a.S;
  const int64_t G = a.G, Hkv = a.Hkv, Hq = Hkv * G, bs = a.bs, ctx = a.ctx[b];
  const ItemBlocks mine = item_blocks(a, item);
  const int64_t* table = mine.table;
  const int64_t j0 = mine.j0, j1 = mine.j1;
  const ItemBlocks after = next >= 0 ? item_blocks(a, next) : ItemBlocks{nullptr, 0, 0};
  const int64_t chunk = std::max<int64_t>(1, kChunkTokens / bs);  // blocks per softmax step
  constexpr int64_t ld = kChunkTokens + 8;  // score row stride
  AlignedFloats accs(Hq * D), qs(Hq * D);  // accumulators [Hq][NV] vectors, queries [Hq, D]
  std::vector<float> m(Hq, -std::numeric_limits<float>::infinity()), l(Hq, 0.f);
  AlignedFloats scores(Hq * ld);  // [Hq, ld]: the chunk's scores, then probabilities
  float* sc = scores.p;
  auto acc = reinterpret_cast<v8f(*)[NV]>(accs.p);
  for (int64_t q = 0; q < Hq; ++q)
    for (int v = 0; v < NV; ++v) acc[q][v] = splat8(0.f);
  for (int64_t h = 0; h < Hkv; ++h)
    load_queries<InOrder, NV>(a.q + (b * Hkv + h) * G * D, G, a.scale, qs.p + h * G * D);
  const T* kbase = static_cast<const T*>(a.k);
  const T* vbase = static_cast<const T*>(a.v);
  const int64_t slab = Hkv * bs * D;  // one block, all heads
  auto block_at = [&](int64_t j) { return table[j] * slab; };
  // the K slab to prefetch while block j - chunk (i-th of its chunk) is in P.V, or null
  auto k_ahead = [&](int64_t j, int64_t i) -> const T* {
    if (j < j1) return kbase + block_at(j);
    const int64_t jn = after.j0 + i;
    return jn < after.j1 ? kbase + after.table[jn] * slab : nullptr;
  };
  for (int64_t c0 = j0; c0 < j1; c0 += chunk) {  // blocks and heads in memory order: the reads stream
    const int64_t nb = std::min(chunk, j1 - c0);
    const int64_t n_last = std::min(bs, ctx - (c0 + nb - 1) * bs);
    for (int64_t i = 0; i < nb; ++i) {  // scores
      const int64_t n = i + 1 < nb ? bs : n_last;
      for (int64_t h = 0; h < Hkv; ++h) {
        const T* kb = kbase + block_at(c0 + i) + h * bs * D;
        const T* vb = vbase + block_at(c0 + i) + h * bs * D;
        score_groups(G, [&](int64_t g0, auto gb, auto rows) {
          const int64_t q = h * G + g0;
          constexpr int GB = decltype(gb)::value, U = decltype(rows)::value;
          for (int64_t t0 = 0; t0 < n; t0 += rows) {
            const T* pf = g0 == 0 ? vb + t0 * D : nullptr;
            float* out = sc + q * ld + i * bs + t0;
            if constexpr (Wide) scores_rows16<T, NV, GB, U>(qs.p + q * D, kb + t0 * D, out, ld, pf);
            else scores_rows<T, NV, GB, U>(qs.p + q * D, kb + t0 * D, out, ld, pf);
          }
        });
      }
    }
    for (int64_t q = 0; q < Hq; ++q) {
      float* blse = a.blse ? a.blse + (b * Hq + q) * a.W + c0 : nullptr;
      const float alpha = softmax_chunk(sc + q * ld, nb, bs, n_last, m[q], l[q], blse);
      for (int v = 0; v < NV; ++v) acc[q][v] *= splat8(alpha);
    }
    for (int64_t i = 0; i < nb; ++i) {  // P.V
      const int64_t n = i + 1 < nb ? bs : n_last;
      const T* ka = k_ahead(c0 + nb + i, i);  // full blocks: n == bs whenever a block ahead exists
      for (int64_t h = 0; h < Hkv; ++h) {
        const T* vb = vbase + block_at(c0 + i) + h * bs * D;
        const T* kb = ka ? ka + h * bs * D : nullptr;
        if constexpr (Wide)
          pv_groups16<NV>(G, [&](int64_t g0, auto gb, auto nw) {
            const int64_t q = h * G + g0;
            pv_rows16<T, NV, decltype(gb)::value, decltype(nw)::value>(accs.p + q * D, sc + q * ld + i * bs, ld, vb,
                                                                       n, g0 == 0 ? kb : nullptr);
          });
        else
          pv_groups(G, [&](int64_t g0, auto gb, auto vc) {
            const int64_t q = h * G + g0;
            pv_rows<T, NV, decltype(gb)::value, decltype(vc)::value>(acc + q, sc + q * ld + i * bs, ld, vb, n,
                                                                     g0 == 0 ? kb : nullptr);
          });
      }
    }
  }
  for (int64_t q = 0; q < Hq; ++q) {
    const int64_t h = q / G, g = q % G, at = ((b * Hkv + h) * a.S + s) * G + g;
    store_row<InOrder, NV>(a.out + at * D, acc[q], splat8(l[q] > 0.f ? 1.f / l[q] : 0.f));
    a.lse[at] = l[q] > 0.f ? m[q] + std::log(l[q]) : -std::numeric_limits<float>::infinity();
  }
}

template <typename T, int NV>
KV_CLONES void decode_vec(const DecodeArgs& a, int64_t item, int64_t next) {
  decode_vec_body<T, NV, false>(a, item, next);
}

#ifdef KV_X86
// decode_vec on the sixteen-float passes (float32, bfloat16, or float16 through F16C), compiled for AVX-512
// alone and picked where the CPU has it
template <typename T, int NV>
__attribute__((target("arch=x86-64-v4"))) void decode_vec_wide(const DecodeArgs& a, int64_t item, int64_t next) {
  decode_vec_body<T, NV, true>(a, item, next);
}
#endif

#ifdef KV_X86_BUILTINS
// decode_vec on float16 rows through F16C on the eight-float passes, compiled for AVX2 (see HalfF16C)
template <int NV>
__attribute__((target("arch=x86-64-v3"))) void decode_vec_f16c(const DecodeArgs& a, int64_t item, int64_t next) {
  decode_vec_body<HalfF16C, NV, false>(a, item, next);
}
#endif

// decode_vec for head_dim 64 or 128; wide: the sixteen-float passes
template <typename T>
void decode_rows(const DecodeArgs& a, int64_t item, int64_t next, bool wide) {
#ifdef KV_X86
  if constexpr (!std::is_same_v<T, c10::Half>)  // float16 widened in integer ops has eight-float passes only
    if (wide) return a.D == 64 ? decode_vec_wide<T, 8>(a, item, next) : decode_vec_wide<T, 16>(a, item, next);
#endif
#ifdef KV_X86_BUILTINS
  if constexpr (std::is_same_v<T, HalfF16C>) {
    a.D == 64 ? decode_vec_f16c<8>(a, item, next) : decode_vec_f16c<16>(a, item, next);
    return;
  } else
#endif
  a.D == 64 ? decode_vec<T, 8>(a, item, next) : decode_vec<T, 16>(a, item, next);
}

// Which decode passes run: the sixteen-float ones (AVX-512) and F16C's float16 widening (AVX2 and up). The
// CPU's best by default; tests pick each in turn.
struct DecodeIsa {
  const char* name;
  bool wide, f16c;
};

DecodeIsa pick_decode_isa(const std::string& name) {
  if ((name == "auto" || name == "avx512") && has_avx512()) return {"avx512", true, true};
  if ((name == "auto" || name == "avx2") && has_avx2()) return {"avx2", false, true};
  TORCH_CHECK(name == "auto" || name == "generic", "instruction set '", name, "' is not available on this CPU");
  return {"generic", false, false};
}

DecodeIsa g_decode_isa = pick_decode_isa("auto");

// one work item: one segment of one sequence, all KV heads; next: see decode_vec
template <typename T>
void decode_item(const DecodeArgs& a, int64_t item, int64_t next) {
  if (a.bs % 8 != 0 || (a.D != 64 && a.D != 128)) {
    for (int64_t h = 0; h < a.Hkv; ++h) decode_one<T>(a, item / a.S, h, item % a.S);
    return;
  }
  const DecodeIsa isa = g_decode_isa;
#ifdef KV_X86_BUILTINS
  if constexpr (std::is_same_v<T, c10::Half>)
    if (isa.f16c) return decode_rows<HalfF16C>(a, item, next, isa.wide);
#endif
  decode_rows<T>(a, item, next, isa.wide);
}

constexpr int64_t kSerialWork = 2048;  // (token, KV head) pairs below which one thread beats waking others

// Segments per sequence: enough work items to balance the threads (several per thread, since contexts
// differ), each of at least 4 blocks (merging has a cost); one when the step is small.
int64_t choose_segments(int64_t B, int64_t max_blocks, int64_t work) {
  const int64_t threads = at::get_num_threads();
  if (work < kSerialWork || threads == 1) return 1;
  const int64_t S = std::min((8 * threads + B - 1) / B, max_blocks / 4);
  return std::max<int64_t>(1, S);
}

}  // namespace

// q: [B, Hq, D]; caches [NB, Hkv, bs, D]; tables [B, W] int64; ctx [B] int64.
// Returns (out [B, Hq, D] in q's dtype, lse [B, Hq] fp32, natural log, and with block_lse the
// log-sum-exp of each block's scores [B, Hq, W], -inf past a context: exp(block_lse - lse) is the
// attention mass of the block).
std::vector<torch::Tensor> paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                                  torch::Tensor tables, torch::Tensor ctx, double scale,
                                                  int64_t num_segments, bool block_lse) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B,Hq,D], cache [NB,Hkv,bs,D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches differ in dtype");
  TORCH_CHECK(tables.scalar_type() == torch::kLong && ctx.scalar_type() == torch::kLong, "int64 tables");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(Hq % Hkv == 0, "query heads must be a multiple of KV heads");
  const int64_t G = Hq / Hkv;
  TORCH_CHECK(G <= kMaxG && D <= kMaxD && bs <= kMaxBS, "head group, head dim or block size too large");
  auto tables_c = tables.contiguous();
  auto ctx_c = ctx.contiguous();
  const int64_t W = tables_c.size(1);
  const int64_t* cp = ctx_c.data_ptr<int64_t>();
  const int64_t work = Hkv * std::accumulate(cp, cp + B, int64_t{0});
  const int64_t S = num_segments > 0 ? num_segments : choose_segments(B, W, work);
  const int64_t seg_blocks = (W + S - 1) / S;
  auto qf = q.to(torch::kFloat).contiguous();
  auto opts = q.options().dtype(torch::kFloat);
  auto part = S == 1 ? torch::empty({B, Hq, D}, opts) : torch::empty({B, Hkv, S, G, D}, opts);
  auto plse = S == 1 ? torch::empty({B, Hq}, opts) : torch::empty({B, Hkv, S, G}, opts);
  auto blse = block_lse ? torch::full({B, Hq, W}, -std::numeric_limits<float>::infinity(), opts) : torch::Tensor();
  DecodeArgs a{qf.data_ptr<float>(), k_cache.data_ptr(), v_cache.data_ptr(), tables_c.data_ptr<int64_t>(),
               cp, part.data_ptr<float>(), plse.data_ptr<float>(), block_lse ? blse.data_ptr<float>() : nullptr,
               Hkv, G, D, bs, W, S, seg_blocks, static_cast<float>(scale)};
  const auto dtype = k_cache.scalar_type();
  const int64_t items = B * S;
  at::parallel_for(0, items, work < kSerialWork ? items : 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t next = i + 1 < end ? i + 1 : -1;
      if (dtype == torch::kFloat) decode_item<float>(a, i, next);
      else if (dtype == torch::kBFloat16) decode_item<c10::BFloat16>(a, i, next);
      else decode_item<c10::Half>(a, i, next);
    }
  });
  torch::Tensor out = part, lse = plse;
  if (S > 1) {
    out = torch::empty({B, Hq, D}, opts);
    lse = torch::empty({B, Hq}, opts);
    merge_segments(part.data_ptr<float>(), plse.data_ptr<float>(), B, Hkv, S, G, D, out.data_ptr<float>(),
                   lse.data_ptr<float>());
  }
  if (block_lse) return {out.to(q.scalar_type()), lse, blse};
  return {out.to(q.scalar_type()), lse};
}

// ---- KV cache write -----------------------------------------------------------------------------

// k, v: [T, Hkv, D] (any strides along T and heads, unit stride along D), in the cache's dtype or float32
// (rounded to the cache's dtype as it is written, as Tensor.to rounds); blocks, offsets: [T].
template <typename T>
void write_rows(T* cache, const torch::Tensor& x, const int64_t* bp, const int64_t* op, int64_t Hkv, int64_t bs) {
  const int64_t rows = x.size(0) * Hkv, D = x.size(2);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / Hkv, h = i % Hkv;
      T* dst = cache + ((bp[t] * Hkv + h) * bs + op[t]) * D;
      const int64_t src = t * x.stride(0) + h * x.stride(1);
      if (x.scalar_type() == c10::CppTypeToScalarType<T>::value) {
        std::memcpy(dst, x.data_ptr<T>() + src, D * sizeof(T));
      } else {
        const float* xs = x.data_ptr<float>() + src;
        for (int64_t d = 0; d < D; ++d) dst[d] = from_f<T>(xs[d]);
      }
    }
  });
}

void write_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
              torch::Tensor blocks, torch::Tensor offsets) {
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "k and v need unit stride along head_dim");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() && k.scalar_type() == v.scalar_type(), "dtypes");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() || k.scalar_type() == torch::kFloat,
              "k/v must be float32 or the cache's dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k.sizes() == v.sizes(), "shapes");
  TORCH_CHECK(blocks.scalar_type() == torch::kLong && offsets.scalar_type() == torch::kLong, "int64 slots");
  const int64_t Hkv = k.size(1), bs = k_cache.size(2);
  auto bl = blocks.contiguous(), of = offsets.contiguous();
  const int64_t* bp = bl.data_ptr<int64_t>();
  const int64_t* op = of.data_ptr<int64_t>();
  dispatch(k_cache.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    write_rows<T>(k_cache.data_ptr<T>(), k, bp, op, Hkv, bs);
    write_rows<T>(v_cache.data_ptr<T>(), v, bp, op, Hkv, bs);
  });
}

// ---- RMSNorm, residual add, RoPE, SiLU-and-mul --------------------------------------------------

namespace {

template <typename T>
KV_CLONES void rms_row(const T* x, const T* w, T* y, int64_t H, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < H; ++i) {
    const float f = to_f(x[i]);
    ss += f * f;
  }
  const float r = 1.f / std::sqrt(ss / H + eps);
    // as HF: normalize in fp32, round to the model dtype, then scale by the weight
  for (int64_t i = 0; i < H; ++i) y[i] = from_f<T>(to_f(w[i]) * to_f(from_f<T>(to_f(x[i]) * r)));
}

template <typename T>
KV_CLONES void add_row(T* h, const T* x, int64_t H) {
  for (int64_t i = 0; i < H; ++i) h[i] = from_f<T>(to_f(h[i]) + to_f(x[i]));
}

template <typename T>
KV_CLONES void rope_row(T* x, const T* cos, const T* sin_signed, int64_t heads, int64_t head_stride, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t hh = 0; hh < heads; ++hh) {
    T* p = x + hh * head_stride;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = to_f(p[i]), b = to_f(p[i + half]);
      p[i] = from_f<T>(a * to_f(cos[i]) + b * to_f(sin_signed[i]));
      p[i + half] = from_f<T>(b * to_f(cos[i + half]) + a * to_f(sin_signed[i + half]));
    }
  }
}

template <typename T>
KV_CLONES void silu_mul_row(const T* gu, T* y, int64_t I) {
  for (int64_t i = 0; i < I; ++i) {
    const float g = to_f(gu[i]);
    y[i] = from_f<T>(to_f(from_f<T>(g / (1.f + fast_exp(-g)))) * to_f(gu[I + i]));
  }
}

}  // namespace

// y = RMSNorm(x) * w; x: [T, H] contiguous.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && w.numel() == x.size(1) && w.is_contiguous(), "x [T, H], w [H]");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "x and w differ in dtype");
  auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t T = xc.size(0), H = xc.size(1);
  dispatch(x.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    const T_* xp = static_cast<const T_*>(xc.data_ptr());
    const T_* wp = static_cast<const T_*>(w.data_ptr());
    T_* yp = static_cast<T_*>(y.data_ptr());
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) rms_row(xp + t * H, wp, yp + t * H, H, static_cast<float>(eps));
    });
  });
  return y;
}

// h += x (in place), then return RMSNorm(h) * w; h, x: [T, H] contiguous.
torch::Tensor add_rms_norm(torch::Tensor h, torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(h.is_contiguous() && h.dim() == 2 && x.sizes() == h.sizes(), "h, x: [T, H], h contiguous");
  TORCH_CHECK(w.numel() == h.size(1) && w.is_contiguous() && w.scalar_type() == h.scalar_type(), "w: [H]");
  auto xc = x.contiguous();
  auto y = torch::empty_like(h);
  const int64_t T = h.size(0), H = h.size(1);
  dispatch(h.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    T_* hp = static_cast<T_*>(h.data_ptr());
    const T_* xp = static_cast<const T_*>(xc.data_ptr());
    const T_* wp = static_cast<const T_*>(w.data_ptr());
    T_* yp = static_cast<T_*>(y.data_ptr());
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        add_row(hp + t * H, xp + t * H, H);
        rms_row(hp + t * H, wp, yp + t * H, H, static_cast<float>(eps));
      }
    });
  });
  return y;
}

// In place on x: [T, heads, D] with unit stride along D; cos, sin_signed: [P, D]; positions: [T].
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin_signed, torch::Tensor positions) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && cos.is_contiguous() && sin_signed.is_contiguous(), "bad strides");
  TORCH_CHECK(cos.size(1) == x.size(2) && sin_signed.sizes() == cos.sizes(), "cos/sin: [P, D]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && positions.scalar_type() == torch::kLong, "dtypes");
  const int64_t T = x.size(0), heads = x.size(1), D = x.size(2);
  auto pos = positions.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  dispatch(x.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    T_* xp = static_cast<T_*>(x.data_ptr());
    const T_* cp = static_cast<const T_*>(cos.data_ptr());
    const T_* sp = static_cast<const T_*>(sin_signed.data_ptr());
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t)
        rope_row(xp + t * x.stride(0), cp + pp[t] * D, sp + pp[t] * D, heads, x.stride(1), D);
    });
  });
}

// gate_up: [T, 2I] -> silu(gate) * up: [T, I]
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up: [T, 2I]");
  auto gu = gate_up.contiguous();
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  auto y = torch::empty({T, I}, gu.options());
  dispatch(gu.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    const T_* gp = static_cast<const T_*>(gu.data_ptr());
    T_* yp = static_cast<T_*>(y.data_ptr());
    at::parallel_for(0, T, 8, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) silu_mul_row(gp + t * 2 * I, yp + t * I, I);
    });
  });
  return y;
}

// ---- GEMV: y[1, N] = x[1, K] @ W[N, K]^T (+ b), the batch-1 decode case -------------------------
// Streams W once at the memory bandwidth; four rows at a time keep four independent accumulators.

namespace {

KV_CLONES void gemv_rows(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t n0,
                         int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* w0 = w + n * K;
    const float* w1 = w0 + K;
    const float* w2 = w1 + K;
    const float* w3 = w2 + K;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t k = 0; k < K; ++k) {
      a0 += x[k] * w0[k];
      a1 += x[k] * w1[k];
      a2 += x[k] * w2[k];
      a3 += x[k] * w3[k];
    }
    y[n] = a0; y[n + 1] = a1; y[n + 2] = a2; y[n + 3] = a3;
  }
  for (; n < n1; ++n) {
    const float* wn = w + n * K;
    float a = 0.f;
#pragma omp simd reduction(+ : a)
    for (int64_t k = 0; k < K; ++k) a += x[k] * wn[k];
    y[n] = a;
  }
  if (bias)
    for (int64_t i = n0; i < n1; ++i) y[i] += bias[i];
}

}  // namespace

torch::Tensor gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == torch::kFloat, "x: [1, K] float32");
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == torch::kFloat, "w: [N, K] contiguous float32");
  const int64_t K = x.size(1), N = w.size(0);
  auto xc = x.contiguous();
  auto y = torch::empty({1, N}, x.options());
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t groups = (N + 3) / 4;
  at::parallel_for(0, groups, 16, [&](int64_t b, int64_t e) {
    gemv_rows(xc.data_ptr<float>(), w.data_ptr<float>(), bp, y.data_ptr<float>(), K, b * 4, std::min(N, e * 4));
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "batch-1 float32 matrix-vector product");
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention with split-KV merge",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("tables"), py::arg("ctx"), py::arg("scale"),
        py::arg("num_segments") = 0, py::arg("block_lse") = false);
  m.def("decode_isa", [] { return std::string(g_decode_isa.name); }, "decode attention's passes in use");
  m.def("set_decode_isa", [](const std::string& name) { g_decode_isa = pick_decode_isa(name); },
        "choose decode attention's passes: 'auto', 'avx512', 'avx2' or 'generic' (tests)");
  m.def("write_kv", &write_kv, "write new K/V rows into their cache slots");
  m.def("rms_norm", &rms_norm, "RMSNorm");
  m.def("add_rms_norm", &add_rms_norm, "residual add in place, then RMSNorm");
  m.def("rope_", &rope_, "half-split rotary embedding in place");
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up");
}
