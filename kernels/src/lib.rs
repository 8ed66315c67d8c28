//! The C ABI of palu-rs's CUDA kernels (`src/*.cu`, compiled by `build.rs` with the `cuda`
//! feature). The templates live in `palu_decode.cuh` / `palu_decode_mma.cuh`; `palu_decode.cu`
//! is the thin dispatch layer these declarations bind. Safe wrappers (candle `CustomOp`s with a
//! CPU twin) are in the plugin, `palu::decode_op`.

use std::ffi::c_void;

/// Tokens per tile of the split kernels: splits over L are whole numbers of tiles.
pub const TILE: usize = 64;

/// Mirror of `palu::DecodeParams` (palu_decode.cuh): one decode step of Palu attention over a
/// latent cache. Pointers are device pointers; strides are in elements.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DecodeParams {
    /// `[B, H, dh]` f16 or bf16 (all 16-bit inputs share one type), RoPE already applied at the query's position.
    pub q: *const c_void,
    /// Key latents, f16: group `grp` of sequence `b` at token `t` starts at
    /// `hk + b·hk_sb + grp·hk_sg + t·ldk` and holds `rk` values.
    pub hk: *const c_void,
    /// Value latents, f16, strides `hv_sb`, `hv_sg`, `ldv`.
    pub hv: *const c_void,
    /// `[G, g·dh, rk]` f16: the key up-projections of the groups.
    pub bk: *const c_void,
    /// `[G, g·dh, rv]` f16.
    pub bv: *const c_void,
    /// `[B]` i32: tokens cached per sequence (1 ..= Lmax); token t sits at RoPE position t.
    pub lens: *const i32,
    /// `[dh/2]` f32: the model's RoPE frequencies (theta and scaling already applied).
    pub inv_freq: *const f32,
    /// Workspace of [`palu_decode_workspace`] floats.
    pub partial: *mut f32,
    /// `[B, H, dh]` f32.
    pub out: *mut f32,
    pub hk_sb: i64,
    pub hk_sg: i64,
    pub hv_sb: i64,
    pub hv_sg: i64,
    pub b: i32,
    pub h: i32,
    pub dh: i32,
    /// Low-rank groups per layer (`H_kv / g`).
    pub groups: i32,
    /// KV heads per group.
    pub g: i32,
    /// Query heads per KV head.
    pub n_rep: i32,
    pub lmax: i32,
    pub ldk: i32,
    pub ldv: i32,
    pub rk: i32,
    pub rv: i32,
    pub n_splits: i32,
    pub split_len: i32,
    /// 0: register pipeline (mma.sync; the fast one), 1: shared-memory pipeline (wmma, f16 only).
    pub variant: i32,
    /// 1: `q`, the latents and the factors are bf16; 0: f16.
    pub bf16: i32,
    /// 0: 16-bit latents. 2, 4 or 8: packed rows of `palu::latent_codec` (one quantization group
    /// per low-rank group); then `hk`/`hv` point at bytes and `hk_sb`, `hk_sg`, `ldk` (and the
    /// value strides) count bytes: a sequence, one group's codes, a row.
    pub bits: i32,
    /// Byte offset in a key row of group 0's f16 scale (group `grp`: `+ 2·grp`).
    pub k_scale_off: i32,
    /// Byte offset in a key row of group 0's i16 zero.
    pub k_zero_off: i32,
    pub v_scale_off: i32,
    pub v_zero_off: i32,
    /// 1: `out` is `[B, H, rv]`, the latent attention outputs before `B_v` (fused values).
    pub latent_out: i32,
    /// Paged latents: `[B, table_stride]` i32 block tables (the engine's, u32 reinterpreted);
    /// row `t` of sequence `b` is physical row `table[b][t / block_size]·block_size +
    /// t % block_size` of `hk`/`hv` (then `hk_sb = hv_sb = 0`). Null: row `t` is row `t`.
    pub block_table: *const i32,
    /// Tokens per block, a multiple of 16.
    pub block_size: i32,
    pub table_stride: i32,
    /// Set by the dispatch (leave 0): groups of `g > 1` heads without a joint instantiation run
    /// as `g` one-head "virtual" groups of the full rank reading the same latent.
    pub latent_share: i32,
}

#[cfg(feature = "cuda")]
extern "C" {
    /// Launches the split and combine kernels on `stream`; returns a `cudaError_t` (0: launched;
    /// 1 invalid value: misaligned strides or bad split plan; 801 not supported: a shape
    /// without an instantiation).
    pub fn palu_decode(p: DecodeParams, stream: *mut c_void) -> i32;
    /// Floats of `partial` a launch needs.
    pub fn palu_decode_workspace(
        b: i32,
        groups: i32,
        g: i32,
        n_rep: i32,
        n_splits: i32,
        rv_pad: i32,
    ) -> usize;
    /// 1 when an instantiation covers (head_dim, g, n_rep, r_k, r_v).
    pub fn palu_decode_supported(dh: i32, g: i32, n_rep: i32, rk: i32, rv: i32) -> i32;
    /// Padded rank of the instantiation that covers the shape (sizes the workspace); 0: none.
    pub fn palu_decode_rank_pad(dh: i32, g: i32, n_rep: i32, rk: i32, rv: i32) -> i32;
    /// 1 when a packed-latent instantiation covers the shape at `bits` (2, 4, 8).
    pub fn palu_decode_packed_supported(
        dh: i32,
        g: i32,
        n_rep: i32,
        rk: i32,
        rv: i32,
        bits: i32,
    ) -> i32;
    /// Splits over L for the shape in `shape` (batch, groups, g, n_rep, head_dim, ranks, bits,
    /// bf16, variant, lmax): one wave of the chosen split kernel's resident blocks
    /// (`target_blocks`, 0: the runtime's occupancy count on this device). Returns a
    /// `cudaError_t` (801: no kernel for the shape).
    pub fn palu_decode_plan_for(
        shape: *const DecodeParams,
        target_blocks: i32,
        n_splits: *mut i32,
        split_len: *mut i32,
    ) -> i32;
    /// Splits over L filling one wave of `target_blocks` resident blocks (0: three per SM).
    pub fn palu_decode_plan(
        b: i32,
        groups: i32,
        lmax: i32,
        target_blocks: i32,
        n_splits: *mut i32,
        split_len: *mut i32,
    );
}

