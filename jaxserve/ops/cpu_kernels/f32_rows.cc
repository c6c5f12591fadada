// The float32 products of one step's linear layers on XLA:CPU: an XLA FFI custom call
// (jaxserve/ops/cpu_kernels/__init__.py builds and registers it). For activations x [T, K] and
// weight rows w_i [N_i, K] (one or more weights sharing the input, e.g. q, k and v), it returns
// out_i[t, n] = sum_k x[t, k] * w_i[n, k].
//
// Every element is summed in one order, whatever T, the tile it falls in or the loop: eight
// lane sums, lane j fused-multiply-adding k = j, j + 8, ... in turn, then the lanes added as
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), then the last K % 8 products fused in
// turn. So a token's result does not depend on which tokens share its call, and the AVX2 loop
// and the portable one give the same bits (tests/test_cpu_kernels.py). XLA's own dot sums in
// another order, so the results differ from it by rounding only.
//
// The AVX2 loop: a tile of 3 rows x 4 tokens keeps 12 lane-sum registers, each row load feeding
// 4 FMAs and each activation load 3. The tokens are cut into blocks of 64, each block's rows
// chunks of their own (row_jobs.h: ~64 KiB, in L2 while the block's tokens pass over them), so
// long prefill chunks spread over the threads too.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "row_jobs.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#define JAXSERVE_FMA 1
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTokenBlock = 64;  // tokens per part (per pass over a chunk's rows)
constexpr int kRows = 3, kTokens = 4;  // the AVX2 tile

struct Problem {
  const float* x;  // [T, K]
  const float* w;  // [N, K]
  float* out;      // [T, N]
  int64_t tokens, k, n;
  int loop;        // which inner loop (Loop below)
};

// The lanes' sum in the order above, then the tail of K % 8 products.
inline float Finish(const float* lanes, const float* w, const float* x, int64_t k) {
  float s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
            ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (int64_t i = k & ~int64_t(7); i < k; ++i) s = std::fma(w[i], x[i], s);
  return s;
}

void RowsPortable(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t kv = p.k & ~int64_t(7);
  for (int64_t n = n0; n < n1; ++n) {
    const float* row = p.w + n * p.k;
    for (int64_t t = 0; t < p.tokens; ++t) {
      const float* xt = p.x + t * p.k;
      float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = 0; i < kv; i += 8)
        for (int j = 0; j < 8; ++j) lanes[j] = std::fma(row[i + j], xt[i + j], lanes[j]);
      p.out[t * p.n + n] = Finish(lanes, row, xt, p.k);
    }
  }
}

#ifdef JAXSERVE_FMA
// Rows n0 .. n0 + R - 1 against tokens t0 .. t0 + C - 1.
template <int R, int C>
inline void Tile(const Problem& p, int64_t t0, int64_t n0) {
  const int64_t k = p.k, kv = k & ~int64_t(7);
  const float* w[R];
  const float* x[C];
  for (int r = 0; r < R; ++r) w[r] = p.w + (n0 + r) * k;
  for (int c = 0; c < C; ++c) x[c] = p.x + (t0 + c) * k;
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t i = 0; i < kv; i += 8) {
    __m256 wv[R];
    // Each row and activation loaded once, into a register: left to itself the compiler
    // folds one of them into every FMA as a memory operand (12 loads per 12 FMAs, not 7).
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm256_loadu_ps(w[r] + i);
      asm("" : "+x"(wv[r]));
    }
    for (int c = 0; c < C; ++c) {
      __m256 xv = _mm256_loadu_ps(x[c] + i);
      asm("" : "+x"(xv));
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
    }
  }
  // Four lane sums at a time in Finish's order: two rounds of pairwise adds within each
  // 128-bit half (vhaddps), then the halves added; the tails (K % 8) after.
  alignas(32) float sums[R * C + 4];
  const __m256* flat = &acc[0][0];
  int i = 0;
  for (; i + 4 <= R * C; i += 4) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(flat[i], flat[i + 1]),
                                    _mm256_hadd_ps(flat[i + 2], flat[i + 3]));
    _mm_store_ps(sums + i, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  alignas(32) float lanes[8];
  for (; i < R * C; ++i) {
    _mm256_store_ps(lanes, flat[i]);
    sums[i] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
              ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = sums[r * C + c];
      for (int64_t j = kv; j < k; ++j) s = std::fma(w[r][j], x[c][j], s);
      p.out[(t0 + c) * p.n + n0 + r] = s;
    }
}

