// Decode attention on XLA:CPU: one query per row reads its context straight from the paged
// float32 KV pool, as an XLA FFI custom call (jaxserve/ops/cpu_kernels/__init__.py builds and
// registers it; jaxserve/ops/attention.py decides when it runs). For queries q [R, H, D], pages
// k, v [blocks, block_size, KV, D], block tables [R, W] and positions [R], row r's query head
// j (of KV head h = j / (H / KV)) attends to the keys at positions 0 .. n - 1,
// n = min(position + 1, context_len): out = sum_t softmax(scale * q . k_t) v_t.
//
// Why: XLA's version gathers each chunk of context blocks into a copy, transposes keys and
// values for its batched dots, and runs the softmax as ~10 small ops per chunk; at batch 32
// that was about a third of the 55M model's float32 decode step. Here each (row, KV head)
// pair is one task: its group of query heads passes once over its context, a block of up to
// kTile keys at a time (scores, the block's maximum, exponentials, the values' weighted sum),
// with an online softmax across blocks. Every row's result depends on its own inputs only,
// in one order of operations, so it is the same alone or in any batch. The exponential is a
// polynomial (ExpApprox: within 0.94 float32 ulps of exp at every float in [-87, 0], checked
// against double exp) so the compiler can vectorize it.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "row_jobs.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#define JAXSERVE_FMA 1
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 64;     // keys scored per pass
constexpr int64_t kMaxGroup = 16;  // query heads per KV head this kernel takes (any would do)
constexpr int64_t kMaxDim = 256;   // head_dim this kernel takes

struct Problem {
  const float* q;          // [R, H, D]
  const float* k;          // [blocks, bs, KV, D]
  const float* v;          // [blocks, bs, KV, D]
  const int32_t* tables;   // [R, W]
  const int32_t* positions;  // [R]
  const int32_t* lens;     // [R]
  float* out;              // [R, H, D]
  int64_t heads, kv, d, bs, width, blocks;
  float scale;
};

