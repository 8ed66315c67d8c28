// Row copies between the Palu latent rows of a step and the engine's paged KV blocks.
//
// The engine allocates each layer's paged cache as [blocks, ..., block_size, ...] of its cache
// dtype; Palu views a layer's pool as rows of `ld` bytes, one per slot (slot = block·block_size
// + offset), and stores a token's latent row (16-bit latents, fp8 latents or packed codes with
// their scales) in the first `row_bytes` bytes. Writes scatter a step's rows to the engine's
// slot mapping (negative slots are the engine's padding and are skipped); reads gather a
// sequence's rows through its block table. Both are this one kernel, in bytes, so one op
// serves every latent format; where the blocks hold float8 e4m3 (`--pa-cache-type f8e4m3`) and
// the rows 16- or 32-bit floats, the copy converts element by element (candle 0.10.2's CUDA casts
// to and from F8E4M3 look up kernels under names the PTX does not define).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
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

// Element types of a converting copy (kernels/src/lib.rs `RowType`).
enum RowType : int { kBytes = 0, kF32 = 1, kF16 = 2, kBF16 = 3, kF8E4M3 = 4 };

__device__ __forceinline__ float load_elem(const unsigned char* row, int type, int i) {
    switch (type) {
        case kF32: return reinterpret_cast<const float*>(row)[i];
        case kF16: return __half2float(reinterpret_cast<const __half*>(row)[i]);
        case kBF16: return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row)[i]);
        default: return float(reinterpret_cast<const __nv_fp8_e4m3*>(row)[i]);
    }
}

// Round to nearest even; fp8 saturates to ±448 (as the engine's fp8 cache and candle's CPU cast).
__device__ __forceinline__ void store_elem(unsigned char* row, int type, int i, float v) {
    switch (type) {
        case kF32: reinterpret_cast<float*>(row)[i] = v; break;
        case kF16: reinterpret_cast<__half*>(row)[i] = __float2half_rn(v); break;
        case kBF16: reinterpret_cast<__nv_bfloat16*>(row)[i] = __float2bfloat16_rn(v); break;
        default: reinterpret_cast<__nv_fp8_e4m3*>(row)[i] = __nv_fp8_e4m3(v); break;
    }
}

__global__ void convert_rows(unsigned char* dst, long long dst_ld, const long long* dst_idx, int dst_type, const unsigned char* src,
                             long long src_ld, const long long* src_idx, int src_type, int width) {
    const long long i = blockIdx.x;
    const long long d = dst_idx ? dst_idx[i] : i, s = src_idx ? src_idx[i] : i;
    if (d < 0 || s < 0) return;
    const unsigned char* from = src + s * src_ld;
    unsigned char* to = dst + d * dst_ld;
    for (int k = threadIdx.x; k < width; k += blockDim.x) store_elem(to, dst_type, k, load_elem(from, src_type, k));
}

int type_size(int t) { return t == kF32 ? 4 : t == kF16 || t == kBF16 ? 2 : 1; }

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

// The same with element types (RowType): `width` elements per row; where the types differ each
// element is converted (float types only), else the rows are copied as bytes.
int palu_convert_rows(unsigned char* dst, long long dst_ld, const long long* dst_idx, int dst_type, const unsigned char* src,
                      long long src_ld, const long long* src_idx, int src_type, long long n, int width, cudaStream_t stream) {
    if (dst_type < kBytes || dst_type > kF8E4M3 || src_type < kBytes || src_type > kF8E4M3) return cudaErrorInvalidValue;
    if (dst_type == src_type)
        return palu_copy_rows(dst, dst_ld, dst_idx, src, src_ld, src_idx, n, width * type_size(src_type), stream);
    if (dst_type == kBytes || src_type == kBytes) return cudaErrorInvalidValue;
    if (n <= 0) return cudaSuccess;
    if (width < 1 || dst_ld < (long long)width * type_size(dst_type) || src_ld < (long long)width * type_size(src_type) ||
        n > 0x7fffffffLL)
        return cudaErrorInvalidValue;
    convert_rows<<<(unsigned)n, 64, 0, stream>>>(dst, dst_ld, dst_idx, dst_type, src, src_ld, src_idx, src_type, width);
    return cudaGetLastError();
}

}  // extern "C"
