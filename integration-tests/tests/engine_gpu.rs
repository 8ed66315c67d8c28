//! The engine on a GPU against the engine on the CPU, on real data: SmolLM2-135M-Instruct at
//! Palu-50 % (the shipped allocation, J-LRD) and WikiText-2. `just gpu-test` builds this with
//! `--features cuda` and runs it on the H200; without the feature the file is empty.
//!
//! The yardstick for "agrees" is the stock engine itself: the same model without Palu, on the
//! same GPU in the same dtype, against its own CPU f32 run. Palu on the GPU may not drift further
//! from the CPU than that (16-bit activations over 30 layers move some logit rows by a few %).
#![cfg(feature = "cuda")]
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, IndexOp, Tensor};
use mistralrs_core::{
    Constraint, MistralRs, ModelDType, NormalRequest, Request, RequestMessage, Response,
    SamplingParams,
};
use palu::engine::server::{start, EngineOptions, KvCacheKind, PagedOptions, Served};
use palu_integration_tests::{engine_logits, nll, smollm2, smollm2_palu50, wikitext_windows};

async fn serve(model_dir: &Path, kv: KvCacheKind, gpu: bool, prefix_cache: bool) -> Served {
    // The CPU reference runs in f32, the GPU in f16 unless said otherwise.
    serve_as(
        model_dir,
        kv,
        if gpu {
            ModelDType::F16
        } else {
            ModelDType::F32
        },
        gpu,
        prefix_cache,
    )
    .await
}

async fn serve_as(
    model_dir: &Path,
    kv: KvCacheKind,
    dtype: ModelDType,
    gpu: bool,
    prefix_cache: bool,
) -> Served {
    serve_bits(model_dir, kv, dtype, gpu, prefix_cache, 16).await
}

async fn serve_bits(
    model_dir: &Path,
    kv: KvCacheKind,
    dtype: ModelDType,
    gpu: bool,
    prefix_cache: bool,
    latent_bits: u8,
) -> Served {
    serve_planned(model_dir, kv, dtype, gpu, prefix_cache, latent_bits, None).await
}

async fn serve_planned(
    model_dir: &Path,
    kv: KvCacheKind,
    dtype: ModelDType,
    gpu: bool,
    prefix_cache: bool,
    latent_bits: u8,
    plan: Option<&Path>,
) -> Served {
    serve_full(
        model_dir,
        kv,
        dtype,
        gpu,
        prefix_cache,
        latent_bits,
        plan,
        None,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn serve_full(
    model_dir: &Path,
    kv: KvCacheKind,
    dtype: ModelDType,
    gpu: bool,
    prefix_cache: bool,
    latent_bits: u8,
    plan: Option<&Path>,
    paged: Option<PagedOptions>,
) -> Served {
    start(&EngineOptions {
        model_dir: model_dir.to_path_buf(),
        palu_config: None,
        palu_calib: None,
        palu_plan: plan.map(Path::to_path_buf),
        kv_cache: kv,
        latent_bits: (kv == KvCacheKind::Palu).then_some(latent_bits),
        max_seqs: 4,
        paged_attention: paged,
        no_prefix_cache: !prefix_cache,
        isq: None,
        cpu: !gpu,
        dtype,
    })
    .await
    .unwrap()
}

/// Relative L2 distance of two logit rows and whether their top tokens agree.
fn compare(got: &Tensor, want: &Tensor) -> (f32, bool) {
    let d = (got - want)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let n = want
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let top = |t: &Tensor| {
        t.argmax(candle_core::D::Minus1)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap()
    };
    ((d / n).sqrt(), top(got) == top(want))
}

#[derive(Debug)]
struct Gap {
    ppl_gpu: f64,
    ppl_cpu: f64,
    mean_rel: f64,
    worst_rel: f32,
    agree: usize,
    rows: usize,
}

impl std::fmt::Display for Gap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "perplexity GPU f16 {:.4} vs CPU f32 {:.4} (|Δ| {:.3} %); logit rows: mean relative L2 {:.2e}, worst {:.2e}; same top token {}/{}",
            self.ppl_gpu,
            self.ppl_cpu,
            100.0 * (self.ppl_gpu / self.ppl_cpu - 1.0).abs(),
            self.mean_rel,
            self.worst_rel,
            self.agree,
            self.rows
        )
    }
}

