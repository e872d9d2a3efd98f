// y[M, N] = x[M, K] @ W for float32 weights packed into column panels: W[P, K, 32], panel p holding
// columns 32p .. 32p + 31, each of its K rows contiguous (N = 32 P).
//
// Why: XLA CPU's dots read a [K, N] weight at ~24 GB/s for one row and ~15 GB/s for 2-32 rows on a 2-core
// Zen 4 (a decode step is bound by reading the weights once). Walking one contiguous panel at a time, with
// the 32 columns of up to 8 rows held in registers, streams the weights at the memory's speed for every
// small M and runs a 512-row prefill at ~90% of the FMA peak.
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

#include "vec_math.h"
#include "workers.h"

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 32;     // columns per panel: two 16-float vectors
constexpr int kRowBlock = 8;   // rows whose accumulators stay in registers (8 x 2 vectors)
using maxjax::Vec16;

// Rows [0, MB) of x times one panel, written to y's 32 columns at n0. (No software prefetch: the panels are
// read in order, which the hardware prefetcher follows; prefetching 2-32 KiB ahead measured 10-35% slower.)
template <int MB>
void PanelBlock(const float* x, int64_t K, const float* panel, float* y, int64_t N) {
  // Few rows: consecutive k in kSplit separate sums, so that at least 8 independent FMA chains hide the FMA
  // latency (one row with one sum per vector ran at 2/3 of the memory's speed).
  constexpr int kSplit = 2 * MB >= 8 ? 1 : (8 + 2 * MB - 1) / (2 * MB);
  Vec16 acc[kSplit][MB][2];
  for (int s = 0; s < kSplit; ++s)
    for (int m = 0; m < MB; ++m) acc[s][m][0] = acc[s][m][1] = Vec16{};
  const float* w = panel;
  int64_t k = 0;
  for (; k + kSplit <= K; k += kSplit) {
    for (int s = 0; s < kSplit; ++s, w += kPanel) {
      Vec16 w0, w1;
      std::memcpy(&w0, w, sizeof(Vec16));
      std::memcpy(&w1, w + 16, sizeof(Vec16));
      for (int m = 0; m < MB; ++m) {
        const float xv = x[m * K + k + s];
        acc[s][m][0] += xv * w0;
        acc[s][m][1] += xv * w1;
      }
    }
  }
  for (; k < K; ++k, w += kPanel) {  // an odd K's last row
    Vec16 w0, w1;
    std::memcpy(&w0, w, sizeof(Vec16));
    std::memcpy(&w1, w + 16, sizeof(Vec16));
    for (int m = 0; m < MB; ++m) {
      acc[0][m][0] += x[m * K + k] * w0;
      acc[0][m][1] += x[m * K + k] * w1;
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int s = 1; s < kSplit; ++s) {
      acc[0][m][0] += acc[s][m][0];
      acc[0][m][1] += acc[s][m][1];
    }
    std::memcpy(y + m * N, &acc[0][m][0], sizeof(Vec16));
    std::memcpy(y + m * N + 16, &acc[0][m][1], sizeof(Vec16));
  }
}

using BlockFn = void (*)(const float*, int64_t, const float*, float*, int64_t);
constexpr BlockFn kBlocks[kRowBlock + 1] = {nullptr, PanelBlock<1>, PanelBlock<2>, PanelBlock<3>, PanelBlock<4>,
                                            PanelBlock<5>, PanelBlock<6>, PanelBlock<7>, PanelBlock<8>};

// What a call fuses around the product: the input rows' RMSNorm (`llama.rms_norm`: x * rsqrt(mean(x^2) + eps)
// times offset + weight) before it, and after it either SwiGLU (w holds gate | up panels: silu(gate) * up) or a
// residual added. Why: each is otherwise its own XLA kernel per layer (a decode step's norms, residual adds and
// activation were ~8 of 19 kernels per layer, each a few microseconds however small), and in a prefill a pass
// over [rows, D] or [rows, 2F] in memory.
struct Fusion {
  const float* norm_weight = nullptr;  // [K]: RMSNorm the rows first
  float eps = 0.f, offset = 0.f;
  const float* residual = nullptr;     // [M, N]: y = residual + x @ w
  bool silu_glu = false;               // y [M, N / 2] = silu(x @ gate) * (x @ up)
};

