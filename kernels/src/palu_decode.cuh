// Palu decode attention over a latent KV cache: kernel templates.
//
// One query token per sequence attends over L cached tokens whose keys and values are stored as
// low-rank latents (pre-RoPE for keys). For a group of g KV heads with key rank r_k and value
// rank r_v:
//   K_j = RoPE_pos(H_k · B_kjᵀ)        (rebuilt per tile on tensor cores, once per KV head,
//                                        shared by its n_rep query heads)
//   o_h = B_vj · softmax(q_h · K_jᵀ) · H_v   (values attended in latent space, B_v applied once)
//
// Split over L (flash-decoding): `palu_decode_split` writes per-split (m, l, acc[r_v]) partials,
// `palu_decode_combine` merges them and applies B_v. Layouts (row-major):
//   q      [B, H, dh]            half, already rotated at its position
//   hk     half, key latents: group grp of sequence b at token t starts at
//          hk + b·hk_sb + grp·hk_sg + t·ldk (elements; all three strides multiples of 8 so rows
//          are 16-byte aligned) and holds r_k values, of which round8(r_k) may be read.
//          [B, G, Lmax, ldk] (the benchmark) and the model's [B, Lmax, G·r_k] are both this.
//   hv     the same for the value latents (hv_sb, hv_sg, ldv, r_v)
//   bk     [G, g·dh, r_k]        half  (the authors' U.i of k_proj)
//   bv     [G, g·dh, r_v]        half
//   lens   [B]                   int, tokens cached per sequence (≤ Lmax)
//   inv_freq [dh/2]              float, RoPE frequencies from the model config (theta, scaling)
// RoPE is rotate-half (HF Llama): pair (i, i + dh/2) rotated by pos·inv_freq[i].
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <math.h>

namespace palu {

constexpr int kTile = 64;      // tokens per tile
constexpr int kThreads = 128;  // 4 warps; warp w owns tile rows 16w..16w+15 in the rebuild

struct DecodeParams {
    const half* q;
    const half* hk;
    const half* hv;
    const half* bk;
    const half* bv;
    const int* lens;
    const float* inv_freq;
    float* partial;   // [B, G, g·n_rep, n_splits, 2 + RVP]
    float* out;       // [B, H, dh]
    long long hk_sb, hk_sg, hv_sb, hv_sg;  // element strides of a sequence and of a group
    int B, H, dh, G, g, n_rep, Lmax, ldk, ldv, rk, rv, n_splits, split_len;
    int variant;      // 0: register pipeline (palu_decode_mma.cuh), 1: shared-memory pipeline,
                      // 2: 0 with g > 1 forced to virtual heads, 3: 0 with the rebuild on wgmma
                      // (experimental; sm_90a builds with PALU_WGMMA), 5: 0 in blocks of 8 warps,
                      // 2 per SM (experimental; g = 1, head_dim 128, 16-bit latents)
    int bf16;         // 1: q, latents and factors hold bf16 (the pointers are reinterpreted;
                      //    register pipeline only), 0: f16
    // Packed latents (register pipeline): 0 for 16-bit latents; 2, 4 or 8 for rows in
    // latent_codec.cu's format with one quantization group per low-rank group. Then hk / hv
    // point at bytes, and hk_sb, hk_sg, ldk (hv_sb, hv_sg, ldv) count bytes: a sequence, one
    // group's codes, a row. Group grp's f16 scale sits at byte k_scale_off + 2·grp of its row,
    // its i16 zero at k_zero_off + 2·grp (v_*: the value rows).
    int bits;
    int k_scale_off, k_zero_off, v_scale_off, v_zero_off;
    // 1: write each query head's latent attention output `a` ([B, H, rv]) and skip B_v: the
    // caller folds B_v into o_proj (the planner's fused values). 0: out = B_v·a ([B, H, dh]).
    int latent_out;
    // Paged latents (the engine's paged KV blocks): row t of sequence b is physical row
    // block_table[b·table_stride + t / block_size]·block_size + t % block_size of hk / hv, whose
    // per-sequence strides hk_sb / hv_sb are then 0. null: row t is row t. block_size is a
    // multiple of 16, so a register-pipeline chunk of 16 rows never straddles two blocks.
    const int* block_table;
    int block_size, table_stride;
    // Virtual heads (set by the dispatch, 0 or 1 otherwise): a group of g KV heads sharing one
    // latent runs as g one-head groups of the full rank, `latent_share` = g of them reading the
    // latent of group grp / latent_share (hk_sg, hv_sg and the packed scale/zero offsets stay
    // those of the real groups; G counts the virtual ones).
    int latent_share;
};

// The latent group a (possibly virtual) group reads.
__device__ __forceinline__ int latent_group(const DecodeParams& p, int grp) {
    return p.latent_share > 1 ? grp / p.latent_share : grp;
}

// The physical row of sequence b's logical row t (see DecodeParams::block_table).
__device__ __forceinline__ int physical_row(const DecodeParams& p, int b, int t) {
    if (p.block_table == nullptr) return t;
    return p.block_table[(size_t)b * p.table_stride + t / p.block_size] * p.block_size + t % p.block_size;
}

// The 16-bit element types: conversions, and the tensor-core instruction for each.
template <typename T>
struct Elem;
template <>
struct Elem<half> {
    static __device__ __forceinline__ float to_float(half x) { return __half2float(x); }
    static __device__ __forceinline__ half from_float(float x) { return __float2half(x); }
    static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
        half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&h);
    }
    static __device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
};
template <>
struct Elem<__nv_bfloat16> {
    static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
    static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&h);
    }
    static __device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
};

