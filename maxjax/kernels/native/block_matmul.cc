// y[M, N] = x[M, K] @ W.T for GGUF block weights W [N, K] (blocks of 32 values along K, each with a float16
// scale; Q4_1 also a float16 min) repacked into panels of 32 output channels (architectures/block_panels.py):
//   Q4: q uint8 [P, B, 16, 32], byte j of block b of output 32p + i at [p, b, j, i]: its low nibble is value
//       32b + j, its high nibble value 32b + 16 + j (the GGUF order); scale and min float16 [P, B, 32];
//       value = nibble * scale + min (Q4_0 is packed with min = -8 scale: (nibble - 8) * scale).
//   Q8: q int8 [P, B, 32, 32], value 32b + j of output 32p + i at [p, b, j, i]; scale float16 [P, B, 32];
//       value = q * scale.
//
// Why: a 4-bit decode step reads 7x fewer bytes than float32, so it is bound by turning packed values into
// floats, not by memory. Output channels in the vector lanes make each value's dequantization one widen,
// mask or shift, convert and multiply-add per 16 values, done once per call and reused by up to 8 rows of x
// whose accumulators stay in registers (no horizontal sums, no per-row reloads of the weights); more rows
// (prefill) read each panel dequantized once into a float32 buffer that stays in cache. The values
// are the ones the file's dequantization gives (up to the rounding of a fused multiply-add), so results
// equal a float32 dot with the dequantized weights up to summation order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "vec_math.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 32;     // output channels per panel: two 16-float vectors
constexpr int kBlock = 32;     // values per GGUF block along K
constexpr int kRowBlock = 8;   // rows of x whose accumulators stay in registers (8 x 2 vectors)
using maxjax::Int16;
using maxjax::Vec16;
using maxjax::Widen;

float HalfToFloat(uint16_t h) {
  const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else if (exponent == 31) {
    magnitude = mantissa ? NAN : INFINITY;
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
  }
  return (h & 0x8000) ? -magnitude : magnitude;
}

// 16 float16 values -> float32 (F16C / AVX-512 when the CPU has them).
inline Vec16 Halves(const uint16_t* h) {
  Vec16 out;
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
  std::memcpy(&out, &v, sizeof(out));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 8)));
  std::memcpy(&out, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof(lo), &hi, sizeof(hi));
#else
  for (int i = 0; i < 16; ++i) out[i] = HalfToFloat(h[i]);
#endif
  return out;
}

inline Vec16 ToFloat(Int16 v) { return __builtin_convertvector(v, Vec16); }

// One panel of a 4-bit weight. Step t of block b gives the weights of values 32b + t and 32b + 16 + t.
struct Q4Panel {
  const uint8_t* q;
  const uint16_t* scale;
  const uint16_t* min;
  struct Scales { Vec16 scale[2], min[2]; };
  static constexpr int kSteps = 16;
  static int First(int t) { return t; }
  static int Second(int t) { return t + 16; }

  static Q4Panel At(const void* q, const uint16_t* scale, const uint16_t* min, int64_t blocks, int64_t p) {
    const int64_t n = blocks * kPanel;  // scales per panel
    return {static_cast<const uint8_t*>(q) + p * n * kSteps, scale + p * n, min + p * n};
  }
  Scales BlockScales(int64_t b) const {
    const uint16_t* s = scale + b * kPanel;
    const uint16_t* m = min + b * kPanel;
    return {{Halves(s), Halves(s + 16)}, {Halves(m), Halves(m + 16)}};
  }
  // Channels 16h .. 16h + 15.
  void Weights(int64_t b, int t, int h, const Scales& sc, Vec16& first, Vec16& second) const {
    const Int16 v = Widen<false>(q + (b * kSteps + t) * kPanel + 16 * h);
    first = ToFloat(v & 15) * sc.scale[h] + sc.min[h];
    second = ToFloat(v >> 4) * sc.scale[h] + sc.min[h];
  }
};