/// Logits of every position of `windows`, GPU f16 against CPU f32, without the prefix cache.
async fn prefill_gap(model_dir: &Path, kv: KvCacheKind, windows: &[Vec<u32>]) -> Gap {
    let gpu = serve(model_dir, kv, true, false).await;
    let cpu = serve(model_dir, kv, false, false).await;
    let (mut nll_gpu, mut nll_cpu, mut count) = (0f64, 0f64, 0usize);
    let (mut sum_rel, mut worst, mut agree, mut rows) = (0f64, 0f32, 0usize, 0usize);
    for w in windows {
        let lg = engine_logits(&gpu.engine, w.clone())
            .await
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
        let lc = engine_logits(&cpu.engine, w.clone()).await.unwrap();
        assert_eq!((lg.dim(0).unwrap(), lc.dim(0).unwrap()), (w.len(), w.len()));
        for t in 0..w.len() {
            let (e, same) = compare(&lg.i(t).unwrap(), &lc.i(t).unwrap());
            sum_rel += e as f64;
            worst = worst.max(e);
            agree += same as usize;
            rows += 1;
        }
        nll_gpu += nll(&lg, w).unwrap().iter().sum::<f64>();
        nll_cpu += nll(&lc, w).unwrap().iter().sum::<f64>();
        count += w.len() - 1;
    }
    Gap {
        ppl_gpu: (nll_gpu / count as f64).exp(),
        ppl_cpu: (nll_cpu / count as f64).exp(),
        mean_rel: sum_rel / rows as f64,
        worst_rel: worst,
        agree,
        rows,
    }
}

/// Prefill over the first 8 WikiText-2 windows of 1024 tokens: Palu's GPU/CPU gap against the
/// stock engine's. Perplexity within 1 %, mean and worst logit gaps within 1.25× and 1.5× the
/// stock engine's, the same top token at ≥ 99 % of the positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smollm2_palu50_gpu_prefill_agrees_with_the_cpu_as_the_stock_engine_does() {
    let ckpt = smollm2_palu50();
    let windows = wikitext_windows(&ckpt, 1024, 8);
    let stock = prefill_gap(&smollm2(), KvCacheKind::Default, &windows).await;
    eprintln!("stock SmolLM2: {stock}");
    let palu = prefill_gap(&ckpt, KvCacheKind::Palu, &windows).await;
    eprintln!("Palu-50 %:     {palu}");
    assert!((palu.ppl_gpu / palu.ppl_cpu - 1.0).abs() <= 0.01, "{palu}");
    assert!(
        palu.mean_rel <= 1.25 * stock.mean_rel,
        "Palu {palu}\nstock {stock}"
    );
    assert!(
        palu.worst_rel <= 1.5 * stock.worst_rel,
        "Palu {palu}\nstock {stock}"
    );
    assert!(palu.agree * 100 >= palu.rows * 99, "{palu}");
}

