// A chunk's new keys and values written into the paged KV cache in place, from the fused q | k | v projection as
// it comes: key (rotated) and value of query t of row b (at position p = positions[b, t]) go to
// cache[layer, pages[b, p / page_size], kv head, p % page_size] (`maxjax.kernels.paged`'s layout).
//
// Why: XLA wrote them with two kernels per cache: a fusion that rotates k (or lays v out) into [B, T, KVH, Dh]
// and a scatter into the cache, ~0.27 ms per layer of a 512-token SmolLM2 prefill for ~0.4 MB of values (8 ms
// of the prefill). Here one pass reads each projection row once and writes its heads where they belong (~4 ms).
//
// Semantics are `maxjax.kernels.paged.write_pages`'s for both caches, with k = the columns
// [k_col, k_col + KVH Dh) of the projection rotated as `rope.apply_rope` does and v = [v_col, v_col + KVH Dh);
// positions < 0 or >= P page_size (past the block table) write nothing (XLA's scatter drops them). The page ids
// a written position uses must lie in [0, num_pages).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "vec_math.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error CacheWriteImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> projection, ffi::Buffer<ffi::F32> cos,
                          ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> cache_k_in, ffi::Buffer<ffi::F32> cache_v_in,
                          ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> pages,
                          ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> cache_k,
                          ffi::ResultBuffer<ffi::F32> cache_v, int64_t k_col, int64_t v_col) {
  const auto pd = projection.dimensions(), cd = cache_k->dimensions();
  const auto td = pages.dimensions();
  if (pd.size() != 3 || cd.size() != 5 || td.size() != 2 || td[0] != pd[0] || td[1] < 1 ||
      positions.element_count() != pd[0] * pd[1] || layer.element_count() != 1 ||
      cos.element_count() != pd[0] * pd[1] * cd[4] || sin.element_count() != cos.element_count() ||
      k_col < 0 || v_col < 0 || std::max(k_col, v_col) + cd[2] * cd[4] > pd[2] ||
      cache_k_in.typed_data() != cache_k->typed_data() || cache_v_in.typed_data() != cache_v->typed_data()) {
    return ffi::Error::InvalidArgument(
        "cache_write: projection [B, T, C], cos and sin [B, T, Dh], caches [L, N, KVH, page_size, Dh] updated in "
        "place, layer [], pages [B, P], positions [B, T], k and v columns inside C expected");
  }
  const int64_t B = pd[0], T = pd[1], C = pd[2], N = cd[1], KVH = cd[2], PS = cd[3], Dh = cd[4], P = td[1];
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= cd[0]) return ffi::Error::InvalidArgument("cache_write: layer out of the cache's range");
  const int32_t* table = pages.typed_data();
  const int32_t* pos = positions.typed_data();
  for (int64_t bt = 0; bt < B * T; ++bt) {  // the pages written must be the cache's (the others are not read)
    const int64_t position = pos[bt];
    if (position < 0 || position >= P * PS) continue;
    const int32_t page = table[bt / T * P + position / PS];
    if (page < 0 || page >= N) return ffi::Error::InvalidArgument("cache_write: page out of the cache's range");
  }
  const float* p = projection.typed_data();
  float *ks = cache_k->typed_data() + l * N * KVH * PS * Dh, *vs = cache_v->typed_data() + l * N * KVH * PS * Dh;
  // The chunk's rows in ranges over the threads: the writes miss the CPU caches, a pass at the memory's speed.
  const int64_t chunks = maxjax::ChunkCount(B * T);
  maxjax::ParallelFor(pool, B * T >= maxjax::kLongCallRows, chunks, [&](int64_t chunk) {
    for (int64_t bt = B * T * chunk / chunks; bt < B * T * (chunk + 1) / chunks; ++bt) {
      const int64_t b = bt / T, position = pos[bt];
      if (position < 0 || position >= P * PS) continue;
      const int64_t page = table[b * P + position / PS], offset = position % PS;
      const float* row = p + bt * C;
      for (int64_t h = 0; h < KVH; ++h) {
        const int64_t at = ((page * KVH + h) * PS + offset) * Dh;
        maxjax::RotateHalf(row + k_col + h * Dh, cos.typed_data() + bt * Dh, sin.typed_data() + bt * Dh, Dh,
                           ks + at);
        std::memcpy(vs + at, row + v_col + h * Dh, Dh * sizeof(float));
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxCacheWrite, CacheWriteImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // projection [B, T, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos [B, T, Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin [B, T, Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cache keys [L, N, KVH, page_size, Dh] (aliased)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cache values (aliased)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer []
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pages [B, P]: the rows' block tables
                                  .Arg<ffi::Buffer<ffi::S32>>()   // positions [B, T]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // the cache keys, updated
                                  .Ret<ffi::Buffer<ffi::F32>>()   // the cache values, updated
                                  .Attr<int64_t>("k_col")
                                  .Attr<int64_t>("v_col"));
