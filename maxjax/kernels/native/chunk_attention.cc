// Grouped-query attention of a chunk of queries over a sequence's keys: prefill chunks and multi-token steps.
//
// Why: XLA CPU runs this as about a dozen kernels per block of queries (the scores product, the mask's select,
// max, exp, sum, the values product, transposes), each a pass over the [queries, keys] scores in memory; in a
// 512-token SmolLM2 prefill they took ~25% of the program. Here one task (row, kv head, tile of queries) computes
// its G heads' scores for the tile into a buffer that stays in cache, with the keys a query tile cannot see
// (past its last visible key: the causal future) skipped, softmaxes them in place and multiplies by the values,
// both products register-blocked like the panel matmul. Around it, XLA's form also rotated and scaled q, copied
// the keys and values out of the cache and transposed the keys (~10 ms of kernels in that prefill): here q is
// read from the projection as it comes and rotated while it is copied into the task's buffer, and keys and
// values are read from the cache in place (each row's keys transposed once per call, by the first tasks).
//
// Semantics are `maxjax.architectures.attention._attention`'s without a soft cap, with q rotated as
// `rope.apply_rope` does when cos/sin are given and multiplied by `scale`: q [B, T, C] holds the H query heads
// in its first H Dh columns (C is wider for a fused q | k | v projection); key/value j of row b is
// cache[layer, pages[b, j / page_size], kv head, j % page_size] for j < S (the paged layout of
// `maxjax.kernels.paged`); mask [B, T, S]; masked scores are -1e30, so a query that sees nothing averages all S
// values uniformly, as XLA's form does.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec_math.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using maxjax::Int16;
using maxjax::Load;
using maxjax::Store;
using maxjax::Vec16;

constexpr float kMasked = -1e30f;
constexpr int64_t kQueryTile = 16;  // queries per task: G x 16 score rows
constexpr int64_t kKeyBlock = 32;   // keys per scores block (two vectors)

struct Shapes {
  int64_t B, T, H, KVH, Dh, S;
  int64_t C, page_size, pages_per_row;  // q's row width; the cache's [L, N, KVH, page_size, Dh]; P
};

// What the tasks read: q [B, T, C], cos/sin [B, T, Dh] (null: q comes rotated), the keys transposed per (row, kv
// head) [B KVH, Dh, S], the layer's values [N, KVH, page_size, Dh], the block tables pages [B, P], mask [B, T, S].
struct Inputs {
  const float *q, *cos, *sin, *kt, *values;
  const int32_t* pages;
  const bool* mask;
  float scale;
};

// Where the values of one (row, kv head) lie: key j's row is page(j / page_size) + (j % page_size) Dh.
struct ValueRows {
  const float* values;  // the layer's values [N, KVH, page_size, Dh]
  const int32_t* pages;  // the row's block table [P]
  int64_t KVH, kvh, page_size, Dh;

  const float* page(int64_t index) const { return values + (pages[index] * KVH + kvh) * page_size * Dh; }
};

// scores[r, j] = q[r] . key j for 8 rows of q ([8, Dh], rows Dh apart) and keys j0 .. j0 + 31 of kt.
void ScoresBlock(const float* q, int64_t Dh, const float* kt, int64_t S, int64_t j0, float* scores, int64_t ld) {
  Vec16 acc[8][2] = {};
  for (int64_t d = 0; d < Dh; ++d) {
    const Vec16 k0 = Load(kt + d * S + j0), k1 = Load(kt + d * S + j0 + 16);
    for (int m = 0; m < 8; ++m) {
      const float x = q[m * Dh + d];
      acc[m][0] += x * k0;
      acc[m][1] += x * k1;
    }
  }
  for (int m = 0; m < 8; ++m) {
    Store(scores + m * ld + j0, acc[m][0]);
    Store(scores + m * ld + j0 + 16, acc[m][1]);
  }
}

