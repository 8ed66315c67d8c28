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
#include <type_traits>
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

// A group's quantizer from its range, with the CPU's f32 operations in the CPU's order, and its
// f16 scale and i16 zero written to the row's tail (`nc` code bytes, then G scales, G zeros).
__device__ __forceinline__ void group_params(const LatentLayout& l, float lo, float hi, int g, int nc,
                                             uint8_t* row, float& scale, float& zero) {
    const float qmax = (float)((1u << l.bits) - 1);
    scale = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), qmax), 1e-8f);
    zero = roundf(__fdiv_rn(-lo, scale));
    if (l.clamped_zero) zero = fminf(fmaxf(zero, 0.0f), qmax);
    const __half hs = __float2half_rn(scale);
    const uint16_t hb = *reinterpret_cast<const uint16_t*>(&hs);
    // As Rust's `clamp(..) as i16`: NaN becomes 0.
    const float zc = isnan(zero) ? 0.0f : fminf(fmaxf(zero, -32768.0f), 32767.0f);
    const int16_t zi = (int16_t)zc;
    row[nc + 2 * g] = hb & 0xff;
    row[nc + 2 * g + 1] = hb >> 8;
    row[nc + 2 * l.n_groups + 2 * g] = (uint16_t)zi & 0xff;
    row[nc + 2 * l.n_groups + 2 * g + 1] = (uint16_t)zi >> 8;
}

// Code byte `k` of a row: the codes overlapping its bits `8k … 8k+7`, value `i` of the row
// quantized by `value(i)` with its group's (scale, zero) from `params(i)`.
template <typename Value, typename Params>
__device__ __forceinline__ uint8_t code_byte(const LatentLayout& l, int k, Value value, Params params) {
    const float qmax = (float)((1u << l.bits) - 1);
    const int first = (8 * k) / l.bits;
    const int last = min((8 * k + 7) / l.bits, l.width - 1);
    unsigned byte = 0;
    for (int i = first; i <= last; ++i) {
        float scale, zero;
        params(i, scale, zero);
        const float q = __fadd_rn(roundf(__fdiv_rn(value(i), scale)), zero);
        const unsigned c = (unsigned)fminf(fmaxf(q, 0.0f), qmax);
        const int bit = i * l.bits - 8 * k;  // may be negative: the code started earlier
        byte |= bit >= 0 ? (c << bit) : (c >> -bit);
    }
    return (uint8_t)(byte & 0xff);
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
        if (lane == 0) group_params(l, lo, hi, g, nc, out, s_scale[g], s_zero[g]);
    }
    __syncthreads();

    for (int k = threadIdx.x; k < nc; k += blockDim.x)
        out[k] = code_byte(
            l, k, [&](int i) { return xr[i]; },
            [&](int i, float& scale, float& zero) {
                const int g = group_of(l, i);
                scale = s_scale[g], zero = s_zero[g];
            });
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

// The latent write of one decode step in one pass: project new tokens onto the down factor
// (h = x·Aᵀ), round h to the activation type T as the unfused path's GEMM output is, quantize
// per (token, group) and pack, writing finished cache rows. One block per (group, tile of TOK
// tokens), a warp per column: TOK = 1 for decode-sized inputs (n·G blocks, A's group slab read
// from L2 by each token's block), TOK = 8 beyond. A GEMM is the better tool for prefill-sized
// inputs (measured: docs/kernels.md); the engine sends only decode steps here. Groups must end on byte boundaries
// (rank·bits % 8 == 0) so blocks of different groups never share a code byte; every rank the
// rank search emits (multiples of 8) does.
constexpr int kMaxGroupRank = 512;

