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

// Instantiations with packed latents (2, 4 and 8 bits): head_dim 128 at g = 1, the ranks of
// Palu-50 % M-LRD (64) and of its G-LRD / J-LRD groups run as virtual heads (128: g = 2, 256:
// g = 4).
template <int DH, int G, int NREP, int RKP>
constexpr bool kPackedInstance = DH == 128 && G == 1 && (RKP == 64 || RKP == 128 || RKP == 256) && (NREP == 4 || NREP == 1);

// One launch's kernels: the split kernel and its dynamic shared memory, then the combine that
// merges the splits and applies B_v.
struct Kernels {
    void (*split)(palu::DecodeParams) = nullptr;
    void (*combine)(palu::DecodeParams) = nullptr;
    int smem = 0, threads = 0;
};

template <typename T, int RKP, int DH, int G, int NREP, int BITS>
Kernels packed_kernels() {
    using S = palu::mma4::Smem<RKP, RKP, DH, G, BITS>;
    return {palu::mma4::split_kernel<T, RKP, RKP, DH, G, NREP, 0, BITS>, palu::palu_decode_combine<T, RKP, DH, G, NREP>, S::total,
            palu::mma4::kWarps * 32};
}

// The kernels of one instantiation for p (variant, bits, ablations); split = null when the
// instantiation has none for them.
template <typename T, int RKP, int DH, int G, int NREP>
Kernels select(const palu::DecodeParams& p) {
    const auto combine = palu::palu_decode_combine<T, RKP, DH, G, NREP>;
    if (p.bits != 0) {
        if constexpr (kPackedInstance<DH, G, NREP, RKP>) {
            if (p.variant != 0 && p.variant != 2) return {};
            if (p.bits == 2) return packed_kernels<T, RKP, DH, G, NREP, 2>();
            if (p.bits == 4) return packed_kernels<T, RKP, DH, G, NREP, 4>();
            if (p.bits == 8) return packed_kernels<T, RKP, DH, G, NREP, 8>();
        }
        return {};
    }
    if (p.block_table != nullptr && p.variant == 1) return {};  // paged: register pipeline
    if (p.variant == 3) {
        // The rebuild on wgmma (experimental): sm_90a builds (PALU_WGMMA), head_dim 128, one-head
        // groups (g = 1 and virtual heads), ranks a multiple of 8, B_k 16-byte aligned.
#ifdef PALU_WGMMA
        if constexpr (DH == 128 && G == 1) {
            // Only Hopper runs the sm_90a code; elsewhere the PTX fallback holds no wgmma.
            int dev = 0, major = 0;
            if (cudaGetDevice(&dev) != cudaSuccess ||
                cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major != 9)
                return {};
            if (p.rk % 8 || p.rv % 8 || reinterpret_cast<size_t>(p.bk) % 16) return {};
            using S = palu::mma4::Smem<RKP, RKP, DH, G, 0, true>;
            return {palu::mma4::split_kernel<T, RKP, RKP, DH, G, NREP, 0, 0, true>, combine, S::total, palu::mma4::kWarps * 32};
        }
#endif
        return {};
    }
    if (p.variant == 5) {
        // 8-warp blocks, 2 per SM (experimental): the 16-bit g = 1 kernel of head_dim 128 and
        // rank 64 (Palu-50 % M-LRD of Llama-3/-2); larger ranks' buffers would not fit twice.
        if constexpr (DH == 128 && G == 1 && RKP == 64) {
            using S = palu::mma4::Smem<RKP, RKP, DH, G, 0, false, 8>;
            return {palu::mma4::split_kernel<T, RKP, RKP, DH, G, NREP, 0, 0, false, 8>, combine, S::total, 8 * 32};
        }
        return {};
    }
    if (p.variant != 1) {
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
        if (p.variant > 100 && split == palu::mma4::split_kernel<T, RKP, RKP, DH, G, NREP>) return {};
        return {split, combine, S::total, palu::mma4::kWarps * 32};
    } else if constexpr (std::is_same_v<T, half>) {
        using S = palu::SplitSmem<RKP, RKP, DH, G>;
        return {palu::palu_decode_split<RKP, RKP, DH, G, NREP>, combine, S::total, palu::kThreads};
    } else {
        return {};  // the shared-memory pipeline is f16 only
    }
}

}  // namespace

