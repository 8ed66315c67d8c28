// Thin dispatch API over the templates of palu_decode.cuh: picks the instantiation for the
// group size, query heads per KV head and padded ranks, sizes the split over L, launches.
#include "palu_decode.cuh"
#include "palu_decode_mma.cuh"
#include <cuda_runtime.h>
#include <type_traits>

namespace {

// Raise a kernel's dynamic shared-memory limit once per device and kernel, not per launch: the
// attribute call costs the host several µs, on every layer of every decode step otherwise.
cudaError_t raise_smem_limit(const void* kernel, int bytes) {
    constexpr int kSlots = 64;
    static thread_local const void* done_kernel[kSlots];
    static thread_local int done_device[kSlots];
    static thread_local int n_done = 0;
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    for (int i = 0; i < n_done; ++i)
        if (done_kernel[i] == kernel && done_device[i] == dev) return cudaSuccess;
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e == cudaSuccess && n_done < kSlots) {
        done_kernel[n_done] = kernel;
        done_device[n_done++] = dev;
    }
    return e;
}
template <typename K>
cudaError_t raise_smem_limit(K* kernel, int bytes) {
    return raise_smem_limit(reinterpret_cast<const void*>(kernel), bytes);
}

// Instantiations with packed latents (2, 4 and 8 bits): the Llama shapes at g = 1.
template <int DH, int G, int NREP, int RKP>
constexpr bool kPackedInstance = DH == 128 && G == 1 && RKP == 64 && (NREP == 4 || NREP == 1);

// Launch a split kernel (its dynamic shared memory raised once), then the combine that merges
// the splits and applies B_v: every path of the dispatch ends here.
template <typename T, int RKP, int DH, int G, int NREP, typename K>
cudaError_t split_then_combine(K* split, int smem, int threads, palu::DecodeParams p, cudaStream_t stream) {
    cudaError_t e = raise_smem_limit(split, smem);
    if (e != cudaSuccess) return e;
    split<<<dim3(p.n_splits, p.G, p.B), threads, smem, stream>>>(p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    palu::palu_decode_combine<T, RKP, DH, G, NREP><<<dim3(p.H, p.B), DH, 0, stream>>>(p);
    return cudaGetLastError();
}

template <typename T, int RKP, int DH, int G, int NREP, int BITS>
cudaError_t launch_packed(palu::DecodeParams p, cudaStream_t stream) {
    using S = palu::mma4::Smem<RKP, RKP, DH, G, BITS>;
    return split_then_combine<T, RKP, DH, G, NREP>(palu::mma4::split_kernel<T, RKP, RKP, DH, G, NREP, 0, BITS>, S::total,
                                                   palu::mma4::kWarps * 32, p, stream);
}

template <typename T, int RKP, int DH, int G, int NREP>
cudaError_t launch(palu::DecodeParams p, cudaStream_t stream) {
    if (p.bits != 0) {
        if constexpr (kPackedInstance<DH, G, NREP, RKP>) {
            if (p.variant != 0) return cudaErrorNotSupported;
            if (p.bits == 2) return launch_packed<T, RKP, DH, G, NREP, 2>(p, stream);
            if (p.bits == 4) return launch_packed<T, RKP, DH, G, NREP, 4>(p, stream);
            if (p.bits == 8) return launch_packed<T, RKP, DH, G, NREP, 8>(p, stream);
        }
        return cudaErrorNotSupported;
    }
    if (p.block_table != nullptr && p.variant != 0) return cudaErrorNotSupported;  // paged: register pipeline
    if (p.variant == 0 || p.variant > 100) {
        using S = palu::mma4::Smem<RKP, RKP, DH, G>;
        auto split = palu::mma4::split_kernel<T, RKP, RKP, DH, G, NREP>;
#ifdef PALU_ABLATIONS
        // Benchmark only: variant 100 + k runs ablation k of the register pipeline (Llama-3 g=1).
        if constexpr (std::is_same_v<T, half> && DH == 128 && G == 1 && NREP == 4 && RKP == 64) {
            if (p.variant == 101) split = palu::mma4::split_kernel<T, RKP, RKP, DH, G, NREP, 1>;
            if (p.variant == 102) split = palu::mma4::split_kernel<T, RKP, RKP, DH, G, NREP, 2>;
            if (p.variant == 103) split = palu::mma4::split_kernel<T, RKP, RKP, DH, G, NREP, 3>;
            if (p.variant == 104) split = palu::mma4::split_kernel<T, RKP, RKP, DH, G, NREP, 4>;
            if (p.variant == 105) split = palu::mma4::split_kernel<T, RKP, RKP, DH, G, NREP, 5>;
        }
#endif
        if (p.variant > 100 && split == palu::mma4::split_kernel<T, RKP, RKP, DH, G, NREP>) return cudaErrorNotSupported;
        return split_then_combine<T, RKP, DH, G, NREP>(split, S::total, palu::mma4::kWarps * 32, p, stream);
    } else if constexpr (std::is_same_v<T, half>) {
        using S = palu::SplitSmem<RKP, RKP, DH, G>;
        return split_then_combine<T, RKP, DH, G, NREP>(palu::palu_decode_split<RKP, RKP, DH, G, NREP>, S::total,
                                                       palu::kThreads, p, stream);
    } else {
        return cudaErrorNotSupported;  // the shared-memory pipeline is f16 only
    }
}

}  // namespace

