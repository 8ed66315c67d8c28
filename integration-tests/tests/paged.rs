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

/// A step too large for one pass (candle 0.10's CUDA kernels index 32-bit element counts:
/// huggingface/candle#3604) runs as sub-batches of sequences: three prompts prefilled together
/// with a limit that fits one sequence per pass give the logits of the single pass, each
/// sequence's rows landing in its own blocks (a decode step over them agrees too); a limit
/// below one prompt chunk is a clear error naming the numbers, not a hang.
#[test]
fn a_paged_step_above_the_activation_limit_runs_as_sub_batches() {
    use palu_integration_tests::direct::{compare, load, paged_step, Pools, Seq};
    let dir = palu_integration_tests::smollm2_palu50();
    let tok = palu::tokenizer::load(&dir).unwrap();
    let enc = |s: &str| palu::tokenizer::encode(&tok, s).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "The river runs through the old town, past the mill and under the stone bridge.",
        "In the spring the market fills with farmers who bring cheese, bread and apples.",
        "Every evening the bells of the great church ring across the empty square below.",
    ]
    .iter()
    .map(|p| enc(p)[..14].to_vec())
    .collect();
    let run = |limit: Option<usize>| {
        let mut model = load(&dir, 16, true, &Device::Cpu, DType::F32).unwrap();
        if let Some(n) = limit {
            model.set_max_activation_elems(n);
        }
        let mut pools = Pools::new(&model, 16, 16, DType::F32, 5).unwrap();
        let tables: Vec<Vec<u32>> = (0..3)
            .map(|_| {
                let mut t = Vec::new();
                pools.reserve(&mut t, 15);
                t
            })
            .collect();
        let seqs: Vec<Seq> = (0..3)
            .map(|i| Seq {
                new: &prompts[i],
                offset: 0,
                table: &tables[i],
            })
            .collect();
        let prefill = paged_step(&model, &pools, &seqs);
        // One decode step of all three over the rows the prefill wrote.
        let next = [7u32, 11, 13];
        let decode = prefill.as_ref().ok().map(|_| {
            let seqs: Vec<Seq> = (0..3)
                .map(|i| Seq {
                    new: &next[i..i + 1],
                    offset: 14,
                    table: &tables[i],
                })
                .collect();
            paged_step(&model, &pools, &seqs).unwrap()
        });
        (prefill, decode)
    };
    let (whole, whole_dec) = run(None);
    let (whole, whole_dec) = (whole.unwrap(), whole_dec.unwrap());
    // SmolLM2: widest activation 2 × 1536 per token; one 14-token prompt is 43,008 elements.
    let (split, split_dec) = run(Some(50_000));
    let (split, split_dec) = (split.unwrap(), split_dec.unwrap());
    assert_eq!(split.dims(), whole.dims());
    let (rel, agree, rows) = compare(&split.flatten(0, 1).unwrap(), &whole.flatten(0, 1).unwrap());
    assert!(
        rel < 1e-5 && agree == rows,
        "prefill in sub-batches: {rel:.2e}, {agree}/{rows}"
    );
    let (rel, agree, rows) = compare(
        &split_dec.flatten(0, 1).unwrap(),
        &whole_dec.flatten(0, 1).unwrap(),
    );
    assert!(
        rel < 1e-5 && agree == rows,
        "decode after it: {rel:.2e}, {agree}/{rows}"
    );

    let (err, _) = run(Some(40_000));
    let err = err.unwrap_err().to_string();
    assert!(
        err.contains("a prompt chunk of 14 tokens makes a 14 × 3072 activation (43008 elements), more than the 40000"),
        "{err}"
    );
}
