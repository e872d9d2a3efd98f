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
  scores.assign(G * keys, kMasked);
  bool any = false;
  for (int64_t j = 0; j < keys; ++j) {
    if (!visible[j]) continue;
    any = true;
    const float* key = j < s.span ? K + j * Dh : kn;
    for (int64_t g = 0; g < G; ++g) {
      float score = Dot(&q[g * Dh], key, Dh) * s.scale;
      if (s.softcap > 0.f) score = std::tanh(score / s.softcap) * s.softcap;
      scores[g * keys + j] = score;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* p = scores.data() + g * keys;
    float* o = out + (b * s.H + kvh * G + g) * Dh;
    std::fill(o, o + Dh, 0.f);
    if (!any) {  // nothing visible (a padding row): the uniform average, finite like XLA's form
      for (int64_t j = 0; j < keys; ++j) Axpy(1.f / keys, j < s.span ? V + j * Dh : vn, o, Dh);
      continue;
    }
    const float top = *std::max_element(p, p + keys);
    for (int64_t j = 0; j < keys; ++j) p[j] -= top;
    ExpInPlace(p, keys);
    float total = 0.f;
    for (int64_t j = 0; j < keys; ++j) total += visible[j] ? p[j] : 0.f;
    const float inv = 1.f / total;
    for (int64_t j = 0; j < keys; ++j) {
      if (visible[j]) Axpy(p[j] * inv, j < s.span ? V + j * Dh : vn, o, Dh);
    }
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