// out[r, d0 .. d0 + 16 NV) = sum_j p[r, j] v[j, d0 ..] / total[r] for 8 rows of p (ld apart) over n keys, read
// page by page (the sums stay in registers across the pages).
template <int NV>
void ValuesBlock(const float* p, int64_t ld, int64_t n, const ValueRows& rows, int64_t d0,
                 const float* inv_total, float* const (&out)[8]) {
  Vec16 acc[8][NV] = {};  // local, so that the compiler keeps it in registers
  const int64_t Dh = rows.Dh, PS = rows.page_size;
  for (int64_t first = 0, index = 0; first < n; first += PS, ++index) {
    const float* v = rows.page(index) + d0;  // key first's row
    const float* w = p + first;
    const int64_t count = std::min(PS, n - first);
    for (int64_t j = 0; j < count; ++j) {
      Vec16 vals[NV];
      for (int i = 0; i < NV; ++i) vals[i] = Load(v + j * Dh + 16 * i);
      for (int m = 0; m < 8; ++m) {
        const float x = w[m * ld + j];
        for (int i = 0; i < NV; ++i) acc[m][i] += x * vals[i];
      }
    }
  }
  for (int m = 0; m < 8; ++m) {
    if (out[m] == nullptr) continue;  // a padding row of the tile
    for (int i = 0; i < NV; ++i) Store(out[m] + d0 + 16 * i, acc[m][i] * inv_total[m]);
  }
}

// Which of the 16 keys j .. j + 15 are visible (all-ones lanes), none at or past n.
Int16 VisibleLanes(const bool* visible, int64_t j, int64_t n) {
  if (j + 16 <= n) return maxjax::Widen<false>(visible + j) != 0;
  Int16 lanes{};
  for (int i = 0; j + i < n; ++i) lanes[i] = visible[j + i] ? -1 : 0;
  return lanes;
}

// One score row p [ld] -> exp(score - max) where visible, 0 elsewhere (1 for keys < n when nothing is
// visible); returns 1 / the row's sum. Two passes: the visible maximum, then the exponentials and their sum.
float SoftmaxRow(float* p, const bool* visible, int64_t n, int64_t ld) {
  const Vec16 masked = Vec16{} + kMasked;
  Vec16 top = masked;
  for (int64_t j = 0; j < ld; j += 16) {
    const Vec16 x = VisibleLanes(visible, j, n) ? Load(p + j) : masked;
    top = top > x ? top : x;
  }
  float max = kMasked;
  for (int i = 0; i < 16; ++i) max = std::max(max, top[i]);
  Vec16 total{};
  if (max == kMasked) {  // nothing visible: the uniform average of keys < n
    Int16 lane{};
    for (int i = 0; i < 16; ++i) lane[i] = i;
    for (int64_t j = 0; j < ld; j += 16) {
      const Vec16 e = (lane + static_cast<int32_t>(j)) < static_cast<int32_t>(n) ? Vec16{} + 1.f : Vec16{};
      Store(p + j, e);
      total += e;
    }
    return 1.f / maxjax::LaneSum(total);
  }
  for (int64_t j = 0; j < ld; j += 16) {
    const Vec16 e = VisibleLanes(visible, j, n) ? maxjax::Exp(Load(p + j) - max) : Vec16{};
    Store(p + j, e);
    total += e;
  }
  return 1.f / maxjax::LaneSum(total);
}

// One past a mask row's last visible key (0: none), 8 keys at a time.
int64_t VisibleEnd(const bool* visible, int64_t S) {
  int64_t end = S;
  for (uint64_t word; end >= 8; end -= 8) {
    std::memcpy(&word, visible + end - 8, sizeof(word));
    if (word != 0) break;
  }
  while (end > 0 && !visible[end - 1]) --end;
  return end;
}

