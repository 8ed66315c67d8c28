//! Exact-math tests against f64 references on fresh random inputs.
mod common;

use faer::Mat;
use palu::decompose::{Gram, GroupSvd, Whitening};
use palu::lowrank::KvKind;
use palu::ranks::{self, ModuleStats, RankSearch};
use rand::{Rng, SeedableRng};

fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(common::fresh_seed())
}

fn randn(r: &mut impl Rng, rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |_, _| r.random::<f64>() * 2.0 - 1.0)
}

#[test]
fn whitened_svd_error_equals_discarded_singular_values() {
    let mut r = rng();
    let (n, d, out) = (300, 48, 32);
    // Correlated inputs with unequal scales, as activations are.
    let mix = randn(&mut r, d, d);
    let x = &randn(&mut r, n, d) * &mix;
    let w = randn(&mut r, out, d);
    let xt = candle_core::Tensor::from_vec(
        (0..n)
            .flat_map(|i| (0..d).map(move |j| (i, j)))
            .map(|(i, j)| x[(i, j)] as f32)
            .collect::<Vec<_>>(),
        (n, d),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut g = Gram::new(d);
    g.accumulate(&xt).unwrap();
    let wh = Whitening::from_gram(&g, 0).unwrap();
    let svd = GroupSvd::new(w.as_ref(), &wh).unwrap();
    for rank in [1, 7, 16, 31] {
        let (a, b) = svd.factors(rank, &wh, "test").unwrap();
        let err = (&w - &(&b * &a)) * &g.xtx * (&w - &(&b * &a)).transpose();
        let trace: f64 = (0..out).map(|i| err[(i, i)]).sum();
        let expected = svd.discarded_energy(rank);
        // XᵀX was accumulated from f32 inputs; the identity holds for the matrix actually used.
        assert!(
            (trace - expected).abs() <= 1e-6 * (1.0 + expected),
            "rank {rank}: ‖(W−BA)Xᵀ‖² = {trace}, Σ discarded σ² = {expected}"
        );
    }
    // Full rank reproduces W.
    let (a, b) = svd.factors(out, &wh, "test").unwrap();
    let diff = &w - &(&b * &a);
    let max = (0..out)
        .flat_map(|i| (0..d).map(move |j| (i, j)))
        .map(|(i, j)| diff[(i, j)].abs())
        .fold(0.0, f64::max);
    assert!(max < 1e-9, "full-rank factors differ from W by {max}");
}

#[test]
fn rank_larger_than_the_matrix_is_an_error() {
    let mut r = rng();
    let w = randn(&mut r, 8, 16);
    let wh = Whitening::identity(16);
    let svd = GroupSvd::new(w.as_ref(), &wh).unwrap();
    let e = svd
        .factors(9, &wh, "model.layers.3.self_attn.k_proj group 0")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.3.self_attn.k_proj") && e.contains("between 1 and 8"),
        "{e}"
    );
}

#[test]
fn hadamard_rotation_leaves_ba_unchanged() {
    let mut r = rng();
    for n in [4, 8, 12, 20, 24, 28, 32, 40, 96, 160] {
        let (t, _) = palu::hadamard::rotation(n, r.random());
        let a = randn(&mut r, n, 24);
        let b = randn(&mut r, 16, n);
        let ba = &b * &a;
        let rot = &(&b * t.transpose()) * &(&t * &a);
        let diff = &ba - &rot;
        let max = (0..16)
            .flat_map(|i| (0..24).map(move |j| (i, j)))
            .map(|(i, j)| diff[(i, j)].abs())
            .fold(0.0, f64::max);
        assert!(max < 1e-5, "n={n}: BA changed by {max}");
    }
}

#[test]
fn hadamard_exists_for_every_multiple_of_32_up_to_512() {
    for n in (32..=512).step_by(32) {
        let h = palu::hadamard::hadamard(n)
            .unwrap_or_else(|| panic!("no Hadamard matrix of order {n}"));
        assert!(
            palu::hadamard::is_hadamard(&h, n),
            "order {n} is not Hadamard"
        );
    }
    // Sizes our constructions do not reach fall back to a random orthogonal rotation.
    assert_eq!(
        palu::hadamard::rotation(3, 0).1,
        palu::hadamard::RotationKind::RandomOrthogonal
    );
}

#[test]
fn random_orthogonal_is_orthonormal() {
    let q = palu::hadamard::random_orthogonal(37, 5);
    let qtq = q.transpose() * &q;
    for i in 0..37 {
        for j in 0..37 {
            let e = if i == j { 1.0 } else { 0.0 };
            assert!((qtq[(i, j)] - e).abs() < 1e-10);
        }
    }
}

fn stats(r: &mut impl Rng, layers: usize, groups: usize, width: usize) -> Vec<ModuleStats> {
    let mut out = Vec::new();
    for l in 0..layers {
        for kind in KvKind::BOTH {
            let gf: Vec<f64> = (0..groups).map(|_| r.random::<f64>() + 0.01).collect();
            out.push(ModuleStats {
                layer: l,
                kind,
                group_width: width,
                group_cap: width,
                fisher: gf.iter().sum::<f64>() / groups as f64,
                group_fisher: gf,
                input_power: 1.0 + r.random::<f64>(),
                sigmas: (0..groups)
                    .map(|_| {
                        let mut s: Vec<f64> =
                            (0..width).map(|_| r.random::<f64>() * 10.0).collect();
                        s.sort_by(|a, b| b.total_cmp(a));
                        s
                    })
                    .collect(),
            });
        }
    }
    out
}

