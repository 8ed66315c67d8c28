// Palu decode attention, register pipeline (v4): the same function as palu_decode_split in
// palu_decode.cuh, organised as FlashAttention-2 organises its inner loop.
//
// Each warp streams its own 16-token chunks (cp.async, double-buffered) and keeps everything
// between the stages in registers:
//   K = H_k·B_kᵀ          mma.m16n8k16, [16 tokens × dh] accumulators (B_k shared in smem)
//   RoPE                  in registers: rotate-half partners (d, d + dh/2) sit in the same
//                         thread's accumulators of n-tiles n and n + dh/16; per-thread angle
//                         state advances by a fixed rotation per chunk (re-seeded in double)
//   Sᵀ = Q·Kᵀ             the rotated accumulators are the B operand as they lie; Q (zero rows
//                         for heads of other KV heads of the group) comes from smem
//   online softmax        on Sᵀ's accumulators (quad shuffles), per warp
//   A += P·H_v            P re-packed from Sᵀ's accumulators as the A operand; H_v via
//                         ldmatrix.trans
// The four warps' (m, l, A) are merged in smem at the end of the split; the combine kernel of
// palu_decode.cuh merges splits and applies B_v.
#pragma once
#include "latent_dequant.cuh"
#include "palu_decode.cuh"
#include <type_traits>