// Rows [0, M) times panels [p0, p1) of the output (of the gate panels with silu_glu), into y [M, N].
void Panels(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N, int64_t p0, int64_t p1,
            const Fusion& f) {
  float gate[kRowBlock * kPanel], up[kRowBlock * kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = w + p * K * kPanel;
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t rows = std::min<int64_t>(kRowBlock, M - m0);
      float* out = y + m0 * N + p * kPanel;
      if (f.silu_glu) {
        kBlocks[rows](x + m0 * K, K, panel, gate, kPanel);
        kBlocks[rows](x + m0 * K, K, panel + N / kPanel * K * kPanel, up, kPanel);  // up: N / 32 panels on
        for (int64_t i = 0; i < rows * kPanel; i += 16) {
          const Vec16 g = maxjax::Load(gate + i);
          maxjax::Store(out + i / kPanel * N + i % kPanel, g / (1.f + maxjax::Exp(-g)) * maxjax::Load(up + i));
        }
        continue;
      }
      kBlocks[rows](x + m0 * K, K, panel, out, N);
      if (f.residual == nullptr) continue;
      for (int64_t m = 0; m < rows; ++m) {
        const float* r = f.residual + (m0 + m) * N + p * kPanel;
        for (int i = 0; i < kPanel; ++i) out[m * N + i] += r[i];
      }
    }
  }
}

// RMSNorm of rows [m0, m1) of x into xn, in llama.rms_norm's float32 steps.
void NormRows(const float* x, int64_t K, const Fusion& f, float* xn, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * K;
    Vec16 sums{};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const Vec16 v = maxjax::Load(row + k);
      sums += v * v;
    }
    float squares = maxjax::LaneSum(sums);
    for (; k < K; ++k) squares += row[k] * row[k];
    const float inv = 1.f / std::sqrt(squares / K + f.eps);
    for (int64_t k = 0; k < K; ++k) xn[m * K + k] = (f.offset + f.norm_weight[k]) * (row[k] * inv);
  }
}

ffi::Error PanelMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> norm_weight,
                           ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> residual, ffi::ResultBuffer<ffi::F32> y,
                           float eps, float offset, bool silu_glu) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  const int64_t M = xd.size() == 2 ? xd[0] : 0, K = xd.size() == 2 ? xd[1] : 0;
  const int64_t N = (silu_glu ? wd[0] / 2 : wd[0]) * kPanel;
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || wd[1] != K || (silu_glu && wd[0] % 2 != 0) ||
      (norm_weight.element_count() != 0 && norm_weight.element_count() != K) ||
      (residual.element_count() != 0 && (silu_glu || residual.element_count() != M * N))) {
    return ffi::Error::InvalidArgument(
        "panel_matmul: x [M, K], norm weight [K] or [0], w [P, K, 32] (gate | up with silu_glu), residual "
        "[M, 32 P] or [0] expected");
  }
  Fusion f;
  f.eps = eps;
  f.offset = offset;
  f.silu_glu = silu_glu;
  if (residual.element_count() != 0) f.residual = residual.typed_data();
  const float* xs = x.typed_data();
  thread_local std::vector<float> normed;
  if (norm_weight.element_count() != 0) {
    f.norm_weight = norm_weight.typed_data();
    normed.resize(M * K);
    float* xn = normed.data();  // this thread's buffer (a worker naming `normed` would get its own)
    maxjax::ForUnits(pool, M, M, [&](int64_t m0, int64_t m1) { NormRows(xs, K, f, xn, m0, m1); });
    xs = xn;
  }
  const float* ws = w.typed_data();
  float* ys = y->typed_data();
  maxjax::ForUnits(pool, M, N / kPanel,
                   [&](int64_t p0, int64_t p1) { Panels(xs, M, K, ws, ys, N, p0, p1, f); });
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxPanelMatmul, PanelMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // RMSNorm weight [K], or [0]: none
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w [P, K, 32]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // residual [M, 32 P], or [0]: none
                                  .Ret<ffi::Buffer<ffi::F32>>()   // [M, 32 P], or [M, 16 P] with silu_glu
                                  .Attr<float>("eps")
                                  .Attr<float>("offset")
                                  .Attr<bool>("silu_glu"));
