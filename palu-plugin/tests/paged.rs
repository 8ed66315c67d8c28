//! Palu latents in the engine's paged blocks (`palu::paged`): row copies into and out of block
//! tensors of the engine's layout, and the decode op reading sequences through block tables.
//! CPU tests compare against plain indexing and the contiguous op (exactly); the CUDA tests
//! (`just gpu-test`) compare the kernels against these CPU twins. Fresh random inputs each run.
mod common;

use candle_core::{DType, Device, Tensor};
use palu::decode_op::LatentDecode;
use palu::latent_codec::LatentCodec;
use palu::paged::{pool_rows, read_rows, sequence_rows, write_rows};
use palu::quant::ZeroPoint;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(common::fresh_seed())
}

fn tensor(r: &mut impl Rng, shape: &[usize], dev: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.random::<f32>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, dev).unwrap()
}

/// A layer's key and value block tensors as the engine allocates them (`CacheEngine`): one
/// "KV head", `w` elements per token, `x = 16 / size` elements per key piece.
fn engine_pools(
    blocks: usize,
    bs: usize,
    wk: usize,
    wv: usize,
    dtype: DType,
    dev: &Device,
) -> (Tensor, Tensor) {
    let x = 16 / dtype.size_in_bytes();
    let k = Tensor::zeros((blocks, 1, wk / x, bs, x), dtype, dev).unwrap();
    let v = Tensor::zeros((blocks, 1, wv, bs), dtype, dev).unwrap();
    (k, v)
}

/// Block tables for sequences of `lens` tokens: distinct blocks, shuffled, as a block pool
/// hands them out after some traffic.
fn tables(r: &mut impl Rng, lens: &[usize], bs: usize, blocks: usize) -> Vec<Vec<u32>> {
    let mut free: Vec<u32> = (0..blocks as u32).collect();
    free.shuffle(r);
    let mut out = Vec::new();
    for &l in lens {
        out.push(
            (0..l.div_ceil(bs))
                .map(|_| free.pop().expect("enough blocks"))
                .collect(),
        );
    }
    out
}

fn table_tensor(t: &[Vec<u32>], dev: &Device) -> Tensor {
    let cols = t.iter().map(Vec::len).max().unwrap();
    let flat: Vec<u32> = t
        .iter()
        .flat_map(|row| row.iter().copied().chain(std::iter::repeat(0)).take(cols))
        .collect();
    Tensor::from_vec(flat, (t.len(), cols), dev).unwrap()
}