// Copy `nt` latent rows (row stride `ld` halves, a multiple of 8; `r` used columns, of which
// round8(r) are read) into a [kTile][RP] shared tile with 16-byte loads, all issued before any
// store so that one memory latency covers the tile; columns ≥ r and rows ≥ nt become zero.
template <int RP>
__device__ __forceinline__ void load_tile(half* dst, const half* src, int t0, int nt, int ld, int r, int tid) {
    constexpr int kChunks = kTile * RP / 8 / kThreads;
    static_assert(kTile * RP / 8 % kThreads == 0, "tile chunks per thread");
    uint4 v[kChunks];
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
        int ci = tid + u * kThreads, t = ci / (RP / 8), col = ci % (RP / 8) * 8;
        v[u] = (t < nt && col < r) ? *reinterpret_cast<const uint4*>(src + (size_t)(t0 + t) * ld + col) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
        int ci = tid + u * kThreads, col = ci % (RP / 8) * 8;
        if (col + 8 > r) {
            half* e = reinterpret_cast<half*>(&v[u]);
#pragma unroll
            for (int k = 0; k < 8; ++k)
                if (col + k >= r) e[k] = __float2half(0.f);
        }
        reinterpret_cast<uint4*>(dst)[ci] = v[u];
    }
}

// Shared-memory layout of the split kernel, in bytes.
template <int RKP, int RVP, int DH, int GHEADS>
struct SplitSmem {
    static constexpr int b = GHEADS * DH * RKP * 2;       // B_k of the group, [g·dh][RKP] half
    static constexpr int hk = kTile * RKP * 2;            // key latents of the tile
    static constexpr int hv = kTile * RVP * 2;            // value latents of the tile
    static constexpr int k = kTile * DH * 4;              // rebuilt keys of one KV head, float
    static constexpr int kh = kTile * DH * 2;             // the same after RoPE, half
    static constexpr int q = GHEADS * 16 * DH * 2;        // per KV head: its query heads' rows, half
    static constexpr int base = (DH / 2) * 16;            // per pair: cos/sin(t0·θ), cos/sin(θ)
    static constexpr int rows = 4 * (DH / 2) * 8;         // per warp and pair: cos/sin(16w·θ)
    static constexpr int s = kTile * 16 * 4;              // scores [T][16], float
    static constexpr int pr = 16 * kTile * 2;             // probabilities [16][T], half
    static constexpr int acc = 16 * RVP * 4;              // latent accumulator [16][RVP], float
    static constexpr int sc = 16 * 4;                     // per-head rescale of the accumulator
    static constexpr int total = b + hk + hv + k + kh + q + base + rows + s + pr + acc + sc;
};

