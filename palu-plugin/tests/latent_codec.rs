//! Packed latent rows: round trip against the simulated quantizer, on fresh random latents.
mod common;

use candle_core::{DType, Device, Tensor};
use palu::latent_codec::LatentCodec;
use palu::quant::{self, ZeroPoint};
use rand::{Rng, SeedableRng};

fn random_latents(r: &mut impl Rng, rows: usize, width: usize) -> Tensor {
    // Per-channel scales and offsets, as real latents have (outlier channels included).
    let scale: Vec<f32> = (0..width).map(|_| 0.1 + 4.0 * r.random::<f32>()).collect();
    let shift: Vec<f32> = (0..width).map(|_| r.random::<f32>() - 0.5).collect();
    let data: Vec<f32> = (0..rows * width)
        .map(|i| (r.random::<f32>() * 2.0 - 1.0) * scale[i % width] + shift[i % width])
        .collect();
    Tensor::from_vec(data, (2, rows / 2, width), &Device::Cpu).unwrap()
}

#[test]
fn packed_rows_decode_to_the_simulated_quantizer_up_to_the_f16_scale() {
    let mut r = rand::rngs::StdRng::seed_from_u64(common::fresh_seed());
    // Group widths that cross byte boundaries at every bit width.
    for widths in [vec![64usize], vec![5, 7, 3], vec![24, 40, 17, 8]] {
        let width: usize = widths.iter().sum();
        let h = random_latents(&mut r, 34, width);
        for bits in [2u8, 3, 4, 8] {
            let codec = LatentCodec::new(bits, &widths, ZeroPoint::Free).unwrap();
            assert_eq!(
                codec.row_bytes(),
                quant::bytes_per_token(width, widths.len(), bits),
                "bits {bits}"
            );
            let rows = codec.encode(&h).unwrap();
            assert_eq!(rows.dtype(), DType::U8);
            assert_eq!(rows.dims(), &[2, 17, codec.row_bytes()]);
            let got: Vec<f32> = codec
                .decode(&rows, DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: Vec<f32> = quant::fake_quant(&h, bits, &widths, None, ZeroPoint::Free)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let x: Vec<f32> = h.flatten_all().unwrap().to_vec1().unwrap();
            // Per row and group the codec stores the scale s = range/(2^b−1) in f16, so a value
            // (q − z)·s moves by at most |q − z|·|s₁₆ − s| ≤ |w|·2⁻¹¹ (round to nearest, 11-bit
            // significand), plus |q − z|·2⁻²⁵ where s is an f16 subnormal; |q − z| = |w|/s, and
            // |w| is large against the range when a group sits far from zero.
            for ((g, w), xr) in got
                .chunks(width)
                .zip(want.chunks(width))
                .zip(x.chunks(width))
            {
                for rg in quant::group_ranges(&widths, None) {
                    let (lo, hi) = xr[rg.clone()]
                        .iter()
                        .fold((f32::MAX, f32::MIN), |a, &v| (a.0.min(v), a.1.max(v)));
                    let range = (hi - lo).max(1e-6);
                    let step = range / ((1u32 << bits) - 1) as f32;
                    let scale_error =
                        |v: f32| v.abs() * (2f32.powi(-11) + 2f32.powi(-25) / step) * 1.001 + 1e-6;
                    for i in rg.clone() {
                        let d = (g[i] - w[i]).abs();
                        assert!(
                            d <= scale_error(w[i]),
                            "bits {bits} widths {widths:?}: {} vs {} (range {range})",
                            g[i],
                            w[i]
                        );
                        // And the codes really quantize: within half a step (plus the scale rounding) of the input.
                        assert!(
                            (g[i] - xr[i]).abs() <= 0.5 * step * 1.001 + scale_error(g[i]),
                            "bits {bits}: {} vs input {}",
                            g[i],
                            xr[i]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn packed_rows_are_smaller_than_16_bit_latents() {
    // 96-wide latent, one group: 4-bit rows are 48 + 4 bytes against 192.
    let codec = LatentCodec::new(4, &[96], ZeroPoint::Free).unwrap();
    assert_eq!(codec.row_bytes(), 52);
    let codec = LatentCodec::new(3, &[32, 32, 32], ZeroPoint::Free).unwrap();
    assert_eq!(codec.row_bytes(), 36 + 12);
}

#[test]
fn bad_codec_input_is_an_error() {
    assert_eq!(
        LatentCodec::new(5, &[8], ZeroPoint::Free)
            .unwrap_err()
            .to_string(),
        "latent_bits = 5: must be one of 2, 3, 4, 8 or 16 (16 = no quantization)"
    );
    assert!(LatentCodec::new(16, &[8], ZeroPoint::Free).is_err());
    let codec = LatentCodec::new(4, &[8], ZeroPoint::Free).unwrap();
    let wrong_width = Tensor::ones((3, 9), DType::F32, &Device::Cpu).unwrap();
    assert!(codec
        .encode(&wrong_width)
        .unwrap_err()
        .to_string()
        .contains("expected latents of width 8"));
    let wrong_rows = Tensor::ones((3, 7), DType::U8, &Device::Cpu).unwrap();
    assert!(codec
        .decode(&wrong_rows, DType::F32)
        .unwrap_err()
        .to_string()
        .contains("rows of 8 bytes expected"));
    let floats = Tensor::ones((3, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(codec
        .decode(&floats, DType::F32)
        .unwrap_err()
        .to_string()
        .contains("expects u8 rows"));
}

/// The fused latent write's CPU twin (projection in f32, rounded to the input dtype, then the
/// codec) writes what the unfused path writes (the GEMM, rounded, then `encode`): the two sum in
/// different orders, so a value on a rounding boundary may land one code away, never more.
#[test]
fn fused_latent_write_twin_equals_encoding_the_projection() {
    let mut r = rand::rngs::StdRng::seed_from_u64(common::fresh_seed());
    let dev = Device::Cpu;
    for (d, widths, n) in [
        (256usize, vec![64usize; 4], 10usize),
        (96, vec![24, 40, 8, 56], 6),
    ] {
        let width: usize = widths.iter().sum();
        let x = random_latents(&mut r, n, d).reshape((n, d)).unwrap();
        let down = (random_latents(&mut r, width, d)
            .reshape((width, d))
            .unwrap()
            / (d as f64).sqrt())
        .unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let (xd, wd) = (x.to_dtype(dtype).unwrap(), down.to_dtype(dtype).unwrap());
            for bits in [2u8, 3, 4, 8] {
                let c = LatentCodec::new(bits, &widths, ZeroPoint::Free).unwrap();
                let fused = c.project_encode_op(&xd, &wd).unwrap();
                // The unfused path on the same rounded inputs, h rounded to the dtype.
                let h = palu::lowrank::linear(
                    &xd.to_dtype(DType::F32).unwrap(),
                    &wd.to_dtype(DType::F32).unwrap(),
                    None,
                )
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
                let unfused = c.encode(&h).unwrap();
                assert_eq!(fused.dims(), &[n, c.row_bytes()]);
                let eps = if dtype == DType::BF16 {
                    2f32.powi(-8)
                } else {
                    2f32.powi(-20)
                };
                let (worst, same) = common::row_agreement(&c, &fused, &unfused, eps);
                assert!(
                    worst <= 1.0,
                    "{dtype:?} {bits}-bit d={d}: {worst} of the bound"
                );
                assert!(
                    same >= 0.97,
                    "{dtype:?} {bits}-bit d={d}: {same} of bytes equal"
                );
                // The engine's entry point on the CPU is the unfused path itself (f32: candle's
                // CPU matmul has no bf16).
                assert!(!c.fused_write_supported(&xd, &wd));
                if dtype == DType::F32 {
                    let via = c.project_encode(&xd, &wd).unwrap();
                    let (worst, _) = common::row_agreement(&c, &via, &fused, 2f32.powi(-20));
                    assert!(
                        worst <= 1.0,
                        "{bits}-bit d={d}: entry point {worst} of the bound"
                    );
                }
            }
        }
    }
    let c = LatentCodec::new(4, &[64; 4], ZeroPoint::Free).unwrap();
    let e = c
        .project_encode_op(
            &Tensor::zeros((2, 256), DType::F32, &dev).unwrap(),
            &Tensor::zeros((255, 256), DType::F32, &dev).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not map inputs"), "{e}");
}