// Row b, kv head kvh, queries t0 .. t0 + nq: score row r is head g = r / nq of query t0 + r % nq.
void Task(const Shapes& s, const Inputs& in, float* out, int64_t b, int64_t kvh, int64_t t0, int64_t nq,
          maxjax::LineAlignedFloats& buffer) {
  const int64_t G = s.H / s.KVH, Dh = s.Dh, S = s.S;
  const int64_t rows = G * nq, padded = (rows + 7) / 8 * 8;
  // Keys any query of the tile may see: up to the last visible one (all S when a query sees none).
  int64_t n = 0;
  for (int64_t t = t0; t < t0 + nq; ++t) {
    const int64_t end = VisibleEnd(in.mask + (b * s.T + t) * S, S);
    n = std::max(n, end == 0 ? S : end);
  }
  const int64_t ld = (n + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  // Not cleared (a pass over ~400 KB per task at a 2048 span): every score read is written first.
  float* qs = buffer.Get(padded * (Dh + ld + 1));  // [padded, Dh], rows past `rows` zero
  float* scores = qs + padded * Dh;        // [padded, ld]
  float* inv_total = scores + padded * ld;  // [padded]
  std::fill(qs + rows * Dh, qs + padded * Dh, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t bt = b * s.T + t0 + r % nq;
    const float* cos = in.cos == nullptr ? nullptr : in.cos + bt * Dh;
    const float* sin = in.sin == nullptr ? nullptr : in.sin + bt * Dh;
    float* row = qs + r * Dh;
    maxjax::RotateHalf(in.q + bt * s.C + (kvh * G + r / nq) * Dh, cos, sin, Dh, row);
    for (int64_t d = 0; d < Dh; ++d) row[d] *= in.scale;
  }
  const float* keys = in.kt + (b * s.KVH + kvh) * Dh * S;
  const ValueRows values{in.values, in.pages + b * s.pages_per_row, s.KVH, kvh, s.page_size, Dh};
  const int64_t full = S >= ld ? ld : n / kKeyBlock * kKeyBlock;  // whole blocks inside kt's S columns
  for (int64_t j0 = 0; j0 < full; j0 += kKeyBlock) {
    for (int64_t r0 = 0; r0 < padded; r0 += 8) ScoresBlock(qs + r0 * Dh, Dh, keys, S, j0, scores + r0 * ld, ld);
  }
  for (int64_t r = 0; r < padded; ++r) {  // the last keys of a span that is not a multiple of 32
    for (int64_t j = full; j < n; ++j) {
      float sum = 0.f;
      for (int64_t d = 0; d < Dh; ++d) sum += qs[r * Dh + d] * keys[d * S + j];
      scores[r * ld + j] = sum;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    inv_total[r] = SoftmaxRow(scores + r * ld, in.mask + (b * s.T + t0 + r % nq) * S, n, ld);
  }
  for (int64_t r0 = 0; r0 < padded; r0 += 8) {
    float* outs[8];
    for (int64_t m = 0; m < 8; ++m) {
      const int64_t r = r0 + m;
      outs[m] = r < rows ? out + ((b * s.T + t0 + r % nq) * s.H + kvh * G + r / nq) * Dh : nullptr;
    }
    const float* p = scores + r0 * ld;
    int64_t d0 = 0;
    for (; d0 + 32 <= Dh; d0 += 32) ValuesBlock<2>(p, ld, n, values, d0, inv_total + r0, outs);
    if (d0 < Dh) ValuesBlock<1>(p, ld, n, values, d0, inv_total + r0, outs);
  }
}

// Keys [S, Dh] of (row, kv head) bk, read from the layer's cache through the row's block table, into kt [Dh, S]
// (ScoresBlock reads 32 keys of one dimension as two vectors); 16 keys at a time, each from its page.
void TransposeKeys(const Shapes& s, const float* keys, const int32_t* pages, int64_t bk, float* kt) {
  const ValueRows rows{keys, pages + bk / s.KVH * s.pages_per_row, s.KVH, bk % s.KVH, s.page_size, s.Dh};
  float* to = kt + bk * s.Dh * s.S;
  for (int64_t j0 = 0; j0 < s.S; j0 += 16) {
    const int64_t j1 = std::min(s.S, j0 + 16);
    const float* from[16];
    for (int64_t j = j0; j < j1; ++j) from[j - j0] = rows.page(j / s.page_size) + j % s.page_size * s.Dh;
    for (int64_t d = 0; d < s.Dh; ++d) {
      for (int64_t j = j0; j < j1; ++j) to[d * s.S + j] = from[j - j0][d];
    }
  }
}

ffi::Error ChunkAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> cache_k,
                              ffi::Buffer<ffi::F32> cache_v, ffi::Buffer<ffi::S32> layer,
                              ffi::Buffer<ffi::S32> pages, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> cos,
                              ffi::Buffer<ffi::F32> sin, ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), cd = cache_k.dimensions(), md = mask.dimensions(), od = out->dimensions();
  const auto td = pages.dimensions();
  const bool rotate = cos.element_count() != 0;
  if (qd.size() != 3 || cd.size() != 5 || md.size() != 3 || od.size() != 4 || od[3] % 16 != 0 ||
      cd[4] != od[3] || od[2] % cd[2] != 0 || od[0] != qd[0] || od[1] != qd[1] || qd[2] < od[2] * od[3] ||
      !std::equal(cd.begin(), cd.end(), cache_v.dimensions().begin(), cache_v.dimensions().end()) ||
      td.size() != 2 || td[0] != qd[0] || layer.element_count() != 1 || md[0] != qd[0] || md[1] != qd[1] ||
      md[2] > td[1] * cd[3] ||
      (rotate && (cos.element_count() != qd[0] * qd[1] * od[3] || sin.element_count() != cos.element_count()))) {
    return ffi::Error::InvalidArgument(
        "chunk_attention: q [B, T, >= H Dh], caches [L, N, KVH, page_size, Dh], layer [], pages [B, P], mask "
        "[B, T, <= P page_size], cos and sin [B, T, Dh] or [0], out [B, T, H, Dh] (Dh % 16 == 0) expected");
  }
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= cd[0]) return ffi::Error::InvalidArgument("chunk_attention: layer out of the cache's range");
  const int32_t* table = pages.typed_data();
  const int64_t used = (md[2] + cd[3] - 1) / cd[3];  // the pages holding keys 0 .. S - 1
  for (int64_t b = 0; b < qd[0]; ++b) {
    for (int64_t i = 0; i < used; ++i) {
      const int32_t id = table[b * td[1] + i];
      if (id < 0 || id >= cd[1]) return ffi::Error::InvalidArgument("chunk_attention: page out of the cache's range");
    }
  }
  const Shapes s{od[0], od[1], od[2], cd[2], od[3], md[2], qd[2], cd[3], td[1]};
  const int64_t layer_size = cd[1] * cd[2] * cd[3] * cd[4], rows = s.B * s.KVH;
  thread_local maxjax::LineAlignedFloats transposed_keys;  // the caller's (a worker naming it gets its own)
  float* kt = transposed_keys.Get(rows * s.Dh * s.S);
  const Inputs in{q.typed_data(), rotate ? cos.typed_data() : nullptr, rotate ? sin.typed_data() : nullptr,
                  kt, cache_v.typed_data() + l * layer_size, table,
                  reinterpret_cast<const bool*>(mask.typed_data()), scale};
  const float* keys = cache_k.typed_data() + l * layer_size;
  float* os = out->typed_data();
  // The first `rows` chunks transpose each (row, kv head)'s keys; then one task per (row, kv head, query tile),
  // the last tiles (the most keys under a causal mask) first, each claimed on its own so that the uneven tasks
  // balance over the threads. A task waits for its keys: their chunk was claimed before it, so it is running.
  const int64_t tiles = (s.T + kQueryTile - 1) / kQueryTile;
  std::vector<std::atomic<bool>> transposed(rows);
  const auto run = [&](int64_t chunk) {
    if (chunk < rows) {
      TransposeKeys(s, keys, table, chunk, kt);
      transposed[chunk].store(true, std::memory_order_release);
      return;
    }
    thread_local maxjax::LineAlignedFloats buffer;
    const int64_t task = chunk - rows, tile = tiles - 1 - task / rows, bk = task % rows;
    while (!transposed[bk].load(std::memory_order_acquire)) maxjax::Pause();
    const int64_t t0 = tile * kQueryTile;
    Task(s, in, os, bk / s.KVH, bk % s.KVH, t0, std::min(kQueryTile, s.T - t0), buffer);
  };
  maxjax::ParallelFor(pool, s.B * s.T >= maxjax::kLongCallRows, rows + rows * tiles, run);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxChunkAttention, ChunkAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [B, T, C]: heads in the first H Dh columns
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cache keys [L, N, KVH, page_size, Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cache values
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer []
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pages [B, P]: the rows' block tables
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [B, T, S]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos [B, T, Dh], or [0]: q comes rotated
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin [B, T, Dh], or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // [B, T, H, Dh]
                                  .Attr<float>("scale"));
