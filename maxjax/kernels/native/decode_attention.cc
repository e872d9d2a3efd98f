// One decode step's grouped-query attention for every row, reading the KV cache in place, from the row's fused
// q | k | v projection: rotary embedding applied here, and the new (rotated) key and value returned for the
// caller's deferred cache write.
//
// Why: written with XLA ops, each layer first copies every row's keys and values out of the cache (a gather by
// slot, the new token's key appended) and then reads the copy in the attention products: on SmolLM2 at batch
// 8-32 that copy alone was 15-18% of a CPU decode step. Here each (row, kv head) task reads its cache rows where
// they are, once for the scores and once for the values, and the new key/value from the projection. Splitting
// q, k, v and rotating them were another 6 small XLA kernels per layer (~0.4 ms of a ~18 ms batch-1 step).
//
// Semantics are those of `maxjax.architectures.attention._attention` with `with_new_key`: key j < span is cache
// position j of the row's slot, key `span` the new one; scores * scale, soft-capped when softcap > 0, masked to
// -1e30, softmax over span + 1 keys (a row that sees nothing averages every key uniformly, as XLA's form does).
// Rotation (cos, sin [B, Dh], or empty when q and k come rotated): `rope.apply_rope`'s rotate-half convention,
// x * cos + rotate_half(x) * sin.
#include <algorithm>
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

// o = scale * sum_j w[j] value_j for rows of 16 NV floats: value j < span is row j of V, value span the new
// one (vn). The sums stay in registers, two keys at a time in separate sums; accumulating into o in memory
// instead chains every key's multiply-add through a store and a load (~10 cycles per key and head).
template <int NV>
void WeightedRows(const float* w, int64_t span, const float* V, const float* vn, float scale, float* o) {
  Vec16 acc[2][NV] = {};
  int64_t j = 0;
  for (; j + 2 <= span; j += 2) {
    for (int h = 0; h < 2; ++h) {
      const float* row = V + (j + h) * 16 * NV;
      for (int i = 0; i < NV; ++i) acc[h][i] += w[j + h] * maxjax::Load(row + 16 * i);
    }
  }
  for (; j < span; ++j) {
    for (int i = 0; i < NV; ++i) acc[0][i] += w[j] * maxjax::Load(V + j * 16 * NV + 16 * i);
  }
  for (int i = 0; i < NV; ++i) {
    maxjax::Store(o + 16 * i, (acc[0][i] + acc[1][i] + w[span] * maxjax::Load(vn + 16 * i)) * scale);
  }
}

// scores[j] = q . key j for keys [0, span] (key j < span is row j of K, key span the new one), rows of 16 NV
// floats: q stays in registers, and the keys are scored without branches (masked afterwards).
template <int NV>
void ScoreRows(const float* q, int64_t span, const float* K, const float* kn, float* scores) {
  Vec16 qv[NV];
  for (int i = 0; i < NV; ++i) qv[i] = maxjax::Load(q + 16 * i);
  for (int64_t j = 0; j <= span; ++j) {
    const float* key = j < span ? K + j * 16 * NV : kn;
    Vec16 sum = qv[0] * maxjax::Load(key);
    for (int i = 1; i < NV; ++i) sum += qv[i] * maxjax::Load(key + 16 * i);
    scores[j] = LaneSum(sum);
  }
}

// ScoreRows for any head size Dh.
void KeyScores(const float* q, int64_t span, const float* K, const float* kn, int64_t Dh, float* scores) {
  switch (Dh) {
    case 64: return ScoreRows<4>(q, span, K, kn, scores);
    case 128: return ScoreRows<8>(q, span, K, kn, scores);
    default: break;
  }
  for (int64_t j = 0; j <= span; ++j) scores[j] = Dot(q, j < span ? K + j * Dh : kn, Dh);
}

// WeightedRows for any head size Dh.
void WeightedValues(const float* w, int64_t span, const float* V, const float* vn, int64_t Dh, float scale,
                    float* o) {
  switch (Dh) {
    case 64: return WeightedRows<4>(w, span, V, vn, scale, o);
    case 128: return WeightedRows<8>(w, span, V, vn, scale, o);
    default: break;
  }
  std::fill(o, o + Dh, 0.f);
  for (int64_t j = 0; j < span; ++j) Axpy(w[j], V + j * Dh, o, Dh);
  Axpy(w[span], vn, o, Dh);
  for (int64_t d = 0; d < Dh; ++d) o[d] *= scale;
}

struct Shapes {
  int64_t B, H, KVH, Dh, slots_in_cache, max_len, layer, span;
  float scale, softcap;
};

