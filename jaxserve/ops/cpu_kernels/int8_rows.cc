// acc[t, n] = sum_k xq[t, k] * w[n, k] in int32, for int8 activations xq [T, K] and int8 weight
// rows w [N, K]: an XLA:CPU FFI custom call (jaxserve/ops/cpu_kernels/__init__.py builds and
// registers it). It computes exactly what an int8 x int8 -> int32 dot computes; it never scales,
// rounds or converts (the caller does that in XLA, so both paths share those numbers).
//
// AVX-512 VNNI (vpdpbusd multiplies u8 by s8): the activations are offset by 128 to u8
// (x ^ 0x80 == x + 128), and 128 * rowsum(w) is taken back out of each row's sum; the row sum is
// one more vpdpbusd against ones, shared by every token. Rows are split into chunks of ~64 KiB
// (they stay in L2 while up to 8 tokens at a time pass over them) that XLA's own intra-op
// thread pool runs, so the kernel uses the threads XLA uses and never oversubscribes the
// cores. Elsewhere: a plain loop.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512VNNI__)
#define JAXSERVE_VNNI 1
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
};

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

using TokensFn = void (*)(const Problem&, int64_t, int64_t, int64_t);
constexpr TokensFn kTokens[kMaxTokens + 1] = {
    nullptr,           RowsVnniTokens<1>, RowsVnniTokens<2>, RowsVnniTokens<3>,
    RowsVnniTokens<4>, RowsVnniTokens<5>, RowsVnniTokens<6>, RowsVnniTokens<7>,
    RowsVnniTokens<8>};

void RowsVnni(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t t0 = 0; t0 < p.tokens; t0 += kMaxTokens) {
    const int64_t tn = std::min(kMaxTokens, p.tokens - t0);
    kTokens[tn](p, t0, n0, n1);
  }
}

#endif

std::atomic<bool> force_portable{false};  // JaxserveInt8RowsForcePortable: tests the plain loop

bool CpuHasVnni() {
#ifdef JAXSERVE_VNNI
  static const bool has = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return has && !force_portable.load();
#else
  return false;
#endif
}

// One call's rows, cut into chunks; any thread (the caller or the pool's) takes the next chunk
// until none is left, and the caller waits only for chunks already taken, so a busy or
// one-thread pool never deadlocks the call. Tasks that start after the call returned find no
// chunk left (the job is kept alive by the tasks that hold it).
struct Job {
  Problem problem;
  std::vector<uint8_t> xu;
  bool vnni = false;
  int64_t rows_per_chunk = 0, chunks = 0;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable finished;

  void Work() {
    for (;;) {
      const int64_t c = next.fetch_add(1);
      if (c >= chunks) return;
      const int64_t n0 = c * rows_per_chunk, n1 = std::min(problem.n, n0 + rows_per_chunk);
#ifdef JAXSERVE_VNNI
      if (vnni) RowsVnni(problem, n0, n1); else RowsPortable(problem, n0, n1);
#else
      RowsPortable(problem, n0, n1);
#endif
      if (done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

ffi::Error Int8RowsProductImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                               ffi::Buffer<ffi::S8> w, ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("int8 rows product: x [T, K] and w [N, K] expected");
  auto job = std::make_shared<Job>();
  job->problem = Problem{x.typed_data(), nullptr, w.typed_data(), out->typed_data(),
                         xd[0], xd[1], wd[0]};
  const int64_t tokens = xd[0], k = xd[1], n = wd[0];
  if (tokens == 0 || n == 0) return ffi::Error::Success();
#ifdef JAXSERVE_VNNI
  job->vnni = CpuHasVnni();
  if (job->vnni) {
    job->xu.resize(tokens * k);
    const int8_t* xs = x.typed_data();
    for (int64_t i = 0; i < tokens * k; ++i) job->xu[i] = uint8_t(xs[i]) ^ 0x80;
    job->problem.xu = job->xu.data();
  }
#endif
  // A chunk reads at least ~64 KiB of weights (a pool task costs microseconds), in rows of 4.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t rows = std::max<int64_t>(4, (65536 / std::max<int64_t>(k, 1)) & ~int64_t(3));
  rows = std::min(rows, std::max<int64_t>(4, ((n + threads - 1) / threads + 3) & ~int64_t(3)));
  job->rows_per_chunk = rows;
  job->chunks = (n + rows - 1) / rows;
  const int64_t helpers = std::min(threads, job->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  std::unique_lock<std::mutex> lock(job->mutex);
  job->finished.wait(lock, [&] { return job->done.load() == job->chunks; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveInt8RowsProduct, Int8RowsProductImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// Which inner loop this build runs on this CPU: 1 = AVX-512 VNNI, 0 = the portable loop.
extern "C" int JaxserveInt8RowsVnni() { return CpuHasVnni() ? 1 : 0; }

// 1: run the portable loop even where VNNI is there (so a VNNI machine tests both); 0: undo.
extern "C" void JaxserveInt8RowsForcePortable(int on) { force_portable.store(on != 0); }
