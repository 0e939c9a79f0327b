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

#ifndef KV_PREFETCH_AHEAD
#define KV_PREFETCH_AHEAD 2
#endif

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
constexpr int64_t kAhead = KV_PREFETCH_AHEAD;  // blocks prefetched ahead of the one being read

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

// The G queries of one (sequence, KV head), scaled, in the order load16 reads rows of T in
// (16-bit rows come deinterleaved per 16 elements: a dot product is unchanged if q is permuted alike).
template <typename T, int NV>
inline void load_queries(const float* q, int64_t G, float scale, float* qs) {
  constexpr int D = 8 * NV;
  const v8i ev = {0, 2, 4, 6, 8, 10, 12, 14}, od = {1, 3, 5, 7, 9, 11, 13, 15};
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < NV / 2; ++c) {
      const v8f x = load8(q + g * D + 16 * c) * splat8(scale), y = load8(q + g * D + 16 * c + 8) * splat8(scale);
      const bool same = std::is_same_v<T, float>;
      store8(qs + g * D + 16 * c, same ? x : __builtin_shuffle(x, y, ev));
      store8(qs + g * D + 16 * c + 8, same ? y : __builtin_shuffle(x, y, od));
    }
}

// acc * inv back in the natural element order (the inverse of load_queries' permutation)
template <typename T, int NV>
inline void store_row(float* out, const v8f* acc, v8f inv) {
  const v8i lo = {0, 8, 1, 9, 2, 10, 3, 11}, hi = {4, 12, 5, 13, 6, 14, 7, 15};
  for (int c = 0; c < NV / 2; ++c) {
    const v8f x = acc[2 * c] * inv, y = acc[2 * c + 1] * inv;
    const bool same = std::is_same_v<T, float>;
    store8(out + 16 * c, same ? x : __builtin_shuffle(x, y, lo));
    store8(out + 16 * c + 8, same ? y : __builtin_shuffle(x, y, hi));
  }
}

// Scores of one query against eight consecutive rows k[0..8) of 8 * NV elements: eight dot products
// accumulated in registers, reduced at once.
template <typename T, int NV>
__attribute__((always_inline)) inline v8f scores8(const float* qg, const T* k) {
  constexpr int D = 8 * NV;
  v8f d[8];
  for (int u = 0; u < 8; ++u) d[u] = splat8(0.f);
  for (int c = 0; c < NV / 2; ++c) {
    const v8f qa = load8(qg + 16 * c), qb = load8(qg + 16 * c + 8);
    for (int u = 0; u < 8; ++u) {
      v8f x, y;
      load16(k + u * D + 16 * c, x, y);
      d[u] += qa * x;
      d[u] += qb * y;
    }
  }
  return reduce8(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]);
}

// softmax_update over a block's n scores eight at a time (sc has room up to a multiple of 8).
__attribute__((always_inline)) inline float softmax_block(float* sc, int64_t n, float& m, float& l, float* blse) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t n8 = (n + 7) & ~int64_t{7};
  for (int64_t t = n; t < n8; ++t) sc[t] = ninf;
  v8f vmx = splat8(m);
  for (int64_t t = 0; t < n8; t += 8) vmx = max8(vmx, load8(sc + t));
  const float mx = hmax8(vmx);
  const float alpha = fast_exp(m - mx);
  v8f sum = splat8(0.f);
  for (int64_t t = 0; t < n8; t += 8) {
    const v8f x = load8(sc + t);
    const v8f e = x == splat8(ninf) ? splat8(0.f) : exp8(x - splat8(mx));  // padding counts zero
    store8(sc + t, e);
    sum += e;
  }
  const float total = hsum8(sum);
  l = l * alpha + total;
  if (blse) *blse = mx + std::log(total);
  m = mx;
  return alpha;
}

// P.V of one query over a block: acc[0..NV) = acc * alpha + sum_t p[t] v[t], kChunk accumulators in
// registers per pass over the rows.
template <typename T, int NV>
__attribute__((always_inline)) inline void accumulate_pv(v8f* acc, float alpha, const float* p, const T* vb,
                                                         int64_t n) {
  constexpr int D = 8 * NV, kChunk = NV < 8 ? NV : 8;
  for (int c0 = 0; c0 < NV; c0 += kChunk) {
    v8f o[kChunk];
    for (int v = 0; v < kChunk; ++v) o[v] = acc[c0 + v] * splat8(alpha);
    for (int64_t t = 0; t < n; ++t) {
      const v8f pt = splat8(p[t]);
      for (int v = 0; v < kChunk; v += 2) {
        v8f x, y;
        load16(vb + t * D + 8 * (c0 + v), x, y);
        o[v] += pt * x;
        o[v + 1] += pt * y;
      }
    }
    for (int v = 0; v < kChunk; ++v) acc[c0 + v] = o[v];
  }
}

