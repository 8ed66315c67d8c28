//! Palu latents in mistral.rs's paged KV blocks.
//!
//! With paged attention on, the engine allocates every layer's cache as blocks of
//! `block_size` tokens (`[blocks, heads, dim/x, block_size, x]` for keys, `[blocks, heads, dim,
//! block_size]` for values, in its cache dtype) from the model's `ModelConfigLike`, hands out
//! blocks per sequence, shares them between sequences with a common prefix, and passes each
//! step's slot mapping and block tables. Palu's geometry reports one "KV head" per layer whose
//! head dims are the widths of the layer's latent rows ([`crate::engine::PaluGeometry`]), so a
//! block holds exactly `block_size` latent rows. This module views a layer's pool as rows of
//! bytes, one per slot (`slot = block·block_size + offset`), and copies rows in and out of it:
//! the same bytes for 16-bit latents, fp8 latents (`--pa-cache-type f8e4m3`) and packed
//! low-bit rows with their scales. The engine never reads the blocks itself (Palu's model does
//! the attention), so the layout inside a block is Palu's: token-major rows.
//!
//! Rows of one float type written to blocks of another (16-bit latents into `f8e4m3` blocks) are
//! converted element by element, and read back converted: on the CPU by candle's casts, on CUDA
//! by the copy kernel itself (candle 0.10.2's CUDA casts to and from F8E4M3 ask for kernels under
//! names its PTX does not define).
//!
//! Both copies have a CPU twin (the reference) and a CUDA kernel (`kernels/src/paged_rows.cu`).

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, DType, Device, InplaceOp2, Layout, Result, Shape, Tensor,
};

/// A layer's paged pool viewed as rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolRows {
    /// Rows (slots): blocks × block_size.
    pub slots: usize,
    /// Bytes per row.
    pub ld: usize,
    pub block_size: usize,
}

/// The row view of one of the engine's per-layer block tensors: rank 5 (keys) or 4 (values),
/// `block_size` at dimension 3, contiguous.
pub fn pool_rows(pool: &Tensor) -> Result<PoolRows> {
    pool_rows_of(pool.layout(), pool.dtype())
}

/// [`pool_rows`] of a block tensor's layout and dtype.
pub fn pool_rows_of(layout: &Layout, dtype: DType) -> Result<PoolRows> {
    let d = layout.dims();
    if !(d.len() == 4 || d.len() == 5) || !layout.is_contiguous() {
        candle_core::bail!(
            "palu: a paged KV block tensor of shape {d:?} is not the engine's layout ([blocks, heads, dim(/x), block_size(, x)], contiguous)"
        )
    }
    let (blocks, block_size) = (d[0], d[3]);
    let slots = blocks * block_size;
    let bytes = layout.shape().elem_count() * dtype.size_in_bytes();
    if slots == 0 || !bytes.is_multiple_of(slots) {
        candle_core::bail!("palu: paged KV block tensor {d:?} does not split into {slots} rows")
    }
    Ok(PoolRows {
        slots,
        ld: bytes / slots,
        block_size,
    })
}

/// The bytes of a CPU storage (every candle dtype is plain data).
fn cpu_bytes(s: &CpuStorage) -> &[u8] {
    macro_rules! raw {
        ($v:expr) => {
            // SAFETY: the element types are plain-old-data; the slice covers the vector's
            // initialized elements exactly and borrows it.
            unsafe {
                std::slice::from_raw_parts($v.as_ptr() as *const u8, std::mem::size_of_val(&$v[..]))
            }
        };
    }
    match s {
        CpuStorage::U8(v) => v,
        CpuStorage::U32(v) => raw!(v),
        CpuStorage::I16(v) => raw!(v),
        CpuStorage::I32(v) => raw!(v),
        CpuStorage::I64(v) => raw!(v),
        CpuStorage::BF16(v) => raw!(v),
        CpuStorage::F16(v) => raw!(v),
        CpuStorage::F32(v) => raw!(v),
        CpuStorage::F64(v) => raw!(v),
        CpuStorage::F8E4M3(v) => raw!(v),
        CpuStorage::F6E2M3(v)
        | CpuStorage::F6E3M2(v)
        | CpuStorage::F4(v)
        | CpuStorage::F8E8M0(v) => v,
    }
}