namespace palu {
namespace mma4 {

constexpr int kChunk = 16;
constexpr int kWarps = 4;
constexpr int kReseed = 32;  // chunks between exact (double) angle re-seeds
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
constexpr float kLazyLog2 = 8.f;  // the softmax reference moves once a score exceeds it by 2^8

// 2^x in one instruction (ex2(−∞) = 0); the softmax runs in log2 units.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldsm_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(smem_u32(p)));
}
// The same at a shared-memory address already in the shared window.
__device__ __forceinline__ void cp_async16_at(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0));
}
// 4- and 8-byte copies (through L1: .cg takes 16 bytes only), for packed rows aligned to less.
template <int N>
__device__ __forceinline__ void cp_async_small(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_u32(dst)), "l"(src), "n"(N), "r"(valid ? N : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Hopper's warpgroup MMA (sm_90a only; elsewhere these compile to nothing and the dispatch
// never selects the WG kernels: PALU_WGMMA is defined only for sm_90a builds).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PALU_HAS_WGMMA 1
#endif
// Shared-memory matrix descriptor, no swizzle, K-major core matrices: start address, byte
// offsets between core matrices along K (lbo) and along M/N (sbo), in 16-byte units.
__device__ __forceinline__ unsigned long long wgmma_desc(const void* p, unsigned lbo, unsigned sbo) {
    const unsigned long long a = smem_u32(p);
    return ((a & 0x3FFFF) >> 4) | (unsigned long long)((lbo >> 4) & 0x3FFF) << 16 |
           (unsigned long long)((sbo >> 4) & 0x3FFF) << 32;
}
// Generic-proxy writes (cp.async, st.shared) made visible to the async proxy wgmma reads with.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef PALU_HAS_WGMMA
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_fence() {
#ifdef PALU_HAS_WGMMA
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef PALU_HAS_WGMMA
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N committed wgmma groups of this warp are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef PALU_HAS_WGMMA
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Pins 16 accumulators after a wait: the compiler may not move reads of them above it (it sees
// the wgmma's outputs as written at issue).
__device__ __forceinline__ void wgmma_fence_operands(float* d) {
#pragma unroll
    for (int i = 0; i < 16; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// D[64 × 32] += A[64 × 16]·B[16 × 32], A and B K-major in shared memory, f32 accumulators in
// the m16n8 C layout per warp and 8-column tile (d[4j + e] is mma.m16n8's c[e] of tile j).
template <typename T>
__device__ __forceinline__ void wgmma_m64n32k16(float* d, unsigned long long da, unsigned long long db) {
#ifdef PALU_HAS_WGMMA
#define PALU_WGMMA_ASM(TY)                                                                                     \
    asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY                                      \
                 " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, 1, 1, 1, 0, 0;\n"         \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),          \
                   "+f"(d[15])                                                                                  \
                 : "l"(da), "l"(db))
    if constexpr (std::is_same_v<T, half>) PALU_WGMMA_ASM("f16");
    else PALU_WGMMA_ASM("bf16");
#undef PALU_WGMMA_ASM
#endif
}

// NW: warps per block (4; 8 for the variant-5 kernels that trade 4 blocks of 4 warps for 2 of 8).
template <int RKP, int RVP, int DH, int GHEADS, int BITS = 0, bool WG = false, int NW = kWarps>
struct Smem {
    static constexpr int ldb = RKP + 8;   // padded rows: conflict-free ldmatrix
    static constexpr int ldk = RKP + 8;
    static constexpr int ldv = RVP + 8;
    static constexpr int ldq = DH + 8;
    // wgmma (WG): B_k and the block's 64-row key tiles in the core-matrix layout its shared-
    // memory descriptors read (8 rows × 16 bytes per core matrix, no padding, no swizzle).
    static constexpr int core_sbo = RKP * 16;   // bytes between core matrices along rows
    static constexpr int ktile = kChunk * 4 * RKP * 2;   // one stage: 64 rows (the 4 warps' chunks)
    static constexpr int vchunk = kChunk * ldv * 2;      // one warp's value chunk, one stage
    static constexpr int b = WG ? DH * RKP * 2 : GHEADS * DH * ldb * 2;
    static constexpr int q = GHEADS * 16 * ldq * 2;
    static constexpr int chunk = kChunk * (ldk + ldv) * 2;       // one buffer of one warp
    // Packed latents: the codes of a chunk land in one of two staging buffers and are
    // dequantized into a single 16-bit chunk buffer.
    static constexpr int stage_k = RKP * BITS / 8, stage_v = RVP * BITS / 8;  // bytes per row
    static constexpr int stage = kChunk * (stage_k + stage_v);
    static constexpr int bufs = WG ? 2 * ktile + NW * 2 * vchunk : BITS == 0 ? NW * 2 * chunk : NW * (chunk + 2 * stage);
    static constexpr int merge = NW * 16 * (RVP + 2) * 4;        // per-warp (m, l, A)
    static constexpr int rowoff = kChunk * (DH / 2) * 8;         // cos/sin(row·θ) per lane, row < 16
    static constexpr int base = NW * (DH / 2) * 8;               // per warp: cos/sin(t0·θ)
    static constexpr int base_h = NW * (DH / 4) * 8;             // the same as f16 pairs (f16 RoPE)
    static constexpr int step = (DH / 2) * 8;                    // per pair: rotation by 64·θ
    static constexpr int total = b + q + rowoff + base + base_h + step + (bufs > merge ? bufs : merge);
    static_assert(b % 16 == 0 && q % 16 == 0 && rowoff % 16 == 0 && base % 16 == 0 && base_h % 16 == 0,
                  "16-byte aligned regions (float4 angle updates, 16-byte copies)");
};

// Issues the copies of one warp's chunk of latent rows: the 8-column pieces that start below r
// (round8(r) columns), zero-filling rows ≥ valid and the pieces beyond. Each lane's pieces and
// their offsets are fixed for the whole split and computed once (v5 recomputed them per chunk:
// about 150 instructions per chunk for 8 copies). Stop 13 (ncu's per-instruction counts): the
// regular layout still spent ~85 instructions per chunk and loader on 64-bit products per piece
// and pointer selects; now one product per chunk, a 64-bit add per piece, and the source address
// is passed as is for zero-filled pieces (a copy of 0 source bytes reads nothing).
template <int RP, int LDD>
struct ChunkLoader {
    static constexpr int per_row = RP / 8;            // 16-byte pieces per row
    static constexpr int n = kChunk * per_row / 32;   // pieces per lane
    static constexpr bool regular = 32 % per_row == 0;
    static constexpr int step = regular ? 32 / per_row : 0;  // rows between a lane's pieces
    int row0, col;       // regular layout: the lane's first row, its column (same in every row)
    bool col_ok;
    long long ld, step_ld;  // step_ld: elements between a lane's consecutive pieces
    int r, lane;

    __device__ ChunkLoader(int ld_, int r_, int lane_) : ld(ld_), r(r_), lane(lane_) {
        row0 = lane / per_row;
        col = lane % per_row * 8;
        col_ok = col < r;
        step_ld = (long long)step * ld;
    }
    // src: the group's row 0; rows t0 … t0 + valid − 1 are copied (t0: the chunk's physical
    // row, see physical_row; its 16 rows are contiguous).
    __device__ __forceinline__ void load(half* dst, const half* src, int t0, int valid) const {
        if constexpr (regular) {
            const half* s = src + (long long)(t0 + row0) * ld + col;
            const unsigned d = smem_u32(dst + row0 * LDD + col);
#pragma unroll
            for (int u = 0; u < n; ++u) {
                cp_async16_at(d + step * u * LDD * 2, s, col_ok && row0 + step * u < valid);
                s += step_ld;
            }
        } else {
#pragma unroll
            for (int u = 0; u < n; ++u) {
                const int ci = lane + 32 * u, t = ci / per_row, c = ci % per_row * 8;
                const bool ok = t < valid && c < r;
                cp_async16(dst + t * LDD + c, ok ? src + (t0 + t) * ld + c : src, ok);
            }
        }
    }
};

// Packed rows (BITS = 2, 4, 8): each chunk's codes (16 rows × r·BITS/8 bytes of one group) are
// copied in pieces of 16 bytes (8 or 4 where the rows are aligned to less: a row of the
// serving cache is G·r·BITS/8 + 4·G bytes) to a staging buffer; each lane also fetches the
// (scale, zero) of one row for the next chunk into a register (lanes 0–15 key rows, 16–31
// value rows).
struct PackedLoader {
    int ppr_k, ppr_v;     // pieces per row
    int piece;            // bytes per piece: 16, 8 or 4
    int lane;
    const unsigned char *hk, *hv;  // the group's row 0: codes
    const unsigned char *ks, *kz, *vs, *vz;  // the group's row 0: scale, zero
    long long ldk, ldv;
    __device__ __forceinline__ void load(unsigned char* stage_k, int ld_sk, unsigned char* stage_v, int ld_sv, int t0, int valid,
                                         unsigned& sz) const {
        auto copy = [&](unsigned char* dst, const unsigned char* src, bool ok) {
            if (piece == 16) cp_async16(dst, src, ok);
            else if (piece == 8) cp_async_small<8>(dst, src, ok);
            else cp_async_small<4>(dst, src, ok);
        };
        for (int i = lane; i < kChunk * ppr_k; i += 32) {
            const int t = i / ppr_k, c = i % ppr_k * piece;
            const bool ok = t < valid;
            copy(stage_k + t * ld_sk + c, ok ? hk + (t0 + t) * ldk + c : hk, ok);
        }
        for (int i = lane; i < kChunk * ppr_v; i += 32) {
            const int t = i / ppr_v, c = i % ppr_v * piece;
            const bool ok = t < valid;
            copy(stage_v + t * ld_sv + c, ok ? hv + (t0 + t) * ldv + c : hv, ok);
        }
        const int t = lane % 16;
        unsigned short s = 0, z = 0;
        if (t < valid) {
            const long long off = (t0 + t) * (lane < 16 ? ldk : ldv);
            s = __ldg(reinterpret_cast<const unsigned short*>((lane < 16 ? ks : vs) + off));
            z = __ldg(reinterpret_cast<const unsigned short*>((lane < 16 ? kz : vz) + off));
        }
        sz = (unsigned)s | (unsigned)z << 16;
    }
};

// Dequantize one staged chunk (RP columns per row, BITS bits per code) into the 16-bit chunk
// buffer: lane → row lane/2, half of the columns lane%2. value = (code − zero)·scale in f32 as
// the CPU codec computes it, then rounded to T; columns ≥ r are zero. `sz`: this lane's
// (scale, zero) register of the rows' owner lanes (`owner` + row). f16 rows take the half2 path
// of latent_dequant.cuh where it is exact (nearly always: zero points of mixed-sign groups lie in
// [0, 2^BITS)), the same numbers in fewer instructions; the rest the f32 path.
template <typename T, int RP, int BITS>
__device__ __forceinline__ void dequant_rows(T* tile, int ld_tile, const unsigned char* stage, int r, unsigned sz, int owner, int lane) {
    constexpr int per_lane = RP / 2, words = per_lane * BITS / 32, mask = (1 << BITS) - 1;
    static_assert(words % 4 == 0 || words == 2, "codes per lane: whole 8- or 16-byte loads");
    const int row = lane / 2, c0 = lane % 2 * per_lane;
    const unsigned my = __shfl_sync(0xffffffffu, sz, owner + row);
    const unsigned short sb = my & 0xffff;
    const float scale = __half2float(*reinterpret_cast<const half*>(&sb));
    // code − zero as (2^23 + code) − (2^23 + zero): exact in f32 (|zero| < 2^15), and the code
    // becomes a float by OR-ing it into the mantissa instead of an I2F (a quarter-rate pipe).
    const float zero = 8388608.f + (float)(short)(my >> 16);
    unsigned w[words];
    const unsigned char* src = stage + row * (RP * BITS / 8) + c0 * BITS / 8;
    if constexpr (words == 2) {
        const uint2 v = *reinterpret_cast<const uint2*>(src);
        w[0] = v.x, w[1] = v.y;
    } else {
#pragma unroll
        for (int i = 0; i < words; i += 4) {
            const uint4 v = *reinterpret_cast<const uint4*>(src + 4 * i);
            w[i] = v.x, w[i + 1] = v.y, w[i + 2] = v.z, w[i + 3] = v.w;
        }
    }
    T* dst = tile + row * ld_tile + c0;
    bool done = false;
    if constexpr (std::is_same_v<T, half>) {
        // f16 rows whose zero point fits: half2 arithmetic, bit for bit the f32 path below
        // (latent_dequant.cuh), in under half its instructions.
        const int zero_i = (short)(my >> 16);
        if (dequant::fits_half2_dequant(zero_i)) {
            const dequant::RowHalf2 rh(sb, zero_i);
            auto store8 = [&](int col, unsigned a, unsigned b, unsigned c, unsigned d) {
                *reinterpret_cast<uint4*>(dst + col) = make_uint4(a, b, c, d);
            };
            if constexpr (BITS == 8) {  // 4 codes per word: two words per 16-byte store
#pragma unroll
                for (int i = 0; i < words; i += 2) {
                    unsigned a[2], b[2];
                    dequant::dequant_word<8>(w[i], rh, a);
                    dequant::dequant_word<8>(w[i + 1], rh, b);
                    store8(4 * i, a[0], a[1], b[0], b[1]);
                }
            } else {  // 8 or 16 codes per word: one or two stores per word
                constexpr int per_word = 32 / BITS, pairs = 16 / BITS;
#pragma unroll
                for (int i = 0; i < words; ++i) {
                    unsigned o[pairs];
                    dequant::dequant_word<BITS>(w[i], rh, o);
#pragma unroll
                    for (int q = 0; q < pairs; q += 4) store8(i * per_word + 2 * q, o[q], o[q + 1], o[q + 2], o[q + 3]);
                }
            }
            done = true;
        }
    }
    if (!done) {
        using E = Elem<T>;
#pragma unroll
        for (int j0 = 0; j0 < per_lane; j0 += 8) {
            unsigned out[4];
#pragma unroll
            for (int e = 0; e < 8; e += 2) {
                float v[2];
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    const int bit = (j0 + e + u) * BITS;
                    const float code = __uint_as_float(((w[bit / 32] >> (bit % 32)) & mask) | 0x4B000000u);
                    v[u] = __fmul_rn(__fsub_rn(code, zero), scale);
                }
                out[e / 2] = E::pack2(v[0], v[1]);
            }
            *reinterpret_cast<uint4*>(dst + j0) = make_uint4(out[0], out[1], out[2], out[3]);
        }
    }
    // Columns ≥ r (a rank below the padded width; rare) become zero: one test per lane and
    // chunk instead of one per code (what was written there came from stale staging bytes).
    if (c0 + per_lane > r) {
        unsigned short* out = reinterpret_cast<unsigned short*>(dst);
        for (int j = max(r - c0, 0); j < per_lane; ++j) out[j] = 0;
    }
}

// Zero the columns r..round8(r) of a landed chunk (they belong to padding or the next group).
__device__ __forceinline__ void mask_cols(half* buf, int ld_dst, int r, int lane) {
    const int ld = (r + 7) / 8 * 8;
    if (r == ld) return;
    for (int i = lane; i < kChunk * (ld - r); i += 32) buf[(i / (ld - r)) * ld_dst + r + i % (ld - r)] = __float2half(0.f);
}

__device__ __forceinline__ unsigned h2bits(half2 h) { return *reinterpret_cast<unsigned*>(&h); }
__device__ __forceinline__ half2 bits2h(unsigned u) { return *reinterpret_cast<half2*>(&u); }

__device__ __forceinline__ float2 cmul(float2 a, float2 b) { return make_float2(a.x * b.x - a.y * b.y, a.y * b.x + a.x * b.y); }

// The rebuild runs in quarters of dh: n-tiles {2d, 2d+1} and their rotate-half partners
// {2d + dh/16, 2d+1 + dh/16}, so only 16 accumulators are live, RoPE applies within the quarter,
// and each quarter feeds two k-steps of Sᵀ = Q·Kᵀ. Angles: a per-warp base cos/sin(t0·θ)
// (advanced per chunk, re-seeded in double) times a per-row table cos/sin(row·θ).
// Elements T (half or __nv_bfloat16): latents, factors and q; the shared-memory tiles hold T's
// bits (zero fill is the same bits in both).
// ABL (benchmark ablations, 0 in production): 1 loads only, 2 loads + rebuild, 3 all but RoPE,
// 4 all but the loads (compute on whatever the buffers hold), 5 the block's start-up only. Stages left out still feed the
// output, so the compiler keeps the rest.
// BITS: 0 for 16-bit latents, 2/4/8 for packed rows (dequantized per chunk in shared memory).
// Blocks of a split kernel that fit on an SM by shared memory (227 KiB per SM on sm_90, 1 KiB
// of it reserved per block), at most 4 (16 warps: 128 registers each): the register budget of
// __launch_bounds__. g > 1 kernels (the joint rebuild of several heads) take one block and all
// 255 registers.
template <int RKP, int RVP, int DH, int GHEADS, int BITS, bool WG = false, int NW = kWarps>
constexpr int resident_blocks() {
    constexpr int fit = 232448 / (Smem<RKP, RVP, DH, GHEADS, BITS, WG, NW>::total + 1024);
    constexpr int most = 4 * kWarps / NW;
    return GHEADS > 1 || fit < 1 ? 1 : fit > most ? most : fit;
}

// WG: the rebuild on Hopper's wgmma (experimental, variant 3; g = 1 groups, 16-bit latents,
// ranks a multiple of 8): the 4 warps (one warpgroup) stream 64-row tiles together, B_k and the
// key tiles in the core-matrix layout, each dh quarter one m64n32 accumulator per warp fed to
// the same RoPE / Sᵀ / softmax / value code as the mma.sync rebuild.
// NW = 8 (variant 5, experimental): blocks of 8 warps, 2 per SM. The stop-13 profile found the
// 4-warp kernel latency-bound at 3 blocks (12 warps) per SM, held there by both its 156
// registers and its 71 KiB of shared memory; ptxas fits the kernel in 128 registers without
// spills, and 8 warps share one block's B_k, Q and angle tables, so 2 blocks of 8 fit
// (2 × 110 KiB): 16 warps per SM.
template <typename T, int RKP, int RVP, int DH, int GHEADS, int NREP, int ABL = 0, int BITS = 0, bool WG = false, int NW = kWarps>
__global__ void __launch_bounds__(NW * 32, (resident_blocks<RKP, RVP, DH, GHEADS, BITS, WG, NW>()))
    split_kernel(DecodeParams p) {
    using E = Elem<T>;
    constexpr int NH = GHEADS * NREP;
    static_assert(NH <= 16 && DH % 32 == 0 && DH <= 128 && RKP % 16 == 0 && RVP % 16 == 0, "shape");
    constexpr int NT = DH / 8;        // rebuild n-tiles (8 dims each)
    constexpr int NV = RVP / 8;       // value n-tiles
    constexpr int KS = RKP / 16;      // rebuild k-steps
    constexpr int HALF = DH / 2;
    // Values transposed (groups of ≤ 8 query heads): Aᵀ += H_vᵀ·Pᵀ with the latent dims as the
    // mma's M and the heads as its N, [RVP/16 m-tiles × 8 heads]: half the accumulators and half
    // the mma of A += P·H_v, whose M (16 rows of heads) is mostly padding below 16 heads. The
    // rank-256 kernels (g = 4 as virtual heads) need it to fit their registers.
    constexpr bool kVT = NH <= 8;
    constexpr int NACC = kVT ? RVP / 16 : NV;
    constexpr int kHeadRows = kVT ? 1 : 2;  // Sᵀ rows per thread that hold heads: g, g + 8
    // The latent A fragments of a chunk are held across the dh quarters up to rank 128 (32
    // registers) and reloaded per quarter above (64 registers at rank 256).
    constexpr bool kHoldA = KS <= 8;
    using S = Smem<RKP, RVP, DH, GHEADS, BITS, WG, NW>;
    static_assert(!WG || (GHEADS == 1 && BITS == 0 && ABL == 0 && NW == 4), "wgmma rebuild: g = 1, 16-bit latents, one warpgroup");
    // f16 models rotate keys in f16x2 arithmetic (angles as f16 pairs): half the RoPE
    // instructions; the rotated keys are rounded to f16 for the score mma anyway. bf16 keeps f32.
    constexpr bool kHalfRope = std::is_same_v<T, half>;
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* ptr = smem;
    auto take = [&](int bytes) { unsigned char* r = ptr; ptr += bytes; return r; };
    half* sB = reinterpret_cast<half*>(take(S::b));
    half* sQ = reinterpret_cast<half*>(take(S::q));
    float2* sRow = reinterpret_cast<float2*>(take(S::rowoff));
    float2* sBase = reinterpret_cast<float2*>(take(S::base));
    uint2* sBaseH = reinterpret_cast<uint2*>(take(S::base_h));
    float2* sStep = reinterpret_cast<float2*>(take(S::step));
    unsigned char* sBuf = take(0);

    const int split = blockIdx.x, grp = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
    const int L = p.lens[b];
    const int s0 = split * p.split_len, s1 = min(L, s0 + p.split_len);

    // B_k of the group into smem: 16-byte copies where rows are 16-byte aligned (rk % 8 == 0),
    // element copies otherwise; all issued before any wait (v5 copied 2 bytes per step, each
    // step a round trip to memory).
    const half* bk = p.bk + (size_t)grp * GHEADS * DH * p.rk;  // copied as bits
    if constexpr (WG) {
        // Rows permuted so that each dh quarter's 32 columns (dims 16·dq… and their rotate-half
        // partners) are 32 consecutive rows n: one m64n32 wgmma per quarter and k-step.
        constexpr int pieces = RKP / 8;
        for (int i = tid; i < DH * pieces; i += NW * 32) {
            const int d = i / pieces, c8 = i % pieces;
            const int n = 32 * ((d % HALF) / 16) + 16 * (d / HALF) + d % 16;
            unsigned char* dst = reinterpret_cast<unsigned char*>(sB) + (n / 8) * S::core_sbo + c8 * 128 + (n % 8) * 16;
            const bool ok = c8 * 8 < p.rk;
            cp_async16(dst, ok ? bk + (size_t)d * p.rk + c8 * 8 : bk, ok);
        }
    } else {
        constexpr int pieces = RKP / 8;
        const bool vec = p.rk % 8 == 0 && (reinterpret_cast<size_t>(p.bk) & 15) == 0;
        for (int i = tid; i < GHEADS * DH * pieces; i += NW * 32) {
            const int row = i / pieces, c = i % pieces * 8;
            half* dst = sB + row * S::ldb + c;
            if (vec) {  // pieces lie wholly inside or wholly beyond rk; the latter zero-filled
                const bool ok = c < p.rk;
                cp_async16(dst, ok ? bk + (size_t)row * p.rk + c : bk, ok);
                continue;
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) dst[e] = c + e < p.rk ? bk[(size_t)row * p.rk + c + e] : __float2half(0.f);
        }
    }
    const float qscale = rsqrtf((float)DH) * kLog2e;  // scores in log2 units (softmax by ex2)
    {
        // Q rows of this group's heads (rows of other groups' heads stay zero): 8 elements per
        // step with their loads issued together.
        constexpr int per_row = DH / 8;
        for (int i = tid; i < GHEADS * 16 * per_row; i += NW * 32) {
            const int j = i / (16 * per_row), h = (i / per_row) % 16, d0 = i % per_row * 8;
            const bool mine = h < NH && h / NREP == j;
            const T* src = reinterpret_cast<const T*>(p.q) + ((size_t)b * p.H + (grp * GHEADS + j) * NREP + h % NREP) * DH + d0;
            T v[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = mine ? src[e] : E::from_float(0.f);
#pragma unroll
            for (int e = 0; e < 8; ++e)
                reinterpret_cast<T*>(sQ)[(j * 16 + h) * S::ldq + d0 + e] = E::from_float(E::to_float(v[e]) * qscale);
        }
    }
    constexpr int kStride = kChunk * NW;  // positions between a warp's consecutive chunks
    // cos/sin(row·θ_f) for the (row, f) pairs each lane rotates, stored lane-minor (entry
    // `pair·32 + lane`): a warp's loads are consecutive, free of bank conflicts (v5 indexed
    // [row][f]: the 8 rows of a load fell on the same banks). Built from accurate sincosf of
    // θ, 2θ, 4θ, 8θ by at most three complex products (≤ 4 roundings): a sincosf per entry cost
    // ~17 µs of start-up per block. sStep: the rotation by 64·θ between a warp's chunks.
    float2* sPow = reinterpret_cast<float2*>(sBuf);  // [4][HALF], scratch until the first chunk lands
    for (int i = tid; i < 4 * HALF; i += NW * 32) {
        float c, sn;
        sincosf((float)(1 << (i / HALF)) * p.inv_freq[i % HALF], &sn, &c);
        sPow[i] = make_float2(c, sn);
    }
    for (int f = tid; f < HALF; f += NW * 32) {
        float c, sn;
        sincosf((float)kStride * p.inv_freq[f], &sn, &c);
        sStep[f] = make_float2(c, sn);
    }
    __syncthreads();
    auto row_angle = [&](int row, int f) {
        float2 a = make_float2(1.f, 0.f);
#pragma unroll
        for (int bit = 0; bit < 4; ++bit)
            if (row >> bit & 1) a = cmul(a, sPow[bit * HALF + f]);
        return a;
    };
    if constexpr (kHalfRope) {
        // f16 models: one entry per lane and (dq, t, r) holds the angles of both columns
        // (f, f + 1) of the lane as f16 pairs (cos, sin): half the table, one load per two pairs.
        uint2* sRowH = reinterpret_cast<uint2*>(sRow);
        for (int i = tid; i < kChunk * HALF / 2; i += NW * 32) {
            const int ln = i % 32, ent = i / 32, r = ent % 2, t = (ent / 2) % 2, dq = ent / 4;
            const int f = 8 * (2 * dq + t) + 2 * (ln % 4), row = ln / 4 + 8 * r;
            const float2 a0 = row_angle(row, f), a1 = row_angle(row, f + 1);
            sRowH[i] = make_uint2(h2bits(__floats2half2_rn(a0.x, a1.x)), h2bits(__floats2half2_rn(a0.y, a1.y)));
        }
    } else {
        for (int i = tid; i < kChunk * HALF; i += NW * 32) {
            const int ln = i % 32, pair = i / 32, f = 8 * (2 * (pair / 8) + (pair / 4) % 2) + 2 * (ln % 4) + (pair / 2) % 2;
            sRow[i] = row_angle(ln / 4 + 8 * (pair % 2), f);
        }
    }
    __syncthreads();  // sPow's space is reused by the chunk buffers
    float2* myBase = sBase + warp * HALF;
    uint2* myBaseH = sBaseH + warp * (HALF / 2);
    // After the warp's base angles change: their f16 pairs (cos f, cos f+1), (sin f, sin f+1).
    auto publish_base = [&]() {
        if constexpr (kHalfRope) {
            __syncwarp();
            for (int pr = lane; pr < HALF / 2; pr += 32) {
                const float2 a = myBase[2 * pr], b2 = myBase[2 * pr + 1];
                myBaseH[pr] = make_uint2(h2bits(__floats2half2_rn(a.x, b2.x)), h2bits(__floats2half2_rn(a.y, b2.y)));
            }
        }
    };

    // Advance this warp's base angles to its next chunk: lane l rotates the pair (2l, 2l + 1)
    // and publishes its f16 form from registers (was a lane-strided loop and a re-read: ~80
    // instructions with branches per chunk, ncu).
    auto advance_base = [&]() {
        static_assert(HALF % 2 == 0 && HALF / 2 <= 32, "one pair of angles per lane");
        __syncwarp();
        if (lane < HALF / 2) {
            const float4 bs = reinterpret_cast<const float4*>(myBase)[lane];
            const float4 st = reinterpret_cast<const float4*>(sStep)[lane];
            const float2 a = cmul(make_float2(bs.x, bs.y), make_float2(st.x, st.y));
            const float2 c = cmul(make_float2(bs.z, bs.w), make_float2(st.z, st.w));
            reinterpret_cast<float4*>(myBase)[lane] = make_float4(a.x, a.y, c.x, c.y);
            if constexpr (kHalfRope)
                myBaseH[lane] = make_uint2(h2bits(__floats2half2_rn(a.x, c.x)), h2bits(__floats2half2_rn(a.y, c.y)));
        }
        __syncwarp();
    };

    // This warp's two chunk buffers (K rows then V rows), addressed arithmetically: an array of
    // pointers indexed by the run-time buffer number went to local memory. Packed latents: one
    // chunk buffer and two staging buffers of codes.
    half* const kbuf0 = reinterpret_cast<half*>(sBuf + warp * (BITS == 0 ? 2 * S::chunk : S::chunk + 2 * S::stage));
    auto bufK = [&](int u) { return kbuf0 + (BITS == 0 ? u * (S::chunk / 2) : 0); };
    // WG: the block's key tile of stage u (core-matrix layout), this warp's value chunk.
    auto tileK = [&](int u) { return sBuf + u * S::ktile; };
    auto bufV = [&](int u) {
        if constexpr (WG) return reinterpret_cast<half*>(sBuf + 2 * S::ktile + (warp * 2 + u) * S::vchunk);
        else return bufK(u) + kChunk * S::ldk;
    };
    // WG: this warp's 16 key rows (from physical row r0, `valid` of them) into rows 16·warp… of
    // the tile, 16-byte pieces at their core-matrix places; rows ≥ valid and ranks ≥ r_k zero.
    auto load_k_rows = [&](unsigned char* tile, const half* src, int r0, int valid) {
        constexpr int per_row = RKP / 8;
        if constexpr (32 % per_row == 0) {  // a lane's pieces share a column (as ChunkLoader)
            constexpr int step = 32 / per_row;
            const int tl = lane / per_row, c8 = lane % per_row;
            const half* s = src + (long long)(r0 + tl) * p.ldk + c8 * 8;
            const unsigned base = smem_u32(tile) + c8 * 128;
#pragma unroll
            for (int u = 0; u < kChunk * per_row / 32; ++u) {
                const int t = tl + step * u, row = kChunk * warp + t;
                cp_async16_at(base + (row / 8) * S::core_sbo + (row % 8) * 16, s, t < valid && c8 * 8 < p.rk);
                s += (long long)step * p.ldk;
            }
        } else {
            for (int i = lane; i < kChunk * per_row; i += 32) {
                const int t = i / per_row, c8 = i % per_row, row = kChunk * warp + t;
                const bool ok = t < valid && c8 * 8 < p.rk;
                cp_async16(tile + (row / 8) * S::core_sbo + c8 * 128 + (row % 8) * 16,
                           ok ? src + (long long)(r0 + t) * p.ldk + c8 * 8 : src, ok);
            }
        }
    };
    unsigned char* const stage0 = reinterpret_cast<unsigned char*>(kbuf0) + S::chunk;
    auto stageK = [&](int u) { return stage0 + u * S::stage; };
    auto stageV = [&](int u) { return stage0 + u * S::stage + kChunk * S::stage_k; };
    const int lat = latent_group(p, grp);
    const half* hk = p.hk + b * p.hk_sb + lat * p.hk_sg;
    const half* hv = p.hv + b * p.hv_sb + lat * p.hv_sg;
    const ChunkLoader<RKP, S::ldk> loadK(p.ldk, p.rk, lane);
    const ChunkLoader<RVP, S::ldv> loadV(p.ldv, p.rv, lane);
    PackedLoader packed{};
    unsigned sz_cur = 0, sz_next = 0;  // packed: (scale, zero) of one row of this / the next chunk
    if constexpr (BITS != 0) {
        const unsigned char* kb = reinterpret_cast<const unsigned char*>(p.hk) + b * p.hk_sb;
        const unsigned char* vb = reinterpret_cast<const unsigned char*>(p.hv) + b * p.hv_sb;
        // The widest piece every row start allows (the dispatch guarantees 4-byte alignment).
        const long long align = p.ldk | p.ldv | p.hk_sb | p.hv_sb | p.hk_sg | p.hv_sg |
                                (long long)reinterpret_cast<size_t>(p.hk) | (long long)reinterpret_cast<size_t>(p.hv);
        packed.piece = align % 16 == 0 ? 16 : align % 8 == 0 ? 8 : 4;
        packed.ppr_k = p.rk * BITS / 8 / packed.piece;
        packed.ppr_v = p.rv * BITS / 8 / packed.piece;
        packed.lane = lane;
        packed.hk = kb + lat * p.hk_sg;
        packed.hv = vb + lat * p.hv_sg;
        packed.ks = kb + p.k_scale_off + 2 * lat;
        packed.kz = kb + p.k_zero_off + 2 * lat;
        packed.vs = vb + p.v_scale_off + 2 * lat;
        packed.vz = vb + p.v_zero_off + 2 * lat;
        packed.ldk = p.ldk;
        packed.ldv = p.ldv;
    }
    int t0 = s0 + kChunk * warp;  // this warp's chunks: t0 = s0 + 16·(warp + 4·i)
    if constexpr (WG) {
        // Every warp fills its rows of the tile, past the end with zeros (the tile is shared).
        const int r0 = t0 < s1 ? physical_row(p, b, t0) : 0;
        load_k_rows(tileK(0), hk, r0, s1 - t0);
        loadV.load(bufV(0), hv, r0, max(0, s1 - t0));
    } else if (ABL != 4 && t0 < s1) {
        if constexpr (BITS == 0) {
            const int r0 = physical_row(p, b, t0);
            loadK.load(bufK(0), hk, r0, s1 - t0);
            loadV.load(bufV(0), hv, r0, s1 - t0);
        } else {
            packed.load(stageK(0), S::stage_k, stageV(0), S::stage_v, physical_row(p, b, t0), s1 - t0, sz_next);
        }
    }
    cp_commit();
    cp_wait<0>();     // sB's copies (and the first chunk)
    if constexpr (WG) fence_proxy_async();
    __syncthreads();  // sB, sQ, sRow, sStep ready

    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    float acc_v[NACC][4];  // kVT: [latent dims m·16 + g (+8)] × [heads 2·tig (+1)]; else heads × dims
#pragma unroll
    for (int n = 0; n < NACC; ++n) acc_v[n][0] = acc_v[n][1] = acc_v[n][2] = acc_v[n][3] = 0.f;

    if constexpr (ABL == 5) t0 = s1;
    int buf = 0;
    const bool mask_k = p.rk % 8 != 0, mask_v = p.rv % 8 != 0;  // ranks that end inside a piece
    // WG: the warpgroup iterates over the split's 64-row tiles together (a warp whose chunk is
    // past the end still takes part in the wgmma); otherwise each warp over its own chunks.
    for (int it = 0; WG ? s0 + kStride * it < s1 : t0 < s1; ++it, t0 += kStride, buf ^= 1) {
        const int valid = max(0, min(kChunk, s1 - t0));
        const int t1 = t0 + kStride;
        sz_cur = sz_next;
        if constexpr (WG) {
            if (s0 + kStride * (it + 1) < s1) {
                const int r1 = t1 < s1 ? physical_row(p, b, t1) : 0;
                load_k_rows(tileK(buf ^ 1), hk, r1, s1 - t1);
                loadV.load(bufV(buf ^ 1), hv, r1, max(0, s1 - t1));
            }
        } else if (ABL != 4 && t1 < s1) {
            if constexpr (BITS == 0) {
                const int r1 = physical_row(p, b, t1);
                loadK.load(bufK(buf ^ 1), hk, r1, s1 - t1);
                loadV.load(bufV(buf ^ 1), hv, r1, s1 - t1);
            } else {
                packed.load(stageK(buf ^ 1), S::stage_k, stageV(buf ^ 1), S::stage_v, physical_row(p, b, t1), s1 - t1, sz_next);
            }
        }
        cp_commit();
        if (it % kReseed == 0) {
            for (int f = lane; f < HALF; f += 32) {
                double a = (double)t0 * (double)p.inv_freq[f];
                myBase[f] = make_float2((float)cos(a), (float)sin(a));
            }
            publish_base();
        }
        cp_wait<1>();
        __syncwarp();
        if constexpr (WG) {
            fence_proxy_async();
            __syncthreads();  // the whole tile landed (the other warps' rows too)
        } else if constexpr (BITS == 0) {
            if (mask_k) mask_cols(bufK(buf), S::ldk, p.rk, lane);
            if (mask_v) mask_cols(bufV(buf), S::ldv, p.rv, lane);
        } else {
            dequant_rows<T, RKP, BITS>(reinterpret_cast<T*>(bufK(buf)), S::ldk, stageK(buf), p.rk, sz_cur, 0, lane);
            dequant_rows<T, RVP, BITS>(reinterpret_cast<T*>(bufV(buf)), S::ldv, stageV(buf), p.rv, sz_cur, 16, lane);
        }
        __syncwarp();
        if constexpr (ABL == 1) {
            acc_v[0][0] += __half2float(bufK(buf)[lane]) + __half2float(bufV(buf)[lane]);
            continue;
        }
        unsigned a[kHoldA ? KS : 1][4];
        auto load_a = [&](unsigned* f, int ks) {
            ldsm_x4(f[0], f[1], f[2], f[3], bufK(buf) + (lane % 16) * S::ldk + ks * 16 + (lane / 16) * 8);
        };
        if constexpr (kHoldA && !WG)
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) load_a(a[ks], ks);
        float st[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // Sᵀ: heads × tokens 0-7, 8-15
        // WG: the quarter's keys of the whole 64-row tile (rows 16·warp… of D are this warp's,
        // in the layout of the four k[t] tiles below), all k-steps in one commit group.
        // Descriptor strides: 128 bytes between the two core matrices of a k16 step, core_sbo
        // between 8-row groups (the H200 run of stop 13 confirmed this reading of the no-swizzle
        // K-major layout against float64).
        float kw[WG ? 2 : 1][4][4];
        auto issue_quarter = [&](float (&acc)[4][4], int dq) {
#pragma unroll
            for (int i = 0; i < 16; ++i) acc[i / 4][i % 4] = 0.f;
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < KS; ++ks)
                wgmma_m64n32k16<T>(&acc[0][0], wgmma_desc(tileK(buf) + ks * 256, 128, S::core_sbo),
                                   wgmma_desc(reinterpret_cast<unsigned char*>(sB) + 4 * dq * S::core_sbo + ks * 256, 128, S::core_sbo));
            wgmma_commit();
        };
        if constexpr (WG) issue_quarter(kw[0], 0);
        for (int j = 0; j < GHEADS; ++j) {
#pragma unroll
            for (int dq = 0; dq < NT / 4; ++dq) {
                // WG: quarter dq's accumulators alternate between kw[0] and kw[1]; quarter dq + 1's
                // wgmma runs while this warp rotates and scores quarter dq.
                float (&k)[4][4] = kw[WG ? dq & 1 : 0];
                if constexpr (WG) {
                    if (dq + 1 < NT / 4) {
                        issue_quarter(kw[(dq + 1) & 1], dq + 1);
                        wgmma_wait<1>();
                    } else {
                        wgmma_wait<0>();
                    }
                    wgmma_fence_operands(&k[0][0]);
                } else {
#pragma unroll
                for (int i = 0; i < 16; ++i) k[i / 4][i % 4] = 0.f;
#pragma unroll
                for (int ks = 0; ks < KS; ++ks) {
                    unsigned b0, b1, b2, b3, c0, c1, c2, c3;
                    const int row = j * DH + dq * 16 + (lane / 16) * 8 + lane % 8;
                    const int col = ks * 16 + ((lane / 8) % 2) * 8;
                    ldsm_x4(b0, b1, b2, b3, sB + (size_t)row * S::ldb + col);
                    ldsm_x4(c0, c1, c2, c3, sB + (size_t)(row + HALF) * S::ldb + col);
                    if constexpr (!kHoldA) load_a(a[0], ks);
                    const unsigned* f = a[kHoldA ? ks : 0];
                    E::mma16816(k[0], f[0], f[1], f[2], f[3], b0, b1);
                    E::mma16816(k[1], f[0], f[1], f[2], f[3], b2, b3);
                    E::mma16816(k[2], f[0], f[1], f[2], f[3], c0, c1);
                    E::mma16816(k[3], f[0], f[1], f[2], f[3], c2, c3);
                }
                }
                if constexpr (ABL == 2) {
#pragma unroll
                    for (int i = 0; i < 16; ++i) st[0][i % 4] += k[i / 4][i % 4];
                    continue;
                }
                // RoPE: k[t] (dims d) pairs with k[2 + t] (dims d + dh/2). kp: the rotated keys
                // packed as the B operand of Sᵀ = Q·Kᵀ, [t][r] (dims d) and [2 + t][r] (d + dh/2).
                unsigned kp[4][2];
                if constexpr (kHalfRope) {
                    const uint2* sRowH = reinterpret_cast<const uint2*>(sRow);
#pragma unroll
                    for (int t = 0; t < 2; ++t) {
                        const uint2 bw = myBaseH[4 * (2 * dq + t) + tig];
                        const half2 cb = bits2h(bw.x), sb = bits2h(bw.y);
#pragma unroll
                        for (int r = 0; r < 2; ++r) {
                            half2 k1 = __floats2half2_rn(k[t][2 * r], k[t][2 * r + 1]);
                            half2 k2 = __floats2half2_rn(k[2 + t][2 * r], k[2 + t][2 * r + 1]);
                            if (ABL != 3) {
                                const uint2 rw = sRowH[((dq * 2 + t) * 2 + r) * 32 + lane];
                                const half2 cr = bits2h(rw.x), sr = bits2h(rw.y);
                                const half2 c = __hfma2(cb, cr, __hneg2(__hmul2(sb, sr)));
                                const half2 sn = __hfma2(sb, cr, __hmul2(cb, sr));
                                const half2 n1 = __hfma2(k1, c, __hneg2(__hmul2(k2, sn)));
                                const half2 n2 = __hfma2(k2, c, __hmul2(k1, sn));
                                k1 = n1, k2 = n2;
                            }
                            kp[t][r] = h2bits(k1);
                            kp[2 + t][r] = h2bits(k2);
                        }
                    }
                } else {
#pragma unroll
                    for (int t = 0; t < 2; ++t)
                        if (ABL != 3)
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                const int f = 8 * (2 * dq + t) + 2 * tig + e;
                                const float2 bs = myBase[f];
#pragma unroll
                                for (int r = 0; r < 2; ++r) {
                                    const float2 an = cmul(bs, sRow[(((dq * 2 + t) * 2 + e) * 2 + r) * 32 + lane]);
                                    float k1 = k[t][2 * r + e], k2 = k[2 + t][2 * r + e];
                                    k[t][2 * r + e] = k1 * an.x - k2 * an.y;
                                    k[2 + t][2 * r + e] = k2 * an.x + k1 * an.y;
                                }
                            }
#pragma unroll
                    for (int t = 0; t < 4; ++t)
#pragma unroll
                        for (int r = 0; r < 2; ++r) kp[t][r] = E::pack2(k[t][2 * r], k[t][2 * r + 1]);
                }
                unsigned q0, q1, q2, q3, w0, w1, w2, w3;
                ldsm_x4(q0, q1, q2, q3, sQ + (j * 16 + lane % 16) * S::ldq + dq * 16 + (lane / 16) * 8);
                ldsm_x4(w0, w1, w2, w3, sQ + (j * 16 + lane % 16) * S::ldq + HALF + dq * 16 + (lane / 16) * 8);
                E::mma16816(st[0], q0, q1, q2, q3, kp[0][0], kp[1][0]);
                E::mma16816(st[1], q0, q1, q2, q3, kp[0][1], kp[1][1]);
                E::mma16816(st[0], w0, w1, w2, w3, kp[2][0], kp[3][0]);
                E::mma16816(st[1], w0, w1, w2, w3, kp[2][1], kp[3][1]);
            }
        }
        if constexpr (ABL == 2) {
            acc_v[0][0] += st[0][0] + st[0][1] + st[0][2] + st[0][3];
            continue;
        }
        // Online softmax over this chunk: rows g (r = 0) and g + 8 (r = 1; no heads there with kVT).
        // Scores are in log2 units (q carries log2 e) and exponentials are single ex2. The
        // reference max m_run moves lazily: only when some score of the warp exceeds it by more
        // than kLazyLog2 (so p ≤ 2^8, exact enough in f16 and summed in f32). Most chunks then
        // skip the quad max (two shuffles on the critical path: ncu's top stall in stop 13) and
        // the rescale of the value accumulators; the result is the same softmax.
        float pr[2][4];
#pragma unroll
        for (int r = 0; r < kHeadRows; ++r) {
            float mx = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    int tok = nt * 8 + 2 * tig + e;
                    float v = tok < valid ? st[nt][2 * r + e] : -INFINITY;
                    st[nt][2 * r + e] = v;
                    mx = fmaxf(mx, v);
                }
            if (__any_sync(0xffffffffu, mx > m_run[r] + kLazyLog2)) {  // warp-uniform
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m_run[r], mx);
                // A quad whose scores are all masked so far keeps scale 1 (−∞ − −∞).
                const float scale = m_new == -INFINITY ? 1.f : ex2(m_run[r] - m_new);
                l_run[r] *= scale;
                m_run[r] = m_new;
                if constexpr (kVT) {
                    // Columns are heads: this thread's are 2·tig and 2·tig + 1, whose scales the
                    // quads 2·tig and 2·tig + 1 computed (row g of Sᵀ is head g).
                    const float s0 = __shfl_sync(0xffffffffu, scale, 8 * tig), s1 = __shfl_sync(0xffffffffu, scale, 8 * tig + 4);
#pragma unroll
                    for (int n = 0; n < NACC; ++n) {
                        acc_v[n][0] *= s0, acc_v[n][1] *= s1;
                        acc_v[n][2] *= s0, acc_v[n][3] *= s1;
                    }
                } else {
#pragma unroll
                    for (int n = 0; n < NV; ++n) {
                        acc_v[n][2 * r] *= scale;
                        acc_v[n][2 * r + 1] *= scale;
                    }
                }
            }
            // m_run = −∞ only while all of this quad's scores are −∞: ex2(−∞) = 0.
            const float m_use = m_run[r] == -INFINITY ? 0.f : m_run[r];
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float pv = ex2(st[nt][2 * r + e] - m_use);
                    pr[nt][2 * r + e] = pv;
                    sum += pv;
                }
            l_run[r] += sum;  // per-thread partial; quad-summed at the end
        }
        if constexpr (kVT) {
            // Aᵀ += H_vᵀ·Pᵀ: Pᵀ (16 tokens × heads) is the B operand as Sᵀ's row-g registers lie
            // (tokens 2·tig, 2·tig + 1 and 8 more, head g); H_vᵀ the A operand by ldmatrix.trans of
            // the [token][dim] chunk (matrices: tokens 0–7 / 8–15 × dims 0–7 / 8–15).
            const unsigned pb0 = E::pack2(pr[0][0], pr[0][1]), pb1 = E::pack2(pr[1][0], pr[1][1]);
#pragma unroll
            for (int m = 0; m < NACC; ++m) {
                unsigned a0, a1, a2, a3;
                ldsm_x4_t(a0, a1, a2, a3, bufV(buf) + ((lane / 16) * 8 + lane % 8) * S::ldv + m * 16 + ((lane / 8) % 2) * 8);
                E::mma16816(acc_v[m], a0, a1, a2, a3, pb0, pb1);
            }
        } else {
            // A += P·H_v: P from the softmax registers as the A operand (heads × 16 tokens).
            const unsigned pa0 = E::pack2(pr[0][0], pr[0][1]), pa1 = E::pack2(pr[0][2], pr[0][3]);
            const unsigned pa2 = E::pack2(pr[1][0], pr[1][1]), pa3 = E::pack2(pr[1][2], pr[1][3]);
#pragma unroll
            for (int np = 0; np < NV / 2; ++np) {
                unsigned b0, b1, b2, b3;
                ldsm_x4_t(b0, b1, b2, b3, bufV(buf) + (lane % 16) * S::ldv + np * 16 + (lane / 16) * 8);
                E::mma16816(acc_v[2 * np], pa0, pa1, pa2, pa3, b0, b1);
                E::mma16816(acc_v[2 * np + 1], pa0, pa1, pa2, pa3, b2, b3);
            }
        }
        advance_base();
    }
    cp_wait<0>();
    // Quad-sum l; merge the warps' (m, l, A) in smem.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
        l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    }
    __syncthreads();  // buffers → merge area
    float* sM = reinterpret_cast<float*>(sBuf);
    constexpr int W = RVP + 2;