#[test]
fn fisher_ranks_sum_to_the_budget_before_rounding() {
    let mut r = rng();
    for (layers, groups, width) in [(5, 4, 8), (30, 3, 64), (30, 1, 192), (32, 8, 128)] {
        let m = stats(&mut r, layers, groups, width);
        for ratio in [0.3, 0.5, 0.7, 0.137] {
            let budget = (ratio * (2 * layers * groups * width) as f64).floor() as usize;
            for per_group in [false, true] {
                let raw = ranks::fisher_ranks_unrounded(&m, ratio, per_group);
                let sum: usize = raw.values().flatten().sum();
                assert_eq!(
                    sum, budget,
                    "layers {layers} groups {groups} ratio {ratio} per_group {per_group}"
                );
            }
        }
    }
}

#[test]
fn fisher_shares_follow_importance_and_caps() {
    let shares = ranks::proportional_shares(&[1.0, 3.0, 100.0], &[64, 64, 64], 120);
    assert_eq!(shares.iter().sum::<usize>(), 120);
    assert_eq!(shares[2], 64, "capped");
    assert!(shares[1] > shares[0]);
}

#[test]
fn waterfill_meets_the_budget_and_rounding() {
    let mut r = rng();
    let m = stats(&mut r, 30, 3, 64);
    for mult in [8, 16, 32] {
        let a = ranks::allocate(RankSearch::Waterfill, &m, 0.5, mult);
        let sum: usize = a.values().flatten().sum();
        assert!(sum <= 30 * 2 * 3 * 64 / 2, "over budget: {sum}");
        assert!(
            sum + mult * 2 > 30 * 2 * 3 * 64 / 2 - mult,
            "budget left unused: {sum}"
        );
        assert!(a
            .values()
            .flatten()
            .all(|&x| x % mult == 0 && x >= mult && x <= 64));
    }
}

#[test]
fn uniform_and_rounding_rules() {
    assert_eq!(ranks::round_rank(20.0, 32, 64), 32);
    assert_eq!(ranks::round_rank(47.0, 32, 64), 32);
    assert_eq!(ranks::round_rank(49.0, 32, 64), 64);
    assert_eq!(ranks::round_rank(3.0, 32, 64), 32, "never below one tile");
    assert_eq!(
        ranks::round_rank(100.0, 32, 64),
        64,
        "never above the group's full rank"
    );
}

#[test]
fn quantization_round_trip_is_within_half_a_step() {
    let mut r = rng();
    for bits in [2u8, 3, 4, 8] {
        let x: Vec<f32> = (0..96).map(|_| (r.random::<f32>() - 0.3) * 7.0).collect();
        let mut codes = vec![0u8; 96];
        let p = palu::quant::quantize_group(&x, bits, palu::quant::ZeroPoint::Free, &mut codes);
        let mut y = vec![0f32; 96];
        palu::quant::dequantize_group(&codes, p, &mut y);
        // Clamping cannot add error: round(min/s) + round(-min/s) = 0, so min maps to code 0 and
        // max to at most one code past qmax, whose clamp is off by the same rounding (≤ s/2).
        for (a, b) in x.iter().zip(&y) {
            assert!(
                (a - b).abs() <= p.scale * (0.5 + 1e-4),
                "bits {bits}: {a} -> {b} (scale {})",
                p.scale
            );
        }
        let packed = palu::quant::pack(&codes, bits);
        assert_eq!(packed.len(), (96 * bits as usize).div_ceil(8));
        assert_eq!(palu::quant::unpack(&packed, bits, 96), codes);
    }
}

#[test]
fn values_attended_in_latent_space_equal_rebuilt_values() {
    use candle_core::{Device, Tensor};
    use palu::lowrank::LowRankProj;
    let mut r = rng();
    let dev = Device::Cpu;
    let cfg = palu::config::ModelConfig::from_json_str(
        r#"{"model_type":"llama","hidden_size":128,"intermediate_size":128,"num_hidden_layers":1,
            "num_attention_heads":8,"num_key_value_heads":4,"vocab_size":32,"rms_norm_eps":1e-5,
            "max_position_embeddings":256,"rope_theta":10000.0}"#,
        std::path::Path::new("config.json"),
    )
    .unwrap();
    let rope = palu::model::Rope::new(&cfg, &dev);
    let t_rand = |r: &mut rand::rngs::StdRng, shape: &[usize]| {
        let n: usize = shape.iter().product();
        Tensor::from_vec(
            (0..n)
                .map(|_| r.random::<f32>() * 2.0 - 1.0)
                .collect::<Vec<_>>(),
            shape,
            &dev,
        )
        .unwrap()
    };
    let (b, h, n_kv, dh, d, total) = (2, 8, 4, 16, 128, 37);
    // Group sizes 1, 2 and 4 (M-, G-, J-LRD), uneven ranks, with and without a V bias (Qwen2).
    for (g, with_bias) in [(1usize, false), (2, true), (4, true)] {
        let groups = n_kv / g;
        let ranks: Vec<usize> = (0..groups).map(|i| 5 + 3 * i + g).collect();
        let rsum: usize = ranks.iter().sum();
        let proj = |r: &mut rand::rngs::StdRng, bias: bool| {
            let ups = ranks.iter().map(|&ri| t_rand(r, &[g * dh, ri])).collect();
            LowRankProj::new(
                t_rand(r, &[rsum, d]),
                ups,
                bias.then(|| t_rand(r, &[n_kv * dh])),
            )
            .unwrap()
        };
        let (kp, vp) = (proj(&mut r, false), proj(&mut r, with_bias));
        let hk = t_rand(&mut r, &[b, total, rsum]);
        let hv = t_rand(&mut r, &[b, total, rsum]);
        for t in [1usize, 3] {
            let q = t_rand(&mut r, &[b, h, t, dh]);
            let start = total - t;
            let latent = palu::model::latent_attention(
                &q, &hk, &hv, &kp, &vp, n_kv, &rope, start, None, false,
            )
            .unwrap();
            let (k, v) = palu::model::rebuild_kv(&hk, &hv, &kp, &vp, n_kv, &rope, false).unwrap();
            let dense = palu::model::grouped_attention(&q, &k, &v, start, None, false).unwrap();
            let diff: f32 = (&latent - &dense)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            let scale: f32 = dense
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "g={g} t={t}: max |Δ| {diff} (scale {scale})"
            );
        }
    }
}

