// The int8 products of one decode step's linear layers on XLA:CPU: an XLA FFI custom call
// (jaxserve/ops/cpu_kernels/__init__.py builds and registers it). For float32 activations
// x [T, K] and int8 weight rows w_i [N_i, K] (one or more weights sharing the input, e.g. q, k
// and v), it returns the activations' scale per token, xs [T] = max|x[t]| / 127, and the exact
// int32 sums acc_i[t, n] = sum_k xq[t, k] * w_i[n, k] of the rounded activations
// xq = rint(x / xs) (0 where xs is 0): the numbers XLA's own ops give for the same formulas
// (jaxserve/ops/quant.py `quantize_activations`, then an int8 x int8 -> int32 dot), so the
// caller scales the sums in XLA and both paths share those numbers.
//
// AVX-512 VNNI (vpdpbusd multiplies u8 by s8): the activations are offset by 128 to u8
// (x ^ 0x80 == x + 128), and 128 * rowsum(w) is taken back out of each row's sum; the row sum is
// one more vpdpbusd against ones, shared by every token. Rows are split into chunks of ~64 KiB
// (they stay in L2 while up to 8 tokens at a time pass over them), the chunks of all of a
// call's weights in one queue, so a call forks and joins once however many weights it has.
// With AVX2 only: vpmaddubsw on |w| and x * sign(w), exact because the activations are within
// +-127 (below). Elsewhere: a plain loop.
//
// Threads: the chunks run on XLA's own intra-op pool (row_jobs.h).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "row_jobs.h"

#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512VNNI__)
#define JAXSERVE_VNNI 1
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__AVX2__)
#define JAXSERVE_AVX2 1
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxTokens = 8;  // tokens per pass over a chunk's rows (in registers)

struct Problem {
  const int8_t* x;    // [T, K]
  const uint8_t* xu;  // [T, K], x + 128 (VNNI only)
  const int8_t* w;    // [N, K]
  int32_t* out;       // [T, N]
  int64_t tokens, k, n;
  int loop;           // which inner loop (Loop below)
};

// A SIMD loop's entry: rows [n0, n1) for the tokens t0 .. t0 + TN - 1 of one pass.
using TokensFn = void (*)(const Problem&, int64_t, int64_t, int64_t);

// Rows [n0, n1) for every token, kMaxTokens at a time: `passes[tn]` runs a pass of tn tokens.
template <const TokensFn* passes>
void RowsInPasses(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t t0 = 0; t0 < p.tokens; t0 += kMaxTokens) {
    const int64_t tn = std::min(kMaxTokens, p.tokens - t0);
    passes[tn](p, t0, n0, n1);
  }
}

void RowsPortable(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = p.w + n * p.k;
    for (int64_t t = 0; t < p.tokens; ++t) {
      const int8_t* xt = p.x + t * p.k;
      int32_t sum = 0;
      for (int64_t i = 0; i < p.k; ++i) sum += int32_t(xt[i]) * int32_t(row[i]);
      p.out[t * p.n + n] = sum;
    }
  }
}

#ifdef JAXSERVE_VNNI
// Lane i (< 8) of the result = the sum of the 16 lanes of v[i] (v[i] for i >= count: zero);
// lanes 8-15 repeat lanes 0-7. A third of the instructions of `count` separate reductions.
inline __m512i Sum8(const __m512i* v, int count) {
  __m512i in[8];
  for (int i = 0; i < 8; ++i) in[i] = i < count ? v[i] : _mm512_setzero_si512();
  __m512i quad[2];  // quad[g], 128-bit lane L: the lane-L partial sums of v[4g .. 4g + 3]
  for (int g = 0; g < 2; ++g) {
    const __m512i* q = in + 4 * g;
    const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(q[0], q[1]),
                                        _mm512_unpackhi_epi32(q[0], q[1]));
    const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(q[2], q[3]),
                                        _mm512_unpackhi_epi32(q[2], q[3]));
    quad[g] = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  }
  const __m512i h = _mm512_add_epi32(_mm512_shuffle_i32x4(quad[0], quad[1], 0x88),
                                     _mm512_shuffle_i32x4(quad[0], quad[1], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(h, h, 0x88), _mm512_shuffle_i32x4(h, h, 0xDD));
}

// Each of TN <= 8 tokens' sum of one row, the row's offset 128 * rowsum taken out, into out.
template <int TN>
inline void StoreRow(const __m512i* acc, __m512i rowsum, int32_t* out, int64_t stride) {
  __m512i v[8];
  for (int t = 0; t < TN; ++t) v[t] = acc[t];
  alignas(64) int32_t sums[16];
  int32_t offset;
  if constexpr (TN < 8) {  // the row sum rides in the spare lane
    v[TN] = rowsum;
    _mm512_store_si512(sums, Sum8(v, TN + 1));
    offset = 128 * sums[TN];
  } else {
    _mm512_store_si512(sums, Sum8(v, TN));
    offset = 128 * _mm512_reduce_add_epi32(rowsum);
  }
  for (int t = 0; t < TN; ++t) out[t * stride] = sums[t] - offset;
}

