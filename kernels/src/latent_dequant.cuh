// Packed latent codes to f16 in half2 arithmetic: the decode kernel's dequantization of one
// 32-bit word of codes (latent_codec's little-endian bit stream: code k at bits [k·B, k·B + B)).
//
// value = (code − zero)·scale, as the CPU codec defines it (f32, then rounded to f16). Here:
//   1. each code becomes the f16 1024 + code by placing it in the mantissa of 1024 (0x6400)
//      with one LOP3 (4- and 2-bit: two codes 16 bits apart at a time) or PRMT (8-bit);
//   2. HSUB2 by 1024 + zero gives code − zero exactly (both operands are integers below 2048,
//      which f16 holds exactly, and so is their difference);
//   3. HMUL2 by the scale rounds once: |code − zero| < 2^11 and the scale's 11-bit significand
//      make the product exact in f32, so the CPU's f32 product rounded to f16 is the same number.
// So the result equals the f32 reference bit for bit whenever −1024 ≤ zero ≤ 1023
// (`fits_half2_dequant`); other rows take the f32 path. About 2.4 instructions per code for 2-
// and 4-bit, 1.5 for 8-bit, against 5–6 for the f32 path (shift, mask, FADD, FMUL, convert).
//
// Host and device: kernels/tests/latent_dequant_test.cu checks every code at every position of a
// word, every accepted zero point and f16 scales across the whole range (the edges and a stride)
// against the f32 reference on the CPU (run by scripts/kernels-check.sh, so in CI).
#pragma once
#include <cuda_fp16.h>

namespace palu {
namespace dequant {

__host__ __device__ __forceinline__ unsigned byte_perm(unsigned x, unsigned y, unsigned s) {
#ifdef __CUDA_ARCH__
    return __byte_perm(x, y, s);
#else
    const unsigned long long xy = (unsigned long long)y << 32 | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned)(xy >> (8 * ((s >> (4 * i)) & 7)) & 0xff) << (8 * i);
    return r;
#endif
}

__host__ __device__ __forceinline__ __half2 bits_to_half2(unsigned u) {
    __half2_raw r;
    r.x = (unsigned short)(u & 0xffff);
    r.y = (unsigned short)(u >> 16);
    return __half2(r);
}
__host__ __device__ __forceinline__ unsigned half2_to_bits(__half2 h) {
    const __half2_raw r = h;
    return (unsigned)r.x | (unsigned)r.y << 16;
}

// The rows whose zero point the half2 path reproduces exactly.
__host__ __device__ __forceinline__ bool fits_half2_dequant(int zero) { return zero >= -1024 && zero <= 1023; }

// Per row: (1024 + zero, 1024 + zero) and (scale, scale) as half2, from the row's f16 scale bits
// and integer zero (which must pass fits_half2_dequant).
struct RowHalf2 {
    __half2 offset, scale;
    __host__ __device__ __forceinline__ RowHalf2(unsigned short scale_bits, int zero)
        : offset(__half2half2(__int2half_rn(1024 + zero))),  // an integer in [0, 2047]: exact
          scale(bits_to_half2((unsigned)scale_bits * 0x10001u)) {}
};

// The codes of one word, in order, as half2 bit pairs (values 2i, 2i + 1 in pair i):
// 32/BITS values, 16/BITS pairs.
template <int BITS>
__host__ __device__ __forceinline__ void dequant_word(unsigned w, const RowHalf2& row, unsigned (&out)[16 / BITS]) {
    static_assert(BITS == 2 || BITS == 4 || BITS == 8, "2-, 4- or 8-bit codes");
    auto finish = [&](unsigned biased) { return half2_to_bits(__hmul2(__hsub2(bits_to_half2(biased), row.offset), row.scale)); };
    if constexpr (BITS == 8) {
        // bytes [c, 0x64, c', 0x64] = (1024 + c, 1024 + c').
        out[0] = finish(byte_perm(w, 0x6464u, 0x5140));
        out[1] = finish(byte_perm(w, 0x6464u, 0x5342));
    } else {
        // Codes i and i + N (N = 16/BITS codes apart = 16 bits apart) per LOP3, then PRMT puts
        // pairs (i, i + N), (i + 1, i + 1 + N) back in order as (i, i + 1), (i + N, i + 1 + N).
        constexpr int N = 16 / BITS;
        constexpr unsigned mask = ((1u << BITS) - 1) * 0x10001u;
        unsigned v[N];
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = finish(((w >> (BITS * i)) & mask) | 0x64006400u);
#pragma unroll
        for (int i = 0; i < N; i += 2) {
            out[i / 2] = byte_perm(v[i], v[i + 1], 0x5410);          // low halves: codes i, i + 1
            out[N / 2 + i / 2] = byte_perm(v[i], v[i + 1], 0x7632);  // high halves: i + N, i + 1 + N
        }
    }
}

}  // namespace dequant
}  // namespace palu