// One panel of an 8-bit weight. Step t of block b gives the weights of values 32b + 2t and 32b + 2t + 1.
struct Q8Panel {
  const int8_t* q;
  const uint16_t* scale;
  struct Scales { Vec16 scale[2]; };
  static constexpr int kSteps = 16;
  static int First(int t) { return 2 * t; }
  static int Second(int t) { return 2 * t + 1; }

  static Q8Panel At(const void* q, const uint16_t* scale, const uint16_t*, int64_t blocks, int64_t p) {
    const int64_t n = blocks * kPanel;  // scales per panel
    return {static_cast<const int8_t*>(q) + p * n * kBlock, scale + p * n};
  }
  Scales BlockScales(int64_t b) const {
    const uint16_t* s = scale + b * kPanel;
    return {{Halves(s), Halves(s + 16)}};
  }
  // Channels 16h .. 16h + 15.
  void Weights(int64_t b, int t, int h, const Scales& sc, Vec16& first, Vec16& second) const {
    const int8_t* values = q + (b * kBlock + 2 * t) * kPanel + 16 * h;
    first = ToFloat(Widen<true>(values)) * sc.scale[h];
    second = ToFloat(Widen<true>(values + kPanel)) * sc.scale[h];
  }
};

// A panel already dequantized into float32 [K, 32] (many rows of x: each weight dequantized once, not once
// per 8 rows). Step t of block b gives the weights of values 32b + 2t and 32b + 2t + 1.
struct DequantizedPanel {
  const float* w;
  struct Scales {};
  static constexpr int kSteps = 16;
  static int First(int t) { return 2 * t; }
  static int Second(int t) { return 2 * t + 1; }

  Scales BlockScales(int64_t) const { return {}; }
  void Weights(int64_t b, int t, int h, const Scales&, Vec16& first, Vec16& second) const {
    const float* row = w + (b * kBlock + First(t)) * kPanel + 16 * h;
    std::memcpy(&first, row, sizeof(first));
    std::memcpy(&second, row + kPanel, sizeof(second));
  }
};

// Rows [0, MB) of x times one panel, written to y's 32 columns (y already offset to the panel).
template <int MB, class Panel>
void PanelRows(const float* x, int64_t K, const Panel& panel, float* y, int64_t N) {
  constexpr int kSums = MB <= 2 ? 2 : 1;  // few rows: the two values of a step in separate sums (more FMA chains)
  Vec16 acc[MB][2][kSums] = {};           // [row][half of the channels][sum]
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const typename Panel::Scales scales = panel.BlockScales(b);
    const float* xb = x + b * kBlock;
    for (int t = 0; t < Panel::kSteps; ++t) {
      for (int h = 0; h < 2; ++h) {  // one half of the channels at a time: fewer live registers with 8 rows
        Vec16 first, second;
        panel.Weights(b, t, h, scales, first, second);
        for (int m = 0; m < MB; ++m) {
          acc[m][h][0] += xb[m * K + Panel::First(t)] * first;
          acc[m][h][kSums - 1] += xb[m * K + Panel::Second(t)] * second;
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int h = 0; h < 2; ++h) {
      const Vec16 sum = kSums == 2 ? acc[m][h][0] + acc[m][h][kSums - 1] : acc[m][h][0];
      std::memcpy(y + m * N + 16 * h, &sum, sizeof(sum));
    }
  }
}

// Every row block of x times one panel.
template <class Panel>
void AllRows(const float* x, int64_t M, int64_t K, const Panel& panel, float* y, int64_t N) {
  using RowsFn = void (*)(const float*, int64_t, const Panel&, float*, int64_t);
  static constexpr RowsFn kRows[kRowBlock + 1] = {
      nullptr, PanelRows<1, Panel>, PanelRows<2, Panel>, PanelRows<3, Panel>, PanelRows<4, Panel>,
      PanelRows<5, Panel>, PanelRows<6, Panel>, PanelRows<7, Panel>, PanelRows<8, Panel>};
  for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
    kRows[std::min<int64_t>(kRowBlock, M - m0)](x + m0 * K, K, panel, y + m0 * N, N);
  }
}

