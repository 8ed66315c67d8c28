//! Packed low-bit latents: what a Palu KV cache really stores when `latent_bits < 16`.
//!
//! One token's latent of width `R` becomes one byte row:
//!
//! ```text
//! [ codes: ⌈R·b/8⌉ bytes, little-endian bit stream | scale: f16 × G | zero: i16 × G ]
//! ```
//!
//! with `G` quantization groups (one per low-rank group, as [`crate::quant::fake_quant`] uses).
//! The quantizer is [`crate::quant::quantize_group`] (asymmetric, per token and group); the
//! scale is stored in f16 and the integer zero point in i16, so `x̂ = (q − zero) · scale` differs
//! from the simulated path only by the f16 rounding of the scale (relative 2⁻¹¹).
//!
//! Rows are opaque to the engine: its cache appends, clones and concatenates them along the
//! sequence axis like any other tensor. Decoding is a [`candle_core::CustomOp1`] so the CUDA
//! twin can slot in beside the CPU reference.
use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::f16;

use crate::quant::{self, GroupParams, ZeroPoint};

/// Most new tokens per step that [`LatentCodec::project_encode`] writes with the fused kernel.
pub const FUSED_WRITE_MAX_ROWS: usize = 64;

/// Fused latent writes (projection + encoding in one CUDA kernel) launched by this process.
static CUDA_FUSED_WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many times this process wrote new tokens' packed latents with the fused CUDA kernel.
pub fn cuda_fused_writes() -> usize {
    CUDA_FUSED_WRITES.load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Debug, Clone, PartialEq)]
pub struct LatentCodec {
    bits: u8,
    width: usize,
    groups: Vec<Range<usize>>,
    zero_point: ZeroPoint,
}

impl LatentCodec {
    /// A codec for latents whose low-rank groups have widths `group_widths`.
    pub fn new(
        bits: u8,
        group_widths: &[usize],
        zero_point: ZeroPoint,
    ) -> std::result::Result<Self, crate::PaluError> {
        quant::check_bits(bits)?;
        if bits >= 16 {
            return Err(crate::PaluError::arg(
                "latent_bits",
                bits,
                "a packed latent codec needs 2, 3, 4 or 8 bits",
            ));
        }
        Ok(LatentCodec {
            bits,
            width: group_widths.iter().sum(),
            groups: quant::group_ranges(group_widths, None),
            zero_point,
        })
    }

    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Latent width `R`.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Bytes of a row's codes (the scales and zeros follow them).
    pub fn code_bytes(&self) -> usize {
        (self.width * self.bits as usize).div_ceil(8)
    }

    /// Quantization groups per row (one per low-rank group).
    pub fn n_groups(&self) -> usize {
        self.groups.len()
    }

    /// Bytes of one encoded token (codes, scales and zeros).
    pub fn row_bytes(&self) -> usize {
        self.code_bytes() + 4 * self.groups.len()
    }

    /// Encode one latent row into `out` (`row_bytes()` long).
    pub fn encode_row(&self, x: &[f32], out: &mut [u8]) {
        let mut codes = vec![0u8; self.width];
        let nc = self.code_bytes();
        let g = self.groups.len();
        for (i, r) in self.groups.iter().enumerate() {
            let p = quant::quantize_group(
                &x[r.clone()],
                self.bits,
                self.zero_point,
                &mut codes[r.clone()],
            );
            let zero = p.zero.clamp(i16::MIN as f32, i16::MAX as f32) as i16;
            out[nc + 2 * i..nc + 2 * i + 2].copy_from_slice(&f16::from_f32(p.scale).to_le_bytes());
            out[nc + 2 * g + 2 * i..nc + 2 * g + 2 * i + 2].copy_from_slice(&zero.to_le_bytes());
        }
        out[..nc].copy_from_slice(&quant::pack(&codes, self.bits));
    }

    /// Decode one row into `out` (`width()` long).
    pub fn decode_row(&self, row: &[u8], out: &mut [f32]) {
        let nc = self.code_bytes();
        let g = self.groups.len();
        let codes = quant::unpack(&row[..nc], self.bits, self.width);
        for (i, r) in self.groups.iter().enumerate() {
            let scale = f16::from_le_bytes([row[nc + 2 * i], row[nc + 2 * i + 1]]).to_f32();
            let zero =
                i16::from_le_bytes([row[nc + 2 * g + 2 * i], row[nc + 2 * g + 2 * i + 1]]) as f32;
            quant::dequantize_group(
                &codes[r.clone()],
                GroupParams { scale, zero },
                &mut out[r.clone()],
            );
        }
    }

