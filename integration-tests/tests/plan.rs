//! The planner's choices run in the engine: full keys (V-only Palu: the cache holds post-RoPE K
//! rows of `W_k = B_k·A_k`) and fused values (`o_proj·B_v` reading the latent outputs) compute
//! the same model as latent keys with unfused values, in prefill and in decode steps; a plan
//! made for another checkpoint is a clear startup error.
use std::path::{Path, PathBuf};

use mistralrs_core::ModelDType;
use palu::engine::server::{start, EngineOptions, KvCacheKind};
use palu::planner::{Keys, Values};
use palu_integration_tests::{
    complete, engine_logits, fixtures, max_abs_diff, mixed_choice, serve_http, smollm2_palu50,
    wikitext_windows, write_plan,
};

fn options(model_dir: &Path, plan: PathBuf, latent_bits: u8) -> EngineOptions {
    EngineOptions {
        model_dir: model_dir.to_path_buf(),
        palu_config: None,
        palu_calib: None,
        palu_plan: Some(plan),
        kv_cache: KvCacheKind::Palu,
        latent_bits: Some(latent_bits),
        max_seqs: 4,
        paged_attention: None,
        no_prefix_cache: true,
        isq: None,
        cpu: true,
        dtype: ModelDType::F32,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_keys_and_fused_values_compute_the_same_model_in_prefill_and_decode() {
    let ckpt = smollm2_palu50();
    let tmp = tempfile::tempdir().unwrap();
    let plain = write_plan(&ckpt, &tmp.path().join("plain.toml"), |_| {
        (Keys::Latent, Values::Unfused)
    });
    // Every combination of the two choices appears among the 30 layers.
    let mixed = write_plan(&ckpt, &tmp.path().join("mixed.toml"), mixed_choice);
    // Packed latents: full keys quantize K rows (another quantizer than the latents'), so only
    // the values' fusion must leave the 4-bit model unchanged.
    let fused_only = write_plan(&ckpt, &tmp.path().join("fused.toml"), |l| {
        (
            Keys::Latent,
            if l % 2 == 0 {
                Values::Fused
            } else {
                Values::Unfused
            },
        )
    });
    let ids = wikitext_windows(&ckpt, 200, 1).remove(0);
    let prompt = "The history of the city begins in the";
    for (bits, other) in [(16u8, &mixed), (4, &fused_only)] {
        let (addr_a, a) = serve_http(&options(&ckpt, plain.clone(), bits))
            .await
            .unwrap();
        let (addr_b, b) = serve_http(&options(&ckpt, other.clone(), bits))
            .await
            .unwrap();
        let la = engine_logits(&a.engine, ids.clone()).await.unwrap();
        let lb = engine_logits(&b.engine, ids.clone()).await.unwrap();
        let d = max_abs_diff(&la, &lb);
        eprintln!(
            "{bits}-bit: prefill of {} tokens, max |Δlogit| = {d:.2e}",
            ids.len()
        );
        assert!(d <= 1e-3, "{bits}-bit prefill: max |Δlogit| = {d}");
        // Greedy decode steps (one token each) through the same two plans.
        let ta = complete(addr_a, prompt, 24).await;
        let tb = complete(addr_b, prompt, 24).await;
        eprintln!("{bits}-bit: {ta:?}");
        assert_eq!(ta, tb, "{bits}-bit greedy decode");
        // Full keys cache H_kv·dh-wide K rows: the live cache is larger by exactly that.
        if bits == 16 {
            let (ra, rb) = (
                a.kv_stats.as_ref().unwrap().reading(),
                b.kv_stats.as_ref().unwrap().reading(),
            );
            assert!(rb.bytes_per_token > ra.bytes_per_token, "{ra:?} vs {rb:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_for_another_checkpoint_is_a_clear_startup_error() {
    let tmp = tempfile::tempdir().unwrap();
    let stories = tmp.path().join("stories");
    palu_integration_tests::full_rank_checkpoint(
        &fixtures().join("models/stories260K"),
        1,
        256,
        &stories,
    );
    let plan = write_plan(&smollm2_palu50(), &tmp.path().join("plan.toml"), |_| {
        (Keys::Latent, Values::Unfused)
    });
    let err = match start(&options(&stories, plan.clone(), 16)).await {
        Ok(_) => panic!("a SmolLM2 plan must not load on stories260K"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(&plan.display().to_string()), "{err}");
    assert!(err.contains("re-run `palu plan`"), "{err}");
}