// TN tokens (starting at t0) against rows [n0, n1), one row at a time: each row is read as one
// sequential stream (interleaving 4 or 16 rows ran 2-3x slower, the prefetcher's doing), with
// C independent accumulation chains along k when there are too few tokens to hide vpdpbusd's
// latency.
template <int TN, int C>
void RowsVnniBlock(const Problem& p, int64_t t0, int64_t n0, int64_t n1) {
  const int64_t blocks = (p.k + 63) / 64, tail = p.k % 64;
  const __mmask64 last_mask = tail ? (~0ULL >> (64 - tail)) : ~0ULL;
  const __m512i ones = _mm512_set1_epi8(1);
  const uint8_t* xs = p.xu + t0 * p.k;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = p.w + n * p.k;
    __m512i acc[C][TN], rowsum[C];
    for (int c = 0; c < C; ++c) {
      rowsum[c] = _mm512_setzero_si512();
      for (int t = 0; t < TN; ++t) acc[c][t] = _mm512_setzero_si512();
    }
    int64_t b = 0;
    for (; b + C < blocks; b += C) {  // full blocks, C at a time (the last block may be a tail)
      for (int c = 0; c < C; ++c) {
        const __m512i wv = _mm512_loadu_si512(row + 64 * (b + c));
        rowsum[c] = _mm512_dpbusd_epi32(rowsum[c], ones, wv);
        for (int t = 0; t < TN; ++t)
          acc[c][t] = _mm512_dpbusd_epi32(
              acc[c][t], _mm512_loadu_si512(xs + t * p.k + 64 * (b + c)), wv);
      }
    }
    for (; b < blocks; ++b) {  // the rest, masked to the row's end
      const __mmask64 m = b == blocks - 1 ? last_mask : ~0ULL;
      const __m512i wv = _mm512_maskz_loadu_epi8(m, row + 64 * b);
      rowsum[0] = _mm512_dpbusd_epi32(rowsum[0], ones, wv);
      for (int t = 0; t < TN; ++t)
        acc[0][t] = _mm512_dpbusd_epi32(
            acc[0][t], _mm512_maskz_loadu_epi8(m, xs + t * p.k + 64 * b), wv);
    }
    for (int c = 1; c < C; ++c) {
      rowsum[0] = _mm512_add_epi32(rowsum[0], rowsum[c]);
      for (int t = 0; t < TN; ++t) acc[0][t] = _mm512_add_epi32(acc[0][t], acc[c][t]);
    }
    StoreRow<TN>(acc[0], rowsum[0], p.out + t0 * p.n + n, p.n);
  }
}

// TN tokens against two rows at a time: each activation load feeds two vpdpbusd (with three
// or more tokens the loop is bound by its instructions, not by the weights' stream).
template <int TN>
void RowsVnniPair(const Problem& p, int64_t t0, int64_t n0, int64_t n1) {
  const int64_t blocks = (p.k + 63) / 64, tail = p.k % 64;
  const __mmask64 last_mask = tail ? (~0ULL >> (64 - tail)) : ~0ULL;
  const __m512i ones = _mm512_set1_epi8(1);
  const uint8_t* xs = p.xu + t0 * p.k;
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    const int8_t* row0 = p.w + n * p.k;
    const int8_t* row1 = row0 + p.k;
    __m512i acc0[TN], acc1[TN];
    __m512i rowsum0 = _mm512_setzero_si512(), rowsum1 = _mm512_setzero_si512();
    for (int t = 0; t < TN; ++t) acc0[t] = acc1[t] = _mm512_setzero_si512();
    // Masked loads only for a tail: on this kind of CPU (AMD Zen 4) a masked 64-byte load
    // measured several times slower than a plain one in this loop.
    const int64_t full = tail ? blocks - 1 : blocks;
    auto block = [&](int64_t b, __m512i w0, __m512i w1, auto load_x) {
      rowsum0 = _mm512_dpbusd_epi32(rowsum0, ones, w0);
      rowsum1 = _mm512_dpbusd_epi32(rowsum1, ones, w1);
      for (int t = 0; t < TN; ++t) {
        const __m512i xv = load_x(xs + t * p.k + 64 * b);
        acc0[t] = _mm512_dpbusd_epi32(acc0[t], xv, w0);
        acc1[t] = _mm512_dpbusd_epi32(acc1[t], xv, w1);
      }
    };
    for (int64_t b = 0; b < full; ++b)
      block(b, _mm512_loadu_si512(row0 + 64 * b), _mm512_loadu_si512(row1 + 64 * b),
            [](const uint8_t* at) { return _mm512_loadu_si512(at); });
    if (tail)
      block(full, _mm512_maskz_loadu_epi8(last_mask, row0 + 64 * full),
            _mm512_maskz_loadu_epi8(last_mask, row1 + 64 * full),
            [&](const uint8_t* at) { return _mm512_maskz_loadu_epi8(last_mask, at); });
    StoreRow<TN>(acc0, rowsum0, p.out + t0 * p.n + n, p.n);
    StoreRow<TN>(acc1, rowsum1, p.out + t0 * p.n + n + 1, p.n);
  }
  if (n < n1) RowsVnniBlock<TN, 1>(p, t0, n, n1);
}

