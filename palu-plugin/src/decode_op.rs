//! One decode step of Palu attention over a latent cache, as a candle `CustomOp3` on
//! `(q, h_k, h_v)`: the CUDA path launches `palu_decode` (kernels/, `cuda` feature), the CPU path
//! is its twin and the reference the GPU is tested against.
//!
//! For query head `qh` of sequence `b`, KV head `kv = qh / n_rep` in group `grp = kv / g`
//! (`j = kv % g` within the group), with `L = lens[b]` cached tokens:
//!   K_t   = RoPE_t(B_k[grp][j] · h_k[b, t, grp])        t < L, token t at position t
//!   p     = softmax_t(q · K_t / √dh)
//!   out   = B_v[grp][j] · Σ_t p_t h_v[b, t, grp]         values attended in latent space
//! `q` is `[B, H, dh]` (RoPE applied at its position), `h_k` `[B, Lmax, G·r_k]`, `h_v`
//! `[B, Lmax, G·r_v]` (the model cache's layout; any row stride, so a narrowed view of a
//! pre-allocated cache works without a copy), `B_k` `[G, g·dh, r_k]`, `B_v` `[G, g·dh, r_v]`.
//! With packed latents ([`LatentDecode::with_packed`]) `h_k` / `h_v` are the cache's U8 rows
//! `[B, Lmax, row_bytes]` of [`LatentCodec`]; the kernel dequantizes them chunk by chunk in shared
//! memory, the CPU twin decodes them with the codec (both round the values to q's dtype first).
//! The result is `[B, H, dh]` f32. Biases are the caller's (`from_projections` declines a key
//! bias; a value bias passes through attention unchanged and is added by the caller).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::latent_codec::LatentCodec;
use crate::lowrank::LowRankProj;

/// Launches of the CUDA kernel in this process (tests check that a path really ran on it).
static CUDA_LAUNCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Of those, launches that read packed latent rows directly.
static CUDA_PACKED_LAUNCHES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Of those, launches that read the engine's paged blocks through block tables.
static CUDA_PAGED_LAUNCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many of [`cuda_launches`] read paged latent blocks in place (through block tables).
pub fn cuda_paged_launches() -> usize {
    CUDA_PAGED_LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
}

/// How many times this process launched the CUDA decode kernel (0 without the `cuda` feature).
pub fn cuda_launches() -> usize {
    CUDA_LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
}

/// The decode kernel variant the CUDA path asks for: `PALU_DECODE_VARIANT=3` selects the
/// experimental rebuild on Hopper's `wgmma` (sm_90a builds), `5` the experimental blocks of 8
/// warps (docs/kernels.md), anything else the register pipeline (0). Shapes or builds without
/// the variant fall back to 0. Read once.
#[cfg(feature = "cuda")]
fn requested_variant() -> i32 {
    static VARIANT: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *VARIANT.get_or_init(|| {
        let v = std::env::var("PALU_DECODE_VARIANT").unwrap_or_default();
        match v.trim() {
            "" | "0" => 0,
            "3" => 3,
            "5" => 5,
            other => {
                tracing::warn!(
                    "PALU_DECODE_VARIANT={other}: not a decode variant (0, 3 or 5); using 0"
                );
                0
            }
        }
    })
}

/// How many of [`cuda_launches`] read packed (2/4/8-bit) latent rows without unpacking them.
pub fn cuda_packed_launches() -> usize {
    CUDA_PACKED_LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Debug, Clone)]