#[test]
fn rows_written_to_slots_read_back_exactly_and_padding_slots_are_skipped() {
    let mut r = rng();
    let dev = Device::Cpu;
    // 16-bit rows in blocks of their dtype, f32 rows, and packed bytes in 16-bit blocks.
    for (pool_dtype, row_dtype, w) in [
        (DType::BF16, DType::BF16, 48usize),
        (DType::F32, DType::F32, 32),
        (DType::F16, DType::U8, 64),
    ] {
        let (blocks, bs) = (7usize, 16usize);
        let (k, _) = engine_pools(blocks, bs, 64, 64, pool_dtype, &dev);
        let view = pool_rows(&k).unwrap();
        assert_eq!(
            (view.slots, view.ld, view.block_size),
            (blocks * bs, 64 * pool_dtype.size_in_bytes(), bs)
        );
        let n = 40;
        let rows = match row_dtype {
            DType::U8 => Tensor::from_vec(
                (0..n * w).map(|_| r.random::<u8>()).collect::<Vec<_>>(),
                (n, w),
                &dev,
            )
            .unwrap(),
            dt => tensor(&mut r, &[n, w], &dev).to_dtype(dt).unwrap(),
        };
        let mut slots: Vec<i64> = (0..(blocks * bs) as i64).collect();
        slots.shuffle(&mut r);
        slots.truncate(n);
        // Two padding rows (the engine's -1 slots) are not written.
        slots[3] = -1;
        slots[17] = -1;
        write_rows(&k, &rows, &Tensor::new(slots.as_slice(), &dev).unwrap()).unwrap();
        let written: Vec<usize> = (0..n).filter(|&i| slots[i] >= 0).collect();
        let idx: Vec<i64> = written.iter().map(|&i| slots[i]).collect();
        let back = read_rows(
            &k,
            &Tensor::new(idx.as_slice(), &dev).unwrap(),
            w,
            row_dtype,
        )
        .unwrap();
        let want = rows
            .index_select(
                &Tensor::new(
                    written
                        .iter()
                        .map(|&i| i as u32)
                        .collect::<Vec<_>>()
                        .as_slice(),
                    &dev,
                )
                .unwrap(),
                0,
            )
            .unwrap();
        let same = back
            .to_dtype(DType::F32)
            .unwrap()
            .eq(&want.to_dtype(DType::F32).unwrap())
            .unwrap();
        assert_eq!(
            same.to_dtype(DType::U32)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<u32>()
                .unwrap() as usize,
            written.len() * w,
            "{pool_dtype:?} pool, {row_dtype:?} rows: read-back differs"
        );
        // Every other slot still holds zeros.
        let others: Vec<i64> = (0..(blocks * bs) as i64)
            .filter(|s| !idx.contains(s))
            .collect();
        let rest = read_rows(
            &k,
            &Tensor::new(others.as_slice(), &dev).unwrap(),
            w,
            row_dtype,
        )
        .unwrap();
        assert_eq!(
            rest.to_dtype(DType::F32)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}

#[test]
fn rows_that_do_not_fit_and_tables_that_are_too_short_are_clear_errors() {
    let dev = Device::Cpu;
    let (k, _) = engine_pools(4, 16, 32, 32, DType::BF16, &dev);
    let wide = Tensor::zeros((2, 33), DType::BF16, &dev).unwrap();
    let e = write_rows(&k, &wide, &Tensor::new(&[0i64, 1], &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("66 bytes do not fit the paged block rows of 64 bytes"),
        "{e}"
    );
    let e = read_rows(&k, &Tensor::new(&[64i64], &dev).unwrap(), 32, DType::BF16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("paged row 64 outside the pool's 64 rows"), "{e}");
    let e = sequence_rows(&[3, 1], 16, 33).unwrap_err().to_string();
    assert!(
        e.contains("a block table of 2 blocks of 16 cannot hold 33 tokens"),
        "{e}"
    );
    let flat = Tensor::zeros((64, 32), DType::BF16, &dev).unwrap();
    let e = pool_rows(&flat).unwrap_err().to_string();
    assert!(e.contains("not the engine's layout"), "{e}");
}

struct Case {
    h: usize,
    n_kv: usize,
    dh: usize,
    rank: usize,
}

fn decode_op(
    r: &mut impl Rng,
    c: &Case,
    lens: &[usize],
    dtype: DType,
    dev: &Device,
) -> LatentDecode {
    let inv: Vec<f32> = (0..c.dh / 2)
        .map(|i| 500000f32.powf(-2.0 * i as f32 / c.dh as f32))
        .collect();
    let scale = |t: Tensor, s: f64| (t * s).unwrap().to_dtype(dtype).unwrap();
    LatentDecode {
        bk: scale(
            tensor(r, &[c.n_kv, c.dh, c.rank], dev),
            2.0 / (c.rank as f64).sqrt(),
        ),
        bv: scale(
            tensor(r, &[c.n_kv, c.dh, c.rank], dev),
            1.0 / (c.rank as f64).sqrt(),
        ),
        inv_freq: Tensor::new(inv.as_slice(), dev).unwrap(),
        lens: lens.to_vec(),
        n_heads: c.h,
        n_kv: c.n_kv,
        packed: None,
        latent_out: false,
        pages: None,
    }
}

/// The latents of `lens` sequences, `[B, Lmax, w]` (16-bit in `dtype`, or packed rows), and the
/// same rows scattered into engine block tensors through shuffled block tables.
#[allow(clippy::type_complexity)]
fn paged_latents(
    r: &mut impl Rng,
    lens: &[usize],
    width: usize,
    codec: Option<&LatentCodec>,
    dtype: DType,
    bs: usize,
) -> (Tensor, Tensor, (Tensor, Tensor), Vec<Vec<u32>>) {
    let dev = Device::Cpu;
    let (b, lmax) = (lens.len(), *lens.iter().max().unwrap());
    let rows = |r: &mut _| {
        let x = tensor(r, &[b, lmax, width], &dev);
        match codec {
            Some(c) => c.encode(&x).unwrap(),
            None => x.to_dtype(dtype).unwrap(),
        }
    };
    let (hk, hv) = (rows(r), rows(r));
    let row_w = hk.dim(2).unwrap();
    // Block rows: 16-element multiples of 16-bit elements, as PaluGeometry reports them.
    let elems = match codec {
        Some(_) => row_w.div_ceil(2),
        None => row_w,
    }
    .div_ceil(16)
        * 16;
    let blocks = lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 3;
    let pool_dtype = if codec.is_some() { DType::BF16 } else { dtype };
    let pools = engine_pools(blocks, bs, elems, elems, pool_dtype, &dev);
    let t = tables(r, lens, bs, blocks);
    for (i, (&len, table)) in lens.iter().zip(&t).enumerate() {
        let slots = Tensor::new(sequence_rows(table, bs, len).unwrap().as_slice(), &dev).unwrap();
        let seq = |h: &Tensor| {
            h.get(i)
                .unwrap()
                .narrow(0, 0, len)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        write_rows(&pools.0, &seq(&hk), &slots).unwrap();
        write_rows(&pools.1, &seq(&hv), &slots).unwrap();
    }
    (hk, hv, pools, t)
}

#[test]
fn paged_decode_equals_contiguous_decode_exactly_for_every_block_size_and_format() {
    let mut r = rng();
    let dev = Device::Cpu;
    let c = Case {
        h: 8,
        n_kv: 2,
        dh: 32,
        rank: 16,
    };
    let lens = [37usize, 5, 64, 90];
    for bs in [8usize, 16, 32] {
        for bits in [16u8, 4, 8] {
            for latent_out in [false, true] {
                let dtype = DType::F16;
                let codec = (bits < 16)
                    .then(|| LatentCodec::new(bits, &[c.rank; 2], ZeroPoint::Free).unwrap());
                let mut op = decode_op(&mut r, &c, &lens, dtype, &dev);
                op.latent_out = latent_out;
                if let Some(cd) = &codec {
                    op = op.with_packed(cd.clone(), cd.clone());
                }
                let (hk, hv, pools, t) =
                    paged_latents(&mut r, &lens, c.n_kv * c.rank, codec.as_ref(), dtype, bs);
                let q = tensor(&mut r, &[lens.len(), c.h, c.dh], &dev)
                    .to_dtype(dtype)
                    .unwrap();
                let want = op.forward(&q, &hk, &hv).unwrap();
                let got = op
                    .with_pages(table_tensor(&t, &dev), bs)
                    .forward(&q, &pools.0, &pools.1)
                    .unwrap();
                let diff = common::max_abs_diff(&got, &want);
                assert_eq!(
                    diff, 0.0,
                    "block {bs}, {bits}-bit, latent_out {latent_out}: max |Δ| {diff}"
                );
            }
        }
    }
}

/// The kernel reading latent rows through block tables (blocks of 16 and 32, 16-bit and packed
/// 4-bit rows, f16 and bf16, a ragged batch) against its CPU twin, and the CUDA row copies
/// against the CPU's. Runs on a GPU only (`just gpu-test`).
#[cfg(feature = "cuda")]
#[test]
fn paged_decode_kernel_matches_cpu_twin() {
    let mut r = rng();
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let cpu = Device::Cpu;
    let on = |t: &Tensor| t.to_device(&gpu).unwrap();
    for (dtype, tol) in [(DType::F16, 3e-3f32), (DType::BF16, 2.4e-2)] {
        for (name, h, n_kv) in [("llama3-8b", 32usize, 8usize), ("llama2-7b", 32, 32)] {
            let c = Case {
                h,
                n_kv,
                dh: 128,
                rank: 64,
            };
            let lens = [1000usize, 77, 2113];
            for bs in [16usize, 32] {
                for bits in [16u8, 4] {
                    let codec = (bits < 16).then(|| {
                        LatentCodec::new(bits, &vec![c.rank; n_kv], ZeroPoint::Free).unwrap()
                    });
                    let mut op = decode_op(&mut r, &c, &lens, dtype, &cpu);
                    if let Some(cd) = &codec {
                        op = op.with_packed(cd.clone(), cd.clone());
                    }
                    let (_, _, pools, t) =
                        paged_latents(&mut r, &lens, n_kv * c.rank, codec.as_ref(), dtype, bs);
                    let q = tensor(&mut r, &[lens.len(), h, c.dh], &cpu)
                        .to_dtype(dtype)
                        .unwrap();
                    let tt = table_tensor(&t, &cpu);
                    let want = op
                        .with_pages(tt.clone(), bs)
                        .forward(&q, &pools.0, &pools.1)
                        .unwrap();
                    let gop = LatentDecode {
                        bk: on(&op.bk),
                        bv: on(&op.bv),
                        inv_freq: on(&op.inv_freq),
                        ..op.clone()
                    };
                    let before = (
                        palu::decode_op::cuda_launches(),
                        palu::decode_op::cuda_paged_launches(),
                    );
                    let got = gop
                        .with_pages(on(&tt), bs)
                        .forward(&on(&q), &on(&pools.0), &on(&pools.1))
                        .unwrap()
                        .to_device(&cpu)
                        .unwrap();
                    assert_eq!(
                        (
                            palu::decode_op::cuda_launches(),
                            palu::decode_op::cuda_paged_launches()
                        ),
                        (before.0 + 1, before.1 + 1),
                        "one kernel launch, reading the blocks in place"
                    );
                    let err = common::rel_l2(&got, &want);
                    println!("{dtype:?} {name} block {bs} {bits}-bit: relative L2 error {err:.2e}");
                    assert!(
                        err < tol && err.is_finite(),
                        "{dtype:?} {name} block {bs} {bits}-bit: {err:.2e}"
                    );
                }
            }
        }
    }
    // Row copies: the CUDA kernel writes and reads exactly what the CPU does.
    for (pool_dtype, row_dtype, w) in [
        (DType::BF16, DType::BF16, 64usize),
        (DType::BF16, DType::U8, 72),
        (DType::F8E4M3, DType::F8E4M3, 48),
        // 16-bit latents into fp8 blocks: converted on the way in and out.
        (DType::F8E4M3, DType::BF16, 64),
        (DType::F8E4M3, DType::F16, 40),
    ] {
        let (k, _) = engine_pools(9, 16, 64, 64, pool_dtype, &cpu);
        let rows = tensor(&mut r, &[50, w], &cpu);
        let rows = match row_dtype {
            DType::U8 => ((rows + 1.0).unwrap() * 100.0)
                .unwrap()
                .to_dtype(DType::U8)
                .unwrap(),
            dt => rows.to_dtype(dt).unwrap(),
        };
        let mut slots: Vec<i64> = (0..144).collect();
        slots.shuffle(&mut r);
        slots.truncate(50);
        slots[7] = -1;
        let s = Tensor::new(slots.as_slice(), &cpu).unwrap();
        let kg = on(&k);
        write_rows(&k, &rows, &s).unwrap();
        write_rows(&kg, &on(&rows), &on(&s)).unwrap();
        let all: Vec<i64> = (0..144).collect();
        let all = Tensor::new(all.as_slice(), &cpu).unwrap();
        let a = read_rows(&k, &all, w, row_dtype)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let b = read_rows(&kg, &on(&all), w, row_dtype)
            .unwrap()
            .to_device(&cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let diff = common::max_abs_diff(&a, &b);
        assert_eq!(
            diff, 0.0,
            "{pool_dtype:?}/{row_dtype:?}: GPU row copies differ from the CPU's"
        );
    }
    // The rounding a step applies to its own rows for fp8 blocks: the kernel's conversion
    // against candle's CPU casts.
    for dt in [DType::F16, DType::BF16, DType::F32] {
        let x = (tensor(&mut r, &[37, 72], &cpu) * 3.0)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let want = palu::paged::round_through(&x, DType::F8E4M3).unwrap();
        let got = palu::paged::round_through(&on(&x), DType::F8E4M3)
            .unwrap()
            .to_device(&cpu)
            .unwrap();
        let diff = common::max_abs_diff(&got, &want);
        assert_eq!(
            diff, 0.0,
            "{dt:?} rows rounded through fp8: GPU differs from the CPU by {diff}"
        );
    }
}
