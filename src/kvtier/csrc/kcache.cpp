// kvtier KCache decode attention (arXiv 2404.18057): scores over all of K, V read at the top-N rows only.
//
// Phase 1, per (sequence, KV head, segment of blocks): raw scores q.k for the G query heads of the KV
// head into a [B, Hkv, G, T] buffer (an AVX2 kernel when the CPU has it, else portable loops).
// Phase 2, per (sequence, KV head): softmax per query head, p summed over the group, the N largest found
// by a radix select on the float bits (O(T), ties to the lower position), then the selected V rows only
// are read and weighted. Cache layout (one layer): k_cache, v_cache [num_blocks, Hkv, block_size, D].

#include "common.h"

#include <string>


namespace {

using namespace kvtier;

constexpr int kMaxG = 16;
constexpr int kMaxD = 256;

struct ScoreArgs {
  const float* q;  // [B, Hq, D] pre-scaled
  const void* k;   // [NB, Hkv, bs, D]
  const int64_t *tables, *ctx;
  float* sc;  // [B, Hkv, G, T]
  int64_t Hkv, G, D, bs, W, T;
};

// scores of n rows of K (row stride D) for G query heads: sc[g * T + t] = q_g . k_t
template <typename T>
KV_CLONES void scores_generic(const float* q, const T* k, int64_t n, int64_t G, int64_t D, float* sc, int64_t T_) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t g = 0; g < G; ++g) {
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += q[g * D + d] * to_f(k[t * D + d]);
      sc[g * T_ + t] = dot;
    }
}

#ifdef KV_X86
#define KV_AVX2 __attribute__((target("avx2,fma,f16c")))

KV_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
KV_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
KV_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

KV_AVX2 inline __m256 hsum8(const __m256* v) {  // [sum(v[0]), ..., sum(v[7])]
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// 8 rows at a time, D % 8 == 0: FMA along D, one horizontal reduction per 8 rows
template <typename T>
KV_AVX2 void scores_avx2(const float* q, const T* k, int64_t n, int64_t G, int64_t D, float* sc, int64_t T_) {
  if (D % 8) return scores_generic(q, k, n, G, D, sc, T_);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8)
    for (int64_t g = 0; g < G; ++g) {
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + g * D + d);
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(qv, load8(k + (t + i) * D + d), acc[i]);
      }
      _mm256_storeu_ps(sc + g * T_ + t, hsum8(acc));
    }
  if (t < n) scores_generic(q, k + t * D, n - t, G, D, sc + t, T_);
}

#endif

bool g_avx2 = has_avx2();

template <typename T>
void score_segment(const ScoreArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1) {
  const int64_t ctx = a.ctx[b];
  const float* q = a.q + (b * a.Hkv + h) * a.G * a.D;
  float* sc = a.sc + (b * a.Hkv + h) * a.G * a.T;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t n = std::min(a.bs, ctx - j * a.bs);
    const T* k = static_cast<const T*>(a.k) + (a.tables[b * a.W + j] * a.Hkv + h) * a.bs * a.D;
    if (j + 1 < j1) {  // blocks are scattered: fetch the next one while this one is computed
      const T* next = static_cast<const T*>(a.k) + (a.tables[b * a.W + j + 1] * a.Hkv + h) * a.bs * a.D;
      for (int64_t e = 0; e < a.bs * a.D * int64_t(sizeof(T)); e += 64) __builtin_prefetch(reinterpret_cast<const char*>(next) + e);
    }
#ifdef KV_X86
    if (g_avx2) {
      scores_avx2(q, k, n, a.G, a.D, sc + j * a.bs, a.T);
      continue;
    }
#endif
    scores_generic(q, k, n, a.G, a.D, sc + j * a.bs, a.T);
  }
}

// ---- phase 2: softmax, top-N, the selected V rows -----------------------------------------------------

// p = exp(s - max) / sum in place over n scores; returns the log-sum-exp
KV_CLONES float softmax_row(float* s, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t t = 0; t < n; ++t) mx = mx > s[t] ? mx : s[t];
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) {
    s[t] = fast_exp(s[t] - mx);
    sum += s[t];
  }
  const float inv = 1.f / sum;
  for (int64_t t = 0; t < n; ++t) s[t] *= inv;
  return mx + std::log(sum);
}