/// Greedy generation of `n` tokens after `prompt`, recording the logits of every step (a
/// logits processor sees each row the sampler does): `(context, logits [V] f32)`.
async fn generate_recording(
    engine: &MistralRs,
    prompt: Vec<u32>,
    n: usize,
) -> Vec<(Vec<u32>, Tensor)> {
    let seen: Arc<Mutex<Vec<(Vec<u32>, Tensor)>>> = Arc::default();
    let record = {
        let seen = Arc::clone(&seen);
        move |logits: &Tensor, ctx: &[u32]| -> candle_core::Result<Tensor> {
            let row = logits
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .flatten_all()?;
            seen.lock().unwrap().push((ctx.to_vec(), row));
            Ok(logits.clone())
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let mut req = NormalRequest::new_simple(
        RequestMessage::CompletionTokens(prompt),
        SamplingParams {
            max_len: Some(n),
            ..SamplingParams::deterministic()
        },
        tx,
        engine.next_request_id(),
        None,
        None,
    );
    req.constraint = Constraint::None;
    req.logits_processors = Some(vec![Arc::new(record)]);
    engine
        .get_sender(None)
        .unwrap()
        .send(Request::Normal(Box::new(req)))
        .await
        .unwrap();
    match rx.recv().await {
        Some(Response::CompletionDone(_)) => {}
        Some(Response::CompletionModelError(e, _)) => panic!("generation failed: {e}"),
        Some(Response::ValidationError(e)) | Some(Response::InternalError(e)) => {
            panic!("generation failed: {e}")
        }
        Some(_) => panic!("generation failed: unexpected response"),
        None => panic!("generation failed: the engine closed the channel"),
    }
    let out = seen.lock().unwrap().clone();
    out
}

/// Decode through the kernel, in f16 and in bf16 (the engine's default on this GPU): greedy
/// generation of 16 tokens after a 200-token WikiText-2 prompt on the GPU, every one-token step
/// of every layer on the fused kernel (counted), with the logits of each step recorded; the CPU
/// engine (f32) then scores the generated sequence in one prefill, and each decode step's logits
/// must be as close to the CPU's at the same position as the GPU's own prefill of the sequence
/// in the same dtype is (its worst row), with the same top token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smollm2_palu50_gpu_decode_steps_run_on_the_kernel_and_agree_with_the_cpu() {
    let ckpt = smollm2_palu50();
    let cpu = serve(&ckpt, KvCacheKind::Palu, false, false).await;
    for dtype in [ModelDType::F16, ModelDType::BF16] {
        decode_agrees_with_the_cpu(&ckpt, &cpu, dtype, 16).await;
    }
}

/// The same with packed 4-bit latents: the GPU quantizes and packs each new token's latents and
/// unpacks the cache on the device (kernels/src/latent_codec.cu), then decodes on the fused
/// kernel; the CPU engine holds the same 4-bit cache (the codecs are bit-exact twins).
/// SmolLM2's head_dim 64 has no packed instantiation: its packed rows are unpacked first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smollm2_palu50_gpu_decode_with_packed_4_bit_latents_agrees_with_the_cpu() {
    let ckpt = smollm2_palu50();
    let cpu = serve_bits(&ckpt, KvCacheKind::Palu, ModelDType::F32, false, false, 4).await;
    let packed = palu::decode_op::cuda_packed_launches();
    let writes = palu::latent_codec::cuda_fused_writes();
    decode_agrees_with_the_cpu(&ckpt, &cpu, ModelDType::F16, 4).await;
    assert_eq!(
        palu::decode_op::cuda_packed_launches(),
        packed,
        "unpacked first, not read packed"
    );
    // New tokens' rows: projected, quantized and packed by the fused write kernel (K and V of
    // every layer at every step).
    let writes = palu::latent_codec::cuda_fused_writes() - writes;
    eprintln!("fused latent writes: {writes}");
    assert!(writes >= 2 * 30 * 15, "{writes} fused writes");
}

/// A Llama-3-shaped Palu checkpoint (head_dim 128, GQA 4, g = 1, rank 64: the packed
/// instantiations' shape; random weights, 2 layers, the stories260K tokenizer) with 4- and
/// 8-bit latents: every one-token step of every layer reads the packed rows in the kernel
/// (counted), in f16 and bf16, and agrees with the CPU engine holding the same packed cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn llama3_shaped_gpu_decode_reads_packed_latents_and_agrees_with_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut spec = palu::synth::SynthSpec::tiny("llama", seed);
    (
        spec.hidden,
        spec.heads,
        spec.kv_heads,
        spec.head_dim,
        spec.intermediate,
    ) = (1024, 8, 2, 128, 2048);
    spec.extra = serde_json::json!({"rope_theta": 500000.0});
    spec.palu = Some(palu::synth::SynthPalu {
        group_size: 1,
        ratio: 0.5,
    });
    let ckpt = tmp.path().join("llama3-shaped-palu50");
    let stories = palu_integration_tests::fixtures().join("models/stories260K");
    palu::synth::write(&spec, &ckpt, Some(&stories)).unwrap();
    for (bits, dtypes) in [
        (4u8, &[ModelDType::F16, ModelDType::BF16][..]),
        (8, &[ModelDType::F16][..]),
    ] {
        let cpu = serve_bits(
            &ckpt,
            KvCacheKind::Palu,
            ModelDType::F32,
            false,
            false,
            bits,
        )
        .await;
        for &dtype in dtypes {
            let packed = palu::decode_op::cuda_packed_launches();
            let launches = palu::decode_op::cuda_launches();
            decode_agrees(&ckpt, &cpu, dtype, bits, false, None).await;
            let (p, l) = (
                palu::decode_op::cuda_packed_launches() - packed,
                palu::decode_op::cuda_launches() - launches,
            );
            eprintln!(
                "{dtype:?} {bits}-bit (seed {seed}): {p} of {l} kernel launches read packed rows"
            );
            assert!(
                p == l && p > 0,
                "{dtype:?} {bits}-bit: {p} of {l} launches read packed rows"
            );
        }
    }
}