fn cpu_bytes_mut(s: &mut CpuStorage) -> &mut [u8] {
    macro_rules! raw {
        ($v:expr) => {
            // SAFETY: as in `cpu_bytes`, mutably: any byte pattern is a valid element.
            unsafe {
                std::slice::from_raw_parts_mut(
                    $v.as_mut_ptr() as *mut u8,
                    std::mem::size_of_val(&$v[..]),
                )
            }
        };
    }
    match s {
        CpuStorage::U8(v) => v,
        CpuStorage::U32(v) => raw!(v),
        CpuStorage::I16(v) => raw!(v),
        CpuStorage::I32(v) => raw!(v),
        CpuStorage::I64(v) => raw!(v),
        CpuStorage::BF16(v) => raw!(v),
        CpuStorage::F16(v) => raw!(v),
        CpuStorage::F32(v) => raw!(v),
        CpuStorage::F64(v) => raw!(v),
        CpuStorage::F8E4M3(v) => raw!(v),
        CpuStorage::F6E2M3(v)
        | CpuStorage::F6E3M2(v)
        | CpuStorage::F4(v)
        | CpuStorage::F8E8M0(v) => v,
    }
}

/// Float types a copy converts between (fp8 blocks of 16- or 32-bit rows).
fn is_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3)
}

/// Whether rows of type `rows` are stored in blocks of type `pool` by conversion (else as bytes).
fn converts(rows: DType, pool: DType) -> bool {
    rows != pool && is_float(rows) && is_float(pool)
}

/// `[n, w]` contiguous rows of `w·size` bytes each.
fn row_bytes(rows: &Layout, dtype: DType) -> Result<(usize, usize)> {
    let (n, w) = rows.shape().dims2()?;
    if !rows.is_contiguous() {
        candle_core::bail!("palu: latent rows to copy must be contiguous")
    }
    Ok((n, w * dtype.size_in_bytes()))
}

fn host_indices(idx: &Tensor) -> Result<Vec<i64>> {
    idx.to_device(&Device::Cpu)?
        .to_dtype(DType::I64)?
        .flatten_all()?
        .to_vec1::<i64>()
}

/// Writes `rows` (`[n, w]`) into the pool's slots `slots` (`[n]` i64, on the pool's device;
/// negative: skipped, the engine's padding). In place. Rows of the pool's dtype, or bytes
/// (packed latents), are copied as they are; float rows of another float type are converted to
/// the pool's (16-bit latents into fp8 blocks). The stored row may not exceed the block row.
pub fn write_rows(pool: &Tensor, rows: &Tensor, slots: &Tensor) -> Result<()> {
    let view = pool_rows(pool)?;
    let convert = converts(rows.dtype(), pool.dtype());
    // On the CPU, candle's cast is the conversion; the op then copies bytes.
    let rows = if convert && pool.device().is_cpu() {
        rows.to_dtype(pool.dtype())?
    } else {
        rows.clone()
    };
    let rows = &rows;
    let stored = if convert { pool.dtype() } else { rows.dtype() };
    let (n, bytes) = row_bytes(rows.layout(), stored)?;
    if bytes > view.ld || slots.elem_count() != n {
        candle_core::bail!(
            "palu: {n} latent rows of {bytes} bytes do not fit the paged block rows of {} bytes ({} slots given)",
            view.ld,
            slots.elem_count()
        )
    }
    pool.inplace_op2(
        rows,
        &WriteRows {
            slots: slots.flatten_all()?.to_dtype(DType::I64)?.contiguous()?,
            view,
            convert_to: convert.then_some(pool.dtype()),
        },
    )
}

/// Reads the pool's rows `rows` (`[n]` i64 physical rows, on the pool's device) as `[n, w]` of
/// `dtype`: the first `w` elements of each row converted from the pool's float type where
/// `dtype` is another float type, else the first `w·size` bytes as they are.
pub fn read_rows(pool: &Tensor, rows: &Tensor, w: usize, dtype: DType) -> Result<Tensor> {
    if converts(dtype, pool.dtype()) && pool.device().is_cpu() {
        return read_rows(pool, rows, w, pool.dtype())?.to_dtype(dtype);
    }
    let view = pool_rows(pool)?;
    let stored = if converts(dtype, pool.dtype()) {
        pool.dtype()
    } else {
        dtype
    };
    let bytes = w * stored.size_in_bytes();
    if bytes > view.ld {
        candle_core::bail!(
            "palu: reading rows of {bytes} bytes from paged block rows of {} bytes",
            view.ld
        )
    }
    let idx = rows.flatten_all()?.to_dtype(DType::I64)?.contiguous()?;
    pool.apply_op1_no_bwd(&ReadRows {
        idx,
        w,
        dtype,
        view,
    })
}