// The instantiations: (head_dim, g, n_rep, padded rank). Llama-3-8B (GQA 4) and Llama-2-7B
// (MHA) at g = 1 (ranks 64, and 128 / 256 for the virtual heads of g = 2 / 4) and g = 2 (the
// joint rebuild); SmolLM2-135M (head_dim 64, GQA 3) at g = 1 and 3 (its J-LRD checkpoints).
// Each adds two split kernels and a combine kernel to the build (and 6 packed ones where
// kPackedInstance holds).
#define PALU_DECODE_INSTANCES(X)                                                                            \
    X(128, 1, 1, 64) X(128, 1, 4, 64) X(128, 1, 1, 128) X(128, 1, 4, 128) X(128, 1, 1, 256) X(128, 1, 4, 256) \
    X(128, 2, 1, 128) X(128, 2, 4, 128) X(64, 1, 3, 64) X(64, 3, 3, 64) X(64, 3, 3, 128) X(64, 3, 3, 192)

namespace {

// Padded rank of the instantiation for (head_dim, g, n_rep) that holds rank r, 0 if none.
int instance_pad(int dh, int g, int n_rep, int r) {
#define PALU_PICK(DH, G, NREP, RP) \
    if (dh == DH && g == G && n_rep == NREP && r <= RP) return RP;
    PALU_DECODE_INSTANCES(PALU_PICK)
#undef PALU_PICK
    return 0;
}

bool packed_instance(int dh, int g, int n_rep, int rp) {
#define PALU_PICK(DH, G, NREP, RP) \
    if (dh == DH && g == G && n_rep == NREP && rp == RP) return kPackedInstance<DH, G, NREP, RP>;
    PALU_DECODE_INSTANCES(PALU_PICK)
#undef PALU_PICK
    return false;
}

// Whether p runs as virtual heads: a group of g > 1 KV heads sharing one latent, as g one-head
// groups of the full rank that read the same latent rows (DecodeParams::latent_share). The
// rebuild FLOPs are the same; the latent is read once per head (from L2 after the first).
// Taken where no joint (g-head) instantiation covers the shape, for packed latents (the joint
// kernels read 16-bit latents only), with variant 2 (forced, for the benchmark) and with the
// wgmma rebuild (variant 3, one-head groups only).
bool runs_virtual(const palu::DecodeParams& p) {
    const int r = p.rk > p.rv ? p.rk : p.rv;
    if (p.g <= 1 || instance_pad(p.dh, 1, p.n_rep, r) == 0) return false;
    if (p.variant == 2 || p.variant == 3 || p.bits != 0) return true;
    return instance_pad(p.dh, p.g, p.n_rep, r) == 0;
}

palu::DecodeParams as_virtual(palu::DecodeParams p) {
    if (!runs_virtual(p)) return p;
    p.latent_share = p.g;
    p.G *= p.g;
    p.g = 1;
    if (p.variant == 2) p.variant = 0;
    return p;
}

// The kernels for p (already virtual where it runs so), split = null without an instantiation.
Kernels kernels_for(const palu::DecodeParams& p) {
    const int r = p.rk > p.rv ? p.rk : p.rv;
    const int rp = p.rk < 1 || p.rv < 1 ? 0 : instance_pad(p.dh, p.g, p.n_rep, r);
#define PALU_SELECT(DH, G, NREP, RP)                      \
    if (p.dh == DH && p.g == G && p.n_rep == NREP && rp == RP) \
        return p.bf16 ? select<__nv_bfloat16, RP, DH, G, NREP>(p) : select<half, RP, DH, G, NREP>(p);
    PALU_DECODE_INSTANCES(PALU_SELECT)
#undef PALU_SELECT
    return {};
}

// Blocks of the split kernel resident per SM on the current device (its shared memory raised
// first), 0 on error. Asked of the runtime once per kernel and device: the engine plans every
// layer of every decode step.
int resident_per_sm(const Kernels& k) {
    constexpr int kSlots = 64;
    static thread_local const void* seen_kernel[kSlots];
    static thread_local int seen_device[kSlots], seen_blocks[kSlots];
    static thread_local int n_seen = 0;
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    const void* key = reinterpret_cast<const void*>(k.split);
    for (int i = 0; i < n_seen; ++i)
        if (seen_kernel[i] == key && seen_device[i] == dev) return seen_blocks[i];
    if (raise_smem_limit(k.split, k.smem) != cudaSuccess) return 0;
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k.split, k.threads, k.smem) != cudaSuccess) return 0;
    if (n_seen < kSlots) {
        seen_kernel[n_seen] = key;
        seen_device[n_seen] = dev;
        seen_blocks[n_seen++] = n;
    }
    return n;
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

