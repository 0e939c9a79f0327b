// Eight-float vectors with GCC vector extensions: the compiler emits AVX/AVX2 (ymm), or two SSE
// halves in the baseline clone, from the same source. Loads widen bfloat16/float16 to float32.
#pragma once

#include "common.h"  // KV_X86

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace kvtier {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));

// x in every lane. Written as vector + scalar, which compiles to one broadcast in the ISA clones: the
// brace form {x, x, ...} compiles to a chain of lane inserts there. (A -0.0 comes out as +0.0.)
inline v8f splat8(float x) { return v8f{} + x; }

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline v8f load8(const c10::BFloat16* p) {  // bfloat16 is the top half of a float32
  v8u16 h;
  std::memcpy(&h, p, sizeof(h));
  v8u w = __builtin_convertvector(h, v8u) << 16;
  v8f v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

// float16 bits (zero-extended to 32) -> float32 in integer arithmetic (the compiler scalarizes
// _Float16 vectors): shift exponent and mantissa into place and rescale by 2^112, which also handles
// subnormals; inf/NaN keep an all-ones exponent.
inline v8f half_bits_to_float(v8u w) {
  const v8u mag = (w & 0x7fffu) << 13;
  v8f f;
  std::memcpy(&f, &mag, sizeof(f));
  f *= splat8(0x1p112f);
  v8u bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const v8u special = (v8u)((w & 0x7c00u) == 0x7c00u);  // all ones where the exponent is 31
  bits = (bits & ~special) | (special & (mag | 0x7f800000u));
  bits |= (w & 0x8000u) << 16;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline v8f load8(const c10::Half* p) {
  v8u16 h;
  std::memcpy(&h, p, sizeof(h));
  return half_bits_to_float(__builtin_convertvector(h, v8u));
}

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// Sixteen 16-bit floats as two float vectors, the even- and the odd-indexed elements: one 32-byte
// load split by shifts and masks (widening them in order costs twice as many instructions).
inline void load16_deinterleaved(const c10::BFloat16* p, v8f& even, v8f& odd) {
  v8u w;
  std::memcpy(&w, p, sizeof(w));
  const v8u e = w << 16, o = w & 0xFFFF0000u;  // bfloat16 is the top half of a float32
  std::memcpy(&even, &e, sizeof(even));
  std::memcpy(&odd, &o, sizeof(odd));
}

inline void load16_deinterleaved(const c10::Half* p, v8f& even, v8f& odd) {
  v8u w;
  std::memcpy(&w, p, sizeof(w));
  even = half_bits_to_float(w & 0xFFFFu);
  odd = half_bits_to_float(w >> 16);
}

#if defined(KV_X86) && !defined(__clang__)
// GCC's x86 builtins: unlike the intrinsics (functions with their own target, which do not inline into the
// code between), a builtin is checked where it is finally compiled, so always-inline helpers can use one if
// every function they end up in is compiled for its instruction set (and runs only where the CPU has it).
#define KV_X86_BUILTINS 1
// float16 data (c10::Half's bits) widened by F16C's conversion, one instruction per eight elements: for
// functions compiled for AVX2 or AVX-512 (decode_vec_f16c, decode_vec_wide).
struct HalfF16C {
  uint16_t bits;
};

typedef short v8s __attribute__((vector_size(16)));

__attribute__((always_inline)) inline v8f load8(const HalfF16C* p) {
  v8s h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_ia32_vcvtph2ps256(h);
}
#endif

// Sixteen floats of a row as two vectors: float32 (and HalfF16C) rows in order, other 16-bit rows
// deinterleaved: evens, then odds (a dot product or an axpy is unchanged if the other operand is permuted alike).
template <typename T>
inline constexpr bool kDeinterleaved = true;
template <>
inline constexpr bool kDeinterleaved<float> = false;

inline void load16(const float* p, v8f& a, v8f& b) {
  a = load8(p);
  b = load8(p + 8);
}
inline void load16(const c10::BFloat16* p, v8f& a, v8f& b) { load16_deinterleaved(p, a, b); }
inline void load16(const c10::Half* p, v8f& a, v8f& b) { load16_deinterleaved(p, a, b); }
#ifdef KV_X86_BUILTINS
template <>
inline constexpr bool kDeinterleaved<HalfF16C> = false;
__attribute__((always_inline)) inline void load16(const HalfF16C* p, v8f& a, v8f& b) {
  a = load8(p);
  b = load8(p + 8);
}
#endif

inline v8f max8(v8f a, v8f b) { return a > b ? a : b; }
inline v8f min8(v8f a, v8f b) { return a < b ? a : b; }

// fast_exp of common.h on eight lanes (the same operations)
inline v8f exp8(v8f x) {
  x = min8(max8(x, splat8(-87.0f)), splat8(88.0f));
  const v8f shift = splat8(12582912.0f);
  const v8f n = (x * splat8(1.44269504088896341f) + shift) - shift;
  const v8f r = (x - n * splat8(0.693145751953125f)) - n * splat8(1.42860682030941723212e-6f);
  v8f p = splat8(1.0f / 720.0f);
  p = p * r + splat8(1.0f / 120.0f);
  p = p * r + splat8(1.0f / 24.0f);
  p = p * r + splat8(1.0f / 6.0f);
  p = p * r + splat8(0.5f);
  p = p * r + splat8(1.0f);
  p = p * r + splat8(1.0f);
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// across the lanes, by halving shuffles
inline float hmax8(v8f a) {
  a = max8(a, __builtin_shuffle(a, v8i{4, 5, 6, 7, 0, 1, 2, 3}));
  a = max8(a, __builtin_shuffle(a, v8i{2, 3, 0, 1, 6, 7, 4, 5}));
  return std::max(a[0], a[1]);
}

inline float hsum8(v8f a) {
  a += __builtin_shuffle(a, v8i{4, 5, 6, 7, 0, 1, 2, 3});
  a += __builtin_shuffle(a, v8i{2, 3, 0, 1, 6, 7, 4, 5});
  return a[0] + a[1];
}

// r[i] = sum of the lanes of a_i: eight horizontal sums in seven shuffle-add rounds.
inline v8f reduce8(v8f a0, v8f a1, v8f a2, v8f a3, v8f a4, v8f a5, v8f a6, v8f a7) {
  const v8i ev = {0, 2, 8, 10, 4, 6, 12, 14}, od = {1, 3, 9, 11, 5, 7, 13, 15};
  v8f t0 = __builtin_shuffle(a0, a1, ev) + __builtin_shuffle(a0, a1, od);
  v8f t1 = __builtin_shuffle(a2, a3, ev) + __builtin_shuffle(a2, a3, od);
  v8f t2 = __builtin_shuffle(a4, a5, ev) + __builtin_shuffle(a4, a5, od);
  v8f t3 = __builtin_shuffle(a6, a7, ev) + __builtin_shuffle(a6, a7, od);
  v8f u0 = __builtin_shuffle(t0, t1, ev) + __builtin_shuffle(t0, t1, od);
  v8f u1 = __builtin_shuffle(t2, t3, ev) + __builtin_shuffle(t2, t3, od);
  const v8i lo = {0, 1, 2, 3, 8, 9, 10, 11}, hi = {4, 5, 6, 7, 12, 13, 14, 15};
  return __builtin_shuffle(u0, u1, lo) + __builtin_shuffle(u0, u1, hi);
}

}  // namespace kvtier
