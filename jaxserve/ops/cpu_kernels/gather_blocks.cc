// out[i] = pages[ids[i]] for whole blocks: the paged KV cache's context reads on XLA:CPU, as an
// XLA FFI custom call (jaxserve/ops/cpu_kernels/__init__.py builds and registers it). A block
// (every dim of `pages` but the first) is contiguous, so each is one memcpy; XLA:CPU's own
// gather computes every element's source index in a scalar loop (~2.6 GB/s measured on 64 KiB
// of blocks). Indices follow jnp indexing exactly: a negative one counts from the end, then
// out-of-range ones are clamped, so the bytes are those of `pages[ids]`, of any dtype.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error GatherBlocksImpl(ffi::AnyBuffer pages, ffi::Buffer<ffi::S32> ids,
                            ffi::Result<ffi::AnyBuffer> out) {
  const auto pd = pages.dimensions();
  if (pd.size() < 1 || pd[0] < 1)
    return ffi::Error::InvalidArgument("gather blocks: pages [blocks, ...] expected");
  const int64_t blocks = pd[0];
  const size_t block_bytes = pages.size_bytes() / blocks;
  const size_t count = ids.element_count();
  if (out->size_bytes() != count * block_bytes || out->element_type() != pages.element_type())
    return ffi::Error::InvalidArgument("gather blocks: the result must hold ids' blocks");
  const char* src = static_cast<const char*>(pages.untyped_data());
  char* dst = static_cast<char*>(out->untyped_data());
  const int32_t* index = ids.typed_data();
  for (size_t i = 0; i < count; ++i) {
    int64_t b = index[i];
    if (b < 0) b += blocks;
    b = std::min<int64_t>(std::max<int64_t>(b, 0), blocks - 1);
    std::memcpy(dst + i * block_bytes, src + b * block_bytes, block_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveGatherBlocks, GatherBlocksImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());
