// One decode step's grouped-query attention for every row, reading the KV cache in place, from the row's fused
// q | k | v projection: rotary embedding applied here, and the new (rotated) key and value returned for the
// caller's deferred cache write.
//
// Why: written with XLA ops, each layer first copies every row's keys and values out of the cache (a gather
// through the block tables, the new token's key appended) and then reads the copy in the attention products: on
// SmolLM2 at batch 8-32 that copy alone was 15-18% of a CPU decode step. Here each (row, kv head) task reads its
// cache rows where they are, page by page, once for the scores and once for the values of all its query heads,
// and the new key/value from the projection. Splitting
// q, k, v and rotating them were another 6 small XLA kernels per layer (~0.4 ms of a ~18 ms batch-1 step).
//
// Semantics are those of `maxjax.architectures.attention._attention` with `with_new_key`: key j < span is cache
// position j of the row, on page pages[b, j / page_size] at offset j % page_size (`maxjax.kernels.paged`), key
// `span` the new one; scores * scale, soft-capped when softcap > 0, masked to -1e30, softmax over span + 1 keys.
// Only the keys from a row's first visible one to its last are read (a causal mask's prefix, a sliding window's
// range): the masked keys outside weigh exactly 0 in that softmax, so the cost follows the row's length, not the
// span. A row that sees no cache key attends to its new key alone (a padding row, which sees nothing at all,
// gets its new value: finite and cheap; XLA's form gives the uniform average there, and callers discard both).
// Rotation (cos, sin [B, Dh], or empty when q and k come rotated): `rope.apply_rope`'s rotate-half convention,
// x * cos + rotate_half(x) * sin.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec_math.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using maxjax::Exp;
using maxjax::ExpInPlace;
using maxjax::LaneSum;
using maxjax::Vec16;

constexpr float kMasked = -1e30f;

