// Shared helpers of kvtier's CPU kernels: dtype conversion, a vectorizable exp, ISA clones.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KV_X86 1
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KV_CLONES
#endif

namespace kvtier {

// AVX2 with FMA and F16C, asked of the CPU at run time (the fast paths are compiled for it with
// target attributes, so the module still loads on CPUs without it).
inline bool has_avx2() {
#ifdef KV_X86
  __builtin_cpu_init();
#if defined(__clang__)  // every AVX2 CPU has F16C; clang may not know the "f16c" feature name
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
#else
  return false;
#endif
}

// The AVX-512 of the x86-64-v4 clones (F, BW, CD, DQ, VL): where it holds, KV_CLONES code runs that clone.
inline bool has_avx512() {
#ifdef KV_X86
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// That AVX-512 with the byte dot product (VNNI) and byte shuffles (VBMI): Ice Lake and later, Zen 4 and later. Code for
// it carries KV_AVX512_VNNI, the same feature set, and runs only where has_avx512_vnni() holds.
#define KV_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")))
inline bool has_avx512_vnni() {
#ifdef KV_X86
  return has_avx512() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
#else
  return false;
#endif
}

inline float to_f(float x) { return x; }
inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_f(c10::Half x) { return static_cast<float>(x); }
template <typename T> inline T from_f(float x) { return static_cast<T>(x); }

// exp(x), branch-free so loops over it vectorize (libm's expf does not).
// Cody-Waite range reduction and a degree-6 polynomial: relative error < 2e-7.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Call f(T{}) with T the C++ type of a float32 / bfloat16 / float16 tensor.
template <typename F>
void dispatch(torch::ScalarType t, F&& f) {
  if (t == torch::kFloat) f(float{});
  else if (t == torch::kBFloat16) f(c10::BFloat16{});
  else if (t == torch::kHalf) f(c10::Half{});
  else TORCH_CHECK(false, "unsupported dtype ", t);
}

constexpr int64_t kMergeGrainFloats = 32768;  // partial-output floats a merge task reads at least

// Merge S partial results per (b, h, g) by their log-sum-exp weights (lse_out may be null).
// part: [B, Hkv, S, G, D], plse: [B, Hkv, S, G] -> out: [B, Hkv, G, D], lse_out: [B, Hkv, G].
inline void merge_segments(const float* part, const float* plse, int64_t B, int64_t Hkv, int64_t S, int64_t G,
                           int64_t D, float* out, float* lse_out) {
  // a small merge (one sequence: a few thousand floats) is done here: waking the threads again costs more
  const int64_t grain = std::max<int64_t>(1, kMergeGrainFloats / (S * D));
  at::parallel_for(0, B * Hkv * G, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / G, g = i % G;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < S; ++s) mx = std::max(mx, plse[(bh * S + s) * G + g]);
      float* o = out + i * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      float total = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        const float ls = plse[(bh * S + s) * G + g];
        if (ls == -std::numeric_limits<float>::infinity()) continue;
        const float w = std::exp(ls - mx);
        total += w;
        const float* p = part + ((bh * S + s) * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * p[d];
      }
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      if (lse_out) lse_out[i] = total > 0.f ? mx + std::log(total) : -std::numeric_limits<float>::infinity();
    }
  });
}

}  // namespace kvtier