extern "C" {

// Floats of workspace `partial` the launch needs.
size_t palu_decode_workspace(int B, int G, int g, int n_rep, int n_splits, int rv_pad) {
    return (size_t)B * G * g * n_rep * n_splits * (2 + rv_pad);
}

// Splits over L for a batch: as many as fill one wave of `target_blocks` resident blocks
// (0: three per SM of the current device, what the Llama-shaped kernels' shared memory allows)
// without starting a second, each split ≥ 512 tokens and a whole number of 64-token tiles.
// Measured on the H200 (docs/kernels.md, v6): a second, partial wave costs more than the
// parallelism it adds, and splits under 512 tokens spend more on start-up than they save.
void palu_decode_plan(int B, int G, int Lmax, int target_blocks, int* n_splits, int* split_len) {
    if (target_blocks <= 0) {
        int dev = 0, sms = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        target_blocks = 3 * (sms > 0 ? sms : 66);
    }
    int blocks = G * B;
    int want = target_blocks / blocks;
    int most = (Lmax + 511) / 512;
    int n = want < most ? want : most;
    if (n < 1) n = 1;
    int len = ((Lmax + n - 1) / n + palu::kTile - 1) / palu::kTile * palu::kTile;
    *split_len = len;
    *n_splits = (Lmax + len - 1) / len;
}

// The instantiations: (head_dim, g, n_rep, padded rank). Llama-3-8B (GQA 4) and Llama-2-7B
// (MHA) at g = 1, 2; SmolLM2-135M (head_dim 64, GQA 3) at g = 1 and 3 (its J-LRD checkpoints).
// Each adds two split kernels and a combine kernel to the build.
#define PALU_DECODE_INSTANCES(X)                                                         \
    X(128, 1, 1, 64) X(128, 1, 4, 64) X(128, 2, 1, 128) X(128, 2, 4, 128)                 \
    X(64, 1, 3, 64) X(64, 3, 3, 64) X(64, 3, 3, 128) X(64, 3, 3, 192)

// Padded rank of the instantiation that covers the shape (the smallest that holds both ranks),
// 0 if none does.
int palu_decode_rank_pad(int dh, int g, int n_rep, int rk, int rv) {
    int r = rk > rv ? rk : rv;
    if (rk < 1 || rv < 1) return 0;
#define PALU_PICK(DH, G, NREP, RP) \
    if (dh == DH && g == G && n_rep == NREP && r <= RP) return RP;
    PALU_DECODE_INSTANCES(PALU_PICK)
#undef PALU_PICK
    return 0;
}

// Whether an instantiation covers (head_dim, g, n_rep, r_k, r_v).
int palu_decode_supported(int dh, int g, int n_rep, int rk, int rv) {
    return palu_decode_rank_pad(dh, g, n_rep, rk, rv) != 0;
}

// Whether a packed instantiation covers the shape with `bits`-bit latents: Llama shapes
// (head_dim 128) at g = 1, ranks ≤ 64 whose codes fill whole 16-byte pieces (r·bits % 128 == 0).
int palu_decode_packed_supported(int dh, int g, int n_rep, int rk, int rv, int bits) {
    if (bits != 2 && bits != 4 && bits != 8) return 0;
    if (rk * bits % 128 || rv * bits % 128) return 0;
    const int rp = palu_decode_rank_pad(dh, g, n_rep, rk, rv);
#define PALU_PICK(DH, G, NREP, RP) \
    if (dh == DH && g == G && n_rep == NREP && rp == RP) return kPackedInstance<DH, G, NREP, RP> ? 1 : 0;
    PALU_DECODE_INSTANCES(PALU_PICK)
#undef PALU_PICK
    return 0;
}

// Elements are f16, or bf16 with p.bf16 (register pipeline only).
// Returns cudaErrorInvalidValue for misaligned latents (every stride a multiple of 8 halves,
// base pointers 16-byte aligned) or a bad split plan, cudaErrorNotSupported for shapes without
// an instantiation (see PALU_DECODE_INSTANCES).
int palu_decode(palu::DecodeParams p, cudaStream_t stream) {
    // Alignment: 16-bit latents in units of 8 halves from 16-byte aligned bases; packed rows
    // (strides in bytes) 4-byte aligned (copied in pieces of 16, 8 or 4 bytes, the widest the
    // alignment allows), scale and zero 2-byte aligned.
    const int unit = p.bits ? 4 : 8, base = p.bits ? 4 : 16;
    if (p.ldk % unit || p.ldv % unit || p.hk_sb % unit || p.hk_sg % unit || p.hv_sb % unit || p.hv_sg % unit ||
        (size_t)p.hk % base || (size_t)p.hv % base || p.rk < 1 || p.rv < 1 || p.n_splits < 1 ||
        p.split_len % palu::kTile || (long long)p.n_splits * p.split_len < p.Lmax)
        return cudaErrorInvalidValue;
    // Paged: whole 16-row chunks per block, and no per-sequence stride (the pool is shared).
    if (p.block_table != nullptr &&
        (p.block_size < 16 || p.block_size % 16 || p.table_stride < 1 || p.hk_sb || p.hv_sb))
        return cudaErrorInvalidValue;
    if (p.bits && (!palu_decode_packed_supported(p.dh, p.g, p.n_rep, p.rk, p.rv, p.bits) || p.k_scale_off % 2 ||
                   p.k_zero_off % 2 || p.v_scale_off % 2 || p.v_zero_off % 2))
        return p.bits == 2 || p.bits == 4 || p.bits == 8 ? cudaErrorNotSupported : cudaErrorInvalidValue;
    const int rp = palu_decode_rank_pad(p.dh, p.g, p.n_rep, p.rk, p.rv);
#define PALU_LAUNCH(DH, G, NREP, RP)                                                       \
    if (p.dh == DH && p.g == G && p.n_rep == NREP && rp == RP)                              \
        return p.bf16 ? launch<__nv_bfloat16, RP, DH, G, NREP>(p, stream) : launch<half, RP, DH, G, NREP>(p, stream);
    PALU_DECODE_INSTANCES(PALU_LAUNCH)
#undef PALU_LAUNCH
    return cudaErrorNotSupported;
}

}  // extern "C"