template <int TN>
void RowsVnniTokens(const Problem& p, int64_t t0, int64_t n0, int64_t n1) {
  if constexpr (TN <= 2) RowsVnniBlock<TN, 4>(p, t0, n0, n1);
  else RowsVnniPair<TN>(p, t0, n0, n1);
}

constexpr TokensFn kVnniPasses[kMaxTokens + 1] = {
    nullptr,           RowsVnniTokens<1>, RowsVnniTokens<2>, RowsVnniTokens<3>,
    RowsVnniTokens<4>, RowsVnniTokens<5>, RowsVnniTokens<6>, RowsVnniTokens<7>,
    RowsVnniTokens<8>};
constexpr auto RowsVnni = RowsInPasses<kVnniPasses>;

#endif

#ifdef JAXSERVE_AVX2
// AVX2 (no VNNI): vpmaddubsw multiplies u8 by s8 into pairs of saturating int16 sums. With the
// unsigned operand |w| (vpsignb(w, w); 128 for -128) and the signed one x * sign(w) (vpsignb(x,
// w)), each product is w * x exactly, and a pair is at most 2 * 128 * 127 = 32512 < 2^15: no
// saturation, because the activations, rounded here, are within +-127. vpmaddwd against ones
// then widens the pairs to int32 sums of 4, accumulated in int32: the int8 dot's integers.
inline int32_t Sum8x32(__m256i v) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i q = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, 0xB1)));
}

// TN tokens against rows [n0, n1), one row at a time (one sequential stream per row), with C
// independent accumulation chains along k.
template <int TN, int C>
void RowsAvx2Block(const Problem& p, int64_t t0, int64_t n0, int64_t n1) {
  const int64_t blocks = p.k / 32, tail = p.k % 32;
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xs = p.x + t0 * p.k;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = p.w + n * p.k;
    __m256i acc[C][TN];
    for (int c = 0; c < C; ++c)
      for (int t = 0; t < TN; ++t) acc[c][t] = _mm256_setzero_si256();
    auto block = [&](int c, int64_t b) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * b));
      const __m256i aw = _mm256_sign_epi8(w, w);
      for (int t = 0; t < TN; ++t) {
        const __m256i x =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs + t * p.k + 32 * b));
        const __m256i pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w));
        acc[c][t] = _mm256_add_epi32(acc[c][t], _mm256_madd_epi16(pairs, ones));
      }
    };
    int64_t b = 0;
    for (; b + C <= blocks; b += C)
      for (int c = 0; c < C; ++c) block(c, b + c);
    for (; b < blocks; ++b) block(0, b);
    for (int t = 0; t < TN; ++t) {
      __m256i total = acc[0][t];
      for (int c = 1; c < C; ++c) total = _mm256_add_epi32(total, acc[c][t]);
      int32_t sum = Sum8x32(total);
      const int8_t* xt = xs + t * p.k;
      for (int64_t i = p.k - tail; i < p.k; ++i) sum += int32_t(xt[i]) * int32_t(row[i]);
      p.out[(t0 + t) * p.n + n] = sum;
    }
  }
}

template <int TN>
void RowsAvx2Tokens(const Problem& p, int64_t t0, int64_t n0, int64_t n1) {
  if constexpr (TN <= 2) RowsAvx2Block<TN, 4>(p, t0, n0, n1);
  else RowsAvx2Block<TN, 1>(p, t0, n0, n1);
}

constexpr TokensFn kAvx2Passes[kMaxTokens + 1] = {
    nullptr,           RowsAvx2Tokens<1>, RowsAvx2Tokens<2>, RowsAvx2Tokens<3>,
    RowsAvx2Tokens<4>, RowsAvx2Tokens<5>, RowsAvx2Tokens<6>, RowsAvx2Tokens<7>,
    RowsAvx2Tokens<8>};
constexpr auto RowsAvx2 = RowsInPasses<kAvx2Passes>;
#endif