KV_CLONES void add_row(float* acc, const float* x, int64_t n) {
  for (int64_t t = 0; t < n; ++t) acc[t] += x[t];
}

// positions of the n largest of x[0..T) (all >= 0), ascending; among equal values the lower positions
void top_n(const float* x, int64_t T, int64_t n, std::vector<uint32_t>& hist, int64_t* out) {
  // radix select on the top 12 bits of the (non-negative) float bit patterns, then on the value
  auto bits = [&](int64_t t) { uint32_t u; std::memcpy(&u, x + t, 4); return u; };
  hist.assign(4096, 0);
  for (int64_t t = 0; t < T; ++t) ++hist[bits(t) >> 20];
  int64_t above = 0, bucket = 4095;
  for (; bucket > 0 && above + hist[bucket] < n; --bucket) above += hist[bucket];
  std::vector<float> cand;
  for (int64_t t = 0; t < T; ++t)
    if ((bits(t) >> 20) == uint32_t(bucket)) cand.push_back(x[t]);
  const int64_t need = n - above;  // from the boundary bucket: its `need` largest values
  std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end(), std::greater<float>());
  const float thr = cand[need - 1];
  int64_t ties = need - std::count_if(cand.begin(), cand.end(), [&](float v) { return v > thr; });
  int64_t k = 0;
  for (int64_t t = 0; t < T; ++t) {
    const uint32_t bk = bits(t) >> 20;
    if (bk > uint32_t(bucket) || (bk == uint32_t(bucket) && x[t] > thr)) out[k++] = t;
    else if (bk == uint32_t(bucket) && x[t] == thr && ties > 0) out[k++] = t, --ties;
  }
  TORCH_INTERNAL_ASSERT(k == n, "top-N selection miscounted");
}

template <typename T>
KV_CLONES void accumulate_row(float* acc, float p, const T* v, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += p * to_f(v[d]);
}

struct SelectArgs {
  float* sc;  // [B, Hkv, G, T] scores in, probabilities out
  const void* v;
  const int64_t *tables, *ctx, *counts;
  float* out;        // [B, Hq, D]
  float* lse;        // [B, Hq]
  int64_t* sel;      // [B, Hkv, N]
  int64_t Hkv, G, D, bs, W, T, N;
  bool renormalize;
};

template <typename T>
void select_one(const SelectArgs& a, int64_t b, int64_t h, std::vector<float>& agg, std::vector<uint32_t>& hist) {
  const int64_t ctx = a.ctx[b], n = a.counts[b], G = a.G, D = a.D;
  float* sc = a.sc + (b * a.Hkv + h) * G * a.T;
  float lse[kMaxG];
  agg.assign(ctx, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    lse[g] = softmax_row(sc + g * a.T, ctx);
    add_row(agg.data(), sc + g * a.T, ctx);
  }
  int64_t* sel = a.sel + (b * a.Hkv + h) * a.N;
  top_n(agg.data(), ctx, n, hist, sel);
  std::fill(sel + n, sel + a.N, -1);
  alignas(64) float acc[kMaxG][kMaxD] = {};
  float mass[kMaxG] = {};
  const T* vbase = static_cast<const T*>(a.v);
  auto row = [&](int64_t t) { return vbase + ((a.tables[b * a.W + t / a.bs] * a.Hkv + h) * a.bs + t % a.bs) * D; };
  constexpr int64_t kAhead = 8;  // selected rows are scattered: keep a few in flight
  for (int64_t i = 0; i < std::min(n, kAhead); ++i)
    for (int64_t e = 0; e < D * int64_t(sizeof(T)); e += 64) __builtin_prefetch(reinterpret_cast<const char*>(row(sel[i])) + e);
  for (int64_t i = 0; i < n; ++i) {  // the selected V rows, in position order
    const int64_t t = sel[i];
    if (i + kAhead < n)
      for (int64_t e = 0; e < D * int64_t(sizeof(T)); e += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(row(sel[i + kAhead])) + e);
    const T* v = row(t);
    for (int64_t g = 0; g < G; ++g) {
      const float p = sc[g * a.T + t];
      mass[g] += p;
      accumulate_row(acc[g], p, v, D);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t hq = h * G + g;
    const float inv = a.renormalize ? 1.f / mass[g] : 1.f;
    for (int64_t d = 0; d < D; ++d) a.out[(b * a.Hkv * G + hq) * D + d] = acc[g][d] * inv;
    a.lse[b * a.Hkv * G + hq] = a.renormalize ? lse[g] + std::log(mass[g]) : lse[g];
  }
}

int64_t choose_segments(int64_t B, int64_t Hkv, int64_t blocks) {
  const int64_t threads = at::get_num_threads();
  const int64_t S = (4 * threads + B * Hkv - 1) / (B * Hkv);
  return std::max<int64_t>(1, std::min(S, blocks / 4));
}

}  // namespace

