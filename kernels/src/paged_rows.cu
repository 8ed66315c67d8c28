// Row copies between the Palu latent rows of a step and the engine's paged KV blocks.
//
// The engine allocates each layer's paged cache as [blocks, ..., block_size, ...] of its cache
// dtype; Palu views a layer's pool as rows of `ld` bytes, one per slot (slot = block·block_size
// + offset), and stores a token's latent row (16-bit latents, fp8 latents or packed codes with
// their scales) in the first `row_bytes` bytes. Writes scatter a step's rows to the engine's
// slot mapping (negative slots are the engine's padding and are skipped); reads gather a
// sequence's rows through its block table. Both are this one kernel, in bytes, so one op
// serves every latent format.
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

// One block per row; the widest piece every address and stride allows.
template <typename W>
__global__ void copy_rows(unsigned char* dst, long long dst_ld, const long long* dst_idx, const unsigned char* src,
                          long long src_ld, const long long* src_idx, int row_bytes) {
    const long long i = blockIdx.x;
    const long long d = dst_idx ? dst_idx[i] : i, s = src_idx ? src_idx[i] : i;
    if (d < 0 || s < 0) return;
    const W* from = reinterpret_cast<const W*>(src + s * src_ld);
    W* to = reinterpret_cast<W*>(dst + d * dst_ld);
    for (int k = threadIdx.x; k < row_bytes / (int)sizeof(W); k += blockDim.x) to[k] = from[k];
}

}  // namespace

extern "C" {

// dst row dst_idx[i] (i when null) ← src row src_idx[i] (i when null), i < n; rows of
// `row_bytes` bytes at strides dst_ld / src_ld bytes. Returns a cudaError_t.
int palu_copy_rows(unsigned char* dst, long long dst_ld, const long long* dst_idx, const unsigned char* src,
                   long long src_ld, const long long* src_idx, long long n, int row_bytes, cudaStream_t stream) {
    if (n <= 0) return cudaSuccess;
    if (row_bytes < 1 || dst_ld < row_bytes || src_ld < row_bytes || n > 0x7fffffffLL) return cudaErrorInvalidValue;
    const long long align = dst_ld | src_ld | row_bytes | (long long)(uintptr_t)dst | (long long)(uintptr_t)src;
    const dim3 grid((unsigned)n), block(64);
    if (align % 16 == 0)
        copy_rows<uint4><<<grid, block, 0, stream>>>(dst, dst_ld, dst_idx, src, src_ld, src_idx, row_bytes);
    else if (align % 4 == 0)
        copy_rows<uint32_t><<<grid, block, 0, stream>>>(dst, dst_ld, dst_idx, src, src_ld, src_idx, row_bytes);
    else
        copy_rows<unsigned char><<<grid, block, 0, stream>>>(dst, dst_ld, dst_idx, src, src_ld, src_idx, row_bytes);
    return cudaGetLastError();
}

}  // extern "C"