// The same computation with head_dim = 8 * NV known at compile time and block_size a multiple of 8:
// scores of eight tokens come out of one reduce8 (rows past a context are read, within their block, and
// their scores dropped), softmax runs eight lanes wide, and P.V keeps its accumulators in registers.
// 16-bit rows are widened as they are read, once per query head: cheaper than a float32 copy.
template <typename T, int NV>
KV_CLONES void decode_vec(const DecodeArgs& a, int64_t b, int64_t h, int64_t s) {
  constexpr int D = 8 * NV;
  const int64_t G = a.G, bs = a.bs;
  const int64_t ctx = a.ctx[b];
  const int64_t nblocks = (ctx + bs - 1) / bs;
  const int64_t j0 = s * a.seg_blocks, j1 = std::min(nblocks, j0 + a.seg_blocks);
  alignas(32) float qs[kMaxG * D];
  load_queries<T, NV>(a.q + (b * a.Hkv + h) * G * D, G, a.scale, qs);
  v8f acc[kMaxG][NV];
  float m[kMaxG], l[kMaxG];
  alignas(32) float sc[kMaxG][kMaxBS + 8];
  for (int64_t g = 0; g < G; ++g) {
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.f;
    for (int v = 0; v < NV; ++v) acc[g][v] = splat8(0.f);
  }
  const T* kbase = static_cast<const T*>(a.k);
  const T* vbase = static_cast<const T*>(a.v);
  constexpr int64_t line = 64 / sizeof(T);
  for (int64_t j = j0; j < std::min(j1, j0 + kAhead); ++j) {  // warm up the prefetch window
    const int64_t first = (a.tables[b * a.W + j] * a.Hkv + h) * bs * D;
    for (int64_t e = 0; e < bs * D; e += line) {
      __builtin_prefetch(kbase + first + e);
      __builtin_prefetch(vbase + first + e);
    }
  }
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t blk = a.tables[b * a.W + j];
    const int64_t n = std::min(bs, ctx - j * bs);
    const T* kb = kbase + (blk * a.Hkv + h) * bs * D;
    const T* vb = vbase + (blk * a.Hkv + h) * bs * D;
    if (j + kAhead < j1) {  // blocks are scattered pages: fetch one a few blocks ahead
      const int64_t next = (a.tables[b * a.W + j + kAhead] * a.Hkv + h) * bs * D;
      for (int64_t e = 0; e < bs * D; e += line) {
        __builtin_prefetch(kbase + next + e);
        __builtin_prefetch(vbase + next + e);
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t t0 = 0; t0 < n; t0 += 8) store8(sc[g] + t0, scores8<T, NV>(qs + g * D, kb + t0 * D));
    for (int64_t g = 0; g < G; ++g) {
      float* blse = a.blse ? a.blse + ((b * a.Hkv + h) * G + g) * a.W + j : nullptr;
      const float alpha = softmax_block(sc[g], n, m[g], l[g], blse);
      accumulate_pv<T, NV>(acc[g], alpha, sc[g], vb, n);
    }
  }
  const int64_t base = ((b * a.Hkv + h) * a.S + s) * G;
  for (int64_t g = 0; g < G; ++g) {
    store_row<T, NV>(a.out + (base + g) * D, acc[g], splat8(l[g] > 0.f ? 1.f / l[g] : 0.f));
    a.lse[base + g] = l[g] > 0.f ? m[g] + std::log(l[g]) : -std::numeric_limits<float>::infinity();
  }
}

template <typename T>
void decode_item(const DecodeArgs& a, int64_t b, int64_t h, int64_t s) {
  if (a.bs % 8 == 0 && a.D == 64) decode_vec<T, 8>(a, b, h, s);
  else if (a.bs % 8 == 0 && a.D == 128) decode_vec<T, 16>(a, b, h, s);
  else decode_one<T>(a, b, h, s);
}

constexpr int64_t kSerialWork = 2048;  // (token, KV head) pairs below which one thread beats waking others

// Work items per (sequence, KV head): enough segments to balance the threads (several per thread,
// since contexts differ), each of at least 4 blocks (merging has a cost); one when the step is small.
int64_t choose_segments(int64_t B, int64_t Hkv, int64_t max_blocks, int64_t work) {
  const int64_t threads = at::get_num_threads();
  if (work < kSerialWork || threads == 1) return 1;
  const int64_t items = B * Hkv;
  const int64_t S = std::min((8 * threads + items - 1) / items, max_blocks / 4);
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
  const int64_t S = num_segments > 0 ? num_segments : choose_segments(B, Hkv, W, work);
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
  const int64_t items = B * Hkv * S;
  at::parallel_for(0, items, work < kSerialWork ? items : 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (Hkv * S), h = (i / S) % Hkv, s = i % S;
      if (dtype == torch::kFloat) decode_item<float>(a, b, h, s);
      else if (dtype == torch::kBFloat16) decode_item<c10::BFloat16>(a, b, h, s);
      else decode_item<c10::Half>(a, b, h, s);
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

// k, v: [T, Hkv, D] (any strides along T and heads, unit stride along D); blocks, offsets: [T].
void write_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
              torch::Tensor blocks, torch::Tensor offsets) {
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "k and v need unit stride along head_dim");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(),
              "k/v dtype differs from the cache's");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k.sizes() == v.sizes(), "shapes");
  TORCH_CHECK(blocks.scalar_type() == torch::kLong && offsets.scalar_type() == torch::kLong, "int64 slots");
  const int64_t T = k.size(0), Hkv = k.size(1), D = k.size(2), bs = k_cache.size(2);
  auto bl = blocks.contiguous(), of = offsets.contiguous();
  const int64_t* bp = bl.data_ptr<int64_t>();
  const int64_t* op = of.data_ptr<int64_t>();
  const int64_t es = k.element_size();
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  at::parallel_for(0, T * Hkv, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / Hkv, h = i % Hkv;
      const int64_t dst = ((bp[t] * Hkv + h) * bs + op[t]) * D * es;
      std::memcpy(kc + dst, kp + (t * k.stride(0) + h * k.stride(1)) * es, D * es);
      std::memcpy(vc + dst, vp + (t * v.stride(0) + h * v.stride(1)) * es, D * es);
    }
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
  m.def("write_kv", &write_kv, "write new K/V rows into their cache slots");
  m.def("rms_norm", &rms_norm, "RMSNorm");
  m.def("add_rms_norm", &add_rms_norm, "residual add in place, then RMSNorm");
  m.def("rope_", &rope_, "half-split rotary embedding in place");
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up");
}