async fn decode_agrees_with_the_cpu(ckpt: &Path, cpu: &Served, dtype: ModelDType, bits: u8) {
    decode_agrees(ckpt, cpu, dtype, bits, true, None).await
}

/// The planner's executors on the GPU: SmolLM2 Palu-50 % with full keys (post-RoPE K rows,
/// candle ops) in every third layer and fused values (`o_proj·B_v`, the kernel's latent
/// outputs) in every second, against the CPU engine with the default plan: prefill and each
/// decode step within the GPU prefill's own distance from the CPU, the same top tokens, and
/// one kernel launch per step in exactly the latent-key layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smollm2_palu50_gpu_decode_with_a_mixed_plan_agrees_with_the_cpu() {
    let ckpt = smollm2_palu50();
    let tmp = tempfile::tempdir().unwrap();
    let path = palu_integration_tests::write_plan(
        &ckpt,
        &tmp.path().join("plan.toml"),
        palu_integration_tests::mixed_choice,
    );
    let cpu = serve(&ckpt, KvCacheKind::Palu, false, false).await;
    decode_agrees(&ckpt, &cpu, ModelDType::F16, 16, true, Some(&path)).await;
}

/// `top_tokens`: also require the same top token at all but one step. A pretrained model's
/// greedy choice is stable under 16-bit rounding; a random-weight model has no preferred
/// continuation (its logits are close together), so there only the yardstick applies.
/// `plan`: a plan.toml for the GPU engine (the CPU keeps its own); its full-key layers decode on
/// candle ops, so only the other layers count kernel launches.
async fn decode_agrees(
    ckpt: &Path,
    cpu: &Served,
    dtype: ModelDType,
    bits: u8,
    top_tokens: bool,
    plan: Option<&Path>,
) {
    let w = wikitext_windows(ckpt, 1024, 1).remove(0);
    let full_keys = plan.map_or(0, |p| {
        palu::planner::Plan::from_toml_file(p)
            .unwrap()
            .full_key_layers()
            .len()
    });
    let layers = palu::config::ModelConfig::from_file(&ckpt.join("config.json"))
        .unwrap()
        .num_layers
        - full_keys;
    let steps = 16;
    {
        let gpu = serve_planned(ckpt, KvCacheKind::Palu, dtype, true, false, bits, plan).await;
        let before = palu::decode_op::cuda_launches();
        let rec = generate_recording(&gpu.engine, w[..200].to_vec(), steps).await;
        let launches = palu::decode_op::cuda_launches() - before;
        assert_eq!(rec.len(), steps, "one recorded row per sampled token");
        let full: Vec<u32> = {
            let (ctx, last) = rec.last().unwrap();
            let mut f = ctx.clone();
            f.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
            f
        };
        let lp = engine_logits(&gpu.engine, full.clone())
            .await
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
        drop(gpu);
        let lc = engine_logits(&cpu.engine, full.clone()).await.unwrap();
        let prefill_worst = (0..full.len())
            .map(|t| compare(&lp.i(t).unwrap(), &lc.i(t).unwrap()).0)
            .fold(0f32, f32::max);
        let (mut worst, mut agree) = (0f32, 0usize);
        for (ctx, row) in &rec[1..] {
            let (e, same) = compare(row, &lc.i(ctx.len() - 1).unwrap());
            worst = worst.max(e);
            agree += same as usize;
        }
        let decoded = steps - 1;
        eprintln!(
            "{dtype:?} {bits}-bit latents decode, {decoded} one-token steps: {launches} kernel launches ({layers} kernel layers); relative L2 to \
             the CPU: worst {worst:.2e} (the GPU prefill of the same {} tokens: worst {prefill_worst:.2e}); same top \
             token {agree}/{decoded}",
            full.len()
        );
        assert!(
            launches >= decoded * layers && launches % layers == 0,
            "{dtype:?}: {launches} launches"
        );
        assert!(
            worst <= prefill_worst,
            "{dtype:?}: decode {worst} vs prefill {prefill_worst}"
        );
        assert!(
            !top_tokens || agree + 1 >= decoded,
            "{dtype:?}: top tokens agree at {agree}/{decoded}"
        );
    }
}