// One block per (split of L, key group, sequence); 4 warps. Per tile of 64 tokens:
//   rebuild  K_j = H_k·B_kjᵀ            wmma, [64 × dh] per KV head j of the group
//   RoPE     in place, by angle addition from a per-tile base (no table, no per-token trig)
//   scores   S += RoPE(K_j)·Q_jᵀ         wmma, Q_j holds only KV head j's query rows (zero
//                                        elsewhere), so one [64 × 16] fragment collects all heads
//   softmax  online, one warp per head
//   values   A = A·diag(scale) + P·H_v   wmma in latent space, [16 × RVP]
template <int RKP, int RVP, int DH, int GHEADS, int NREP>
__global__ void __launch_bounds__(kThreads) palu_decode_split(DecodeParams p) {
    using namespace nvcuda;
    constexpr int NH = GHEADS * NREP;  // query heads of the group
    static_assert(NH <= 16, "at most 16 query heads per group");
    static_assert(RKP % 16 == 0 && RVP % 64 == 0 && DH % 64 == 0, "padded ranks");
    using S = SplitSmem<RKP, RVP, DH, GHEADS>;
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* ptr = smem;
    auto take = [&](int bytes) { unsigned char* r = ptr; ptr += bytes; return r; };
    half* sB = reinterpret_cast<half*>(take(S::b));
    half* sHk = reinterpret_cast<half*>(take(S::hk));
    half* sHv = reinterpret_cast<half*>(take(S::hv));
    float* sK = reinterpret_cast<float*>(take(S::k));
    half* sKh = reinterpret_cast<half*>(take(S::kh));
    half* sQ = reinterpret_cast<half*>(take(S::q));
    float4* sBase = reinterpret_cast<float4*>(take(S::base));
    float2* sRows = reinterpret_cast<float2*>(take(S::rows));
    float* sS = reinterpret_cast<float*>(take(S::s));
    half* sP = reinterpret_cast<half*>(take(S::pr));
    float* sAcc = reinterpret_cast<float*>(take(S::acc));
    float* sScale = reinterpret_cast<float*>(take(S::sc));

    const int split = blockIdx.x, grp = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int L = p.lens[b];
    const int s0 = split * p.split_len;
    const int s1 = min(L, s0 + p.split_len);
    const float qscale = rsqrtf((float)DH);

    const half* bk = p.bk + (size_t)grp * GHEADS * DH * p.rk;
    for (int i = tid; i < GHEADS * DH * RKP; i += kThreads) {
        int row = i / RKP, c = i % RKP;
        sB[i] = c < p.rk ? bk[(size_t)row * p.rk + c] : __float2half(0.f);
    }
    // Q_j: rows of KV head j's query heads (scaled by 1/√dh), zero elsewhere.
    for (int i = tid; i < GHEADS * 16 * DH; i += kThreads) {
        int j = i / (16 * DH), h = (i / DH) % 16, d = i % DH;
        float v = 0.f;
        if (h < NH && h / NREP == j) {
            int qh = (grp * GHEADS + j) * NREP + h % NREP;
            v = __half2float(p.q[((size_t)b * p.H + qh) * DH + d]) * qscale;
        }
        sQ[i] = __float2half(v);
    }
    for (int i = tid; i < 16 * RVP; i += kThreads) sAcc[i] = 0.f;
    for (int i = tid; i < 4 * (DH / 2); i += kThreads) {
        double a = (double)(16 * (i / (DH / 2))) * (double)p.inv_freq[i % (DH / 2)];
        sRows[i] = make_float2((float)cos(a), (float)sin(a));
    }
    float m_run[4], l_run[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        m_run[u] = -INFINITY;
        l_run[u] = 0.f;
    }
    __syncthreads();

    const half* hk = p.hk + b * p.hk_sb + latent_group(p, grp) * p.hk_sg;
    const half* hv = p.hv + b * p.hv_sb + latent_group(p, grp) * p.hv_sg;
    for (int t0 = s0; t0 < s1; t0 += kTile) {
        const int nt = min(kTile, s1 - t0);
        load_tile<RKP>(sHk, hk, t0, nt, p.ldk, p.rk, tid);
        load_tile<RVP>(sHv, hv, t0, nt, p.ldv, p.rv, tid);
        for (int f = tid; f < DH / 2; f += kThreads) {
            double th = (double)p.inv_freq[f], a = (double)t0 * th;
            sBase[f] = make_float4((float)cos(a), (float)sin(a), (float)cos(th), (float)sin(th));
        }
        __syncthreads();
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> sc;
        wmma::fill_fragment(sc, 0.f);
        for (int j = 0; j < GHEADS; ++j) {
#pragma unroll
            for (int n0 = 0; n0 < DH; n0 += 16) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
                wmma::fill_fragment(c, 0.f);
#pragma unroll
                for (int k0 = 0; k0 < RKP; k0 += 16) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> bm;
                    wmma::load_matrix_sync(a, sHk + warp * 16 * RKP + k0, RKP);
                    wmma::load_matrix_sync(bm, sB + (size_t)(j * DH + n0) * RKP + k0, RKP);
                    wmma::mma_sync(c, a, bm, c);
                }
                wmma::store_matrix_sync(sK + warp * 16 * DH + n0, c, DH, wmma::mem_row_major);
            }
            __syncwarp();
            // RoPE on this warp's 16 rows: lane owns pairs f = lane, lane + 32 (DH/2 = 64),
            // stepping the angle token by token by the rotation of θ_f.
#pragma unroll
            for (int fi = 0; fi < DH / 64; ++fi) {
                int f = lane + 32 * fi;
                float4 bs = sBase[f];
                int tr = warp * 16;
                // cos/sin((t0 + tr)·θ) from the tile base by angle addition, then step.
                float2 rw = sRows[warp * (DH / 2) + f];
                float cr = rw.x, sr = rw.y;
                float cs = bs.x * cr - bs.y * sr, sn = bs.y * cr + bs.x * sr;
                for (int t = tr; t < tr + 16; ++t) {
                    float k1 = sK[t * DH + f], k2 = sK[t * DH + f + DH / 2];
                    sKh[t * DH + f] = __float2half(k1 * cs - k2 * sn);
                    sKh[t * DH + f + DH / 2] = __float2half(k2 * cs + k1 * sn);
                    float c2 = cs * bs.z - sn * bs.w;
                    sn = sn * bs.z + cs * bs.w;
                    cs = c2;
                }
            }
            __syncwarp();
#pragma unroll
            for (int d0 = 0; d0 < DH; d0 += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> qm;
                wmma::load_matrix_sync(a, sKh + warp * 16 * DH + d0, DH);
                wmma::load_matrix_sync(qm, sQ + (size_t)j * 16 * DH + d0, DH);
                wmma::mma_sync(sc, a, qm, sc);
            }
        }
        wmma::store_matrix_sync(sS + warp * 16 * 16, sc, 16, wmma::mem_row_major);
        __syncthreads();
        // Online softmax: warp w owns heads w, w + 4, ...
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            int h = warp + 4 * u;
            if (h < NH) {
                float s_a = lane < nt ? sS[lane * 16 + h] : -INFINITY;
                float s_b = lane + 32 < nt ? sS[(lane + 32) * 16 + h] : -INFINITY;
                float mx = fmaxf(s_a, s_b);
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
                float m_new = fmaxf(m_run[u], mx);
                float pa = __expf(s_a - m_new), pb = __expf(s_b - m_new);
                float sum = pa + pb;
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
                float scale = __expf(m_run[u] - m_new);
                l_run[u] = l_run[u] * scale + sum;
                m_run[u] = m_new;
                sP[h * kTile + lane] = __float2half(pa);
                sP[h * kTile + lane + 32] = __float2half(pb);
                if (lane == 0) sScale[h] = scale;
            } else if (h < 16) {
                sP[h * kTile + lane] = __float2half(0.f);
                sP[h * kTile + lane + 32] = __float2half(0.f);
                if (lane == 0) sScale[h] = 0.f;
            }
        }
        __syncthreads();
        // A ← A·diag(scale) + P·H_v: warps split the RVP columns.
        for (int n0 = warp * 16; n0 < RVP; n0 += 64) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            for (int e = lane; e < 16 * 16; e += 32) {
                int h = e / 16, c = n0 + e % 16;
                sAcc[h * RVP + c] *= sScale[h];
            }
            __syncwarp();
            wmma::load_matrix_sync(acc, sAcc + n0, RVP, wmma::mem_row_major);