/// Random f32 tensor in [-1, 1) from the test's generator.
fn tensor(
    r: &mut rand::rngs::StdRng,
    shape: &[usize],
    dev: &candle_core::Device,
) -> candle_core::Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.random::<f32>() * 2.0 - 1.0).collect();
    candle_core::Tensor::from_vec(v, shape, dev).unwrap()
}

fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The decode op's CPU twin (the reference the CUDA kernel is tested against) computes what the
/// model's attention computes: per sequence of a batch with different lengths, Llama-3 RoPE
/// frequencies, group sizes 1, 2, 4, latents read through a narrowed view of a larger cache.
#[test]
fn decode_op_cpu_twin_equals_model_attention() {
    use candle_core::{Device, IndexOp};
    use palu::decode_op::LatentDecode;
    use palu::lowrank::LowRankProj;
    let mut r = rng();
    let dev = Device::Cpu;
    let cfg = palu::config::ModelConfig::from_json_str(
        r#"{"model_type":"llama","hidden_size":128,"intermediate_size":64,"num_hidden_layers":1,
            "num_attention_heads":8,"num_key_value_heads":4,"vocab_size":32,"rms_norm_eps":1e-5,
            "max_position_embeddings":256,"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
                            "high_freq_factor":4.0,"original_max_position_embeddings":64}}"#,
        std::path::Path::new("config.json"),
    )
    .unwrap();
    let rope = palu::model::Rope::new(&cfg, &dev);
    let (h, n_kv, dh, d) = (8, 4, 16, 64);
    let lens = vec![37usize, 1, 20];
    let (b, cap) = (lens.len(), 45);
    for g in [1usize, 2, 4] {
        let groups = n_kv / g;
        let (rk, rv) = (3 + 2 * g, 4 + g);
        let proj = |r: &mut rand::rngs::StdRng, rank: usize| {
            let ups = (0..groups)
                .map(|_| tensor(r, &[g * dh, rank], &dev))
                .collect();
            LowRankProj::new(tensor(r, &[groups * rank, d], &dev), ups, None).unwrap()
        };
        let (kp, vp) = (proj(&mut r, rk), proj(&mut r, rv));
        // A pre-allocated cache [b, cap, R + 5] narrowed to [b, Lmax, R]: rows strided.
        let lmax = *lens.iter().max().unwrap();
        let hk_all = tensor(&mut r, &[b, cap, groups * rk + 5], &dev);
        let hv_all = tensor(&mut r, &[b, cap, groups * rv + 5], &dev);
        let hk = hk_all
            .narrow(1, 0, lmax)
            .unwrap()
            .narrow(2, 0, groups * rk)
            .unwrap();
        let hv = hv_all
            .narrow(1, 0, lmax)
            .unwrap()
            .narrow(2, 0, groups * rv)
            .unwrap();
        let q = tensor(&mut r, &[b, h, dh], &dev);
        let op = LatentDecode::from_projections(
            &kp,
            &vp,
            h,
            n_kv,
            rope.inv_freq(),
            candle_core::DType::F32,
        )
        .unwrap()
        .expect("equal ranks, no key bias")
        .with_lens(lens.clone());
        let got = op.forward(&q, &hk, &hv).unwrap();
        assert_eq!(got.dims(), &[b, h, dh]);
        for (i, &len) in lens.iter().enumerate() {
            let seq = |t: &candle_core::Tensor| {
                t.i(i..i + 1)
                    .unwrap()
                    .narrow(1, 0, len)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let qi = q.i(i..i + 1).unwrap().unsqueeze(2).unwrap(); // [1, H, 1, dh] at position len-1
            let want = palu::model::latent_attention(
                &qi,
                &seq(&hk),
                &seq(&hv),
                &kp,
                &vp,
                n_kv,
                &rope,
                len - 1,
                None,
                false,
            )
            .unwrap()
            .reshape((h, dh))
            .unwrap();
            let diff = max_abs(&(got.i(i).unwrap() - &want).unwrap());
            assert!(
                diff <= 1e-5 * max_abs(&want).max(1.0),
                "g={g} seq {i} (len {len}): max |Δ| {diff}"
            );
        }
    }
}