/// Palu latents in the engine's paged blocks on the GPU (blocks of 16 and 32, f16 and bf16,
/// 16-bit and packed 4-bit rows, fp8 blocks): prefill, a prefix-cache hit over shared blocks and
/// batched decode at mixed offsets against the plain cache's prefill of the whole sequence, with
/// the decode kernel reading the blocks in place; then WikiText-2 perplexity through chunked
/// paged prefill, plain vs paged vs fp8 blocks (`--pa-cache-type f8e4m3`'s accuracy).
#[test]
fn paged_latent_blocks_match_the_plain_cache_and_fp8_blocks_are_measured() {
    use palu_integration_tests::direct::{
        load, paged_prefill_logits, paged_steps_match_the_plain_cache, prefill_logits, Pools,
    };
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let before = palu::decode_op::cuda_paged_launches();
    // The same schedule on the plain cache computes the same rows: what remains is 16-bit
    // arithmetic of the kernel over blocks vs over contiguous rows (its split plan follows the
    // longest sequence of the batch); fp8 adds the rounding of every latent to 3 mantissa bits.
    for (dtype, pool, bits, bs, tol, agree) in [
        (DType::F16, None, 16u8, 16usize, 1e-2f32, 1.0f32),
        (DType::BF16, None, 16, 32, 3e-2, 1.0),
        (DType::F16, None, 4, 32, 1e-2, 1.0),
        // fp8 vs the 16-bit cache is an accuracy question, not an exactness one: 12 prompt rows
        // are too few for a top-1 rate (10/12 on the H200, 11/12 on the CPU in f32), so this
        // bound is a sanity check and the perplexity below is the measure.
        (DType::F16, Some(DType::F8E4M3), 16, 16, 0.15, 0.75),
    ] {
        paged_steps_match_the_plain_cache(&gpu, dtype, pool, bits, bs, tol, agree, None);
    }
    // The two 16-bit cases: 3 decode steps × 30 layers each read the blocks in place.
    let launches = palu::decode_op::cuda_paged_launches() - before;
    println!("decode kernel launches reading paged blocks: {launches}");
    assert!(
        launches >= 2 * 3 * 30,
        "only {launches} paged kernel launches"
    );

    let dir = smollm2_palu50();
    let windows = wikitext_windows(&dir, 512, 4);
    let plain = load(&dir, 16, false, &gpu, DType::F16).unwrap();
    let paged = load(&dir, 16, true, &gpu, DType::F16).unwrap();
    let ppl = |logits: &dyn Fn(&[u32]) -> Tensor| {
        let mut all = Vec::new();
        for w in &windows {
            all.extend(nll(&logits(w), w).unwrap());
        }
        (all.iter().sum::<f64>() / all.len() as f64).exp()
    };
    let p_plain = ppl(&|w| {
        prefill_logits(&plain, w)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    });
    let mut results = vec![("plain cache", p_plain)];
    for (name, pool) in [
        ("paged blocks f16", DType::F16),
        ("paged blocks f8e4m3", DType::F8E4M3),
    ] {
        let p = ppl(&|w| {
            let mut pools = Pools::new(&paged, w.len() / 16 + 2, 16, pool, 11).unwrap();
            paged_prefill_logits(&paged, &mut pools, w, 128).unwrap()
        });
        results.push((name, p));
    }
    for (name, p) in &results {
        println!("SmolLM2 Palu-50 % f16, WikiText-2 first 4 × 512 tokens, {name}: perplexity {p:.4} ({:+.2} % vs plain)", 100.0 * (p / p_plain - 1.0));
    }
    assert!(
        (results[1].1 / p_plain - 1.0).abs() < 0.005,
        "paged f16 blocks change perplexity: {results:?}"
    );
    assert!(
        (results[2].1 / p_plain - 1.0).abs() < 0.02,
        "fp8 blocks change perplexity by more than 2 %: {results:?}"
    );
}