// exp(x) for x <= 0 (scores minus their running maximum): 2^n * p(r), x = n ln2 + r,
// |r| <= ln2 / 2, p the degree-7 Taylor polynomial; below -87 it is 0.
inline float ExpApprox(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = std::fma(n, -1.428606765330187e-06f, std::fma(n, -0.693145751953125f, x));
  float p = 1.0f / 5040.0f;
  p = std::fma(p, r, 1.0f / 720.0f);
  p = std::fma(p, r, 1.0f / 120.0f);
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// Sums and maxima in eight independent lanes, then the lanes combined pairwise: strict
// float32 semantics keep a single running sum scalar, eight lanes are one vector.
constexpr int kLanes = 8;

inline float Combine(const float* lanes) {
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

inline float Dot(const float* a, const float* b, int64_t d) {
  float lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t dv = d & ~int64_t(kLanes - 1);
  for (int64_t i = 0; i < dv; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = std::fma(a[i + l], b[i + l], lanes[l]);
  float s = Combine(lanes);
  for (int64_t i = dv; i < d; ++i) s = std::fma(a[i], b[i], s);
  return s;
}

// scores[0 .. kTile) (count real, the rest -inf on entry): their maximum with `m`, then each
// replaced by its exponential against that maximum; returns (maximum, sum of exponentials).
inline void Softmax(float* scores, int64_t count, float m, float* top, float* sum) {
  float most[kLanes];
  for (int l = 0; l < kLanes; ++l) most[l] = m;
  for (int64_t t = 0; t < kTile; t += kLanes)
    for (int l = 0; l < kLanes; ++l) most[l] = std::max(most[l], scores[t + l]);
  float best = most[0];
  for (int l = 1; l < kLanes; ++l) best = std::max(best, most[l]);
  float lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t t = 0; t < kTile; t += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      scores[t + l] = t + l < count ? ExpApprox(scores[t + l] - best) : 0.0f;
      lanes[l] += scores[t + l];
    }
  *top = best;
  *sum = Combine(lanes);
}

// Where each key and value of one tile of a row's context lies (one block lookup per block).
struct TileRows {
  const float* key[kTile];
  const float* value[kTile];
};

void Locate(const Problem& p, int64_t row, int64_t h, int64_t start, int64_t count,
            TileRows* tile) {
  int64_t b = start / p.bs, offset = start % p.bs;
  for (int64_t t = 0; t < count;) {
    int64_t block = p.tables[row * p.width + b];
    block = std::min<int64_t>(std::max<int64_t>(block, 0), p.blocks - 1);
    const int64_t base = (block * p.bs * p.kv + h) * p.d, stride = p.kv * p.d;
    for (; offset < p.bs && t < count; ++offset, ++t) {
      tile->key[t] = p.k + base + offset * stride;
      tile->value[t] = p.v + base + offset * stride;
    }
    ++b;
    offset = 0;
  }
}

// One tile of keys for one query head: its scores, the online softmax's running maximum m and
// sum l, and the accumulator acc [d] of weighted values. D fixed at compile time keeps the
// query, four keys' lane sums and the accumulator in registers; D = 0: any d, in loops.
template <int D>
void TileHead(const Problem& p, const TileRows& tile, int64_t count, const float* q, float* m,
              float* l, float* acc) {
  const int64_t d = D ? D : p.d;
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  alignas(64) float scores[kTile];
  int64_t t = 0;
#ifdef JAXSERVE_FMA
  if constexpr (D != 0 && D % kLanes == 0) {
    for (; t + 4 <= count; t += 4) {  // four keys at once, in Dot's order: four chains
      __m256 lanes[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                         _mm256_setzero_ps()};
      for (int64_t i = 0; i < D; i += kLanes) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int c = 0; c < 4; ++c)
          lanes[c] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(tile.key[t + c] + i), lanes[c]);
      }
      // Combine's order for four sums at once: pairwise adds within each 128-bit half
      // (vhaddps, twice), then the halves added
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(lanes[0], lanes[1]),
                                      _mm256_hadd_ps(lanes[2], lanes[3]));
      const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      _mm_storeu_ps(scores + t, _mm_mul_ps(sums, _mm_set1_ps(p.scale)));
    }
  }
#endif
  for (; t < count; ++t) scores[t] = Dot(q, tile.key[t], d) * p.scale;
  for (t = count; t < kTile; ++t) scores[t] = kNone;
  float top, sum;
  Softmax(scores, count, *m, &top, &sum);
  const float correction = *m == kNone ? 0.0f : ExpApprox(*m - top);
  *l = *l * correction + sum;
  *m = top;
#ifdef JAXSERVE_FMA
  if constexpr (D != 0 && D % kLanes == 0) {  // the accumulator in registers
    __m256 a[D / kLanes];
    const __m256 c = _mm256_set1_ps(correction);
    for (int r = 0; r < D / kLanes; ++r) a[r] = _mm256_mul_ps(_mm256_loadu_ps(acc + r * kLanes), c);
    for (t = 0; t < count; ++t) {
      const __m256 w = _mm256_set1_ps(scores[t]);
      const float* value = tile.value[t];
      for (int r = 0; r < D / kLanes; ++r)
        a[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(value + r * kLanes), a[r]);
    }
    for (int r = 0; r < D / kLanes; ++r) _mm256_storeu_ps(acc + r * kLanes, a[r]);
    return;
  }
#endif
  float a[D ? D : kMaxDim];
  for (int64_t i = 0; i < d; ++i) a[i] = acc[i] * correction;
  for (t = 0; t < count; ++t) {
    const float w = scores[t];
    const float* value = tile.value[t];
    for (int64_t i = 0; i < d; ++i) a[i] = std::fma(w, value[i], a[i]);
  }
  for (int64_t i = 0; i < d; ++i) acc[i] = a[i];
}