// q [B, Hq, D]; caches [NB, Hkv, bs, D]; tables [B, W], ctx [B], counts [B] (1 <= counts <= ctx) int64.
// Returns (out [B, Hq, D] in q's dtype, lse [B, Hq] float32, selected [B, Hkv, max(counts)] int64).
std::vector<torch::Tensor> kcache_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                                   torch::Tensor tables, torch::Tensor ctx, torch::Tensor counts,
                                                   double scale, bool renormalize) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "q [B,Hq,D], caches [NB,Hkv,bs,D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches differ in dtype");
  TORCH_CHECK(tables.scalar_type() == torch::kLong && ctx.scalar_type() == torch::kLong &&
              counts.scalar_type() == torch::kLong, "int64 tables, context lengths and counts");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(Hq % Hkv == 0 && Hq / Hkv <= kMaxG && D <= kMaxD && k_cache.size(3) == D, "unsupported shapes");
  auto tables_c = tables.contiguous(), ctx_c = ctx.contiguous(), counts_c = counts.contiguous();
  const int64_t W = tables_c.size(1), T = W * bs, G = Hq / Hkv;
  const int64_t* cp = ctx_c.data_ptr<int64_t>();
  const int64_t* np = counts_c.data_ptr<int64_t>();
  int64_t N = 1;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cp[b] >= 1 && cp[b] <= T && np[b] >= 1 && np[b] <= cp[b], "need 1 <= counts <= context <= table");
    N = std::max(N, np[b]);
  }
  auto qf = (q.to(torch::kFloat) * scale).contiguous();
  auto opts = q.options().dtype(torch::kFloat);
  auto sc = torch::empty({B, Hkv, G, T}, opts);
  ScoreArgs sa{qf.data_ptr<float>(), k_cache.data_ptr(), tables_c.data_ptr<int64_t>(), cp, sc.data_ptr<float>(),
               Hkv, G, D, bs, W, T};
  const int64_t S = choose_segments(B, Hkv, W), seg = (W + S - 1) / S;
  const auto dtype = k_cache.scalar_type();
  at::parallel_for(0, B * Hkv * S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (Hkv * S), h = (i / S) % Hkv, s = i % S;
      const int64_t j0 = s * seg, j1 = std::min((cp[b] + bs - 1) / bs, j0 + seg);
      dispatch(dtype, [&](auto tag) { score_segment<decltype(tag)>(sa, b, h, j0, j1); });
    }
  });
  auto out = torch::empty({B, Hq, D}, opts);
  auto lse = torch::empty({B, Hq}, opts);
  auto sel = torch::empty({B, Hkv, N}, q.options().dtype(torch::kLong));
  SelectArgs a{sc.data_ptr<float>(), v_cache.data_ptr(), tables_c.data_ptr<int64_t>(), cp, np, out.data_ptr<float>(),
               lse.data_ptr<float>(), sel.data_ptr<int64_t>(), Hkv, G, D, bs, W, T, N, renormalize};
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> agg;
    std::vector<uint32_t> hist;
    for (int64_t i = begin; i < end; ++i)
      dispatch(dtype, [&](auto tag) { select_one<decltype(tag)>(a, i / Hkv, i % Hkv, agg, hist); });
  });
  return {out.to(q.scalar_type()), lse, sel};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kcache_decode_attention", &kcache_decode_attention, "KCache decode attention: top-N V rows per KV head");
}