/// The engine's own paged attention serving the Palu cache (`--paged-attn-context`, blocks of 16
/// and 32): greedy decode after a 200-token WikiText-2 prompt with the kernel reading the
/// engine's blocks (counted), then a prompt extending the first one, which the engine's prefix
/// cache serves from the first request's latent blocks (fewer tokens fed). Every step's logits
/// are as close to the CPU engine's (f32, plain cache) as the GPU's own unpaged prefill of the
/// same tokens is, with the same top tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smollm2_palu50_engine_paged_blocks_decode_and_share_prefixes() {
    let ckpt = smollm2_palu50();
    let cpu = serve(&ckpt, KvCacheKind::Palu, false, false).await;
    let plain_gpu = serve(&ckpt, KvCacheKind::Palu, true, false).await;
    let w = wikitext_windows(&ckpt, 1024, 1).remove(0);
    let layers = 30;
    for block_size in [16usize, 32] {
        let gpu = serve_full(
            &ckpt,
            KvCacheKind::Palu,
            ModelDType::F16,
            true,
            true,
            16,
            None,
            Some(PagedOptions {
                context_tokens: Some(8192),
                block_size,
                fp8: false,
            }),
        )
        .await;
        let stats = gpu.kv_stats.clone().expect("the Palu cache's counters");
        for (i, prompt) in [w[..200].to_vec(), w[..264].to_vec()]
            .into_iter()
            .enumerate()
        {
            let (fed0, paged0) = (
                stats.reading().tokens_fed,
                palu::decode_op::cuda_paged_launches(),
            );
            let steps = 8;
            let rec = generate_recording(&gpu.engine, prompt.clone(), steps).await;
            let fed = stats.reading().tokens_fed - fed0;
            let paged = palu::decode_op::cuda_paged_launches() - paged0;
            let mut full = rec.last().unwrap().0.clone();
            full.push(
                rec.last()
                    .unwrap()
                    .1
                    .argmax(0)
                    .unwrap()
                    .to_scalar::<u32>()
                    .unwrap(),
            );
            let lc = engine_logits(&cpu.engine, full.clone()).await.unwrap();
            let lp = engine_logits(&plain_gpu.engine, full.clone())
                .await
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            let prefill_worst = (0..full.len())
                .map(|t| compare(&lp.i(t).unwrap(), &lc.i(t).unwrap()).0)
                .fold(0f32, f32::max);
            let (mut worst, mut agree) = (0f32, 0usize);
            for (ctx, row) in &rec {
                let (e, same) = compare(row, &lc.i(ctx.len() - 1).unwrap());
                worst = worst.max(e);
                agree += same as usize;
            }
            eprintln!(
                "paged blocks of {block_size}, request {i} ({} prompt tokens): {fed} tokens fed, {paged} kernel launches on blocks; relative L2 to the CPU: worst {worst:.2e} (unpaged GPU prefill: {prefill_worst:.2e}); same top token {agree}/{steps}",
                prompt.len()
            );
            assert!(
                paged >= (steps - 1) * layers,
                "{paged} launches read the blocks"
            );
            assert!(
                worst <= prefill_worst,
                "worst {worst:.2e} vs prefill {prefill_worst:.2e}"
            );
            assert!(agree + 1 >= steps, "top tokens agree at {agree}/{steps}");
            if i == 1 {
                // The first 192 of its tokens sit in the first request's full blocks.
                assert!(
                    fed as usize + 150 <= prompt.len() + steps,
                    "no prefix-cache hit: {fed} tokens fed for a {}-token prompt",
                    prompt.len()
                );
            }
        }
    }
}