/// The planner's fused values: `o_proj·B_v` applied to the latent outputs equals `o_proj` applied
/// after `B_v` (and the value bias), for group sizes 1, 2, 4 with uneven ranks; the decode op's
/// latent outputs are the same latent outputs.
#[test]
fn fused_values_equal_unfused_values_through_o_proj() {
    use candle_core::{Device, IndexOp};
    use palu::decode_op::LatentDecode;
    use palu::lowrank::{linear, LowRankProj};
    use palu::model::{
        attention_probs, fused_o_proj, fused_value_inputs, latent_value_outputs, latent_values,
        rebuild_k,
    };
    let mut r = rng();
    let dev = Device::Cpu;
    let cfg = palu::config::ModelConfig::from_json_str(
        r#"{"model_type":"llama","hidden_size":128,"intermediate_size":64,"num_hidden_layers":1,
            "num_attention_heads":8,"num_key_value_heads":4,"vocab_size":32,"rms_norm_eps":1e-5,
            "max_position_embeddings":256,"rope_theta":10000.0}"#,
        std::path::Path::new("config.json"),
    )
    .unwrap();
    let rope = palu::model::Rope::new(&cfg, &dev);
    let (b, h, n_kv, dh, d, total) = (2, 8, 4, 16, 48, 29);
    for (g, with_bias, uniform) in [
        (1usize, false, true),
        (2, true, false),
        (4, true, true),
        (1, false, false),
    ] {
        let groups = n_kv / g;
        let ranks: Vec<usize> = (0..groups)
            .map(|i| if uniform { 6 + g } else { 5 + 3 * i + g })
            .collect();
        let rsum: usize = ranks.iter().sum();
        let proj = |r: &mut rand::rngs::StdRng, bias: bool| {
            let ups = ranks
                .iter()
                .map(|&ri| tensor(r, &[g * dh, ri], &dev))
                .collect();
            LowRankProj::new(
                tensor(r, &[rsum, d], &dev),
                ups,
                bias.then(|| tensor(r, &[n_kv * dh], &dev)),
            )
            .unwrap()
        };
        let (kp, vp) = (proj(&mut r, false), proj(&mut r, with_bias));
        let w_o = tensor(&mut r, &[d, h * dh], &dev);
        let (w_fused, b_fused) = fused_o_proj(&w_o, &vp, h, n_kv, dh).unwrap();
        assert_eq!(w_fused.dims(), &[d, h * rsum / groups]);
        assert_eq!(b_fused.is_some(), with_bias);
        let hk = tensor(&mut r, &[b, total, rsum], &dev);
        let hv = tensor(&mut r, &[b, total, rsum], &dev);
        let k = rebuild_k(&hk, &kp, n_kv, &rope, false).unwrap();
        for t in [1usize, 3] {
            let q = tensor(&mut r, &[b, h, t, dh], &dev);
            let probs = attention_probs(&q, &k, total - t, None, false).unwrap();
            let unfused = linear(
                &latent_values(&probs, &hv, &vp, n_kv, h, dh).unwrap(),
                &w_o,
                None,
            )
            .unwrap();
            let fused = linear(
                &fused_value_inputs(&probs, &hv, &vp, n_kv, t).unwrap(),
                &w_fused,
                b_fused.as_ref(),
            )
            .unwrap();
            let diff = max_abs(&(&fused - &unfused).unwrap());
            assert!(
                diff <= 1e-4 * max_abs(&unfused).max(1.0),
                "g={g} t={t} bias={with_bias}: max |Δ| {diff}"
            );
        }
        // The decode op's latent outputs (one token per sequence) are these latent outputs.
        if uniform && !with_bias {
            let lens = vec![total; b];
            let op = LatentDecode::from_projections(
                &kp,
                &vp,
                h,
                n_kv,
                rope.inv_freq(),
                candle_core::DType::F32,
            )
            .unwrap()
            .expect("equal ranks, no key bias")
            .with_lens(lens)
            .with_latent_out();
            let q = tensor(&mut r, &[b, h, dh], &dev);
            let got = op.forward(&q, &hk, &hv).unwrap(); // [b, H, r]
            let probs =
                attention_probs(&q.unsqueeze(2).unwrap(), &k, total - 1, None, false).unwrap();
            let want = latent_value_outputs(&probs, &hv, &vp, n_kv, 1).unwrap(); // per group [b, g·rep, 1, r]
            let want = candle_core::Tensor::cat(&want, 1)
                .unwrap()
                .squeeze(2)
                .unwrap();
            let diff = max_abs(&(&got - &want).unwrap());
            assert!(
                diff <= 1e-5 * max_abs(&want).max(1.0),
                "g={g}: decode op latent out max |Δ| {diff}"
            );
            assert_eq!(got.i(0).unwrap().dims(), &[h, ranks[0]]);
        }
    }
}

/// Misuse is an error naming what is wrong, not a wrong answer.
#[test]
fn decode_op_rejects_bad_lengths_and_shapes() {
    use candle_core::{DType, Device, Tensor};
    use palu::decode_op::LatentDecode;
    let dev = Device::Cpu;
    let op = LatentDecode {
        bk: Tensor::ones((2, 16, 4), DType::F32, &dev).unwrap(),
        bv: Tensor::ones((2, 16, 4), DType::F32, &dev).unwrap(),
        inv_freq: Tensor::ones(8, DType::F32, &dev).unwrap(),
        lens: vec![5, 0],
        n_heads: 4,
        n_kv: 2,
        packed: None,
        latent_out: false,
        pages: None,
    };
    let q = Tensor::ones((2, 4, 16), DType::F32, &dev).unwrap();
    let h = Tensor::ones((2, 5, 8), DType::F32, &dev).unwrap();
    let e = op.forward(&q, &h, &h).unwrap_err().to_string();
    assert!(e.contains("lengths [5, 0]"), "{e}");
    let e = op
        .with_lens(vec![5, 6])
        .forward(&q, &h, &h)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 5 tokens"), "{e}");
    let wide = Tensor::ones((2, 5, 9), DType::F32, &dev).unwrap();
    let e = op
        .with_lens(vec![5, 3])
        .forward(&q, &wide, &h)
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not match"), "{e}");
}

