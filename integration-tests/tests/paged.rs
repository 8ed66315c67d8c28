//! The Palu model over the engine's paged KV blocks, driven on the CPU with the inputs the
//! engine's paged scheduler builds (the engine itself has no CPU paged attention; the GPU test
//! in engine_gpu.rs runs the same steps through the CUDA kernel). SmolLM2-135M at Palu-50 %
//! (the shipped allocation), real text; the yardstick is the same model's plain (unpaged)
//! prefill of the whole sequence.
use candle_core::{DType, Device};
use palu_integration_tests::direct::paged_steps_match_the_plain_cache;

#[test]
fn paged_forward_on_cpu_matches_the_plain_cache_16_bit_blocks_of_16() {
    paged_steps_match_the_plain_cache(&Device::Cpu, DType::F32, None, 16, 16, 1e-5, 1.0, None);
}

#[test]
fn paged_forward_on_cpu_matches_the_plain_cache_4_bit_blocks_of_32() {
    paged_steps_match_the_plain_cache(&Device::Cpu, DType::F32, None, 4, 32, 1e-5, 1.0, None);
}

/// fp8 blocks (`--pa-cache-type f8e4m3`): 16-bit latents stored as float8 e4m3 without a scale.
/// Against the f32 plain cache the distance is fp8's rounding of the latents; its effect on
/// perplexity is measured in docs/accuracy.md.
#[test]
fn paged_forward_on_cpu_with_fp8_blocks_stays_close_to_the_plain_cache() {
    paged_steps_match_the_plain_cache(
        &Device::Cpu,
        DType::F32,
        Some(DType::F8E4M3),
        16,
        16,
        0.1,
        0.9,
        None,
    );
}

/// The accuracy of fp8 blocks through the serving code path: WikiText-2 perplexity of SmolLM2
/// Palu-50 % prefilled over paged blocks in chunks of 128 (every chunk after the first reads the
/// earlier ones from the blocks), blocks in f32 and in float8 e4m3, against the plain cache.
#[test]
fn fp8_blocks_cost_little_perplexity_through_the_paged_path() {
    use palu_integration_tests::direct::{load, paged_prefill_logits, prefill_logits, Pools};
    use palu_integration_tests::{nll, smollm2_palu50, wikitext_windows};
    let dir = smollm2_palu50();
    let windows = wikitext_windows(&dir, 512, 2);
    let cpu = Device::Cpu;
    let plain = load(&dir, 16, false, &cpu, DType::F32).unwrap();
    let paged = load(&dir, 16, true, &cpu, DType::F32).unwrap();
    let ppl = |logits: &dyn Fn(&[u32]) -> candle_core::Tensor| {
        let mut all = Vec::new();
        for w in &windows {
            all.extend(nll(&logits(w), w).unwrap());
        }
        (all.iter().sum::<f64>() / all.len() as f64).exp()
    };
    let p_plain = ppl(&|w| prefill_logits(&plain, w).unwrap());
    let mut p = Vec::new();
    for pool in [DType::F32, DType::F8E4M3] {
        p.push(ppl(&|w| {
            let mut pools = Pools::new(&paged, w.len() / 16 + 2, 16, pool, 11).unwrap();
            paged_prefill_logits(&paged, &mut pools, w, 128).unwrap()
        }));
    }
    println!(
        "SmolLM2 Palu-50 %, WikiText-2 first 2 × 512 tokens, CPU f32: plain cache {p_plain:.4}, paged f32 blocks {:.4} ({:+.3} %), paged fp8 blocks {:.4} ({:+.3} %)",
        p[0],
        100.0 * (p[0] / p_plain - 1.0),
        p[1],
        100.0 * (p[1] / p_plain - 1.0)
    );
    assert!(
        (p[0] / p_plain - 1.0).abs() < 1e-4,
        "paged f32 blocks change perplexity"
    );
    assert!(
        (p[1] / p_plain - 1.0).abs() < 0.02,
        "fp8 blocks cost more than 2 % perplexity"
    );
}

/// The planner's executors over paged blocks: full keys (post-RoPE K rows in the blocks) in
/// every third layer and fused values in every second, on both models, 16-bit and 4-bit rows.
#[test]
fn paged_forward_on_cpu_with_a_mixed_plan_matches_the_plain_cache() {
    use palu_integration_tests::{mixed_choice, smollm2_palu50, write_plan};
    let tmp = tempfile::tempdir().unwrap();
    let path = write_plan(
        &smollm2_palu50(),
        &tmp.path().join("plan.toml"),
        mixed_choice,
    );
    let plan = palu::planner::Plan::from_toml_file(&path).unwrap();
    assert!(!plan.full_key_layers().is_empty());
    for (bits, bs) in [(16u8, 16usize), (4, 32)] {
        paged_steps_match_the_plain_cache(
            &Device::Cpu,
            DType::F32,
            None,
            bits,
            bs,
            1e-5,
            1.0,
            Some(&plan),
        );
    }
}