/// `rows` rounded through `dtype` and back (what a row stored in blocks of `dtype` reads back
/// as): the new rows a step attends to are the ones later steps will read.
pub fn round_through(rows: &Tensor, dtype: DType) -> Result<Tensor> {
    if !converts(rows.dtype(), dtype) {
        return Ok(rows.clone());
    }
    match rows.device() {
        Device::Cpu => rows.to_dtype(dtype)?.to_dtype(rows.dtype()),
        _ => {
            let shape = rows.shape().clone();
            let w = shape.dims().last().copied().unwrap_or(1);
            rows.reshape(((), w))?
                .contiguous()?
                .apply_op1_no_bwd(&RoundThrough { dtype })?
                .reshape(shape)
        }
    }
}

struct RoundThrough {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    dtype: DType,
}

impl CustomOp1 for RoundThrough {
    fn name(&self) -> &'static str {
        "palu-round-through"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("palu: round_through runs candle's casts on the CPU")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::round_through(self.dtype, s, l)
    }
}

/// The physical pool rows of logical rows `0..len` of a sequence with block table `table`.
pub fn sequence_rows(table: &[u32], block_size: usize, len: usize) -> Result<Vec<i64>> {
    if len.div_ceil(block_size) > table.len() {
        candle_core::bail!(
            "palu: a block table of {} blocks of {block_size} cannot hold {len} tokens",
            table.len()
        )
    }
    Ok((0..len)
        .map(|t| (table[t / block_size] as usize * block_size + t % block_size) as i64)
        .collect())
}

struct WriteRows {
    slots: Tensor,
    view: PoolRows,
    /// CUDA: convert the rows' elements to this (the pool's) float type.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    convert_to: Option<DType>,
}