    /// `[.., R]` floats to `[.., row_bytes]` u8 rows, on the tensor's device.
    pub fn encode(&self, h: &Tensor) -> Result<Tensor> {
        let dims = h.dims().to_vec();
        if dims.last() != Some(&self.width) {
            candle_core::bail!(
                "palu latent codec: expected latents of width {}, got shape {:?}",
                self.width,
                dims
            )
        }
        let x = h.to_dtype(DType::F32)?.contiguous()?;
        if !x.device().is_cpu() && self.groups.len() > palu_kernels::MAX_CODEC_GROUPS {
            // More groups than the kernels take: through the CPU reference (correct, slow).
            return self
                .encode(&x.to_device(&candle_core::Device::Cpu)?)?
                .to_device(x.device());
        }
        x.apply_op1_no_bwd(&Encoder(self))
    }

    /// `[.., row_bytes]` u8 rows to `[.., R]` latents of `dtype`, on the rows' device.
    pub fn decode(&self, rows: &Tensor, dtype: DType) -> Result<Tensor> {
        let rb = self.row_bytes();
        if rows.dims().last() != Some(&rb) {
            candle_core::bail!(
                "palu latent decode: rows of {rb} bytes expected, got shape {:?}",
                rows.dims()
            )
        }
        let rows = rows.contiguous()?;
        if !rows.device().is_cpu() && self.groups.len() > palu_kernels::MAX_CODEC_GROUPS {
            // More groups than the kernels take: through the CPU reference (correct, slow).
            return self
                .decode(&rows.to_device(&candle_core::Device::Cpu)?, DType::F32)?
                .to_device(rows.device())?
                .to_dtype(dtype);
        }
        // CPU: f32 from the reference, then rounded; CUDA: the kernel writes `dtype` directly.
        rows.apply_op1_no_bwd(&Decoder(self, dtype))?
            .to_dtype(dtype)
    }

    /// The latent write of new tokens: `x` `[.., d]` projected onto the down factor `down`
    /// `[R, d]`, rounded to `x`'s dtype, then encoded: exactly `encode(linear(x, down))`. On a
    /// CUDA device with f16/bf16 inputs and a layout the fused kernel takes (groups on whole
    /// bytes, ≤ 512 wide) and decode-sized inputs this is one kernel
    /// (`palu_latent_project_encode`); elsewhere the GEMM and the encoder.
    pub fn project_encode(&self, x: &Tensor, down: &Tensor) -> Result<Tensor> {
        if self.fused_write_supported(x, down) {
            return self.project_encode_op(x, down);
        }
        self.encode(&crate::lowrank::linear(x, down, None)?)
    }

    /// [`Self::project_encode`] as the fused op on any device: the CUDA kernel, or its CPU twin
    /// (per-row loops; the reference the kernel is tested against).
    pub fn project_encode_op(&self, x: &Tensor, down: &Tensor) -> Result<Tensor> {
        if down.dims() != [self.width, *x.dims().last().unwrap_or(&0)] {
            candle_core::bail!(
                "palu latent write: down factor {:?} does not map inputs {:?} to width {}",
                down.dims(),
                x.dims(),
                self.width
            )
        }
        x.contiguous()?
            .apply_op2_no_bwd(&down.contiguous()?, &ProjectEncoder(self))
    }

    /// Whether [`Self::project_encode`] runs as one fused kernel for these inputs: decode-sized
    /// inputs (at most [`FUSED_WRITE_MAX_ROWS`] tokens; a prompt's rows go through the GEMM,
    /// which is faster there) on a CUDA device, with a layout the kernel takes.
    pub fn fused_write_supported(&self, x: &Tensor, down: &Tensor) -> bool {
        #[cfg(feature = "cuda")]
        {
            let d = down.dim(1).unwrap_or(0);
            let rows = x.elem_count() / d.max(1);
            let ok = x.device().is_cuda()
                && rows <= FUSED_WRITE_MAX_ROWS
                && matches!(x.dtype(), DType::F16 | DType::BF16)
                && down.dtype() == x.dtype()
                && down.dim(0).ok() == Some(self.width)
                && x.dims().last() == Some(&d);
            if let (true, Some(layout)) = (ok, self.kernel_layout()) {
                return unsafe { palu_kernels::palu_latent_project_supported(layout, d as i32) }
                    == 1;
            }
        }
        let _ = (x, down);
        false
    }

    /// The row format as the CUDA kernels take it; `None` with more groups than they handle.
    pub fn kernel_layout(&self) -> Option<palu_kernels::LatentLayout> {
        if self.groups.len() > palu_kernels::MAX_CODEC_GROUPS {
            return None;
        }
        let mut start = [0i32; palu_kernels::MAX_CODEC_GROUPS + 1];
        for (i, r) in self.groups.iter().enumerate() {
            start[i] = r.start as i32;
            start[i + 1] = r.end as i32;
        }
        Some(palu_kernels::LatentLayout {
            width: self.width as i32,
            bits: self.bits as i32,
            n_groups: self.groups.len() as i32,
            clamped_zero: matches!(self.zero_point, ZeroPoint::Clamped) as i32,
            start,
        })
    }
}

