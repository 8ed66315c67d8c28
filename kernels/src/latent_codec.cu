// Packed low-bit latents on the GPU: encode (quantize + pack, what a cache write does) and
// decode (unpack + dequantize, to f32, f16 or bf16) of the row format of `palu::latent_codec`:
//
//   [ codes: ceil(R*b/8) bytes, little-endian bit stream | scale: f16 x G | zero: i16 x G ]
//
// Bit-exact twins of the CPU reference (`LatentCodec::encode_row` / `decode_row`): the same f32
// operations in the same order, IEEE division and round-half-away-from-zero, no FMA contraction
// (the `__f*_rn` intrinsics), so a row encoded here decodes to the same floats as one encoded
// on the CPU.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace palu {

constexpr int kMaxCodecGroups = 64;

// Passed by value: the group boundaries of one latent row (group g spans [start[g], start[g+1])).
struct LatentLayout {
    int width;     // R
    int bits;      // 2, 3, 4 or 8
    int n_groups;  // G <= kMaxCodecGroups
    int clamped_zero;  // 1: zero clamped to [0, 2^b - 1] (the authors' quantizer)
    int start[kMaxCodecGroups + 1];
};

__device__ __forceinline__ int code_bytes(const LatentLayout& l) {
    return (l.width * l.bits + 7) / 8;
}

__device__ __forceinline__ int group_of(const LatentLayout& l, int j) {
    int g = 0;
    while (g + 1 < l.n_groups && j >= l.start[g + 1]) ++g;
    return g;
}

// One block per row. Warps reduce the groups' ranges, then every thread builds whole code bytes
// (a byte gathers the codes that overlap it: no atomics, no read-modify-write).
__global__ void latent_encode_kernel(const float* __restrict__ x, uint8_t* __restrict__ rows,
                                     int64_t n_rows, LatentLayout l) {
    __shared__ float s_scale[kMaxCodecGroups];
    __shared__ float s_zero[kMaxCodecGroups];
    const int64_t row = blockIdx.x;
    if (row >= n_rows) return;
    const float* xr = x + row * l.width;
    const int nc = code_bytes(l);
    uint8_t* out = rows + row * (int64_t)(nc + 4 * l.n_groups);
    const float qmax = (float)((1u << l.bits) - 1);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;

    for (int g = warp; g < l.n_groups; g += n_warps) {
        float lo = INFINITY, hi = -INFINITY;
        for (int j = l.start[g] + lane; j < l.start[g + 1]; j += 32) {
            lo = fminf(lo, xr[j]);
            hi = fmaxf(hi, xr[j]);
        }
        for (int o = 16; o > 0; o >>= 1) {
            lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
            hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        }
        if (lane == 0) {
            const float scale = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), qmax), 1e-8f);
            float zero = roundf(__fdiv_rn(-lo, scale));
            if (l.clamped_zero) zero = fminf(fmaxf(zero, 0.0f), qmax);
            s_scale[g] = scale;
            s_zero[g] = zero;
            const __half hs = __float2half_rn(scale);
            const uint16_t hb = *reinterpret_cast<const uint16_t*>(&hs);
            // As Rust's `clamp(..) as i16`: NaN becomes 0.
            const float zc = isnan(zero) ? 0.0f : fminf(fmaxf(zero, -32768.0f), 32767.0f);
            const int16_t zi = (int16_t)zc;
            out[nc + 2 * g] = hb & 0xff;
            out[nc + 2 * g + 1] = hb >> 8;
            out[nc + 2 * l.n_groups + 2 * g] = (uint16_t)zi & 0xff;
            out[nc + 2 * l.n_groups + 2 * g + 1] = (uint16_t)zi >> 8;
        }
    }
    __syncthreads();

    for (int k = threadIdx.x; k < nc; k += blockDim.x) {
        const int first = (8 * k) / l.bits;
        const int last = min((8 * k + 7) / l.bits, l.width - 1);
        unsigned byte = 0;
        for (int i = first; i <= last; ++i) {
            const int g = group_of(l, i);
            const float q = __fadd_rn(roundf(__fdiv_rn(xr[i], s_scale[g])), s_zero[g]);
            const unsigned c = (unsigned)fminf(fmaxf(q, 0.0f), qmax);
            const int bit = i * l.bits - 8 * k;  // may be negative: the code started earlier
            byte |= bit >= 0 ? (c << bit) : (c >> -bit);
        }
        out[k] = (uint8_t)(byte & 0xff);
    }
}

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// One thread per 8 consecutive values of a row: their codes are exactly `bits` whole bytes,
// read once; the group's scale and zero are read when the group changes; the 8 outputs go out
// as 16-byte stores where the row allows it (rounded to T like candle's `to_dtype`).
template <typename T>
__global__ void latent_decode_kernel(const uint8_t* __restrict__ rows, T* __restrict__ out,
                                     int64_t n_rows, LatentLayout l) {
    const int nc = code_bytes(l);
    const int64_t rb = nc + 4 * l.n_groups;
    const int per_row = (l.width + 7) / 8;
    const int64_t n = n_rows * per_row;
    const uint64_t mask = (1u << l.bits) - 1;
    const bool vec_ok = (l.width % 8 == 0) && ((8 * sizeof(T)) % 16 == 0);
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = e / per_row;
        const int j0 = (int)(e - row * per_row) * 8;
        const uint8_t* r = rows + row * rb;
        const int byte0 = j0 * l.bits / 8;
        const int nbytes = min(l.bits, nc - byte0);
        uint64_t word = 0;
        for (int k = 0; k < nbytes; ++k) word |= (uint64_t)r[byte0 + k] << (8 * k);
        int g = group_of(l, j0);
        auto params = [&](int g, float& scale, float& zero) {
            const uint16_t sb = (uint16_t)r[nc + 2 * g] | ((uint16_t)r[nc + 2 * g + 1] << 8);
            const uint16_t zb = (uint16_t)r[nc + 2 * l.n_groups + 2 * g] |
                                ((uint16_t)r[nc + 2 * l.n_groups + 2 * g + 1] << 8);
            scale = __half2float(*reinterpret_cast<const __half*>(&sb));
            zero = (float)(int16_t)zb;
        };
        float scale, zero;
        params(g, scale, zero);
        alignas(16) T v[8];
        const int m = min(8, l.width - j0);
        for (int i = 0; i < m; ++i) {
            const int j = j0 + i;
            if (g + 1 < l.n_groups && j >= l.start[g + 1]) {
                while (g + 1 < l.n_groups && j >= l.start[g + 1]) ++g;
                params(g, scale, zero);
            }
            const float c = (float)((word >> (i * l.bits)) & mask);
            v[i] = from_f32<T>(__fmul_rn(__fsub_rn(c, zero), scale));
        }
        T* o = out + row * l.width + j0;
        if (vec_ok) {
            const uint4* src = reinterpret_cast<const uint4*>(v);
            uint4* dst = reinterpret_cast<uint4*>(o);
            for (int k = 0; k < (int)(8 * sizeof(T) / 16); ++k) dst[k] = src[k];
        } else {
            for (int i = 0; i < m; ++i) o[i] = v[i];
        }
    }
}

}  // namespace palu