/// Most quantization groups per latent row the codec kernels take (`kMaxCodecGroups`).
pub const MAX_CODEC_GROUPS: usize = 64;

/// Mirror of `palu::LatentLayout` (latent_codec.cu), passed by value: the row format of
/// `palu::latent_codec` (codes, then f16 scales, then i16 zeros, one per group).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LatentLayout {
    pub width: i32,
    pub bits: i32,
    pub n_groups: i32,
    /// 1: zero points clamped to `[0, 2^b − 1]` (the authors' quantizer).
    pub clamped_zero: i32,
    /// Group `g` spans channels `start[g] .. start[g + 1]`.
    pub start: [i32; MAX_CODEC_GROUPS + 1],
}

#[cfg(feature = "cuda")]
extern "C" {
    /// Quantize and pack `n_rows` f32 latent rows (`[n_rows, width]`, contiguous) into `rows`
    /// (`[n_rows, row_bytes]`). Returns a `cudaError_t` (801: a layout the kernel does not take).
    pub fn palu_latent_encode(
        x: *const f32,
        rows: *mut u8,
        n_rows: i64,
        layout: LatentLayout,
        stream: *mut c_void,
    ) -> i32;
    /// Project `x` `[n_rows, d]` onto `a` `[width, d]` (both f16 with `dtype` 1, bf16 with 2),
    /// round to that type, quantize and pack into `rows`, in one kernel (801: a layout it does
    /// not take, see `palu_latent_project_supported`).
    pub fn palu_latent_project_encode(
        x: *const c_void,
        a: *const c_void,
        rows: *mut u8,
        n_rows: i64,
        d: i32,
        layout: LatentLayout,
        dtype: i32,
        stream: *mut c_void,
    ) -> i32;
    /// 1 when the fused write takes the layout and reduction width `d`: every group on whole
    /// bytes (`start·bits % 8 == 0`), at most 512 wide, `d % 8 == 0`.
    pub fn palu_latent_project_supported(layout: LatentLayout, d: i32) -> i32;
    /// Unpack and dequantize `n_rows` packed rows into `[n_rows, width]` of `out_type`
    /// (0: f32, 1: f16, 2: bf16; rounded to nearest even from the f32 value, as candle does).
    pub fn palu_latent_decode(
        rows: *const u8,
        out: *mut c_void,
        n_rows: i64,
        layout: LatentLayout,
        out_type: i32,
        stream: *mut c_void,
    ) -> i32;
}

#[cfg(feature = "cuda")]
extern "C" {
    /// Copies `n` rows of `row_bytes` bytes: dst row `dst_idx[i]` (`i` when null) ← src row
    /// `src_idx[i]` (`i` when null); a negative index skips the row (the engine's padding
    /// slots). Strides in bytes. Returns a `cudaError_t`.
    #[allow(clippy::too_many_arguments)]
    pub fn palu_copy_rows(
        dst: *mut u8,
        dst_ld: i64,
        dst_idx: *const i64,
        src: *const u8,
        src_ld: i64,
        src_idx: *const i64,
        n: i64,
        row_bytes: i32,
        stream: *mut c_void,
    ) -> i32;
    /// [`palu_copy_rows`] with element types ([`RowType`]): `width` elements per row, converted
    /// element by element where the types differ (float types only; fp8 saturates to ±448).
    #[allow(clippy::too_many_arguments)]
    pub fn palu_convert_rows(
        dst: *mut u8,
        dst_ld: i64,
        dst_idx: *const i64,
        dst_type: i32,
        src: *const u8,
        src_ld: i64,
        src_idx: *const i64,
        src_type: i32,
        n: i64,
        width: i32,
        stream: *mut c_void,
    ) -> i32;
}

/// Element types of [`palu_convert_rows`] (`RowType` in paged_rows.cu).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowType {
    Bytes = 0,
    F32 = 1,
    F16 = 2,
    BF16 = 3,
    F8E4M3 = 4,
}

/// `cudaErrorNotSupported`: the shape has no instantiation (the caller falls back to candle ops).
pub const ERROR_NOT_SUPPORTED: i32 = 801;

/// Whether the decode kernel has an instantiation for this attention shape.
#[cfg(feature = "cuda")]
pub fn decode_supported(head_dim: usize, g: usize, n_rep: usize, rk: usize, rv: usize) -> bool {
    let i = |x: usize| i32::try_from(x).unwrap_or(i32::MAX);
    unsafe { palu_decode_supported(i(head_dim), i(g), i(n_rep), i(rk), i(rv)) == 1 }
}

/// Whether the decode kernel reads `bits`-bit packed latent rows of this shape directly
/// (dequantizing in shared memory) instead of needing them unpacked first.
#[cfg(feature = "cuda")]
pub fn decode_packed_supported(
    head_dim: usize,
    g: usize,
    n_rep: usize,
    rk: usize,
    rv: usize,
    bits: u8,
) -> bool {
    let i = |x: usize| i32::try_from(x).unwrap_or(i32::MAX);
    unsafe {
        palu_decode_packed_supported(i(head_dim), i(g), i(n_rep), i(rk), i(rv), bits as i32) == 1
    }
}