// The inner loops, fastest last: which one a call runs is the best this build and CPU have,
// at most `loop_limit` (JaxserveInt8RowsLimitLoop: a machine with VNNI tests the others too).
enum Loop { kPortable = 0, kAvx2 = 1, kVnni = 2 };
std::atomic<int> loop_limit{kVnni};

int BestLoop() {
  static const int best = [] {
#ifdef JAXSERVE_VNNI
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
      return int(kVnni);
#endif
#ifdef JAXSERVE_AVX2
    if (__builtin_cpu_supports("avx2")) return int(kAvx2);
#endif
    return int(kPortable);
  }();
  return best;
}

int ActiveLoop() { return std::min(BestLoop(), loop_limit.load()); }

// Rows [n0, n1) of one weight, in the call's inner loop.
void Int8Rows(const void* problem, int64_t n0, int64_t n1) {
  const Problem& p = *static_cast<const Problem*>(problem);
#ifdef JAXSERVE_VNNI
  if (p.loop == kVnni) return RowsVnni(p, n0, n1);
#endif
#ifdef JAXSERVE_AVX2
  if (p.loop == kAvx2) return RowsAvx2(p, n0, n1);
#endif
  RowsPortable(p, n0, n1);
}

// xs[t] = max|x[t]| / 127 and xq[t] = rint(x[t] / xs[t]) clipped to +-127 (0 where xs is 0),
// as XLA computes `quantize_activations` (its x / 127 is folded into x * (1 / 127.0f)); a NaN
// in a token makes its scale NaN, so its products come out NaN as in XLA.
void QuantizeActivations(const float* x, int64_t tokens, int64_t k, float* xs, int8_t* xq) {
  constexpr float kInv127 = 1.0f / 127.0f;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = x + t * k;
    float m = 0.0f;
    bool nan = false;
    for (int64_t i = 0; i < k; ++i) {
      const float a = std::fabs(row[i]);
      nan |= a != a;
      m = a > m ? a : m;
    }
    const float scale = nan ? std::numeric_limits<float>::quiet_NaN() : m * kInv127;
    xs[t] = scale;
    const float divisor = scale > 0.0f ? scale : 1.0f;
    int8_t* q = xq + t * k;
    for (int64_t i = 0; i < k; ++i) {
      float r = std::nearbyint(row[i] / divisor);
      r = std::min(127.0f, std::max(-127.0f, r));
      q[i] = r == r ? int8_t(r) : int8_t(0);
    }
  }
}

ffi::Error Int8ProductsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::RemainingArgs weights, ffi::ResultBuffer<ffi::F32> xs,
                            ffi::RemainingRets sums) {
  const auto xd = x.dimensions();
  if (xd.size() != 2)
    return ffi::Error::InvalidArgument("int8 products: x [T, K] expected");
  const int64_t tokens = xd[0], k = xd[1];
  if (weights.size() == 0 || weights.size() != sums.size())
    return ffi::Error::InvalidArgument("int8 products: one int32 result per weight expected");
  std::vector<int8_t> xq(tokens * k);
  std::vector<uint8_t> xu;
  QuantizeActivations(x.typed_data(), tokens, k, xs->typed_data(), xq.data());
  const int loop = ActiveLoop();
#ifdef JAXSERVE_VNNI
  if (loop == kVnni) {
    xu.resize(tokens * k);
    for (int64_t i = 0; i < tokens * k; ++i) xu[i] = uint8_t(xq[i]) ^ 0x80;
  }
#endif
  std::vector<Problem> problems;
  problems.reserve(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    auto w = weights.get<ffi::Buffer<ffi::S8>>(i);
    auto out = sums.get<ffi::Buffer<ffi::S32>>(i);
    if (!w.has_value() || !out.has_value())
      return ffi::Error::InvalidArgument("int8 products: int8 weights, int32 results expected");
    const auto wd = w->dimensions();
    if (wd.size() != 2 || wd[1] != k)
      return ffi::Error::InvalidArgument("int8 products: weights [N, K] of x's K expected");
    problems.push_back(Problem{xq.data(), xu.data(), w->typed_data(), (*out)->typed_data(),
                               tokens, k, wd[0], loop});
  }
  if (tokens == 0) return ffi::Error::Success();
  std::vector<jaxserve::RowPart> parts;
  for (const Problem& p : problems) parts.push_back({Int8Rows, &p, p.n, k, 4});
  jaxserve::RunRows(pool, parts);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveInt8Products, Int8ProductsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets());

// Which inner loop this build runs on this CPU: 2 = AVX-512 VNNI, 1 = AVX2, 0 = the portable one.
extern "C" int JaxserveInt8RowsLoop() { return ActiveLoop(); }

// Run at most loop `limit` (2 = any) even where a faster one is there, so one machine tests all.
extern "C" void JaxserveInt8RowsLimitLoop(int limit) { loop_limit.store(limit); }