impl InplaceOp2 for WriteRows {
    fn name(&self) -> &'static str {
        "palu-write-rows"
    }

    fn cpu_fwd(
        &self,
        pool: &mut CpuStorage,
        pl: &Layout,
        rows: &CpuStorage,
        rl: &Layout,
    ) -> Result<()> {
        let (_, bytes) = row_bytes(rl, rows.dtype())?;
        let slots = host_indices(&self.slots)?;
        let src = &cpu_bytes(rows)[rl.start_offset() * rows.dtype().size_in_bytes()..];
        let start = pl.start_offset() * pool.dtype().size_in_bytes();
        let dst = &mut cpu_bytes_mut(pool)[start..];
        for (i, &s) in slots.iter().enumerate() {
            if s < 0 {
                continue;
            }
            if s as usize >= self.view.slots {
                candle_core::bail!("palu: slot {s} outside the pool's {} rows", self.view.slots)
            }
            dst[s as usize * self.view.ld..][..bytes].copy_from_slice(&src[i * bytes..][..bytes]);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        pool: &mut candle_core::CudaStorage,
        pl: &Layout,
        rows: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<()> {
        cuda::write_rows(self, pool, pl, rows, rl)
    }
}

struct ReadRows {
    idx: Tensor,
    w: usize,
    dtype: DType,
    view: PoolRows,
}

impl CustomOp1 for ReadRows {
    fn name(&self) -> &'static str {
        "palu-read-rows"
    }

    fn cpu_fwd(&self, pool: &CpuStorage, pl: &Layout) -> Result<(CpuStorage, Shape)> {
        let bytes = self.w * self.dtype.size_in_bytes();
        let ids = host_indices(&self.idx)?;
        let src = &cpu_bytes(pool)[pl.start_offset() * pool.dtype().size_in_bytes()..];
        let mut out = vec![0u8; ids.len() * bytes];
        for (dst, &r) in out.chunks_exact_mut(bytes.max(1)).zip(&ids) {
            if r < 0 || r as usize >= self.view.slots {
                candle_core::bail!(
                    "palu: paged row {r} outside the pool's {} rows",
                    self.view.slots
                )
            }
            dst.copy_from_slice(&src[r as usize * self.view.ld..][..bytes]);
        }
        let shape = Shape::from((ids.len(), self.w));
        let t = Tensor::from_raw_buffer(&out, self.dtype, shape.dims(), &Device::Cpu)?;
        let (s, _) = t.storage_and_layout();
        match &*s {
            candle_core::Storage::Cpu(c) => Ok((c.clone(), shape)),
            _ => unreachable!("built on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        pool: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::read_rows(self, pool, pl)
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, SyncOnDrop};
    use candle_core::{CudaStorage, Storage};
    use half::{bf16, f16};

    type Guard<'a> = SyncOnDrop<'a>;

    /// The device address of a storage's element `offset`, in bytes, whatever its dtype.
    pub(crate) fn bytes_ptr<'a>(
        s: &'a CudaStorage,
        offset: usize,
        stream: &'a std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    ) -> Result<(u64, Guard<'a>)> {
        macro_rules! ptr {
            ($t:ty) => {{
                let (p, g) = s.as_cuda_slice::<$t>()?.device_ptr(stream);
                (p + (offset * std::mem::size_of::<$t>()) as u64, g)
            }};
        }
        Ok(match s.dtype() {
            DType::U8 => ptr!(u8),
            DType::U32 => ptr!(u32),
            DType::I64 => ptr!(i64),
            DType::F16 => ptr!(f16),
            DType::BF16 => ptr!(bf16),
            DType::F32 => ptr!(f32),
            DType::F8E4M3 => ptr!(float8::F8E4M3),
            other => candle_core::bail!("palu: paged latents of {other:?} are not supported"),
        })
    }

    fn bytes_ptr_mut<'a>(
        s: &'a mut CudaStorage,
        offset: usize,
        stream: &'a std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    ) -> Result<(u64, Guard<'a>)> {
        macro_rules! ptr {
            ($t:ty) => {{
                let (p, g) = s.as_cuda_slice_mut::<$t>()?.device_ptr_mut(stream);
                (p + (offset * std::mem::size_of::<$t>()) as u64, g)
            }};
        }
        Ok(match s.dtype() {
            DType::U8 => ptr!(u8),
            DType::F16 => ptr!(f16),
            DType::BF16 => ptr!(bf16),
            DType::F32 => ptr!(f32),
            DType::F8E4M3 => ptr!(float8::F8E4M3),
            other => candle_core::bail!("palu: paged latents of {other:?} are not supported"),
        })
    }

    fn row_type(d: DType) -> i32 {
        (match d {
            DType::F32 => palu_kernels::RowType::F32,
            DType::F16 => palu_kernels::RowType::F16,
            DType::BF16 => palu_kernels::RowType::BF16,
            DType::F8E4M3 => palu_kernels::RowType::F8E4M3,
            _ => palu_kernels::RowType::Bytes,
        }) as i32
    }

    fn check(err: i32) -> Result<()> {
        if err != 0 {
            candle_core::bail!("palu: paged row copy failed (cudaError {err})")
        }
        Ok(())
    }

    pub(super) fn write_rows(
        op: &WriteRows,
        pool: &mut CudaStorage,
        pl: &Layout,
        rows: &CudaStorage,
        rl: &Layout,
    ) -> Result<()> {
        let stored = op.convert_to.unwrap_or(rows.dtype());
        let (n, bytes) = row_bytes(rl, stored)?;
        let stream = rows.device.cuda_stream();
        let (sl_s, sl_l) = op.slots.storage_and_layout();
        let Storage::Cuda(sl) = &*sl_s else {
            candle_core::bail!("palu: slot mapping must be on the GPU with the pool")
        };
        let (src, _g1) = bytes_ptr(rows, rl.start_offset(), &stream)?;
        let (idx, _g2) = bytes_ptr(sl, sl_l.start_offset(), &stream)?;
        let (dst, _g3) = bytes_ptr_mut(pool, pl.start_offset(), &stream)?;
        let w = rl.shape().dims2()?.1;
        check(unsafe {
            match op.convert_to {
                Some(to) => palu_kernels::palu_convert_rows(
                    dst as _,
                    op.view.ld as i64,
                    idx as _,
                    row_type(to),
                    src as _,
                    (w * rows.dtype().size_in_bytes()) as i64,
                    std::ptr::null(),
                    row_type(rows.dtype()),
                    n as i64,
                    w as i32,
                    stream.cu_stream() as _,
                ),
                None => palu_kernels::palu_copy_rows(
                    dst as _,
                    op.view.ld as i64,
                    idx as _,
                    src as _,
                    bytes as i64,
                    std::ptr::null(),
                    n as i64,
                    bytes as i32,
                    stream.cu_stream() as _,
                ),
            }
        })
    }

    pub(super) fn read_rows(
        op: &ReadRows,
        pool: &CudaStorage,
        pl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, w) = (op.idx.elem_count(), op.w);
        let convert = converts(op.dtype, pool.dtype());
        let bytes = w * op.dtype.size_in_bytes();
        let dev = &pool.device;
        let stream = dev.cuda_stream();
        let mut out: CudaStorage = match op.dtype {
            DType::U8 => {
                CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<u8>(n * w) }?, dev.clone())
            }
            DType::F16 => {
                CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f16>(n * w) }?, dev.clone())
            }
            DType::BF16 => {
                CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<bf16>(n * w) }?, dev.clone())
            }
            DType::F8E4M3 => CudaStorage::wrap_cuda_slice(
                unsafe { dev.alloc::<float8::F8E4M3>(n * w) }?,
                dev.clone(),
            ),
            other => candle_core::bail!("palu: reading paged rows as {other:?} is not supported"),
        };
        {
            let (is, il) = op.idx.storage_and_layout();
            let Storage::Cuda(is) = &*is else {
                candle_core::bail!("palu: row indices must be on the GPU with the pool")
            };
            let (src, _g1) = bytes_ptr(pool, pl.start_offset(), &stream)?;
            let (ids, _g2) = bytes_ptr(is, il.start_offset(), &stream)?;
            let (dst, _g3) = bytes_ptr_mut(&mut out, 0, &stream)?;
            check(unsafe {
                if convert {
                    palu_kernels::palu_convert_rows(
                        dst as _,
                        bytes as i64,
                        std::ptr::null(),
                        row_type(op.dtype),
                        src as _,
                        op.view.ld as i64,
                        ids as _,
                        row_type(pool.dtype()),
                        n as i64,
                        w as i32,
                        stream.cu_stream() as _,
                    )
                } else {
                    palu_kernels::palu_copy_rows(
                        dst as _,
                        bytes as i64,
                        std::ptr::null(),
                        src as _,
                        op.view.ld as i64,
                        ids as _,
                        n as i64,
                        bytes as i32,
                        stream.cu_stream() as _,
                    )
                }
            })?;
        }
        Ok((out, Shape::from((n, w))))
    }

    pub(super) fn round_through(
        to: DType,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, w) = l.shape().dims2()?;
        let dev = &s.device;
        let stream = dev.cuda_stream();
        let from = s.dtype();
        let mut tmp = CudaStorage::wrap_cuda_slice(
            unsafe { dev.alloc::<u8>(n * w * to.size_in_bytes()) }?,
            dev.clone(),
        );
        let mut out = match from {
            DType::F32 => {
                CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n * w) }?, dev.clone())
            }
            DType::F16 => {
                CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f16>(n * w) }?, dev.clone())
            }
            DType::BF16 => {
                CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<bf16>(n * w) }?, dev.clone())
            }
            other => candle_core::bail!("palu: rounding {other:?} rows through {to:?}"),
        };
        {
            let (src, _g1) = bytes_ptr(s, l.start_offset(), &stream)?;
            let (t, _g2) = bytes_ptr_mut(&mut tmp, 0, &stream)?;
            check(unsafe {
                palu_kernels::palu_convert_rows(
                    t as _,
                    (w * to.size_in_bytes()) as i64,
                    std::ptr::null(),
                    row_type(to),
                    src as _,
                    (w * from.size_in_bytes()) as i64,
                    std::ptr::null(),
                    row_type(from),
                    n as i64,
                    w as i32,
                    stream.cu_stream() as _,
                )
            })?;
        }
        {
            let (t, _g1) = bytes_ptr(&tmp, 0, &stream)?;
            let (dst, _g2) = bytes_ptr_mut(&mut out, 0, &stream)?;
            check(unsafe {
                palu_kernels::palu_convert_rows(
                    dst as _,
                    (w * from.size_in_bytes()) as i64,
                    std::ptr::null(),
                    row_type(from),
                    t as _,
                    (w * to.size_in_bytes()) as i64,
                    std::ptr::null(),
                    row_type(to),
                    n as i64,
                    w as i32,
                    stream.cu_stream() as _,
                )
            })?;
        }
        Ok((out, Shape::from((n, w))))
    }
}