namespace {
// 801 = cudaErrorNotSupported, as palu_decode reports shapes it has no instance for.
int check_layout(const palu::LatentLayout& l) {
    if (l.n_groups < 1 || l.n_groups > palu::kMaxCodecGroups) return 801;
    if (l.bits != 2 && l.bits != 3 && l.bits != 4 && l.bits != 8) return 801;
    if (l.start[0] != 0 || l.start[l.n_groups] != l.width) return 801;
    return 0;
}
}  // namespace

extern "C" int palu_latent_encode(const float* x, uint8_t* rows, int64_t n_rows,
                                  palu::LatentLayout layout, cudaStream_t stream) {
    if (int e = check_layout(layout)) return e;
    if (n_rows == 0) return 0;
    palu::latent_encode_kernel<<<(unsigned)n_rows, 128, 0, stream>>>(x, rows, n_rows, layout);
    return (int)cudaGetLastError();
}

extern "C" int palu_latent_decode(const uint8_t* rows, void* out, int64_t n_rows,
                                  palu::LatentLayout layout, int out_type, cudaStream_t stream) {
    if (int e = check_layout(layout)) return e;
    const int64_t n = n_rows * ((layout.width + 7) / 8);
    if (n == 0) return 0;
    const unsigned blocks = (unsigned)((n + 255) / 256 < 65536 ? (n + 255) / 256 : 65536);
    switch (out_type) {
        case 0:
            palu::latent_decode_kernel<float>
                <<<blocks, 256, 0, stream>>>(rows, (float*)out, n_rows, layout);
            break;
        case 1:
            palu::latent_decode_kernel<__half>
                <<<blocks, 256, 0, stream>>>(rows, (__half*)out, n_rows, layout);
            break;
        case 2:
            palu::latent_decode_kernel<__nv_bfloat16>
                <<<blocks, 256, 0, stream>>>(rows, (__nv_bfloat16*)out, n_rows, layout);
            break;
        default:
            return 801;
    }
    return (int)cudaGetLastError();
}