template <int D>
void AttendTask(const Problem& p, int64_t row, int64_t h) {
  const int64_t group = p.heads / p.kv, d = D ? D : p.d;
  const int64_t n = std::min<int64_t>(int64_t(p.positions[row]) + 1, p.lens[row]);
  const float* q = p.q + (row * p.heads + h * group) * d;
  float* out = p.out + (row * p.heads + h * group) * d;
  alignas(64) float acc[kMaxGroup][D ? D : kMaxDim];
  float m[kMaxGroup], l[kMaxGroup];
  for (int64_t j = 0; j < group; ++j) {
    m[j] = -std::numeric_limits<float>::infinity();
    l[j] = 0.0f;
    for (int64_t i = 0; i < d; ++i) acc[j][i] = 0.0f;
  }
  TileRows tile;
  for (int64_t start = 0; start < n; start += kTile) {
    const int64_t count = std::min(kTile, n - start);
    Locate(p, row, h, start, count, &tile);
    for (int64_t j = 0; j < group; ++j) TileHead<D>(p, tile, count, q + j * d, &m[j], &l[j], acc[j]);
  }
  for (int64_t j = 0; j < group; ++j) {
    const float inv = l[j] > 0.0f ? 1.0f / l[j] : 0.0f;  // padding rows: 0, not NaN
    for (int64_t i = 0; i < d; ++i) out[j * d + i] = acc[j][i] * inv;
  }
}

// Tasks [t0, t1) of R * KV: task i is row i / KV, KV head i % KV (its group of query heads).
void Attend(const void* problem, int64_t t0, int64_t t1) {
  const Problem& p = *static_cast<const Problem*>(problem);
  for (int64_t task = t0; task < t1; ++task) {
    const int64_t row = task / p.kv, h = task % p.kv;
    switch (p.d) {
      case 16: AttendTask<16>(p, row, h); break;
      case 32: AttendTask<32>(p, row, h); break;
      case 64: AttendTask<64>(p, row, h); break;
      case 128: AttendTask<128>(p, row, h); break;
      default: AttendTask<0>(p, row, h); break;
    }
  }
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> positions,
                               ffi::Buffer<ffi::S32> lens, ffi::Result<ffi::Buffer<ffi::F32>> out,
                               float scale, bool threads) {
  const auto qd = q.dimensions(), kd = k.dimensions(), td = tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument(
        "decode attention: q [R, H, D], pages [blocks, bs, KV, D], tables [R, W] expected");
  const int64_t rows = qd[0], heads = qd[1], d = qd[2], kv = kd[2];
  const auto vd = v.dimensions();
  if (kd[3] != d || vd.size() != 4 || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] ||
      vd[3] != kd[3] || td[0] != rows || kv < 1 || heads % kv != 0 ||
      heads / kv > kMaxGroup || d > kMaxDim || positions.element_count() != size_t(rows) ||
      lens.element_count() != size_t(rows) || kd[0] < 1 || kd[1] < 1)
    return ffi::Error::InvalidArgument("decode attention: operand shapes do not agree");
  Problem p{q.typed_data(), k.typed_data(), v.typed_data(), tables.typed_data(),
            positions.typed_data(), lens.typed_data(), out->typed_data(),
            heads, kv, d, kd[1], td[1], kd[0], scale};
  if (rows == 0) return ffi::Error::Success();
  if (!threads) {
    Attend(&p, 0, rows * kv);
    return ffi::Error::Success();
  }
  // a task's bytes: its keys and values (sizes the chunks the pool's threads take)
  int64_t longest = 0;
  for (int64_t r = 0; r < rows; ++r) longest = std::max<int64_t>(longest, p.lens[r]);
  jaxserve::RunRows(pool, {{Attend, &p, rows * kv,
                            std::max<int64_t>(1, longest) * d * 2 * int64_t(sizeof(float)), 1}});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("threads"));