// Row b, kv head kvh: its G = H / KVH query heads against span cache keys and the new key. qkv is the row's
// projection [(H + 2 KVH) Dh]; the rotated new key and the value go to k_out, v_out [B, KVH, Dh].
void Task(const Shapes& s, const float* qkv, const float* cos, const float* sin, const float* cache_k,
          const float* cache_v, const int32_t* slots, const bool* mask, float* out, float* k_out, float* v_out,
          int64_t b, int64_t kvh, std::vector<float>& scores, std::vector<float>& q) {
  const int64_t G = s.H / s.KVH, Dh = s.Dh, keys = s.span + 1;
  const int64_t row = ((s.layer * s.slots_in_cache + slots[b]) * s.KVH + kvh) * s.max_len * Dh;
  const float* K = cache_k + row;
  const float* V = cache_v + row;
  const float* projection = qkv + b * (s.H + 2 * s.KVH) * Dh;
  const float* row_cos = cos == nullptr ? nullptr : cos + b * Dh;
  const float* row_sin = sin == nullptr ? nullptr : sin + b * Dh;
  float* kn = k_out + (b * s.KVH + kvh) * Dh;
  float* vn = v_out + (b * s.KVH + kvh) * Dh;
  maxjax::RotateHalf(projection + (s.H + kvh) * Dh, row_cos, row_sin, Dh, kn);
  std::memcpy(vn, projection + (s.H + s.KVH + kvh) * Dh, Dh * sizeof(float));
  q.resize(G * Dh);
  for (int64_t g = 0; g < G; ++g) {
    maxjax::RotateHalf(projection + (kvh * G + g) * Dh, row_cos, row_sin, Dh, &q[g * Dh]);
  }
  const bool* visible = mask + b * keys;
  const bool any = std::find(visible, visible + keys, true) != visible + keys;
  scores.resize(G * keys);
  for (int64_t g = 0; g < G; ++g) {
    float* row = scores.data() + g * keys;
    KeyScores(&q[g * Dh], s.span, K, kn, Dh, row);
    for (int64_t j = 0; j < keys; ++j) {
      float score = row[j] * s.scale;
      if (s.softcap > 0.f) score = std::tanh(score / s.softcap) * s.softcap;
      row[j] = visible[j] ? score : kMasked;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* p = scores.data() + g * keys;
    float inv_total = 1.f / keys;
    if (any) {
      const float top = *std::max_element(p, p + keys);
      for (int64_t j = 0; j < keys; ++j) p[j] -= top;
      ExpInPlace(p, keys);
      float total = 0.f;
      for (int64_t j = 0; j < keys; ++j) {
        p[j] = visible[j] ? p[j] : 0.f;
        total += p[j];
      }
      inv_total = 1.f / total;
    } else {  // nothing visible (a padding row): the uniform average, finite like XLA's form
      std::fill(p, p + keys, 1.f);
    }
    WeightedValues(p, s.span, V, vn, Dh, inv_total, out + (b * s.H + kvh * G + g) * Dh);
  }
}

ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> cache_k,
                               ffi::Buffer<ffi::F32> cache_v, ffi::Buffer<ffi::S32> slots,
                               ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                               ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> k_out,
                               ffi::ResultBuffer<ffi::F32> v_out, int64_t layer, float scale, float softcap) {
  const auto pd = qkv.dimensions(), cd = cache_k.dimensions(), md = mask.dimensions();
  const auto od = out->dimensions();
  const bool rotated = cos.element_count() != 0;
  if (pd.size() != 2 || cd.size() != 5 || md.size() != 2 || od.size() != 3 || od[2] != cd[4] ||
      od[1] % cd[2] != 0 || pd[0] != od[0] || pd[1] != (od[1] + 2 * cd[2]) * cd[4] || md[0] != pd[0] ||
      md[1] - 1 > cd[3] || layer < 0 || layer >= cd[0] || cd[4] % 2 != 0 ||
      (rotated && (cos.element_count() != pd[0] * cd[4] || sin.element_count() != cos.element_count()))) {
    return ffi::Error::InvalidArgument(
        "decode_attention: qkv [B, (H + 2 KVH) Dh], cache [L, S, KVH, M, Dh], mask [B, span + 1], cos and sin "
        "[B, Dh] or [0], out [B, H, Dh] expected");
  }
  Shapes s{pd[0], od[1], cd[2], cd[4], cd[1], cd[3], layer, md[1] - 1, scale, softcap};
  const float *ps = qkv.typed_data(), *ks = cache_k.typed_data(), *vs = cache_v.typed_data();
  const float* cs = rotated ? cos.typed_data() : nullptr;
  const float* ss = rotated ? sin.typed_data() : nullptr;
  const int32_t* sl = slots.typed_data();
  const bool* ms = reinterpret_cast<const bool*>(mask.typed_data());
  float *os = out->typed_data(), *kn = k_out->typed_data(), *vn = v_out->typed_data();
  maxjax::ForRanges(s.B * s.KVH, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> scores, q;
    for (int64_t t = t0; t < t1; ++t) {
      Task(s, ps, cs, ss, ks, vs, sl, ms, os, kn, vn, t / s.KVH, t % s.KVH, scores, q);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q | k | v [B, (H + 2 KVH) Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cache keys [L, S, KVH, M, Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cache values
                                  .Arg<ffi::Buffer<ffi::S32>>()   // slots [B]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [B, span + 1]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos [B, Dh], or [0]: q and k come rotated
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin [B, Dh], or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // [B, H, Dh]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // the new keys, rotated [B, KVH, Dh]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // the new values [B, KVH, Dh]
                                  .Attr<int64_t>("layer")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