#pragma unroll
            for (int k0 = 0; k0 < kTile; k0 += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> bm;
                wmma::load_matrix_sync(a, sP + k0, kTile);
                wmma::load_matrix_sync(bm, sHv + k0 * RVP + n0, RVP);
                wmma::mma_sync(acc, a, bm, acc);
            }
            wmma::store_matrix_sync(sAcc + n0, acc, RVP, wmma::mem_row_major);
        }
        __syncthreads();
    }
    // Partials: (m, l, acc[RVP]) per head and split.
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        int h = warp + 4 * u;
        if (h >= NH) continue;
        float* dst = p.partial + ((((size_t)b * p.G + grp) * NH + h) * p.n_splits + split) * (2 + RVP);
        if (lane == 0) {
            dst[0] = m_run[u];
            dst[1] = l_run[u];
        }
        for (int c = lane; c < RVP; c += 32) dst[2 + c] = sAcc[h * RVP + c];
    }
}

// Merge the splits of one query head and apply B_v (elements T), or write the merged latent
// output as it is (`latent_out`): one block per (head, sequence), DH threads. Every load is issued across lanes, none waits on the one before: v5's
// combine looped over splits and B_v's columns serially per thread and took 15.9 µs at
// 16K × batch 8 (a tenth of the step); see docs/kernels.md.
template <typename T, int RVP, int DH, int GHEADS, int NREP>
__global__ void palu_decode_combine(DecodeParams p) {
    constexpr int NH = GHEADS * NREP;
    constexpr int kWarpsC = DH / 32;
    __shared__ float a[RVP];
    __shared__ float red[2][kWarpsC];
    const int qh = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int kv = qh / NREP, grp = kv / GHEADS, j = kv % GHEADS;
    const int h = j * NREP + qh % NREP;
    const int stride = 2 + RVP;
    const float* src = p.partial + (((size_t)b * p.G + grp) * NH + h) * p.n_splits * stride;
    // M = max over splits, L = Σ l_s·e^(m_s − M): splits across the block's threads.
    float M = -INFINITY;
    for (int s = tid; s < p.n_splits; s += DH) M = fmaxf(M, src[s * stride]);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    if (lane == 0) red[0][warp] = M;
    __syncthreads();
    M = red[0][0];
#pragma unroll
    for (int w = 1; w < kWarpsC; ++w) M = fmaxf(M, red[0][w]);
    float Lsum = 0.f;
    for (int s = tid; s < p.n_splits; s += DH) {
        const float m = src[s * stride];
        Lsum += m == -INFINITY ? 0.f : src[s * stride + 1] * __expf(m - M);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) Lsum += __shfl_xor_sync(0xffffffffu, Lsum, o);
    if (lane == 0) red[1][warp] = Lsum;
    __syncthreads();
    Lsum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarpsC; ++w) Lsum += red[1][w];
    const float inv_l = Lsum > 0.f ? 1.f / Lsum : 0.f;
    // a[c] = Σ_s acc_s[c]·e^(m_s − M) / L: columns across threads (coalesced), splits unrolled.
    for (int c = tid; c < RVP; c += DH) {
        float v = 0.f;
#pragma unroll 4
        for (int s = 0; s < p.n_splits; ++s) {
            const float m = src[s * stride];
            v += m == -INFINITY ? 0.f : src[s * stride + 2 + c] * __expf(m - M);
        }
        a[c] = v * inv_l;
    }
    if (p.latent_out) {
        for (int c = tid; c < p.rv; c += DH) p.out[((size_t)b * p.H + qh) * p.rv + c] = a[c];
        return;
    }
    __syncthreads();
    // out[d] = B_v[d, :]·a: one warp per row at a time, lanes across the row's columns
    // (coalesced), a shuffle reduction per row.
    const T* bv = reinterpret_cast<const T*>(p.bv) + ((size_t)grp * GHEADS * DH + j * DH) * p.rv;
    constexpr int kCols = (RVP + 31) / 32;
#pragma unroll 4
    for (int d = warp; d < DH; d += kWarpsC) {
        float o = 0.f;
#pragma unroll
        for (int u = 0; u < kCols; ++u) {
            const int c = lane + 32 * u;
            if (c < p.rv) o += Elem<T>::to_float(bv[(size_t)d * p.rv + c]) * a[c];
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2) o += __shfl_xor_sync(0xffffffffu, o, off);
        if (lane == 0) p.out[((size_t)b * p.H + qh) * DH + d] = o;
    }
}

}  // namespace palu