/// The CUDA kernel against its CPU twin on fresh random inputs, f16 and bf16, Llama-3-8B and
/// Llama-2-7B attention shapes, g = 1, 2 and 4 (g = 4: one-head virtual groups of rank up to
/// 256 reading the shared latent), ragged batch, the model cache's layout. Runs on a GPU only
/// (`just gpu-test`).
#[cfg(feature = "cuda")]
#[test]
fn decode_kernel_matches_cpu_twin() {
    use candle_core::{DType, Device};
    use palu::decode_op::LatentDecode;
    let mut r = rng();
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let cpu = Device::Cpu;
    // The kernel rounds rebuilt keys and probabilities to the element type: a few units of its
    // rounding (2^-11 for f16, 2^-8 for bf16) of relative error, 3e-3 and 8x that.
    for (dtype, tol) in [(DType::F16, 3e-3f32), (DType::BF16, 2.4e-2)] {
        for (name, h, n_kv, g, rank) in [
            ("llama3-8b", 32, 8, 1, 64),
            ("llama3-8b", 32, 8, 2, 80),
            ("llama3-8b", 32, 8, 1, 40),
            ("llama3-8b", 32, 8, 4, 256),
            ("llama3-8b", 32, 8, 4, 200),
            ("llama2-7b", 32, 32, 1, 64),
            ("llama2-7b", 32, 32, 4, 256),
            ("smollm2", 9, 3, 3, 96),
        ] {
            let dh = if name == "smollm2" { 64 } else { 128 };
            let groups = n_kv / g;
            let lens = vec![1000usize, 77, 2113];
            let (b, lmax) = (lens.len(), 2113);
            let inv: Vec<f32> = (0..dh / 2)
                .map(|i| 500000f32.powf(-2.0 * i as f32 / dh as f32))
                .collect();
            let bk = (tensor(&mut r, &[groups, g * dh, rank], &cpu) * (2.0 / (rank as f64).sqrt()))
                .unwrap();
            let bv = (tensor(&mut r, &[groups, g * dh, rank], &cpu) * (1.0 / (rank as f64).sqrt()))
                .unwrap();
            let q = tensor(&mut r, &[b, h, dh], &cpu);
            let hk = tensor(&mut r, &[b, lmax, groups * rank], &cpu);
            let hv = tensor(&mut r, &[b, lmax, groups * rank], &cpu);
            // Both sides see the same rounded values.
            let cast = |t: &candle_core::Tensor| t.to_dtype(dtype).unwrap();
            let on = |t: &candle_core::Tensor| cast(t).to_device(&gpu).unwrap();
            // B_v applied in the kernel ([B, H, dh]), and the fused values' latent outputs
            // before B_v ([B, H, r]).
            for latent_out in [false, true] {
                let op = |dev: &Device| LatentDecode {
                    bk: cast(&bk).to_device(dev).unwrap(),
                    bv: cast(&bv).to_device(dev).unwrap(),
                    inv_freq: candle_core::Tensor::new(inv.as_slice(), dev).unwrap(),
                    lens: lens.clone(),
                    n_heads: h,
                    n_kv,
                    packed: None,
                    latent_out,
                    pages: None,
                };
                let want = op(&cpu).forward(&cast(&q), &cast(&hk), &cast(&hv)).unwrap();
                let got = op(&gpu)
                    .forward(&on(&q), &on(&hk), &on(&hv))
                    .unwrap()
                    .to_device(&cpu)
                    .unwrap();
                assert_eq!(got.dims(), &[b, h, if latent_out { rank } else { dh }]);
                let err = common::rel_l2(&got, &want);
                println!("{dtype:?} {name} g={g} r={rank} lens={lens:?} latent_out={latent_out}: relative L2 error {err:.2e}");
                assert!(
                    err < tol && err.is_finite(),
                    "{dtype:?} {name} g={g} r={rank} latent_out={latent_out}: relative L2 error {err:.2e}"
                );
            }
        }
    }
}

/// Packed rows (the serving cache's 2/4/8-bit format) through the decode op give exactly what the
/// op gives on the rows the codec decodes, rounded to the activation dtype: the CPU twin of the
/// packed kernel reads the cache's bytes where they are (strides of a narrowed cache).
#[test]
fn decode_op_on_packed_rows_equals_decode_op_on_decoded_rows() {
    use candle_core::{DType, Device};
    use palu::decode_op::LatentDecode;
    use palu::latent_codec::LatentCodec;
    use palu::quant::ZeroPoint;
    let mut r = rng();
    let dev = Device::Cpu;
    let (h, n_kv, g, dh, rank) = (8usize, 2usize, 1usize, 32usize, 16usize);
    let groups = n_kv / g;
    let lens = vec![23usize, 9];
    let (b, lmax) = (lens.len(), 23);
    let inv: Vec<f32> = (0..dh / 2)
        .map(|i| 10000f32.powf(-2.0 * i as f32 / dh as f32))
        .collect();
    for bits in [2u8, 4, 8] {
        let codec = LatentCodec::new(bits, &vec![rank; groups], ZeroPoint::Free).unwrap();
        let op = LatentDecode {
            bk: tensor(&mut r, &[groups, g * dh, rank], &dev)
                .to_dtype(DType::F16)
                .unwrap(),
            bv: tensor(&mut r, &[groups, g * dh, rank], &dev)
                .to_dtype(DType::F16)
                .unwrap(),
            inv_freq: candle_core::Tensor::new(inv.as_slice(), &dev).unwrap(),
            lens: lens.clone(),
            n_heads: h,
            n_kv,
            packed: None,
            latent_out: false,
            pages: None,
        };
        let q = tensor(&mut r, &[b, h, dh], &dev)
            .to_dtype(DType::F16)
            .unwrap();
        let encode = |r: &mut rand::rngs::StdRng| {
            // A cache with room for more tokens, narrowed to Lmax rows.
            let x = tensor(r, &[b, lmax + 4, groups * rank], &dev);
            codec.encode(&x).unwrap().narrow(1, 0, lmax).unwrap()
        };
        let (pk, pv) = (encode(&mut r), encode(&mut r));
        let packed = op.clone().with_packed(codec.clone(), codec.clone());
        let got = packed.forward(&q, &pk, &pv).unwrap();
        let dk = codec.decode(&pk.contiguous().unwrap(), DType::F16).unwrap();
        let dv = codec.decode(&pv.contiguous().unwrap(), DType::F16).unwrap();
        let want = op.forward(&q, &dk, &dv).unwrap();
        let diff = max_abs(&(&got - &want).unwrap());
        assert_eq!(diff, 0.0, "{bits}-bit: max |Δ| {diff}");
        // Rows of the wrong width are refused with the codec's numbers.
        let e = packed.forward(&q, &dk, &dv).unwrap_err().to_string();
        assert!(e.contains("do not match"), "{e}");
    }
}

