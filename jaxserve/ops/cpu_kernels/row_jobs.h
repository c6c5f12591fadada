// The threads of the CPU kernels that read weight rows (int8_rows.cc, f32_rows.cc): a call's
// rows, cut into chunks, run on XLA's own intra-op pool, so a kernel never oversubscribes the
// cores XLA uses. One implementation (row_jobs.cc) serves every kernel, so the pool tasks that
// wait between calls (below) pick up the next call whichever kernel makes it.

#pragma once

#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jaxserve {

// One weight's rows [0, n) of a call: `rows(problem, n0, n1)` computes rows [n0, n1).
struct RowPart {
  void (*rows)(const void* problem, int64_t n0, int64_t n1);
  const void* problem;
  int64_t n;          // rows
  int64_t row_bytes;  // bytes of one row read from memory (sizes the chunks)
  int64_t multiple;   // a chunk's rows are a multiple of this (the inner loop's row block)
};

// Runs every part's rows, in chunks of about 64 KiB of weights each (they stay in L2 while
// the tokens pass over them), on the caller and the pool's threads; returns when all are done.
// The chunks of all parts are one queue, so a call forks and joins once. `problem`s need only
// live until the return: tasks that come to the job later find no chunk left.
void RunRows(xla::ffi::ThreadPool& pool, const std::vector<RowPart>& parts);

}  // namespace jaxserve
