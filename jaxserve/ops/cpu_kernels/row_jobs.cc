// The row-chunk jobs of row_jobs.h.
//
// A decode step calls the kernels ~60 times, tens of microseconds apart, and waking a sleeping
// pool thread costs about what a small product does, so a pool task that ran out of chunks
// waits, spinning (and yielding the core now and then), a bounded time (JaxserveRowsSetSpin;
// the loader sets it) for the next call and joins it at once. The wait is bounded, so a pool
// thread is never held for longer than that past its work.

#include "row_jobs.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>

#include <sched.h>

namespace ffi = xla::ffi;

namespace jaxserve {
namespace {

std::atomic<int64_t> spin_micros{0};  // how long a pool task waits for the next call

// One call's rows, cut into chunks (per part, then queued one part after another); any thread
// (the caller or the pool's) takes the next chunk until none is left, and the caller waits
// only for chunks already taken, so a busy or one-thread pool never deadlocks the call. Tasks
// that come to a job after the call returned find no chunk left (a job is kept alive by
// whoever holds it).
struct Job {
  std::vector<RowPart> parts;
  std::vector<int64_t> rows_per_chunk, first_chunk;  // per part; first_chunk has one more
  int64_t chunks = 0;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable finished;

  void Run(int64_t c) {
    const int64_t part = std::upper_bound(first_chunk.begin(), first_chunk.end(), c) -
                         first_chunk.begin() - 1;
    const RowPart& p = parts[part];
    const int64_t n0 = (c - first_chunk[part]) * rows_per_chunk[part];
    p.rows(p.problem, n0, std::min(p.n, n0 + rows_per_chunk[part]));
  }

  void Work() {
    for (;;) {
      const int64_t c = next.fetch_add(1);
      if (c >= chunks) return;
      Run(c);
      if (done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

// The newest call's job, for pool tasks that wait for one (`posted_epoch` counts the posts).
std::mutex posted_mutex;
std::shared_ptr<Job> posted;
std::atomic<uint64_t> posted_epoch{0};
std::atomic<int64_t> waiting{0};  // pool tasks spinning for the next job

inline void Pause() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

std::shared_ptr<Job> TakePosted() {
  std::lock_guard<std::mutex> lock(posted_mutex);
  return posted;
}

// A pool task: the job it was scheduled for, then, while new jobs come within the spin limit,
// those too.
void PoolTask(std::shared_ptr<Job> job) {
  for (;;) {
    const uint64_t seen = posted_epoch.load();
    job->Work();
    job.reset();
    const int64_t limit = spin_micros.load();
    if (limit <= 0) return;
    waiting.fetch_add(1);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(limit);
    bool fresh = false;
    for (int i = 0;; ++i) {
      if (posted_epoch.load() != seen) { fresh = true; break; }
      if ((i & 63) == 63 && std::chrono::steady_clock::now() >= deadline) break;
      // yield now and then: on a loaded machine another process gets the core (spinning
      // without it made the step 1.2-1.4x slower there), on an idle one it returns at once
      if ((i & 15) == 15) sched_yield(); else Pause();
    }
    waiting.fetch_sub(1);
    // a job posted while this task stopped waiting: the poster may have counted it as waiting
    if (!fresh && posted_epoch.load() == seen) return;
    job = TakePosted();
    if (!job) return;
  }
}

}  // namespace

void RunRows(ffi::ThreadPool& pool, const std::vector<RowPart>& parts) {
  auto job = std::make_shared<Job>();
  job->parts = parts;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  job->first_chunk.push_back(0);
  for (const RowPart& p : parts) {
    // A chunk reads at least ~64 KiB of weights (a pool task costs microseconds), and at most
    // a thread's share of the rows, in whole row blocks.
    const int64_t m = std::max<int64_t>(1, p.multiple);
    const int64_t base = std::max<int64_t>(4, m);
    const auto whole = [m](int64_t r) { return std::max(m, r / m * m); };
    int64_t rows = std::max(base, whole(65536 / std::max<int64_t>(p.row_bytes, 1)));
    rows = std::min(rows, std::max(base, whole((p.n + threads - 1) / threads + m - 1)));
    job->rows_per_chunk.push_back(rows);
    job->first_chunk.push_back(job->first_chunk.back() + (p.n + rows - 1) / rows);
  }
  job->chunks = job->first_chunk.back();
  if (job->chunks == 0) return;
  const int64_t helpers = std::min(threads, job->chunks) - 1;
  if (helpers > 0) {
    {
      std::lock_guard<std::mutex> lock(posted_mutex);
      posted = job;
    }
    posted_epoch.fetch_add(1);
    const int64_t fresh = helpers - std::min(helpers, waiting.load());
    for (int64_t i = 0; i < fresh; ++i) pool.Schedule([job] { PoolTask(job); });
  }
  job->Work();
  std::unique_lock<std::mutex> lock(job->mutex);
  job->finished.wait(lock, [&] { return job->done.load() == job->chunks; });
}

}  // namespace jaxserve

// How long (microseconds) a pool task that ran out of chunks waits for the next call (0: none).
extern "C" void JaxserveRowsSetSpin(long long micros) { jaxserve::spin_micros.store(micros); }