/// The packed-latent kernel (2/4/8-bit rows dequantized in shared memory) against its CPU twin
/// on fresh random latents encoded by the codec, f16 and bf16, Llama-3-8B and Llama-2-7B shapes
/// at g = 1, rows of 2 and 1 KV groups (8- and 4-byte aligned), and Llama-3-8B at g = 2 and 4
/// (virtual heads), ragged batch. Runs on a GPU only (`just gpu-test`).
#[cfg(feature = "cuda")]
#[test]
fn packed_decode_kernel_matches_cpu_twin() {
    use candle_core::{DType, Device};
    use palu::decode_op::LatentDecode;
    use palu::latent_codec::LatentCodec;
    use palu::quant::ZeroPoint;
    let mut r = rng();
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let cpu = Device::Cpu;
    for (dtype, tol) in [(DType::F16, 3e-3f32), (DType::BF16, 2.4e-2)] {
        for bits in [2u8, 4, 8] {
            // Rows of 2 and 1 KV groups are 8- and 4-byte aligned (the kernel's narrower copies).
            for (name, h, n_kv, g) in [
                ("llama3-8b", 32usize, 8usize, 1usize),
                ("llama2-7b", 32, 32, 1),
                ("gqa4-2kv", 8, 2, 1),
                ("gqa4-1kv", 4, 1, 1),
                ("llama3-8b", 32, 8, 2),
                ("llama3-8b", 32, 8, 4),
            ] {
                let (dh, rank, groups) = (128usize, 64 * g, n_kv / g);
                assert!(palu_kernels::decode_packed_supported(
                    dh,
                    g,
                    h / n_kv,
                    rank,
                    rank,
                    bits
                ));
                let lens = vec![1000usize, 77, 2113];
                let (b, lmax) = (lens.len(), 2113);
                let inv: Vec<f32> = (0..dh / 2)
                    .map(|i| 500000f32.powf(-2.0 * i as f32 / dh as f32))
                    .collect();
                let codec = LatentCodec::new(bits, &vec![rank; groups], ZeroPoint::Free).unwrap();
                let bk = (tensor(&mut r, &[groups, g * dh, rank], &cpu)
                    * (2.0 / (rank as f64).sqrt()))
                .unwrap();
                let bv = (tensor(&mut r, &[groups, g * dh, rank], &cpu)
                    * (1.0 / (rank as f64).sqrt()))
                .unwrap();
                let q = tensor(&mut r, &[b, h, dh], &cpu).to_dtype(dtype).unwrap();
                let pk = codec
                    .encode(&tensor(&mut r, &[b, lmax, groups * rank], &cpu))
                    .unwrap();
                let pv = codec
                    .encode(&tensor(&mut r, &[b, lmax, groups * rank], &cpu))
                    .unwrap();
                let op = |dev: &Device| {
                    LatentDecode {
                        bk: bk.to_dtype(dtype).unwrap().to_device(dev).unwrap(),
                        bv: bv.to_dtype(dtype).unwrap().to_device(dev).unwrap(),
                        inv_freq: candle_core::Tensor::new(inv.as_slice(), dev).unwrap(),
                        lens: lens.clone(),
                        n_heads: h,
                        n_kv,
                        packed: None,
                        latent_out: false,
                        pages: None,
                    }
                    .with_packed(codec.clone(), codec.clone())
                };
                let want = op(&cpu).forward(&q, &pk, &pv).unwrap();
                let on = |t: &candle_core::Tensor| t.to_device(&gpu).unwrap();
                let before = palu::decode_op::cuda_launches();
                let got = op(&gpu)
                    .forward(&on(&q), &on(&pk), &on(&pv))
                    .unwrap()
                    .to_device(&cpu)
                    .unwrap();
                assert_eq!(palu::decode_op::cuda_launches(), before + 1);
                let err = common::rel_l2(&got, &want);
                println!("{dtype:?} {bits}-bit {name} g={g} r={rank} lens={lens:?}: relative L2 error {err:.2e}");
                assert!(
                    err < tol && err.is_finite(),
                    "{dtype:?} {bits}-bit {name} g={g}: relative L2 error {err:.2e}"
                );
            }
        }
    }
}

/// Long prompts are attended in blocks of query rows; the result may not depend on the block
/// size (causal and sliding-window masks, a prefix already cached, GQA).
#[test]
fn blocked_attention_equals_one_block() {
    use candle_core::Device;
    let mut r = rng();
    let dev = Device::Cpu;
    let (b, h, n_kv, dh, start, t) = (2, 6, 2, 8, 9, 23);
    let q = tensor(&mut r, &[b, h, t, dh], &dev);
    let k = tensor(&mut r, &[b, n_kv, start + t, dh], &dev);
    let v = tensor(&mut r, &[b, n_kv, start + t, dh], &dev);
    for window in [None, Some(5)] {
        let whole =
            palu::model::grouped_attention_blocked(&q, &k, &v, start, window, false, usize::MAX)
                .unwrap();
        for block in [1, 4, 7, 22] {
            let blocked =
                palu::model::grouped_attention_blocked(&q, &k, &v, start, window, false, block)
                    .unwrap();
            let d = max_abs(&(&blocked - &whole).unwrap());
            assert!(d <= 1e-6, "window {window:?}, block {block}: max |Δ| {d}");
        }
    }
}