// Tokens t0 .. t0 + C - 1 against rows [n0, n1), kRows at a time.
template <int C>
inline void TokenTiles(const Problem& p, int64_t t0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) Tile<kRows, C>(p, t0, n);
  if (n1 - n == 2) Tile<2, C>(p, t0, n);
  if (n1 - n == 1) Tile<1, C>(p, t0, n);
}

void RowsFma(const Problem& p, int64_t n0, int64_t n1) {
  int64_t t = 0;
  for (; t + kTokens <= p.tokens; t += kTokens) TokenTiles<kTokens>(p, t, n0, n1);
  switch (p.tokens - t) {
    case 3: TokenTiles<3>(p, t, n0, n1); break;
    case 2: TokenTiles<2>(p, t, n0, n1); break;
    case 1: TokenTiles<1>(p, t, n0, n1); break;
    default: break;
  }
}
#endif

// The inner loops, fastest last: a call runs the best this build and CPU have, at most
// `loop_limit` (JaxserveF32RowsLimitLoop: one machine tests them all).
enum Loop { kPortable = 0, kFma = 1 };
std::atomic<int> loop_limit{kFma};

int BestLoop() {
  static const int best = [] {
#ifdef JAXSERVE_FMA
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return int(kFma);
#endif
    return int(kPortable);
  }();
  return best;
}

int ActiveLoop() { return std::min(BestLoop(), loop_limit.load()); }

void F32Rows(const void* problem, int64_t n0, int64_t n1) {
  const Problem& p = *static_cast<const Problem*>(problem);
#ifdef JAXSERVE_FMA
  if (p.loop == kFma) return RowsFma(p, n0, n1);
#endif
  RowsPortable(p, n0, n1);
}

ffi::Error F32ProductsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::RemainingArgs weights, ffi::RemainingRets outs) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("float32 products: x [T, K] expected");
  const int64_t tokens = xd[0], k = xd[1];
  if (weights.size() == 0 || weights.size() != outs.size())
    return ffi::Error::InvalidArgument("float32 products: one result per weight expected");
  const int loop = ActiveLoop();
  std::vector<Problem> problems;
  problems.reserve(weights.size() * ((tokens + kTokenBlock - 1) / kTokenBlock));
  for (size_t i = 0; i < weights.size(); ++i) {
    auto w = weights.get<ffi::Buffer<ffi::F32>>(i);
    auto out = outs.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !out.has_value())
      return ffi::Error::InvalidArgument("float32 products: float32 weights and results expected");
    const auto wd = w->dimensions();
    if (wd.size() != 2 || wd[1] != k)
      return ffi::Error::InvalidArgument("float32 products: weights [N, K] of x's K expected");
    // one part per block of tokens: the blocks' chunks run in parallel too
    for (int64_t t0 = 0; t0 < tokens; t0 += kTokenBlock)
      problems.push_back(Problem{x.typed_data() + t0 * k, w->typed_data(),
                                 (*out)->typed_data() + t0 * wd[0],
                                 std::min(kTokenBlock, tokens - t0), k, wd[0], loop});
  }
  if (tokens == 0) return ffi::Error::Success();
  std::vector<jaxserve::RowPart> parts;
  for (const Problem& p : problems)
    parts.push_back({F32Rows, &p, p.n, k * int64_t(sizeof(float)), kRows});
  jaxserve::RunRows(pool, parts);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveF32Products, F32ProductsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

// Which inner loop this build runs on this CPU: 1 = AVX2 with FMA, 0 = the portable one.
extern "C" int JaxserveF32RowsLoop() { return ActiveLoop(); }

// Run at most loop `limit` (1 = any) even where a faster one is there.
extern "C" void JaxserveF32RowsLimitLoop(int limit) { loop_limit.store(limit); }