/// `dims` with the last (row) dimension replaced by `n`: rows of floats <-> rows of bytes.
fn with_last(dims: &[usize], n: usize) -> Shape {
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rows have a last dimension") = n;
    Shape::from(shape)
}

/// Encoding as a candle op: the CPU reference ([`LatentCodec::encode_row`]) and its CUDA twin
/// (`palu_latent_encode`, kernels/src/latent_codec.cu), bit-exact to each other.
struct Encoder<'a>(&'a LatentCodec);

impl CustomOp1 for Encoder<'_> {
    fn name(&self) -> &'static str {
        "palu-latent-encode"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = self.0;
        let CpuStorage::F32(x) = storage else {
            candle_core::bail!("palu latent encode expects f32 latents")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("palu latent encode expects contiguous latents")
        };
        let rb = c.row_bytes();
        let src = &x[start..end];
        let mut out = vec![0u8; src.len() / c.width * rb];
        for (x, o) in src.chunks(c.width).zip(out.chunks_mut(rb)) {
            c.encode_row(x, o);
        }
        Ok((CpuStorage::U8(out), with_last(layout.dims(), rb)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::encode(self.0, storage, layout)
    }
}

/// Projection and encoding in one op: the CPU twin computes each `h = x·Aᵀ` in f32, rounds it
/// to the inputs' dtype and encodes it with [`LatentCodec::encode_row`]; the CUDA path is one
/// kernel (`palu_latent_project_encode`, kernels/src/latent_codec.cu).
struct ProjectEncoder<'a>(&'a LatentCodec);

impl candle_core::CustomOp2 for ProjectEncoder<'_> {
    fn name(&self) -> &'static str {
        "palu-latent-project-encode"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = self.0;
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("palu latent write expects contiguous inputs")
        };
        let f32s = |s: &CpuStorage, r: std::ops::Range<usize>| -> Result<Vec<f32>> {
            Ok(match s {
                CpuStorage::F16(v) => v[r].iter().map(|x| x.to_f32()).collect(),
                CpuStorage::BF16(v) => v[r].iter().map(|x| x.to_f32()).collect(),
                CpuStorage::F32(v) => v[r].to_vec(),
                _ => candle_core::bail!("palu latent write expects float inputs"),
            })
        };
        let round = |v: f32| match xs {
            CpuStorage::F16(_) => f16::from_f32(v).to_f32(),
            CpuStorage::BF16(_) => half::bf16::from_f32(v).to_f32(),
            _ => v,
        };
        let (x, w) = (f32s(xs, x0..x1)?, f32s(ws, w0..w1)?);
        let d = *wl.dims().last().expect("[R, d]");
        let rb = c.row_bytes();
        let mut h = vec![0f32; c.width];
        let mut out = vec![0u8; x.len() / d * rb];
        for (xr, o) in x.chunks(d).zip(out.chunks_mut(rb)) {
            for (hj, wr) in h.iter_mut().zip(w.chunks(d)) {
                *hj = round(xr.iter().zip(wr).map(|(a, b)| a * b).sum());
            }
            c.encode_row(&h, o);
        }
        Ok((CpuStorage::U8(out), with_last(xl.dims(), rb)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::project_encode(self.0, xs, xl, ws, wl)
    }
}

/// Decoding as a candle op: the CPU reference ([`LatentCodec::decode_row`], f32 out) and its
/// CUDA twin (`palu_latent_decode`), which writes the requested float type directly.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the dtype is the CUDA path's
struct Decoder<'a>(&'a LatentCodec, DType);

