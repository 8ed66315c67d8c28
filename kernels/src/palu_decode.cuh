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
//   hk     [B, G, Lmax, ldk]     half, latents of the key groups (r_k ≤ ldk columns used)
//   hv     [B, G, Lmax, ldv]     half
//   bk     [G, g·dh, r_k]        half  (the authors' U.i of k_proj)
//   bv     [G, g·dh, r_v]        half
//   lens   [B]                   int, tokens cached per sequence (≤ Lmax)
//   inv_freq [dh/2]              float, RoPE frequencies from the model config (theta, scaling)
// RoPE is rotate-half (HF Llama): pair (i, i + dh/2) rotated by pos·inv_freq[i].
#pragma once
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
    int B, H, dh, G, g, n_rep, Lmax, ldk, ldv, rk, rv, n_splits, split_len;
};

// Shared-memory layout of the split kernel, in bytes.
template <int RKP, int RVP, int DH, int GHEADS>
struct SplitSmem {
    static constexpr int b = GHEADS * DH * RKP * 2;       // B_k of the group, [g·dh][RKP] half
    static constexpr int hk = kTile * RKP * 2;            // key latents of the tile
    static constexpr int hv = kTile * RVP * 2;            // value latents of the tile
    static constexpr int k = kTile * DH * 4;              // rebuilt keys of one KV head, float
    static constexpr int rot = kTile * (DH / 2) * 8;      // cos/sin(m·θ_i), m < kTile
    static constexpr int base = (DH / 2) * 8;             // cos/sin(t0·θ_i)
    static constexpr int s = 16 * kTile * 4;              // scores / probabilities, ≤ 16 heads
    static constexpr int total = b + hk + hv + k + rot + base + s;
};

template <int RKP, int RVP, int DH, int GHEADS, int NREP>
__global__ void __launch_bounds__(kThreads) palu_decode_split(DecodeParams p) {
    using namespace nvcuda;
    constexpr int NH = GHEADS * NREP;  // query heads of the group
    static_assert(NH <= 16, "at most 16 query heads per group");
    static_assert(RKP % 16 == 0 && RVP % 32 == 0 && DH % 16 == 0, "padded ranks");
    using S = SplitSmem<RKP, RVP, DH, GHEADS>;
    extern __shared__ __align__(16) unsigned char smem[];
    half* sB = reinterpret_cast<half*>(smem);
    half* sHk = reinterpret_cast<half*>(smem + S::b);
    half* sHv = reinterpret_cast<half*>(smem + S::b + S::hk);
    float* sK = reinterpret_cast<float*>(smem + S::b + S::hk + S::hv);
    float2* sRot = reinterpret_cast<float2*>(smem + S::b + S::hk + S::hv + S::k);
    float2* sBase = reinterpret_cast<float2*>(smem + S::b + S::hk + S::hv + S::k + S::rot);
    float* sS = reinterpret_cast<float*>(smem + S::b + S::hk + S::hv + S::k + S::rot + S::base);

    const int split = blockIdx.x, grp = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int L = p.lens[b];
    const int s0 = split * p.split_len;
    const int s1 = min(L, s0 + p.split_len);

    // B_k of the group, zero-padded to RKP columns.
    const half* bk = p.bk + (size_t)grp * GHEADS * DH * p.rk;
    for (int i = tid; i < GHEADS * DH * RKP; i += kThreads) {
        int row = i / RKP, c = i % RKP;
        sB[i] = c < p.rk ? bk[(size_t)row * p.rk + c] : __float2half(0.f);
    }
    // Offsets of the rotation within a tile, in double for accuracy at long contexts.
    for (int i = tid; i < kTile * (DH / 2); i += kThreads) {
        int m = i / (DH / 2), f = i % (DH / 2);
        double a = (double)m * (double)p.inv_freq[f];
        sRot[i] = make_float2((float)cos(a), (float)sin(a));
    }
    // Per-thread state: warp w < NH owns query head w (NH ≤ 4 with 4 warps; more loop).
    float m_run[4], l_run[4], acc[4][RVP / 32];
    float q_reg[4][DH / 32];  // lane-strided query of owned heads (for scores)
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        m_run[u] = -INFINITY;
        l_run[u] = 0.f;
#pragma unroll
        for (int c = 0; c < RVP / 32; ++c) acc[u][c] = 0.f;
        int h = warp + 4 * u;
        if (h < NH) {
            int kv = grp * GHEADS + h / NREP;
            int qh = kv * NREP + h % NREP;
#pragma unroll
            for (int d = 0; d < DH / 32; ++d)
                q_reg[u][d] = __half2float(p.q[((size_t)b * p.H + qh) * DH + lane + 32 * d]) * rsqrtf((float)DH);
        }
    }
    __syncthreads();

    const half* hk = p.hk + ((size_t)b * p.G + grp) * p.Lmax * p.ldk;
    const half* hv = p.hv + ((size_t)b * p.G + grp) * p.Lmax * p.ldv;
    for (int t0 = s0; t0 < s1; t0 += kTile) {
        const int nt = min(kTile, s1 - t0);
        for (int i = tid; i < kTile * RKP; i += kThreads) {
            int t = i / RKP, c = i % RKP;
            sHk[i] = (t < nt && c < p.rk) ? hk[(size_t)(t0 + t) * p.ldk + c] : __float2half(0.f);
        }
        for (int i = tid; i < kTile * RVP; i += kThreads) {
            int t = i / RVP, c = i % RVP;
            sHv[i] = (t < nt && c < p.rv) ? hv[(size_t)(t0 + t) * p.ldv + c] : __float2half(0.f);
        }
        for (int f = tid; f < DH / 2; f += kThreads) {
            double a = (double)t0 * (double)p.inv_freq[f];
            sBase[f] = make_float2((float)cos(a), (float)sin(a));
        }
        __syncthreads();
        for (int j = 0; j < GHEADS; ++j) {
            // Rebuild K_j = H_k · B_kjᵀ for this tile: warp rows 16·warp.., all DH columns.
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
            __syncthreads();
            // Scores of the NREP query heads of KV head j: s = q · RoPE_{t0+t}(k_t).
            for (int u = 0; u < 4; ++u) {
                int h = warp + 4 * u;
                if (h >= NH || h / NREP != j) continue;
                for (int t = 0; t < kTile; ++t) {
                    float part = 0.f;
#pragma unroll
                    for (int d = 0; d < DH / 32; ++d) {
                        int i = lane + 32 * d;
                        int f = i % (DH / 2);
                        float2 r = sRot[t * (DH / 2) + f], bs = sBase[f];
                        float cs = bs.x * r.x - bs.y * r.y, sn = bs.y * r.x + bs.x * r.y;
                        float k = sK[t * DH + i];
                        float kp = sK[t * DH + (i < DH / 2 ? i + DH / 2 : i - DH / 2)];
                        float rot = i < DH / 2 ? k * cs - kp * sn : k * cs + kp * sn;
                        part += q_reg[u][d] * rot;
                    }
#pragma unroll
                    for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
                    if (lane == 0) sS[h * kTile + t] = t < nt ? part : -INFINITY;
                }
            }
            __syncthreads();
        }
        // Online softmax and latent values, one warp per owned head.
        for (int u = 0; u < 4; ++u) {
            int h = warp + 4 * u;
            if (h >= NH) continue;
            float s_a = sS[h * kTile + lane], s_b = sS[h * kTile + lane + 32];
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
            sS[h * kTile + lane] = pa;
            sS[h * kTile + lane + 32] = pb;
            __syncwarp();
#pragma unroll
            for (int c = 0; c < RVP / 32; ++c) {
                float a = acc[u][c] * scale;
                for (int t = 0; t < nt; ++t) a += sS[h * kTile + t] * __half2float(sHv[t * RVP + lane + 32 * c]);
                acc[u][c] = a;
            }
        }
        __syncthreads();
    }
    // Partials: (m, l, acc[RVP]) per head and split.
    for (int u = 0; u < 4; ++u) {
        int h = warp + 4 * u;
        if (h >= NH) continue;
        float* dst = p.partial + ((((size_t)b * p.G + grp) * NH + h) * p.n_splits + split) * (2 + RVP);
        if (lane == 0) {
            dst[0] = m_run[u];
            dst[1] = l_run[u];
        }
#pragma unroll
        for (int c = 0; c < RVP / 32; ++c) dst[2 + lane + 32 * c] = acc[u][c];
    }
}