pub struct LatentDecode {
    /// `[G, g·dh, r_k]`.
    pub bk: Tensor,
    /// `[G, g·dh, r_v]`.
    pub bv: Tensor,
    /// `[dh/2]` f32, the model's RoPE frequencies.
    pub inv_freq: Tensor,
    /// Tokens cached per sequence (1 ..= Lmax).
    pub lens: Vec<usize>,
    pub n_heads: usize,
    pub n_kv: usize,
    /// The codecs of packed K and V rows; `None`: 16-bit latents.
    pub packed: Option<(LatentCodec, LatentCodec)>,
    /// Return each query head's latent output `Σ_t p_t h_v` (`[B, H, r_v]`) without `B_v`: the
    /// caller has folded `B_v` into `o_proj` (the planner's fused values).
    pub latent_out: bool,
    /// Paged latents: `h_k` / `h_v` are the engine's per-layer block tensors and rows are found
    /// through these block tables ([`crate::paged`]). `None`: `[B, Lmax, row]` latents.
    pub pages: Option<Pages>,
}

/// The engine's block tables for one decode step.
#[derive(Debug, Clone)]
pub struct Pages {
    /// `[B, max_blocks]` u32 (the engine's `block_tables`), on the latents' device.
    pub tables: Tensor,
    /// Tokens per block.
    pub block_size: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Dims {
    b: usize,
    h: usize,
    dh: usize,
    groups: usize,
    g: usize,
    n_rep: usize,
    lmax: usize,
    rk: usize,
    rv: usize,
}

impl LatentDecode {
    /// The op for a layer's projections, or `None` where the kernel's function does not apply:
    /// unequal group ranks or a key bias (both rebuilt by the general path instead).
    pub fn from_projections(
        kp: &LowRankProj,
        vp: &LowRankProj,
        n_heads: usize,
        n_kv: usize,
        inv_freq: &[f32],
        dtype: DType,
    ) -> Result<Option<Self>> {
        let uniform = |p: &LowRankProj| p.ranks.windows(2).all(|w| w[0] == w[1]);
        if kp.bias.is_some() || !uniform(kp) || !uniform(vp) || kp.ranks.len() != vp.ranks.len() {
            return Ok(None);
        }
        let dev = kp.down.device();
        Ok(Some(Self {
            bk: Tensor::stack(&kp.ups, 0)?.to_dtype(dtype)?.contiguous()?,
            bv: Tensor::stack(&vp.ups, 0)?.to_dtype(dtype)?.contiguous()?,
            inv_freq: Tensor::new(inv_freq, dev)?,
            lens: Vec::new(),
            n_heads,
            n_kv,
            packed: None,
            latent_out: false,
            pages: None,
        }))
    }

    /// The same op reading packed rows of these codecs (one quantization group per low-rank
    /// group, as the serving cache writes them).
    pub fn with_packed(self, k: LatentCodec, v: LatentCodec) -> Self {
        Self {
            packed: Some((k, v)),
            ..self
        }
    }

    /// The same op returning the latent outputs before `B_v` (`[B, H, r_v]`).
    pub fn with_latent_out(self) -> Self {
        Self {
            latent_out: true,
            ..self
        }
    }

    /// The same op for a batch with `lens` cached tokens per sequence.
    pub fn with_lens(&self, lens: Vec<usize>) -> Self {
        Self {
            lens,
            ..self.clone()
        }
    }

    /// The same op over paged latents: `h_k` / `h_v` given to [`Self::forward`] are then the
    /// engine's block tensors of the layer, and sequence `b`'s rows are found through row `b`
    /// of `tables`.
    pub fn with_pages(&self, tables: Tensor, block_size: usize) -> Self {
        Self {
            pages: Some(Pages { tables, block_size }),
            ..self.clone()
        }
    }

    /// Runs the op: `[B, H, dh]` f32 (`[B, H, r_v]` with [`Self::with_latent_out`]).
    ///
    /// Paged latents go to the kernel through their block tables where it reads them (a CUDA
    /// device, blocks of a multiple of 16 tokens, rows in q's dtype or packed); otherwise the
    /// sequences' rows are gathered into `[B, Lmax, row]` first and the op runs on those. The
    /// gather is the CPU twin of the kernel's paged addressing, and the path of fp8 blocks.
    pub fn forward(&self, q: &Tensor, hk: &Tensor, hv: &Tensor) -> Result<Tensor> {
        match &self.pages {
            Some(pages) if !self.kernel_reads_pages(pages, q, hk, hv) => {
                let (hk, hv) = self.gather_pages(pages, q.dtype(), hk, hv)?;
                Self {
                    pages: None,
                    ..self.clone()
                }
                .forward(q, &hk, &hv)
            }
            _ => q.apply_op3_no_bwd(hk, hv, self),
        }
    }

