// y[M, N] = x[M, K] @ W for float32 weights packed into column panels: W[P, K, 32], panel p holding
// columns 32p .. 32p + 31, each of its K rows contiguous (N = 32 P).
//
// Why: XLA CPU's dots read a [K, N] weight at ~24 GB/s for one row and ~15 GB/s for 2-32 rows on a 2-core
// Zen 4 (a decode step is bound by reading the weights once). Walking one contiguous panel at a time, with
// the 32 columns of up to 8 rows held in registers, streams the weights at the memory's speed for every
// small M and runs a 512-row prefill at ~90% of the FMA peak.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "vec_math.h"
#include "workers.h"

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 32;     // columns per panel: two 16-float vectors
constexpr int kRowBlock = 8;   // rows whose accumulators stay in registers (8 x 2 vectors)
constexpr int64_t kPoolRows = 64;  // from this many rows a call runs on XLA's thread pool (workers.h)
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

void Panels(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = w + p * K * kPanel;
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t rows = std::min<int64_t>(kRowBlock, M - m0);
      kBlocks[rows](x + m0 * K, K, panel, y + m0 * N + p * kPanel, N);
    }
  }
}

// Rows [0, M) times the gate panels [p0, p1) and their up panels (F / 32 panels later), written as
// silu(gate) * up to y [M, F]: the gated MLP's activation in the product's epilogue (no [M, 2F] output to write
// and read back, one kernel less per layer).
void SiluGluPanels(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t F, int64_t p0,
                   int64_t p1) {
  float gate[kRowBlock * kPanel], up[kRowBlock * kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    const float* gate_panel = w + p * K * kPanel;
    const float* up_panel = w + (p + F / kPanel) * K * kPanel;
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t rows = std::min<int64_t>(kRowBlock, M - m0);
      kBlocks[rows](x + m0 * K, K, gate_panel, gate, kPanel);
      kBlocks[rows](x + m0 * K, K, up_panel, up, kPanel);
      for (int64_t i = 0; i < rows * kPanel; i += 16) {
        Vec16 g, u;
        std::memcpy(&g, gate + i, sizeof(Vec16));
        std::memcpy(&u, up + i, sizeof(Vec16));
        const Vec16 out = g / (1.f + maxjax::Exp(-g)) * u;
        std::memcpy(y + (m0 + i / kPanel) * F + p * kPanel + i % kPanel, &out, sizeof(Vec16));
      }
    }
  }
}

// fn(first panel, end panel) over `panels` panels cut into chunks, on XLA's thread pool for long calls (a
// prefill's rows) and on maxjax's spinning workers for short ones (decode steps), see workers.h.
template <typename F>
void ForPanelChunks(ffi::ThreadPool& pool, int64_t M, int64_t panels, const F& fn) {
  const int64_t chunks = maxjax::ChunkCount(panels);
  const auto chunk = [&](int64_t c) { fn(panels * c / chunks, panels * (c + 1) / chunks); };
  if (M >= kPoolRows) {
    maxjax::ParallelForOn(chunks, chunk, maxjax::Workers::Get().size(),
                          [&](auto task) { pool.Schedule(std::move(task)); });
  } else {
    maxjax::ParallelFor(chunks, chunk);
  }
}

bool Shaped(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  return xd.size() == 2 && wd.size() == 3 && wd[2] == kPanel && xd[1] == wd[1];
}

ffi::Error PanelMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y) {
  if (!Shaped(x, w)) return ffi::Error::InvalidArgument("panel_matmul: x [M, K] and w [P, K, 32] expected");
  const float *xs = x.typed_data(), *ws = w.typed_data();
  float* ys = y->typed_data();
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[0] * kPanel;
  ForPanelChunks(pool, M, N / kPanel, [&](int64_t p0, int64_t p1) { Panels(xs, M, K, ws, ys, N, p0, p1); });
  return ffi::Error::Success();
}

ffi::Error SiluGluMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                             ffi::ResultBuffer<ffi::F32> y) {
  if (!Shaped(x, w) || w.dimensions()[0] % 2 != 0) {
    return ffi::Error::InvalidArgument("silu_glu_matmul: x [M, K] and gate|up w [2P, K, 32] expected");
  }
  const float *xs = x.typed_data(), *ws = w.typed_data();
  float* ys = y->typed_data();
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], F = w.dimensions()[0] / 2 * kPanel;
  ForPanelChunks(pool, M, F / kPanel, [&](int64_t p0, int64_t p1) { SiluGluPanels(xs, M, K, ws, ys, F, p0, p1); });
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxPanelMatmul, PanelMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w [P, K, 32]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [M, 32 P]

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxSiluGluMatmul, SiluGluMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gate | up w [2P, K, 32]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // silu(x @ gate) * (x @ up) [M, 32 P]