/// Rebuilding K/V group by group (equal ranks: one batched matmul) equals the block-diagonal
/// product, with and without a bias, for 2-d and 3-d latents.
#[test]
fn grouped_reconstruction_equals_block_diagonal() {
    use candle_core::Device;
    use palu::lowrank::{block_diag, LowRankProj};
    let mut r = rng();
    let dev = Device::Cpu;
    let (groups, gdh, rank, d) = (4, 12, 5, 20);
    for with_bias in [false, true] {
        let ups: Vec<_> = (0..groups)
            .map(|_| tensor(&mut r, &[gdh, rank], &dev))
            .collect();
        let bias = with_bias.then(|| tensor(&mut r, &[groups * gdh], &dev));
        let p = LowRankProj::new(
            tensor(&mut r, &[groups * rank, d], &dev),
            ups.clone(),
            bias.clone(),
        )
        .unwrap();
        let bd = block_diag(&ups).unwrap();
        for shape in [vec![7, groups * rank], vec![2, 9, groups * rank]] {
            let h = tensor(&mut r, &shape, &dev);
            let want = palu::lowrank::linear(&h, &bd, bias.as_ref()).unwrap();
            let got = p.reconstruct(&h).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = max_abs(&(&got - &want).unwrap());
            assert!(diff <= 1e-5, "bias {with_bias}, {shape:?}: max |Δ| {diff}");
        }
    }
}