    fn kernel_reads_pages(&self, pages: &Pages, q: &Tensor, hk: &Tensor, hv: &Tensor) -> bool {
        q.device().is_cuda()
            && pages.block_size.is_multiple_of(16)
            && (self.packed.is_some() || (hk.dtype() == q.dtype() && hv.dtype() == q.dtype()))
    }

    /// `[B, Lmax, row]` latents of the sequences (16-bit rows in `dtype`, packed rows as U8)
    /// read from the pools through the block tables; rows past a sequence's length repeat its
    /// first row (never attended).
    fn gather_pages(
        &self,
        pages: &Pages,
        dtype: DType,
        hk: &Tensor,
        hv: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let lmax = self.lens.iter().copied().max().unwrap_or(0);
        let tables = pages
            .tables
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::U32)?;
        let (b, _) = tables.dims2()?;
        if b != self.lens.len() {
            candle_core::bail!(
                "palu decode: {b} block tables for {} sequences",
                self.lens.len()
            )
        }
        let tables = tables.to_vec2::<u32>()?;
        let mut idx = Vec::with_capacity(b * lmax);
        for (table, &len) in tables.iter().zip(&self.lens) {
            let rows = crate::paged::sequence_rows(table, pages.block_size, len)?;
            idx.extend((0..lmax).map(|t| rows[t.min(len - 1).min(rows.len() - 1)]));
        }
        let idx = Tensor::from_vec(idx, b * lmax, hk.device())?;
        let (gk, gv) = (self.bk.dim(0)?, self.bv.dim(0)?);
        let (rk, rv) = (self.bk.dim(2)?, self.bv.dim(2)?);
        let read = |pool: &Tensor, codec: Option<&LatentCodec>, width: usize| match codec {
            Some(c) => crate::paged::read_rows(pool, &idx, c.row_bytes(), DType::U8),
            None => crate::paged::read_rows(pool, &idx, width, dtype),
        };
        let k = read(hk, self.packed.as_ref().map(|c| &c.0), gk * rk)?;
        let v = read(hv, self.packed.as_ref().map(|c| &c.1), gv * rv)?;
        Ok((k.reshape((b, lmax, ()))?, v.reshape((b, lmax, ()))?))
    }