float Dot(const float* a, const float* b, int64_t n) {
  Vec16 acc{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    Vec16 x, y;
    std::memcpy(&x, a + i, sizeof(Vec16));
    std::memcpy(&y, b + i, sizeof(Vec16));
    acc += x * y;
  }
  float sum = LaneSum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void Axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Keys of a row held contiguously in the cache (inside one page): `count` rows of Dh floats from `keys` and
// `values`. A row's visible range is a list of runs, one per page, in key order.
struct Run {
  const float* keys;
  const float* values;
  int64_t count;
};

// Query heads served by one pass over a row's keys (and values) at 16 NV floats per row: each key is loaded
// once for all of them (a pass per head read a long row's keys G times, from L2 or farther), as many as the
// registers hold: NG q heads (or NG sums) of NV vectors beside the NV of the key.
#if defined(__AVX512F__)
constexpr int kHeadsPerPass4 = 4, kHeadsPerPass8 = 2;
#else
constexpr int kHeadsPerPass4 = 2, kHeadsPerPass8 = 1;
#endif

// fn(u, j, row j) on rows [0, count) of a run of rows of 16 NV floats, U rows at a time (u = j % U, a constant
// once the loop over u is unrolled: register sums may be indexed by it), the last ones with u = 0. While a run
// is read, the next one (another page, or null) is fetched line by line, a page ahead: the hardware prefetcher
// starts over at each page, and on pages of 64 positions that restart cost as much as the reads.
template <int NV, int U, typename F>
void EachRow(const float* rows, int64_t count, const float* next, const F& fn) {
  int64_t j = 0;
  for (; j + U <= count; j += U) {
    if (next != nullptr) {
      for (int i = 0; i < U * NV; ++i) __builtin_prefetch(next + j * 16 * NV + 16 * i);
    }
    for (int u = 0; u < U; ++u) fn(u, j + u, rows + (j + u) * 16 * NV);
  }
  for (; j < count; ++j) fn(0, j, rows + j * 16 * NV);
}

// scores[g ld + j] = q_g . key j for NG heads q [NG, 16 NV] over the runs' n keys, then scores[g ld + n] =
// q_g . kn (the new key): q stays in registers, each key is loaded once, and the keys are scored without
// branches (masked afterwards).
template <int NV, int NG>
void ScoreHeads(const float* q, const Run* runs, int64_t num_runs, const float* kn, float* scores, int64_t ld) {
  Vec16 qv[NG][NV];
  for (int g = 0; g < NG; ++g) {
    for (int i = 0; i < NV; ++i) qv[g][i] = maxjax::Load(q + g * 16 * NV + 16 * i);
  }
  const auto score = [&](const float* key, float* at) {
    Vec16 k[NV];
    for (int i = 0; i < NV; ++i) k[i] = maxjax::Load(key + 16 * i);
    for (int g = 0; g < NG; ++g) {
      Vec16 sum = qv[g][0] * k[0];
      for (int i = 1; i < NV; ++i) sum += qv[g][i] * k[i];
      at[g * ld] = LaneSum(sum);
    }
  };
  for (const Run* run = runs; run != runs + num_runs; ++run) {
    const float* next = run + 1 == runs + num_runs ? nullptr : run[1].keys;
    EachRow<NV, 1>(run->keys, run->count, next, [&](int, int64_t j, const float* key) { score(key, scores + j); });
    scores += run->count;
  }
  score(kn, scores);
}

// o_g = inv_total[g] * (sum_j w[g ld + j] value_j + w[g ld + n] vn) for NG heads (o_g at o + g 16 NV) over the
// runs' n keys, rows of 16 NV floats. The sums stay in registers across the runs (pages), each value loaded
// once for the NG heads; one head alone takes two keys at a time in separate sums (enough independent chains).
// Accumulating into o in memory instead chains every key's multiply-add through a store and a load (~10 cycles
// per key and head).
template <int NV, int NG>
void WeightHeads(const float* w, int64_t ld, const Run* runs, int64_t num_runs, const float* vn,
                 const float* inv_total, float* o) {
  constexpr int U = NG == 1 ? 2 : 1;
  Vec16 acc[U][NG][NV] = {};
  const auto add = [&](int u, const float* row, const float* weights) {
    Vec16 v[NV];
    for (int i = 0; i < NV; ++i) v[i] = maxjax::Load(row + 16 * i);
    for (int g = 0; g < NG; ++g) {
      const float x = weights[g * ld];
      for (int i = 0; i < NV; ++i) acc[u][g][i] += x * v[i];
    }
  };
  for (const Run* run = runs; run != runs + num_runs; ++run) {
    const float* next = run + 1 == runs + num_runs ? nullptr : run[1].values;
    EachRow<NV, U>(run->values, run->count, next, [&](int u, int64_t j, const float* row) { add(u, row, w + j); });
    w += run->count;
  }
  add(0, vn, w);
  for (int g = 0; g < NG; ++g) {
    for (int i = 0; i < NV; ++i) {
      Vec16 sum = acc[0][g][i];
      for (int u = 1; u < U; ++u) sum += acc[u][g][i];
      maxjax::Store(o + g * 16 * NV + 16 * i, sum * inv_total[g]);
    }
  }
}

// ScoreHeads over G heads, NG at a time (then the rest).
template <int NV, int NG>
void ScoreGroups(const float* q, int64_t G, const Run* runs, int64_t num_runs, const float* kn, float* scores,
                 int64_t ld) {
  int64_t g = 0;
  for (; g + NG <= G; g += NG) ScoreHeads<NV, NG>(q + g * 16 * NV, runs, num_runs, kn, scores + g * ld, ld);
  if constexpr (NG > 1) {
    if (g < G) ScoreGroups<NV, NG - 1>(q + g * 16 * NV, G - g, runs, num_runs, kn, scores + g * ld, ld);
  }
}

// WeightHeads over G heads, NG at a time (then the rest).
template <int NV, int NG>
void WeightGroups(const float* w, int64_t ld, int64_t G, const Run* runs, int64_t num_runs, const float* vn,
                  const float* inv_total, float* o) {
  int64_t g = 0;
  for (; g + NG <= G; g += NG) {
    WeightHeads<NV, NG>(w + g * ld, ld, runs, num_runs, vn, inv_total + g, o + g * 16 * NV);
  }
  if constexpr (NG > 1) {
    if (g < G) WeightGroups<NV, NG - 1>(w + g * ld, ld, G - g, runs, num_runs, vn, inv_total + g, o + g * 16 * NV);
  }
}

// scores [G, ld]: the G query heads q [G, Dh] against the runs' n keys and the new key kn (column n), any Dh.
void KeyScores(const float* q, int64_t G, const Run* runs, int64_t num_runs, const float* kn, int64_t Dh,
               float* scores, int64_t ld) {
  switch (Dh) {
    case 64: return ScoreGroups<4, kHeadsPerPass4>(q, G, runs, num_runs, kn, scores, ld);
    case 128: return ScoreGroups<8, kHeadsPerPass8>(q, G, runs, num_runs, kn, scores, ld);
    default: break;
  }
  for (int64_t g = 0; g < G; ++g) {
    float* row = scores + g * ld;
    for (const Run* run = runs; run != runs + num_runs; ++run) {
      for (int64_t j = 0; j < run->count; ++j) row[j] = Dot(q + g * Dh, run->keys + j * Dh, Dh);
      row += run->count;
    }
    row[0] = Dot(q + g * Dh, kn, Dh);
  }
}

// o [G, Dh]: head g's weights w [g ld ..] over the runs' values and vn, times inv_total[g], any Dh.
void WeightedValues(const float* w, int64_t ld, int64_t G, const Run* runs, int64_t num_runs, const float* vn,
                    int64_t Dh, const float* inv_total, float* o) {
  switch (Dh) {
    case 64: return WeightGroups<4, kHeadsPerPass4>(w, ld, G, runs, num_runs, vn, inv_total, o);
    case 128: return WeightGroups<8, kHeadsPerPass8>(w, ld, G, runs, num_runs, vn, inv_total, o);
    default: break;
  }
  for (int64_t g = 0; g < G; ++g) {
    const float* weights = w + g * ld;
    float* out = o + g * Dh;
    std::fill(out, out + Dh, 0.f);
    for (const Run* run = runs; run != runs + num_runs; ++run) {
      for (int64_t j = 0; j < run->count; ++j) Axpy(weights[j], run->values + j * Dh, out, Dh);
      weights += run->count;
    }
    Axpy(weights[0], vn, out, Dh);
    for (int64_t d = 0; d < Dh; ++d) out[d] *= inv_total[g];
  }
}

// The first visible key of a mask row of n keys (n: none), 64 keys at a time.
int64_t VisibleBegin(const bool* visible, int64_t n) {
  int64_t begin = 0;
  for (uint64_t words[8]; begin + 64 <= n; begin += 64) {
    std::memcpy(words, visible + begin, sizeof(words));
    if ((words[0] | words[1] | words[2] | words[3] | words[4] | words[5] | words[6] | words[7]) != 0) break;
  }
  while (begin < n && !visible[begin]) ++begin;
  return begin;
}

// One past the last visible key of a mask row of n keys (0: none), 64 keys at a time.
int64_t VisibleEnd(const bool* visible, int64_t n) {
  int64_t end = n;
  for (uint64_t words[8]; end >= 64; end -= 64) {
    std::memcpy(words, visible + end - 64, sizeof(words));
    if ((words[0] | words[1] | words[2] | words[3] | words[4] | words[5] | words[6] | words[7]) != 0) break;
  }
  while (end > 0 && !visible[end - 1]) --end;
  return end;
}

struct Shapes {
  int64_t B, H, KVH, Dh, num_pages, page_size, pages_per_row, layer, span;
  float scale, softcap;
};

// What the tasks read: the rows' q | k | v [B, (H + 2 KVH) Dh], cos/sin [B, Dh] (null: q and k come rotated),
// the caches [L, num_pages, KVH, page_size, Dh], the block tables [B, P] and the mask [B, span + 1].
struct Inputs {
  const float *qkv, *cos, *sin, *cache_k, *cache_v;
  const int32_t* pages;
  const bool* mask;
};

// A task's scratch: G rows of scores, G rotated queries, the runs of its keys.
struct Scratch {
  std::vector<float> scores, q;
  std::vector<Run> runs;
};

// Row b, kv head kvh: its G = H / KVH query heads against the row's visible cache keys and the new key; the
// rotated new key and the value go to k_out, v_out [B, KVH, Dh]. False when a page it reads is out of range.
bool Task(const Shapes& s, const Inputs& in, float* out, float* k_out, float* v_out, int64_t b, int64_t kvh,
          Scratch& scratch) {
  const int64_t G = s.H / s.KVH, Dh = s.Dh, PS = s.page_size, span = s.span;
  const float* projection = in.qkv + b * (s.H + 2 * s.KVH) * Dh;
  const float* row_cos = in.cos == nullptr ? nullptr : in.cos + b * Dh;
  const float* row_sin = in.sin == nullptr ? nullptr : in.sin + b * Dh;
  float* kn = k_out + (b * s.KVH + kvh) * Dh;
  float* vn = v_out + (b * s.KVH + kvh) * Dh;
  maxjax::RotateHalf(projection + (s.H + kvh) * Dh, row_cos, row_sin, Dh, kn);
  std::memcpy(vn, projection + (s.H + s.KVH + kvh) * Dh, Dh * sizeof(float));
  const bool* visible = in.mask + b * (span + 1);
  // The cache keys read: [first visible, last visible] (none: the new key alone, whose softmax weight is 1).
  const int64_t begin = VisibleBegin(visible, span);
  const int64_t end = begin == span ? begin : VisibleEnd(visible, span);
  const int64_t n = end - begin;
  if (n == 0) {
    for (int64_t g = 0; g < G; ++g) std::memcpy(out + (b * s.H + kvh * G + g) * Dh, vn, Dh * sizeof(float));
    return true;
  }
  std::vector<Run>& runs = scratch.runs;
  runs.clear();
  const int64_t layer_base = s.layer * s.num_pages * s.KVH * PS * Dh;
  for (int64_t page = begin / PS; page * PS < end; ++page) {
    const int64_t id = in.pages[b * s.pages_per_row + page];
    if (id < 0 || id >= s.num_pages) return false;
    const int64_t first = std::max(begin, page * PS), last = std::min(end, (page + 1) * PS);
    const int64_t at = layer_base + ((id * s.KVH + kvh) * PS + first - page * PS) * Dh;
    runs.push_back({in.cache_k + at, in.cache_v + at, last - first});
  }
  const int64_t keys = n + 1;  // the range's, then the new key
  std::vector<float>& q = scratch.q;
  q.resize(G * Dh);
  for (int64_t g = 0; g < G; ++g) {
    maxjax::RotateHalf(projection + (kvh * G + g) * Dh, row_cos, row_sin, Dh, &q[g * Dh]);
  }
  scratch.scores.resize(G * keys + G);
  float* scores = scratch.scores.data();  // [G, keys]: the range's keys, then the new one
  float* inv_total = scores + G * keys;   // [G]
  KeyScores(q.data(), G, runs.data(), runs.size(), kn, Dh, scores, keys);
  const bool* seen = visible + begin;  // the range's mask; the new key's is visible[span]
  for (int64_t g = 0; g < G; ++g) {
    float* p = scores + g * keys;
    for (int64_t j = 0; j < keys; ++j) p[j] *= s.scale;
    if (s.softcap > 0.f) {
      for (int64_t j = 0; j < keys; ++j) p[j] = std::tanh(p[j] / s.softcap) * s.softcap;
    }
    for (int64_t j = 0; j < n; ++j) p[j] = seen[j] ? p[j] : kMasked;
    p[n] = visible[span] ? p[n] : kMasked;
    const float top = *std::max_element(p, p + keys);  // key `begin` is visible: a real score
    for (int64_t j = 0; j < keys; ++j) p[j] -= top;
    ExpInPlace(p, keys);
    float total = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      p[j] = seen[j] ? p[j] : 0.f;
      total += p[j];
    }
    p[n] = visible[span] ? p[n] : 0.f;
    inv_total[g] = 1.f / (total + p[n]);
  }
  WeightedValues(scores, keys, G, runs.data(), runs.size(), vn, Dh, inv_total, out + (b * s.H + kvh * G) * Dh);
  return true;
}

ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> cache_k,
                               ffi::Buffer<ffi::F32> cache_v, ffi::Buffer<ffi::S32> pages,
                               ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                               ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> k_out,
                               ffi::ResultBuffer<ffi::F32> v_out, int64_t layer, float scale, float softcap) {
  const auto pd = qkv.dimensions(), cd = cache_k.dimensions(), md = mask.dimensions(), td = pages.dimensions();
  const auto od = out->dimensions();
  const bool rotated = cos.element_count() != 0;
  if (pd.size() != 2 || cd.size() != 5 || md.size() != 2 || od.size() != 3 || td.size() != 2 || od[2] != cd[4] ||
      od[1] % cd[2] != 0 || pd[0] != od[0] || pd[1] != (od[1] + 2 * cd[2]) * cd[4] || md[0] != pd[0] ||
      td[0] != pd[0] || md[1] < 1 || md[1] - 1 > td[1] * cd[3] || layer < 0 || layer >= cd[0] ||
      cd[4] % 2 != 0 ||
      !std::equal(cd.begin(), cd.end(), cache_v.dimensions().begin(), cache_v.dimensions().end()) ||
      (rotated && (cos.element_count() != pd[0] * cd[4] || sin.element_count() != cos.element_count()))) {
    return ffi::Error::InvalidArgument(
        "decode_attention: qkv [B, (H + 2 KVH) Dh], caches [L, N, KVH, page_size, Dh], pages [B, P], mask "
        "[B, span + 1] (span <= P page_size), cos and sin [B, Dh] or [0], out [B, H, Dh] expected");
  }
  const Shapes s{pd[0], od[1], cd[2], cd[4], cd[1], cd[3], td[1], layer, md[1] - 1, scale, softcap};
  const Inputs in{qkv.typed_data(), rotated ? cos.typed_data() : nullptr, rotated ? sin.typed_data() : nullptr,
                  cache_k.typed_data(), cache_v.typed_data(), pages.typed_data(),
                  reinterpret_cast<const bool*>(mask.typed_data())};
  float *os = out->typed_data(), *kn = k_out->typed_data(), *vn = v_out->typed_data();
  std::atomic<bool> bad_page{false};
  maxjax::ForRanges(s.B * s.KVH, [&](int64_t t0, int64_t t1) {
    thread_local Scratch scratch;
    for (int64_t t = t0; t < t1; ++t) {
      if (!Task(s, in, os, kn, vn, t / s.KVH, t % s.KVH, scratch)) bad_page.store(true);
    }
  });
  if (bad_page.load()) return ffi::Error::InvalidArgument("decode_attention: page out of the cache's range");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q | k | v [B, (H + 2 KVH) Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cache keys [L, N, KVH, page_size, Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cache values
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pages [B, P]: the rows' block tables
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [B, span + 1]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos [B, Dh], or [0]: q and k come rotated
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin [B, Dh], or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // [B, H, Dh]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // the new keys, rotated [B, KVH, Dh]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // the new values [B, KVH, Dh]
                                  .Attr<int64_t>("layer")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
