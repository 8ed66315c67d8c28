// Thin dispatch API over the templates of palu_decode.cuh: picks the instantiation for the
// group size, query heads per KV head and padded ranks, sizes the split over L, launches.
#include "palu_decode.cuh"
#include "palu_decode_mma.cuh"
#include <cuda_runtime.h>

namespace {

template <int RKP, int DH, int G, int NREP>
cudaError_t launch(palu::DecodeParams p, cudaStream_t stream) {
    cudaError_t e;
    if (p.variant == 0) {
        using S = palu::mma4::Smem<RKP, RKP, DH, G>;
        auto split = palu::mma4::split_kernel<RKP, RKP, DH, G, NREP>;
        e = cudaFuncSetAttribute(split, cudaFuncAttributeMaxDynamicSharedMemorySize, S::total);
        if (e != cudaSuccess) return e;
        split<<<dim3(p.n_splits, p.G, p.B), palu::mma4::kWarps * 32, S::total, stream>>>(p);
    } else {
        using S = palu::SplitSmem<RKP, RKP, DH, G>;
        auto split = palu::palu_decode_split<RKP, RKP, DH, G, NREP>;
        e = cudaFuncSetAttribute(split, cudaFuncAttributeMaxDynamicSharedMemorySize, S::total);
        if (e != cudaSuccess) return e;
        split<<<dim3(p.n_splits, p.G, p.B), palu::kThreads, S::total, stream>>>(p);
    }
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    palu::palu_decode_combine<RKP, DH, G, NREP><<<dim3(p.H, p.B), DH, 0, stream>>>(p);
    return cudaGetLastError();
}

}  // namespace

extern "C" {

// Floats of workspace `partial` the launch needs.
size_t palu_decode_workspace(int B, int G, int g, int n_rep, int n_splits, int rv_pad) {
    return (size_t)B * G * g * n_rep * n_splits * (2 + rv_pad);
}

// Splits over L for a batch: enough blocks to fill the device `target_blocks` deep (0: two per
// SM of the current device), splits of ≥ 256 tokens, each a whole number of 64-token tiles.
void palu_decode_plan(int B, int G, int Lmax, int target_blocks, int* n_splits, int* split_len) {
    if (target_blocks <= 0) {
        int dev = 0, sms = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        target_blocks = 2 * (sms > 0 ? sms : 66);
    }
    int blocks = G * B;
    int want = (target_blocks + blocks - 1) / blocks;
    int most = (Lmax + 255) / 256;
    int n = want < most ? want : most;
    if (n < 1) n = 1;
    int len = ((Lmax + n - 1) / n + palu::kTile - 1) / palu::kTile * palu::kTile;
    *split_len = len;
    *n_splits = (Lmax + len - 1) / len;
}

// Padded rank the instantiation for (g, r) uses, 0 if none.
int palu_decode_rank_pad(int g, int r) {
    int need = r <= 64 ? 64 : r <= 128 ? 128 : 0;
    return (g == 1 && need == 64) || (g == 2 && need <= 128 && need > 0) ? (g == 2 ? 128 : 64) : 0;
}

// Whether an instantiation covers the shape (head_dim 128; g ∈ {1, 2}; n_rep ∈ {1, 4};
// 1 ≤ r ≤ 64·g).
int palu_decode_supported(int dh, int g, int n_rep, int rk, int rv) {
    return dh == 128 && (g == 1 || g == 2) && (n_rep == 1 || n_rep == 4) && rk >= 1 && rv >= 1 &&
           rk <= 64 * g && rv <= 64 * g;
}

// Returns cudaErrorInvalidValue for misaligned latents (every stride a multiple of 8 halves,
// base pointers 16-byte aligned), cudaErrorNotSupported for shapes without an instantiation
// (head_dim 128; g ∈ {1, 2}; n_rep ∈ {1, 4}; r ≤ 64·g).
int palu_decode(palu::DecodeParams p, cudaStream_t stream) {
    if (p.ldk % 8 || p.ldv % 8 || p.hk_sb % 8 || p.hk_sg % 8 || p.hv_sb % 8 || p.hv_sg % 8 ||
        (size_t)p.hk % 16 || (size_t)p.hv % 16 || p.rk < 1 || p.rv < 1 || p.n_splits < 1 ||
        p.split_len % palu::kTile || (long long)p.n_splits * p.split_len < p.Lmax)
        return cudaErrorInvalidValue;
    if (!palu_decode_supported(p.dh, p.g, p.n_rep, p.rk, p.rv)) return cudaErrorNotSupported;
    if (p.g == 1 && p.n_rep == 1) return launch<64, 128, 1, 1>(p, stream);
    if (p.g == 1 && p.n_rep == 4) return launch<64, 128, 1, 4>(p, stream);
    if (p.g == 2 && p.n_rep == 1) return launch<128, 128, 2, 1>(p, stream);
    if (p.g == 2 && p.n_rep == 4) return launch<128, 128, 2, 4>(p, stream);
    return cudaErrorNotSupported;
}

}  // extern "C"