    /// `latent`: the latents' dtype (paged pools are views of bytes).
    fn dims(&self, ql: &Layout, hkl: &Layout, hvl: &Layout, latent: DType) -> Result<Dims> {
        let (b, h, dh) = ql.shape().dims3()?;
        let (bk_groups, gdh, rk) = self.bk.dims3()?;
        let (bv_groups, gdh_v, rv) = self.bv.dims3()?;
        let fail = |what: String| Err(candle_core::Error::Msg(format!("palu decode: {what}")));
        // Paged: every sequence reads the shared pools; rows per element of their dtype.
        let (hb, lmax, rk_all, vb, vlmax, rv_all) = match &self.pages {
            None => {
                let (hb, lmax, rk_all) = hkl.shape().dims3()?;
                let (vb, vlmax, rv_all) = hvl.shape().dims3()?;
                (hb, lmax, rk_all, vb, vlmax, rv_all)
            }
            Some(pages) => {
                let (pk, pv) = (
                    crate::paged::pool_rows_of(hkl, latent)?,
                    crate::paged::pool_rows_of(hvl, latent)?,
                );
                let per = if self.packed.is_some() {
                    1
                } else {
                    latent.size_in_bytes()
                };
                let (tb, cols) = pages.tables.dims2()?;
                if pk.block_size != pages.block_size || pv.block_size != pages.block_size {
                    return fail(format!(
                        "block tensors of {} / {} tokens per block, tables of {}",
                        pk.block_size, pv.block_size, pages.block_size
                    ));
                }
                let lmax = self.lens.iter().copied().max().unwrap_or(0);
                if lmax > cols * pages.block_size {
                    return fail(format!(
                        "{lmax} tokens do not fit block tables of {cols} blocks of {}",
                        pages.block_size
                    ));
                }
                let (want_k, want_v) = match &self.packed {
                    Some((ck, cv)) => (ck.row_bytes(), cv.row_bytes()),
                    None => (bk_groups * rk, bv_groups * rv),
                };
                if pk.ld / per < want_k || pv.ld / per < want_v {
                    return fail(format!(
                        "paged rows of {} / {} bytes cannot hold latent rows of {want_k} / {want_v}",
                        pk.ld, pv.ld
                    ));
                }
                (tb, lmax, want_k, tb, lmax, want_v)
            }
        };
        if h != self.n_heads || self.n_kv == 0 || h % self.n_kv != 0 {
            return fail(format!(
                "q has {h} heads, the op {} over {} KV heads",
                self.n_heads, self.n_kv
            ));
        }
        if bk_groups != bv_groups
            || gdh != gdh_v
            || bk_groups == 0
            || !self.n_kv.is_multiple_of(bk_groups)
        {
            return fail(format!(
                "B_k {:?} and B_v {:?} do not describe groups of {} KV heads",
                self.bk.dims(),
                self.bv.dims(),
                self.n_kv
            ));
        }
        let g = self.n_kv / bk_groups;
        if gdh != g * dh || self.inv_freq.dims1()? * 2 != dh {
            return fail(format!(
                "B rows {gdh} and RoPE frequencies {} do not match head_dim {dh}",
                self.inv_freq.dims1()?
            ));
        }
        let (want_k, want_v) = match &self.packed {
            Some((ck, cv)) => {
                if ck.width() != bk_groups * rk || cv.width() != bk_groups * rv {
                    return fail(format!(
                        "codecs of widths {}/{} for ranks {rk}/{rv} over {bk_groups} groups",
                        ck.width(),
                        cv.width()
                    ));
                }
                (ck.row_bytes(), cv.row_bytes())
            }
            None => (bk_groups * rk, bk_groups * rv),
        };
        if hb != b || vb != b || vlmax != lmax || rk_all != want_k || rv_all != want_v {
            return fail(format!(
                "latents {:?} / {:?} do not match q {:?} and ranks {rk}/{rv} over {bk_groups} groups",
                hkl.dims(),
                hvl.dims(),
                ql.dims()
            ));
        }
        if self.lens.len() != b || self.lens.iter().any(|&l| l == 0 || l > lmax) {
            return fail(format!(
                "lengths {:?} for {b} sequences of at most {lmax} tokens",
                self.lens
            ));
        }
        Ok(Dims {
            b,
            h,
            dh,
            groups: bk_groups,
            g,
            n_rep: h / self.n_kv,
            lmax,
            rk,
            rv,
        })
    }
}

/// Row-major element offsets of a 3-d layout whose last dimension is contiguous.
fn strides3(l: &Layout, what: &str) -> Result<[usize; 3]> {
    let s = l.stride();
    if s.len() != 3 || (s[2] != 1 && l.dims()[2] > 1) {
        candle_core::bail!("palu decode: {what} needs contiguous rows, got strides {s:?}")
    }
    Ok([s[0], s[1], 1])
}

fn to_f32(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    // The buffer from the layout's start: the layout's strides index into it.
    let start = l.start_offset();
    Ok(match s {
        CpuStorage::F32(v) => v[start..].to_vec(),
        CpuStorage::F16(v) => v[start..].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::BF16(v) => v[start..].iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!("palu decode: unsupported dtype {:?}", other.dtype()),
    })
}