impl CustomOp1 for Decoder<'_> {
    fn name(&self) -> &'static str {
        "palu-latent-decode"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = self.0;
        let CpuStorage::U8(bytes) = storage else {
            candle_core::bail!("palu latent decode expects u8 rows")
        };
        let rb = c.row_bytes();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("palu latent decode expects contiguous rows")
        };
        let src = &bytes[start..end];
        let mut out = vec![0f32; src.len() / rb * c.width];
        for (row, o) in src.chunks(rb).zip(out.chunks_mut(c.width)) {
            c.decode_row(row, o);
        }
        Ok((CpuStorage::F32(out), with_last(layout.dims(), c.width)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::decode(self.0, self.1, storage, layout)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{with_last, LatentCodec};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, DevicePtr, DevicePtrMut, DeviceRepr,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice};
    use candle_core::{CudaStorage, DType, Layout, Result, Shape};

    fn launched(what: &str, err: i32) -> Result<()> {
        match err {
            0 => Ok(()),
            e => candle_core::bail!("palu latent {what}: CUDA launch failed (cudaError {e})"),
        }
    }

    pub(super) fn encode(
        c: &LatentCodec,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let Some(layout) = c.kernel_layout() else {
            candle_core::bail!("palu latent encode: more groups than the CUDA kernel takes")
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("palu latent encode expects contiguous latents")
        };
        let n_rows = (end - start) / c.width();
        let dev = s.device.clone();
        let stream = dev.cuda_stream();
        let x = s.as_cuda_slice::<f32>()?.slice(start..end);
        let mut out = unsafe { dev.alloc::<u8>(n_rows * c.row_bytes()) }?;
        {
            let (x_p, _gx) = x.device_ptr(&stream);
            let (o_p, _go) = out.device_ptr_mut(&stream);
            let err = unsafe {
                palu_kernels::palu_latent_encode(
                    x_p as _,
                    o_p as _,
                    n_rows as i64,
                    layout,
                    stream.cu_stream() as _,
                )
            };
            launched("encode", err)?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            with_last(l.dims(), c.row_bytes()),
        ))
    }

    pub(super) fn project_encode(
        c: &LatentCodec,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let Some(layout) = c.kernel_layout() else {
            candle_core::bail!("palu latent write: more groups than the CUDA kernel takes")
        };
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("palu latent write expects contiguous inputs")
        };
        let d = *wl.dims().last().expect("[R, d]");
        let n_rows = (x1 - x0) / d;
        let dev = xs.device.clone();
        let stream = dev.cuda_stream();
        let mut out = unsafe { dev.alloc::<u8>(n_rows * c.row_bytes()) }?;
        let err = {
            let (o_p, _go) = out.device_ptr_mut(&stream);
            macro_rules! launch {
                ($t:ty, $code:expr) => {{
                    let x = xs.as_cuda_slice::<$t>()?.slice(x0..x1);
                    let w = ws.as_cuda_slice::<$t>()?.slice(w0..w1);
                    let (x_p, _gx) = x.device_ptr(&stream);
                    let (w_p, _gw) = w.device_ptr(&stream);
                    unsafe {
                        palu_kernels::palu_latent_project_encode(
                            x_p as _,
                            w_p as _,
                            o_p as _,
                            n_rows as i64,
                            d as i32,
                            layout,
                            $code,
                            stream.cu_stream() as _,
                        )
                    }
                }};
            }
            match candle_core::backend::BackendStorage::dtype(xs) {
                DType::F16 => launch!(half::f16, 1),
                DType::BF16 => launch!(half::bf16, 2),
                other => candle_core::bail!("palu latent write: f16 or bf16 inputs, got {other:?}"),
            }
        };
        launched("write", err)?;
        super::CUDA_FUSED_WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            with_last(xl.dims(), c.row_bytes()),
        ))
    }

    pub(super) fn decode(
        c: &LatentCodec,
        dtype: DType,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let Some(layout) = c.kernel_layout() else {
            candle_core::bail!("palu latent decode: more groups than the CUDA kernel takes")
        };
        let rb = c.row_bytes();
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("palu latent decode expects contiguous rows")
        };
        let n_rows = (end - start) / rb;
        let dev = s.device.clone();
        let rows = s.as_cuda_slice::<u8>()?.slice(start..end);
        let n = n_rows * c.width();
        let out = match dtype {
            DType::F16 => launch_decode::<half::f16>(layout, &dev, &rows, n_rows, n, 1)?,
            DType::BF16 => launch_decode::<half::bf16>(layout, &dev, &rows, n_rows, n, 2)?,
            _ => launch_decode::<f32>(layout, &dev, &rows, n_rows, n, 0)?,
        };
        Ok((out, with_last(l.dims(), c.width())))
    }

    fn launch_decode<T: CudaDType + DeviceRepr>(
        layout: palu_kernels::LatentLayout,
        dev: &CudaDevice,
        rows: &CudaView<'_, u8>,
        n_rows: usize,
        n: usize,
        out_type: i32,
    ) -> Result<CudaStorage> {
        let stream = dev.cuda_stream();
        let mut out = unsafe { dev.alloc::<T>(n) }?;
        {
            let (r_p, _gr) = rows.device_ptr(&stream);
            let (o_p, _go) = out.device_ptr_mut(&stream);
            let err = unsafe {
                palu_kernels::palu_latent_decode(
                    r_p as _,
                    o_p as _,
                    n_rows as i64,
                    layout,
                    out_type,
                    stream.cu_stream() as _,
                )
            };
            launched("decode", err)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}
