// Vector math shared by maxjax's native kernels: 16-float vectors (one AVX-512 register, two AVX2 ones), bytes
// widened to 16 lanes, a lane sum in registers, a vectorized exp for softmax, the rotary embedding's rotation and
// a cache-line-aligned scratch buffer.
#ifndef MAXJAX_NATIVE_VEC_MATH_H_
#define MAXJAX_NATIVE_VEC_MATH_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace maxjax {

typedef float Vec16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));
typedef int32_t Int16 __attribute__((vector_size(64)));

// 16 bytes -> 16 int32 (zero- or sign-extended): one instruction with AVX-512 (GCC scalarizes the generic
// conversion), two with AVX2.
template <bool kSigned>
inline Int16 Widen(const void* p) {
  Int16 out;
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(static_cast<const __m128i*>(p));
  const __m512i v = kSigned ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
  std::memcpy(&out, &v, sizeof(out));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(static_cast<const __m128i*>(p));
  const __m128i b8 = _mm_unpackhi_epi64(b, b);
  const __m256i lo = kSigned ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
  const __m256i hi = kSigned ? _mm256_cvtepi8_epi32(b8) : _mm256_cvtepu8_epi32(b8);
  std::memcpy(&out, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof(lo), &hi, sizeof(hi));
#else
  typedef std::conditional_t<kSigned, int8_t, uint8_t> Byte;
  typedef Byte Bytes16 __attribute__((vector_size(16)));
  Bytes16 b;
  std::memcpy(&b, p, sizeof(b));
  out = __builtin_convertvector(b, Int16);
#endif
  return out;
}

inline Vec16 Load(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(Vec16));
  return v;
}

inline void Store(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(Vec16)); }

// The sum of a vector's lanes as a tree (halves added): a few dependent adds instead of 16, in registers.
inline float LaneSum(Vec16 v) {
  const Vec8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// exp(x) for 16 lanes (Cephes' expf: x = n ln2 + r with n the nearest integer, a degree-5 polynomial for e^r
// on |r| <= ln2 / 2, then 2^n), within ~1.3 ulp. Inputs below -87 give ~1e-38 (the softmax's masked scores,
// whose weight is dropped anyway). With AVX-512, rounding and the 2^n scaling are one instruction each.
inline Vec16 Exp(Vec16 x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
#if defined(__AVX512F__)
  __m512 v;
  std::memcpy(&v, &x, sizeof(v));
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), v));
  __m512 p = _mm512_set1_ps(kPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kPoly[i]));
  p = _mm512_scalef_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f))), n);
  Vec16 out;
  std::memcpy(&out, &p, sizeof(out));
  return out;
#else
  const Vec16 lo = Vec16{} - 87.3f, hi = Vec16{} + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const Vec16 y = x * kLog2e + 0.5f;
  Int16 n = __builtin_convertvector(y, Int16);  // truncated toward zero; floor(y) below: the nearest to x log2e
  n += (__builtin_convertvector(n, Vec16) > y);  // a comparison is -1 where true
  const Vec16 fn = __builtin_convertvector(n, Vec16);
  const Vec16 r = x - fn * kLn2Hi - fn * kLn2Lo;
  Vec16 p = Vec16{} + kPoly[0];
  for (int i = 1; i < 6; ++i) p = p * r + kPoly[i];
  p = p * r * r + r + 1.f;
  const Int16 bits = (n + 127) << 23;
  Vec16 scale;
  std::memcpy(&scale, &bits, sizeof(Vec16));
  return p * scale;
#endif
}

// A growable float buffer whose data starts on a 64-byte cache line: a vector loaded from it at a multiple of
// 16 floats stays within one line (a std::vector's data is only 16-byte aligned, so such loads could straddle
// two).
class LineAlignedFloats {
 public:
  float* Get(size_t n) {  // at least n floats; contents are not kept across calls that grow it
    if (data_.size() < n + 15) data_.resize(n + 15);
    const uintptr_t at = reinterpret_cast<uintptr_t>(data_.data());
    return reinterpret_cast<float*>((at + 63) & ~static_cast<uintptr_t>(63));
  }

 private:
  std::vector<float> data_;
};

// x [Dh] rotated by the angles in cos/sin [Dh] (`rope.apply_rope`'s rotate-half convention: the first half pairs
// with the second), into out; a copy when cos is null.
inline void RotateHalf(const float* x, const float* cos, const float* sin, int64_t Dh, float* out) {
  if (cos == nullptr) {
    std::memcpy(out, x, Dh * sizeof(float));
    return;
  }
  const int64_t half = Dh / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
  for (int64_t i = half; i < Dh; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

inline void ExpInPlace(float* p, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    Vec16 v;
    std::memcpy(&v, p + i, sizeof(Vec16));
    v = Exp(v);
    std::memcpy(p + i, &v, sizeof(Vec16));
  }
  for (; i < n; ++i) p[i] = std::exp(std::max(p[i], -87.3f));
}

}  // namespace maxjax

#endif  // MAXJAX_NATIVE_VEC_MATH_H_