/// The CUDA latent codec (pack on write, unpack on read) against the CPU reference on fresh
/// random latents: the same bytes out of the encoder and the same floats out of the decoder,
/// bit for bit, at 2/3/4/8 bits, one group (J-LRD), eight equal groups (M-LRD), ragged groups,
/// both zero-point rules, with a constant group (scale at its floor) and an offset group. Runs
/// on a GPU only (`just gpu-test`).
#[cfg(feature = "cuda")]
#[test]
fn latent_codec_kernels_match_cpu_twin_bit_for_bit() {
    use candle_core::{DType, Device, Tensor};
    use palu::latent_codec::LatentCodec;
    use palu::quant::ZeroPoint;
    let mut r = rng();
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    fn host<T: candle_core::WithDType>(t: &Tensor) -> Vec<T> {
        t.to_device(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
    fn bit_patterns(t: &Tensor) -> Vec<u32> {
        host::<f32>(&t.to_dtype(DType::F32).unwrap())
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }
    let rows = 3001;
    for widths in [vec![64usize], vec![16; 8], vec![24, 40, 8, 56]] {
        let width: usize = widths.iter().sum();
        let mut x: Vec<f32> = (0..rows * width)
            .map(|i| (r.random::<f32>() * 2.0 - 1.0) * (1.0 + (i % width) as f32 / 8.0))
            .collect();
        for row in 0..rows {
            // First group constant in every 7th row; last group far from zero in every 5th.
            if row % 7 == 0 {
                x[row * width..row * width + widths[0]].fill(0.37);
            }
            if row % 5 == 0 {
                let last = widths[widths.len() - 1];
                for v in &mut x[(row + 1) * width - last..(row + 1) * width] {
                    *v += 300.0;
                }
            }
        }
        let h = Tensor::from_vec(x, (rows, width), &Device::Cpu).unwrap();
        for bits in [2u8, 3, 4, 8] {
            for zp in [ZeroPoint::Free, ZeroPoint::Clamped] {
                let c = LatentCodec::new(bits, &widths, zp).unwrap();
                let want = c.encode(&h).unwrap();
                let got = c.encode(&h.to_device(&gpu).unwrap()).unwrap();
                let (want_b, got_b) = (host::<u8>(&want), host::<u8>(&got));
                let bad = want_b.iter().zip(&got_b).filter(|(a, b)| a != b).count();
                // Decoded values compared as f32 bit patterns; the 16-bit types straight from the
                // GPU must equal the CPU's f32 rounded by candle (every f16 / bf16 value is exact
                // in f32).
                let on_gpu = want.to_device(&gpu).unwrap();
                let dec = |rows: &Tensor, dt| bit_patterns(&c.decode(rows, dt).unwrap());
                let (dec_cpu, dec_gpu) = (dec(&want, DType::F32), dec(&on_gpu, DType::F32));
                let bad_dec = dec_cpu.iter().zip(&dec_gpu).filter(|(a, b)| a != b).count();
                println!(
                    "codec {bits}-bit {zp:?} groups {widths:?}: {} bytes, {bad} differ; {} values decoded, {bad_dec} differ",
                    want_b.len(),
                    dec_cpu.len()
                );
                for dt in [DType::F16, DType::BF16] {
                    let (a, b) = (dec(&want, dt), dec(&on_gpu, dt));
                    let bad16 = a.iter().zip(&b).filter(|(x, y)| x != y).count();
                    assert_eq!(
                        bad16,
                        0,
                        "{bits_n}-bit {zp:?} {widths:?} to {dt:?}: values differ",
                        bits_n = c.bits()
                    );
                }
                assert_eq!(want_b.len(), got_b.len());
                assert_eq!(bad, 0, "{bits}-bit {zp:?} {widths:?}: encoded bytes differ");
                assert_eq!(
                    bad_dec, 0,
                    "{bits}-bit {zp:?} {widths:?}: decoded values differ"
                );
            }
        }
    }
}

/// The fused latent write (projection + quantization + packing in one kernel) against its CPU
/// twin on fresh random inputs: f16 and bf16, Llama-3-8B's d = 4096 with 8 groups of 64 and a
/// SmolLM2-like mixed-rank layout, 2/3/4/8 bits, decode (1, 8 tokens) and prefill (300) sizes.
/// Both round h to the dtype after summing in different orders, so a value on a rounding
/// boundary may land one code away: never more than one step, and almost every byte equal.
#[cfg(feature = "cuda")]
#[test]
fn latent_codec_kernels_fused_write_matches_cpu_twin() {
    use candle_core::{DType, Device};
    use palu::latent_codec::LatentCodec;
    use palu::quant::ZeroPoint;
    let mut r = rng();
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let cpu = Device::Cpu;
    let before = palu::latent_codec::cuda_fused_writes();
    let mut launches = 0;
    for (d, widths) in [(4096usize, vec![64usize; 8]), (576, vec![96, 56, 184])] {
        let width: usize = widths.iter().sum();
        let down = (tensor(&mut r, &[width, d], &cpu) * (2.0 / (d as f64).sqrt())).unwrap();
        for n in [1usize, 8, 300] {
            let x = tensor(&mut r, &[n, d], &cpu);
            for dtype in [DType::F16, DType::BF16] {
                let (xd, wd) = (x.to_dtype(dtype).unwrap(), down.to_dtype(dtype).unwrap());
                for bits in [2u8, 3, 4, 8] {
                    let c = LatentCodec::new(bits, &widths, ZeroPoint::Free).unwrap();
                    let (xg, wg) = (xd.to_device(&gpu).unwrap(), wd.to_device(&gpu).unwrap());
                    // The engine takes the fused kernel for decode-sized writes only; the op
                    // runs it at any size.
                    assert_eq!(
                        c.fused_write_supported(&xg, &wg),
                        n <= palu::latent_codec::FUSED_WRITE_MAX_ROWS,
                        "d={d} {widths:?} {bits}-bit n={n}"
                    );
                    let got = c
                        .project_encode_op(&xg, &wg)
                        .unwrap()
                        .to_device(&cpu)
                        .unwrap();
                    launches += 1;
                    let want = c.project_encode_op(&xd, &wd).unwrap();
                    // One code step (a value on a rounding boundary) plus the dtype's rounding
                    // of h on each side (2^-11 relative for f16, 2^-8 for bf16), which moves a
                    // group's range and so every code's dequantized value by that much.
                    let eps = if dtype == DType::F16 {
                        2f32.powi(-11)
                    } else {
                        2f32.powi(-8)
                    };
                    let (worst, same) = common::row_agreement(&c, &got, &want, eps);
                    println!("fused write {dtype:?} {bits}-bit d={d} groups={widths:?} n={n}: {worst:.3} of the bound at most, {:.4} of bytes equal", same);
                    assert!(
                        worst <= 1.0,
                        "{dtype:?} {bits}-bit d={d} n={n}: {worst} of (one step + h's rounding)"
                    );
                    assert!(
                        same >= 0.97,
                        "{dtype:?} {bits}-bit d={d} n={n}: {same} of bytes equal"
                    );
                }
            }
        }
    }
    assert_eq!(
        palu::latent_codec::cuda_fused_writes() - before,
        launches,
        "every write ran on the fused kernel"
    );
}

/// `fp8_round_rows` rounds each row to e4m3 after scaling its largest magnitude to 448: every
/// element within e4m3's half-ulp (2⁻⁴ relative for normals, 2⁻¹⁰·scale absolute below 2⁻⁶·scale),
/// the row maximum kept, zero rows zero; and the simulated fp8 rebuild moves `reconstruct` by
/// about that much, never by nothing.
#[test]
fn fp8_rows_and_the_fp8_rebuild_stay_within_e4m3_rounding() {
    use palu::lowrank::{fp8_round_rows, LowRankProj};
    let mut r = rng();
    let dev = candle_core::Device::Cpu;
    // Rows of very different magnitudes (the per-row scale must follow each), one row of zeros.
    let (rows, cols) = (6, 64);
    let mut v: Vec<f32> = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        let mag = if i == 3 {
            0.0
        } else {
            10f32.powi(i as i32 - 2)
        };
        v.extend((0..cols).map(|_| (r.random::<f32>() * 2.0 - 1.0) * mag));
    }
    let t = candle_core::Tensor::from_vec(v.clone(), (rows, cols), &dev).unwrap();
    let q = fp8_round_rows(&t).unwrap().to_vec2::<f32>().unwrap();
    let mut moved = 0;
    for i in 0..rows {
        let row = &v[i * cols..(i + 1) * cols];
        let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = amax / 448.0;
        for (j, (&x, &y)) in row.iter().zip(&q[i]).enumerate() {
            let bound = (x.abs() / 16.0).max(scale / 1024.0) * (1.0 + 1e-5) + 1e-30;
            assert!(
                (x - y).abs() <= bound,
                "row {i} col {j}: {x} -> {y} (bound {bound})"
            );
            if x.abs() == amax {
                assert!((x - y).abs() <= amax * 1e-6, "row maximum {x} -> {y}");
            }
            moved += (x != y) as usize;
        }
        if amax == 0.0 {
            assert!(q[i].iter().all(|&y| y == 0.0), "zero row");
        }
    }
    assert!(
        moved > rows * cols / 2,
        "rounding changed only {moved} values"
    );

    let (d, dh, g, ranks) = (48, 16, 2, [12usize, 20]);
    let ups: Vec<_> = ranks
        .iter()
        .map(|&ri| tensor(&mut r, &[g * dh, ri], &dev))
        .collect();
    let rsum: usize = ranks.iter().sum();
    let p = LowRankProj::new(tensor(&mut r, &[rsum, d], &dev), ups, None).unwrap();
    let p8 = p.with_fp8_rebuild().unwrap();
    let h = tensor(&mut r, &[3, 5, rsum], &dev);
    let (a, b) = (p.reconstruct(&h).unwrap(), p8.reconstruct(&h).unwrap());
    let rel = common::rel_l2(&b, &a);
    // Two e4m3 roundings (≤ 2⁻⁴ each, ~2⁻⁶ in RMS for uniform inputs) on random-signed sums.
    assert!(
        rel > 1e-3 && rel < 0.08,
        "fp8 rebuild moved reconstruct by {rel}"
    );
    assert_eq!(
        p8.latent(&tensor(&mut r, &[2, d], &dev)).unwrap().dims(),
        &[2, rsum]
    );
}