#pragma unroll
    for (int r = 0; r < kHeadRows; ++r) {
        int h = g + 8 * r;
        float* row = sM + (warp * 16 + h) * W;
        if (tig == 0) {
            row[0] = m_run[r];
            row[1] = l_run[r];
        }
        if constexpr (!kVT)
#pragma unroll
            for (int n = 0; n < NV; ++n) {
                row[2 + n * 8 + 2 * tig] = acc_v[n][2 * r];
                row[2 + n * 8 + 2 * tig + 1] = acc_v[n][2 * r + 1];
            }
    }
    if constexpr (kVT) {
        // Row of head 2·tig (+1), columns m·16 + g (+8).
        float* h0 = sM + (warp * 16 + 2 * tig) * W + 2;
        float* h1 = h0 + W;
#pragma unroll
        for (int m = 0; m < NACC; ++m) {
            h0[m * 16 + g] = acc_v[m][0], h1[m * 16 + g] = acc_v[m][1];
            h0[m * 16 + g + 8] = acc_v[m][2], h1[m * 16 + g + 8] = acc_v[m][3];
        }
    }
    __syncthreads();
    for (int i = tid; i < NH * (RVP + 2); i += NW * 32) {
        int h = i / (RVP + 2), c = i % (RVP + 2);
        float M = -INFINITY;
        for (int w = 0; w < NW; ++w) M = fmaxf(M, sM[(w * 16 + h) * W]);
        float v;
        if (c == 0) {
            v = M;
        } else {
            v = 0.f;
            for (int w = 0; w < NW; ++w) {
                float m = sM[(w * 16 + h) * W];
                if (m != -INFINITY) v += sM[(w * 16 + h) * W + c] * ex2(m - M);
            }
        }
        if (c == 0) v *= kLn2;  // the partials' max in natural units, as the combine reads it
        p.partial[((((size_t)b * p.G + grp) * NH + h) * p.n_splits + split) * (2 + RVP) + c] = v;
    }
}

}  // namespace mma4
}  // namespace palu