fn tensor_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl CustomOp3 for LatentDecode {
    fn name(&self) -> &'static str {
        "palu-latent-decode"
    }

    /// The reference: f32 accumulation, angles in f64, one query head at a time.
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        hks: &CpuStorage,
        hkl: &Layout,
        hvs: &CpuStorage,
        hvl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.pages.is_some() {
            candle_core::bail!("palu decode: paged latents on the CPU are read by `forward`")
        }
        let d = self.dims(ql, hkl, hvl, hks.dtype())?;
        let [qsb, qsh, _] = strides3(ql, "q")?;
        let [mut ksb, mut kst, _] = strides3(hkl, "h_k")?;
        let [mut vsb, mut vst, _] = strides3(hvl, "h_v")?;
        let q = to_f32(qs, ql)?;
        let (hk, hv) = match &self.packed {
            None => (to_f32(hks, hkl)?, to_f32(hvs, hvl)?),
            Some((ck, cv)) => {
                // Decoded rows, rounded to q's dtype as the kernel's tiles (and the unpack
                // path) hold them; then the same reference on a contiguous [B, Lmax, width].
                let unpack = |s: &CpuStorage, l: &Layout, c: &LatentCodec, sb: usize, st: usize| {
                    let CpuStorage::U8(bytes) = s else {
                        candle_core::bail!("palu decode: packed latents must be U8 rows")
                    };
                    let bytes = &bytes[l.start_offset()..];
                    let w = c.width();
                    let mut out = vec![0f32; d.b * d.lmax * w];
                    for b in 0..d.b {
                        for t in 0..self.lens[b] {
                            let row = &bytes[b * sb + t * st..][..c.row_bytes()];
                            c.decode_row(row, &mut out[(b * d.lmax + t) * w..][..w]);
                        }
                    }
                    let round = |x: f32| match qs.dtype() {
                        DType::F16 => half::f16::from_f32(x).to_f32(),
                        DType::BF16 => half::bf16::from_f32(x).to_f32(),
                        _ => x,
                    };
                    out.iter_mut().for_each(|x| *x = round(*x));
                    Ok(out)
                };
                let hk = unpack(hks, hkl, ck, ksb, kst)?;
                let hv = unpack(hvs, hvl, cv, vsb, vst)?;
                (ksb, kst, vsb, vst) = (
                    d.lmax * ck.width(),
                    ck.width(),
                    d.lmax * cv.width(),
                    cv.width(),
                );
                (hk, hv)
            }
        };
        let (bk, bv, inv) = (
            tensor_f32(&self.bk)?,
            tensor_f32(&self.bv)?,
            tensor_f32(&self.inv_freq)?,
        );
        let (dh, half) = (d.dh, d.dh / 2);
        let scale = 1.0 / (dh as f32).sqrt();
        let width = if self.latent_out { d.rv } else { dh };
        let mut out = vec![0f32; d.b * d.h * width];
        let mut k = vec![0f32; dh];
        let mut scores = vec![0f32; d.lmax];
        let mut acc = vec![0f32; d.rv];
        for b in 0..d.b {
            let len = self.lens[b];
            for qh in 0..d.h {
                let kv = qh / d.n_rep;
                let (grp, j) = (kv / d.g, kv % d.g);
                let qrow = &q[b * qsb + qh * qsh..][..dh];
                let bk_j = &bk[(grp * d.g + j) * dh * d.rk..][..dh * d.rk];
                let bv_j = &bv[(grp * d.g + j) * dh * d.rv..][..dh * d.rv];
                let mut max = f32::NEG_INFINITY;
                for t in 0..len {
                    let h = &hk[b * ksb + t * kst + grp * d.rk..][..d.rk];
                    for (kd, row) in k.iter_mut().zip(bk_j.chunks_exact(d.rk)) {
                        *kd = row.iter().zip(h).map(|(a, b)| a * b).sum();
                    }
                    let mut s = 0f32;
                    for i in 0..half {
                        let (sn, cs) = (t as f64 * inv[i] as f64).sin_cos();
                        let (sn, cs) = (sn as f32, cs as f32);
                        let (k1, k2) = (k[i], k[i + half]);
                        s += qrow[i] * (k1 * cs - k2 * sn) + qrow[i + half] * (k2 * cs + k1 * sn);
                    }
                    scores[t] = s * scale;
                    max = max.max(scores[t]);
                }
                acc.iter_mut().for_each(|a| *a = 0.0);
                let mut sum = 0f32;
                for (t, &s) in scores[..len].iter().enumerate() {
                    let p = (s - max).exp();
                    sum += p;
                    let h = &hv[b * vsb + t * vst + grp * d.rv..][..d.rv];
                    acc.iter_mut().zip(h).for_each(|(a, x)| *a += p * x);
                }
                let o = &mut out[(b * d.h + qh) * width..][..width];
                if self.latent_out {
                    o.iter_mut().zip(&acc).for_each(|(od, a)| *od = a / sum);
                    continue;
                }
                for (od, row) in o.iter_mut().zip(bv_j.chunks_exact(d.rv)) {
                    *od = row.iter().zip(&acc).map(|(a, b)| a * b).sum::<f32>() / sum;
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((d.b, d.h, width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        hks: &candle_core::CudaStorage,
        hkl: &Layout,
        hvs: &candle_core::CudaStorage,
        hvl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, qs, ql, hks, hkl, hvs, hvl)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CudaStorage, Storage};
    use half::{bf16, f16};
    use palu_kernels as k;

    /// The CUDA slice of a contiguous weight tensor of element `T`.
    fn weight<'a, T: CudaDType>(
        s: &'a Storage,
        t: &Tensor,
        what: &str,
    ) -> Result<&'a CudaSlice<T>> {
        match s {
            Storage::Cuda(c) if t.is_contiguous() => c.as_cuda_slice::<T>(),
            _ => candle_core::bail!("palu decode: {what} must be a contiguous CUDA tensor"),
        }
    }

    /// f16 or bf16: every 16-bit input (q, latents, factors) must share the type.
    pub(super) fn forward(
        op: &LatentDecode,
        qs: &CudaStorage,
        ql: &Layout,
        hks: &CudaStorage,
        hkl: &Layout,
        hvs: &CudaStorage,
        hvl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dt = qs.dtype();
        let latent = match (&op.packed, &op.pages) {
            // Paged packed rows: bytes of the engine's blocks, whatever their dtype.
            (Some(_), Some(_)) => hks.dtype(),
            (Some(_), None) => DType::U8,
            (None, _) => dt,
        };
        let all = [hks.dtype(), hvs.dtype(), op.bk.dtype(), op.bv.dtype()];
        if all != [latent, latent, dt, dt] {
            candle_core::bail!(
                "palu decode: q is {dt:?}; latents must be {latent:?} and factors {dt:?}, got {all:?}"
            )
        }
        match dt {
            DType::F16 => forward_typed::<f16>(op, qs, ql, hks, hkl, hvs, hvl, 0),
            DType::BF16 => forward_typed::<bf16>(op, qs, ql, hks, hkl, hvs, hvl, 1),
            other => {
                candle_core::bail!("palu decode: the CUDA kernel reads f16 or bf16, got {other:?}")
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_typed<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        op: &LatentDecode,
        qs: &CudaStorage,
        ql: &Layout,
        hks: &CudaStorage,
        hkl: &Layout,
        hvs: &CudaStorage,
        hvl: &Layout,
        is_bf16: i32,
    ) -> Result<(CudaStorage, Shape)> {
        let d = op.dims(ql, hkl, hvl, hks.dtype())?;
        if !ql.is_contiguous() {
            candle_core::bail!("palu decode: q must be contiguous")
        }
        // Strides count elements of T, or bytes for packed rows. Paged: one shared pool.
        let (ksb, kst, vsb, vst) = match &op.pages {
            None => {
                let [ksb, kst, _] = strides3(hkl, "h_k")?;
                let [vsb, vst, _] = strides3(hvl, "h_v")?;
                (ksb, kst, vsb, vst)
            }
            Some(_) => {
                let per = if op.packed.is_some() {
                    1
                } else {
                    hks.dtype().size_in_bytes()
                };
                let pk = crate::paged::pool_rows_of(hkl, hks.dtype())?;
                let pv = crate::paged::pool_rows_of(hvl, hvs.dtype())?;
                (0, pk.ld / per, 0, pv.ld / per)
            }
        };
        let dev = qs.device.clone();
        let stream = dev.cuda_stream();
        let (bk_s, bk_l) = op.bk.storage_and_layout();
        let (bv_s, bv_l) = op.bv.storage_and_layout();
        let bk = weight::<T>(&bk_s, &op.bk, "B_k")?.slice(bk_l.start_offset()..);
        let bv = weight::<T>(&bv_s, &op.bv, "B_v")?.slice(bv_l.start_offset()..);
        let inv = op.inv_freq.to_dtype(DType::F32)?.contiguous()?;
        let (inv_s, inv_l) = inv.storage_and_layout();
        let Storage::Cuda(inv_c) = &*inv_s else {
            candle_core::bail!("palu decode: RoPE frequencies must be on the GPU")
        };
        let lens: Vec<i32> = op.lens.iter().map(|&l| l as i32).collect();
        let lens = dev.clone_htod(&lens)?;

        let rv_pad = unsafe {
            k::palu_decode_rank_pad(
                d.dh as i32,
                d.g as i32,
                d.n_rep as i32,
                d.rk as i32,
                d.rv as i32,
            )
        };
        if rv_pad == 0 {
            candle_core::bail!(
                "palu decode: no kernel for g={} r_k={} r_v={} (see kernels/README.md)",
                d.g,
                d.rk,
                d.rv
            )
        }
        let width = if op.latent_out { d.rv } else { d.dh };
        let mut out = unsafe { dev.alloc::<f32>(d.b * d.h * width) }?;

        let q = qs.as_cuda_slice::<T>()?.slice(ql.start_offset()..);
        let inv_f = inv_c.as_cuda_slice::<f32>()?.slice(inv_l.start_offset()..);
        let (q_p, _g1) = q.device_ptr(&stream);
        // Latents: T elements, or packed rows (then every stride below counts bytes).
        let packed = op.packed.is_some();
        let (hk_p, _g2) = crate::paged::cuda::bytes_ptr(hks, hkl.start_offset(), &stream)?;
        let (hv_p, _g3) = crate::paged::cuda::bytes_ptr(hvs, hvl.start_offset(), &stream)?;
        let tables = match &op.pages {
            Some(pages) => Some((
                pages.tables.to_dtype(DType::U32)?.contiguous()?,
                pages.block_size,
            )),
            None => None,
        };
        let table_guard = tables.as_ref().map(|(t, _)| t.storage_and_layout());
        let (table_p, _g10, block_size, table_stride) = match (&table_guard, &tables) {
            (Some((ts, tl)), Some((t, bs))) => {
                let Storage::Cuda(ts) = &**ts else {
                    candle_core::bail!("palu decode: block tables must be on the GPU")
                };
                let (p, g) = crate::paged::cuda::bytes_ptr(ts, tl.start_offset(), &stream)?;
                (p, Some(g), *bs as i32, t.dim(1)? as i32)
            }
            _ => (0, None, 0, 0),
        };
        // Packed rows: bits, one group's code bytes, and where group 0's scale and zero sit.
        let (bits, k_sg, v_sg, k_sc, k_z, v_sc, v_z) = match &op.packed {
            None => (0, d.rk, d.rv, 0, 0, 0, 0),
            Some((ck, cv)) => {
                let bits = ck.bits() as usize;
                (
                    bits,
                    d.rk * bits / 8,
                    d.rv * bits / 8,
                    ck.code_bytes(),
                    ck.code_bytes() + 2 * ck.n_groups(),
                    cv.code_bytes(),
                    cv.code_bytes() + 2 * cv.n_groups(),
                )
            }
        };
        let (bk_p, _g4) = bk.device_ptr(&stream);
        let (bv_p, _g5) = bv.device_ptr(&stream);
        let (inv_p, _g6) = inv_f.device_ptr(&stream);
        let (lens_p, _g7) = lens.device_ptr(&stream);
        let (out_p, _g9) = out.device_ptr_mut(&stream);
        let mut p = k::DecodeParams {
            q: q_p as _,
            hk: hk_p as _,
            hv: hv_p as _,
            bk: bk_p as _,
            bv: bv_p as _,
            lens: lens_p as _,
            inv_freq: inv_p as _,
            partial: std::ptr::null_mut(),
            out: out_p as _,
            hk_sb: ksb as i64,
            hk_sg: k_sg as i64,
            hv_sb: vsb as i64,
            hv_sg: v_sg as i64,
            b: d.b as i32,
            h: d.h as i32,
            dh: d.dh as i32,
            groups: d.groups as i32,
            g: d.g as i32,
            n_rep: d.n_rep as i32,
            lmax: d.lmax as i32,
            ldk: kst as i32,
            ldv: vst as i32,
            rk: d.rk as i32,
            rv: d.rv as i32,
            n_splits: 0,
            split_len: 0,
            variant: requested_variant(),
            bf16: is_bf16,
            bits: bits as i32,
            k_scale_off: k_sc as i32,
            k_zero_off: k_z as i32,
            v_scale_off: v_sc as i32,
            v_zero_off: v_z as i32,
            latent_out: op.latent_out as i32,
            block_table: table_p as _,
            block_size,
            table_stride,
            latent_share: 0,
        };
        // Splits over L for this shape's kernel (its resident blocks per SM), then the
        // workspace of their partials.
        let (mut n_splits, mut split_len) = (0i32, 0i32);
        let mut planned = unsafe { k::palu_decode_plan_for(&p, 0, &mut n_splits, &mut split_len) };
        if planned != 0 && p.variant != 0 {
            // The requested variant has no kernel for this shape or build: the default one.
            p.variant = 0;
            planned = unsafe { k::palu_decode_plan_for(&p, 0, &mut n_splits, &mut split_len) };
        }
        if planned != 0 {
            candle_core::bail!(
                "palu decode: no kernel for dh={} g={} n_rep={} r_k={} r_v={} bits={bits} (cudaError {planned})",
                d.dh,
                d.g,
                d.n_rep,
                d.rk,
                d.rv
            )
        }
        let ws = unsafe {
            k::palu_decode_workspace(
                d.b as i32,
                d.groups as i32,
                d.g as i32,
                d.n_rep as i32,
                n_splits,
                rv_pad,
            )
        };
        let mut partial = unsafe { dev.alloc::<f32>(ws) }?;
        let (part_p, _g8) = partial.device_ptr_mut(&stream);
        p.partial = part_p as _;
        p.n_splits = n_splits;
        p.split_len = split_len;
        let err = unsafe { k::palu_decode(p, stream.cu_stream() as _) };
        match err {
            0 => {
                CUDA_LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if packed {
                    CUDA_PACKED_LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if op.pages.is_some() {
                    CUDA_PAGED_LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            k::ERROR_NOT_SUPPORTED => candle_core::bail!(
                "palu decode: no kernel for dh={} g={} n_rep={} r_k={} r_v={} bits={bits}",
                d.dh, d.g, d.n_rep, d.rk, d.rv
            ),
            e => candle_core::bail!(
                "palu decode: launch failed (cudaError {e}); latent rows must be 16-byte aligned (ranks and row strides multiples of 8)"
            ),
        }
        drop((_g8, _g9, _g10));
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((d.b, d.h, width)),
        ))
    }
}
