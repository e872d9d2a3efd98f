// y[M, N] = x[M, K] @ W for float32 weights packed into column panels: W[P, K, 32], panel p holding
// columns 32p .. 32p + 31, each of its K rows contiguous (N = 32 P).
//
// Why: XLA CPU's dots read a [K, N] weight at ~24 GB/s for one row and ~15 GB/s for 2-32 rows on a 2-core
// Zen 4 (a decode step is bound by reading the weights once). Walking one contiguous panel at a time, with
// the 32 columns of up to 8 rows held in registers, streams the weights at the memory's speed for every
// small M and runs a 512-row prefill at ~90% of the FMA peak.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 32;     // columns per panel: two 16-float vectors
constexpr int kRowBlock = 8;   // rows whose accumulators stay in registers (8 x 2 vectors)
typedef float Vec16 __attribute__((vector_size(64)));

// Rows [0, MB) of x times one panel, written to y's 32 columns at n0.
template <int MB>
void PanelBlock(const float* x, int64_t K, const float* panel, float* y, int64_t N) {
  Vec16 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = Vec16{};
  const float* w = panel;
  for (int64_t k = 0; k < K; ++k, w += kPanel) {
    __builtin_prefetch(w + 16 * kPanel);  // 2 KiB ahead within the panel (or into the next one)
    Vec16 w0, w1;
    std::memcpy(&w0, w, sizeof(Vec16));
    std::memcpy(&w1, w + 16, sizeof(Vec16));
    for (int m = 0; m < MB; ++m) {
      const float xv = x[m * K + k];
      acc[m][0] += xv * w0;
      acc[m][1] += xv * w1;
    }
  }
  for (int m = 0; m < MB; ++m) {
    std::memcpy(y + m * N, &acc[m][0], sizeof(Vec16));
    std::memcpy(y + m * N + 16, &acc[m][1], sizeof(Vec16));
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

// Chunks of panels claimed from a shared counter by the caller and by helpers on XLA's intra-op pool. The
// caller can finish every chunk alone, so a helper that starts late (or never) only finds nothing left.
struct Work {
  const float* x; const float* w; float* y;
  int64_t M, K, N, panels, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      Panels(x, M, K, w, y, N, panels * c / chunks, panels * (c + 1) / chunks);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error PanelMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("panel_matmul: x [M, K] and w [P, K, 32] expected");
  }
  auto work = std::make_shared<Work>();
  work->x = x.typed_data(); work->w = w.typed_data(); work->y = y->typed_data();
  work->M = xd[0]; work->K = xd[1]; work->panels = wd[0]; work->N = wd[0] * kPanel;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  work->chunks = std::min<int64_t>(work->panels, 4 * threads);
  for (int64_t t = 1; t < std::min(threads, work->chunks); ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->chunks) {
    std::this_thread::yield();  // a helper is finishing its last chunk (yield: it may share our core)
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxPanelMatmul, PanelMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