template <typename T>
struct Vec8;  // eight T in 16 bytes, as f32
template <>
struct Vec8<__half> {
    static __device__ __forceinline__ void load(const __half* p, float* f) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 v = __half22float2(h[i]);
            f[2 * i] = v.x, f[2 * i + 1] = v.y;
        }
    }
};
template <>
struct Vec8<__nv_bfloat16> {
    static __device__ __forceinline__ void load(const __nv_bfloat16* p, float* f) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 v = __bfloat1622float2(h[i]);
            f[2 * i] = v.x, f[2 * i + 1] = v.y;
        }
    }
};

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, int TOK>
__global__ void latent_project_encode_kernel(const T* __restrict__ x, const T* __restrict__ a,
                                             uint8_t* __restrict__ rows, int64_t n_rows, int d,
                                             LatentLayout l) {
    __shared__ float s_h[TOK][kMaxGroupRank];
    const int g = blockIdx.x;
    const int64_t t0 = (int64_t)blockIdx.y * TOK;
    const int n_tok = (int)min((int64_t)TOK, n_rows - t0);
    const int c0 = l.start[g], r = l.start[g + 1] - c0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    // h[t][j] = Σ_k x[t][k]·A[c0 + j][k]: a warp per column, lanes over k in 8-wide pieces.
    for (int j = warp; j < r; j += n_warps) {
        const T* arow = a + (int64_t)(c0 + j) * d;
        float acc[TOK];
#pragma unroll
        for (int t = 0; t < TOK; ++t) acc[t] = 0.f;
        for (int k = 8 * lane; k < d; k += 8 * 32) {
            float av[8];
            Vec8<T>::load(arow + k, av);
#pragma unroll
            for (int t = 0; t < TOK; ++t) {
                if (t >= n_tok) break;
                float xv[8];
                Vec8<T>::load(x + (t0 + t) * d + k, xv);
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[t] = fmaf(xv[i], av[i], acc[t]);
            }
        }
#pragma unroll
        for (int t = 0; t < TOK; ++t) {
            float v = acc[t];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            // Rounded to T: the unfused path quantizes the GEMM's T output.
            if (lane == 0 && t < n_tok) s_h[t][j] = to_f32<T>(from_f32<T>(v));
        }
    }
    __syncthreads();
    const int nc = code_bytes(l);
    const int64_t rb = nc + 4 * l.n_groups;
    // Per token: the group's range (one warp per token), then its code bytes (all threads),
    // with latent_encode_kernel's operations in its order (bit-exact on the same h).
    __shared__ float s_scale[TOK], s_zero[TOK];
    for (int t = warp; t < n_tok; t += n_warps) {
        float lo = INFINITY, hi = -INFINITY;
        for (int j = lane; j < r; j += 32) lo = fminf(lo, s_h[t][j]), hi = fmaxf(hi, s_h[t][j]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
            hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        }
        if (lane == 0) group_params(l, lo, hi, g, nc, rows + (t0 + t) * rb, s_scale[t], s_zero[t]);
    }
    __syncthreads();
    const int b0 = c0 * l.bits / 8, b1 = (c0 + r) * l.bits / 8;  // the group's whole bytes
    for (int e = threadIdx.x; e < n_tok * (b1 - b0); e += blockDim.x) {
        const int t = e / (b1 - b0), k = b0 + e % (b1 - b0);
        rows[(t0 + t) * rb + k] = code_byte(
            l, k, [&](int i) { return s_h[t][i - c0]; },
            [&](int, float& scale, float& zero) { scale = s_scale[t], zero = s_zero[t]; });
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

// Whether palu_latent_project_encode takes this layout and width: every group on whole bytes and
// at most kMaxGroupRank wide, a reduction width of whole 16-byte pieces.
extern "C" int palu_latent_project_supported(palu::LatentLayout layout, int d) {
    if (check_layout(layout) || d % 8) return 0;
    for (int g = 0; g < layout.n_groups; ++g) {
        const int r = layout.start[g + 1] - layout.start[g];
        if (r > palu::kMaxGroupRank || (layout.start[g] * layout.bits) % 8) return 0;
    }
    return (layout.width * layout.bits) % 8 == 0;
}

// x [n_rows, d] and a [width, d] of T (dtype 1: f16, 2: bf16), contiguous, 16-byte aligned;
// rows [n_rows, row_bytes] of the codec's format. 801 for a layout the kernel does not take.
extern "C" int palu_latent_project_encode(const void* x, const void* a, uint8_t* rows, int64_t n_rows, int d,
                                          palu::LatentLayout layout, int dtype, cudaStream_t stream) {
    if (!palu_latent_project_supported(layout, d) || (dtype != 1 && dtype != 2)) return 801;
    if ((size_t)x % 16 || (size_t)a % 16) return (int)cudaErrorInvalidValue;
    if (n_rows == 0) return 0;
    auto launch = [&](auto tok) {
        constexpr int TOK = decltype(tok)::value;
        const dim3 grid((unsigned)layout.n_groups, (unsigned)((n_rows + TOK - 1) / TOK));
        if (dtype == 1)
            palu::latent_project_encode_kernel<__half, TOK><<<grid, 512, 0, stream>>>(
                (const __half*)x, (const __half*)a, rows, n_rows, d, layout);
        else
            palu::latent_project_encode_kernel<__nv_bfloat16, TOK><<<grid, 512, 0, stream>>>(
                (const __nv_bfloat16*)x, (const __nv_bfloat16*)a, rows, n_rows, d, layout);
    };
    if (n_rows <= 64)
        launch(std::integral_constant<int, 1>{});
    else
        launch(std::integral_constant<int, 8>{});
    return (int)cudaGetLastError();
}