// Merge the splits of one query head and apply B_v: one block per (head, sequence), DH threads.
template <int RVP, int DH, int GHEADS, int NREP>
__global__ void palu_decode_combine(DecodeParams p) {
    constexpr int NH = GHEADS * NREP;
    __shared__ float a[RVP];
    __shared__ float w[64];
    const int qh = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
    const int kv = qh / NREP, grp = kv / GHEADS, j = kv % GHEADS;
    const int h = j * NREP + qh % NREP;
    const float* src = p.partial + (((size_t)b * p.G + grp) * NH + h) * p.n_splits * (2 + RVP);
    float M = -INFINITY;
    for (int s = 0; s < p.n_splits; ++s) M = fmaxf(M, src[s * (2 + RVP)]);
    float Lsum = 0.f;
    for (int s = 0; s < p.n_splits; ++s) {
        float m = src[s * (2 + RVP)];
        float e = m == -INFINITY ? 0.f : __expf(m - M);
        if (tid == 0 && s < 64) w[s] = e;
        Lsum += src[s * (2 + RVP) + 1] * e;
    }
    __syncthreads();
    for (int c = tid; c < RVP; c += blockDim.x) {
        float v = 0.f;
        for (int s = 0; s < p.n_splits; ++s) {
            float m = src[s * (2 + RVP)];
            float e = s < 64 ? w[s] : (m == -INFINITY ? 0.f : __expf(m - M));
            v += src[s * (2 + RVP) + 2 + c] * e;
        }
        a[c] = Lsum > 0.f ? v / Lsum : 0.f;
    }
    __syncthreads();
    const half* bv = p.bv + ((size_t)grp * GHEADS * DH + j * DH) * p.rv;
    for (int d = tid; d < DH; d += blockDim.x) {
        float o = 0.f;
        for (int c = 0; c < p.rv; ++c) o += __half2float(bv[(size_t)d * p.rv + c]) * a[c];
        p.out[((size_t)b * p.H + qh) * DH + d] = o;
    }
}

}  // namespace palu