// Padded rank of the instantiation that covers the shape (the smallest that holds both ranks;
// for groups that run as virtual heads, that of the one-head instantiation), 0 if none does.
int palu_decode_rank_pad(int dh, int g, int n_rep, int rk, int rv) {
    if (rk < 1 || rv < 1) return 0;
    const int r = rk > rv ? rk : rv;
    const int joint = instance_pad(dh, g, n_rep, r);
    return joint != 0 ? joint : g > 1 ? instance_pad(dh, 1, n_rep, r) : 0;
}

// Whether an instantiation covers (head_dim, g, n_rep, r_k, r_v), jointly or as virtual heads.
int palu_decode_supported(int dh, int g, int n_rep, int rk, int rv) {
    return palu_decode_rank_pad(dh, g, n_rep, rk, rv) != 0;
}

// Whether a packed instantiation covers the shape with `bits`-bit latents: head_dim 128, ranks
// ≤ 256 (g > 1 as virtual heads) whose codes fill whole 16-byte pieces (r·bits % 128 == 0).
int palu_decode_packed_supported(int dh, int g, int n_rep, int rk, int rv, int bits) {
    if (bits != 2 && bits != 4 && bits != 8) return 0;
    if (rk < 1 || rv < 1 || rk * bits % 128 || rv * bits % 128) return 0;
    const int r = rk > rv ? rk : rv;
    return packed_instance(dh, 1, n_rep, instance_pad(dh, 1, n_rep, r)) ? 1 : 0;
}

// Splits over L for p's shape (B, G, g, n_rep, dh, ranks, bits, bf16, variant, Lmax): as many
// as fill one wave of the split kernel's resident blocks (`target_blocks`, 0: what fits on the
// device's SMs by the runtime's occupancy count for that kernel), blocks counted per virtual
// head where the shape runs so. Returns a cudaError_t (cudaErrorNotSupported: no kernel).
int palu_decode_plan_for(const palu::DecodeParams* shape, int target_blocks, int* n_splits, int* split_len) {
    const palu::DecodeParams p = as_virtual(*shape);
    const Kernels k = kernels_for(p);
    if (k.split == nullptr) return cudaErrorNotSupported;
    if (target_blocks <= 0) {
        int dev = 0, sms = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        const int per_sm = resident_per_sm(k);
        target_blocks = (per_sm > 0 ? per_sm : 1) * (sms > 0 ? sms : 66);
    }
    palu_decode_plan(p.B, p.G, p.Lmax, target_blocks, n_splits, split_len);
    return cudaSuccess;
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
    p = as_virtual(p);
    const Kernels k = kernels_for(p);
    if (k.split == nullptr) return cudaErrorNotSupported;
    cudaError_t e = raise_smem_limit(k.split, k.smem);
    if (e != cudaSuccess) return e;
    k.split<<<dim3(p.n_splits, p.G, p.B), k.threads, k.smem, stream>>>(p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    k.combine<<<dim3(p.H, p.B), p.dh, 0, stream>>>(p);
    return cudaGetLastError();
}

}  // extern "C"