// The panel's weights as float32 [K, 32] in `w`.
template <class Panel>
void Dequantize(const Panel& panel, int64_t K, float* w) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const typename Panel::Scales scales = panel.BlockScales(b);
    for (int t = 0; t < Panel::kSteps; ++t) {
      for (int h = 0; h < 2; ++h) {
        Vec16 first, second;
        panel.Weights(b, t, h, scales, first, second);
        std::memcpy(w + (b * kBlock + Panel::First(t)) * kPanel + 16 * h, &first, sizeof(first));
        std::memcpy(w + (b * kBlock + Panel::Second(t)) * kPanel + 16 * h, &second, sizeof(second));
      }
    }
  }
}

// Panels [p0, p1) of one product: each panel times every row of x.
template <class Panel>
void Panels(const float* x, int64_t M, int64_t K, const void* q, const uint16_t* scale, const uint16_t* min,
            float* y, int64_t N, int64_t p0, int64_t p1) {
  thread_local std::vector<float> dequantized;  // one panel, for more than one row block (prefill)
  for (int64_t p = p0; p < p1; ++p) {
    const Panel panel = Panel::At(q, scale, min, K / kBlock, p);
    if (M <= kRowBlock) {
      AllRows(x, M, K, panel, y + p * kPanel, N);
      continue;
    }
    dequantized.resize(K * kPanel);
    Dequantize(panel, K, dequantized.data());
    AllRows(x, M, K, DequantizedPanel{dequantized.data()}, y + p * kPanel, N);
  }
}

template <class Panel>
ffi::Error Run(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x, const ffi::AnyBuffer& q,
               const ffi::Buffer<ffi::F16>& scale,
               const uint16_t* min, ffi::ResultBuffer<ffi::F32>& y, int64_t values_per_step) {
  const auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || qd.size() != 4 || sd.size() != 3 || qd[3] != kPanel || qd[2] != values_per_step ||
      sd[0] != qd[0] || sd[1] != qd[1] || sd[2] != kPanel || xd[1] != qd[1] * kBlock) {
    return ffi::Error::InvalidArgument("block_matmul: x [M, 32 B], q [P, B, step values, 32], scale [P, B, 32]");
  }
  const float* xs = x.typed_data();
  const void* qs = q.untyped_data();
  const uint16_t* scales = scale.typed_data();
  float* ys = y->typed_data();
  const int64_t M = xd[0], K = xd[1], panels = qd[0], N = panels * kPanel;
  if (M == 0) return ffi::Error::Success();
  maxjax::ForUnits(pool, M, panels, [&](int64_t p0, int64_t p1) {
    Panels<Panel>(xs, M, K, qs, scales, min, ys, N, p0, p1);
  });
  return ffi::Error::Success();
}

ffi::Error Q4MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                        ffi::Buffer<ffi::F16> scale,
                        ffi::Buffer<ffi::F16> min, ffi::ResultBuffer<ffi::F32> y) {
  const auto md = min.dimensions(), sd = scale.dimensions();
  if (q.element_type() != ffi::U8 || !std::equal(md.begin(), md.end(), sd.begin(), sd.end())) {
    return ffi::Error::InvalidArgument("q4_matmul: q uint8 and min shaped like scale expected");
  }
  return Run<Q4Panel>(pool, x, q, scale, min.typed_data(), y, 16);
}

ffi::Error Q8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                        ffi::Buffer<ffi::F16> scale,
                        ffi::ResultBuffer<ffi::F32> y) {
  if (q.element_type() != ffi::S8) return ffi::Error::InvalidArgument("q8_matmul: q int8 expected");
  return Run<Q8Panel>(pool, x, q, scale, nullptr, y, kBlock);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxQ4Matmul, Q4MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxQ8Matmul, Q8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
