//! The Palu model inside mistral.rs, through the real OpenAI-compatible HTTP router on loopback.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mistralrs_core::ModelDType;
use palu::engine::server::{build_engine, EngineOptions, KvCacheKind, PagedOptions};
use palu_integration_tests::{
    chat, complete, fixtures, full_rank_checkpoint, post, serve_http, smollm2,
};

/// Start a server on an ephemeral loopback port; returns its address.
async fn serve(model_dir: &Path, kv: KvCacheKind) -> anyhow::Result<std::net::SocketAddr> {
    serve_with(model_dir, kv, None).await
}

async fn serve_with(
    model_dir: &Path,
    kv: KvCacheKind,
    palu_config: Option<PathBuf>,
) -> anyhow::Result<std::net::SocketAddr> {
    serve_opts(EngineOptions {
        model_dir: model_dir.to_path_buf(),
        palu_calib: palu_config
            .as_ref()
            .map(|_| fixtures().join("text/c4-train-00000-first800.jsonl")),
        palu_config,
        palu_plan: None,
        kv_cache: kv,
        latent_bits: None,
        max_seqs: 32,
        paged_attention: None,
        no_prefix_cache: false,
        isq: None,
        cpu: true,
        dtype: ModelDType::F32,
    })
    .await
}

async fn serve_opts(opts: EngineOptions) -> anyhow::Result<std::net::SocketAddr> {
    Ok(serve_http(&opts).await?.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authors_dump_serves_and_matches_the_reference_model() {
    let dir = fixtures().join("palu-reference/stories260K-g1-r50");
    let addr = serve(&dir, KvCacheKind::Palu).await.unwrap();
    let text = complete(addr, "Once upon a time", 40).await;
    // The same checkpoint through palu's own latent-cache decoding (BOS prepended, as the engine does).
    let m = palu::model::Model::load(&dir, &candle_core::Device::Cpu).unwrap();
    let tok = palu::tokenizer::load(&dir).unwrap();
    let mut ids = vec![1u32];
    ids.extend(palu::tokenizer::encode(&tok, "Once upon a time").unwrap());
    let want = tok
        .decode(&m.generate_greedy(&ids, 40, Some(2)).unwrap(), true)
        .unwrap();
    assert_eq!(text, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_rank_palu_equals_the_stock_engine_token_for_token() {
    let base = fixtures().join("models/stories260K");
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("full");
    full_rank_checkpoint(
        &base,
        palu::compress::CompressOptions::default().group_size,
        256,
        &ckpt,
    );
    let stock = serve(&base, KvCacheKind::Default).await.unwrap();
    let palu = serve(&ckpt, KvCacheKind::Palu).await.unwrap();
    for prompt in [
        "Once upon a time",
        "The little dog",
        "Tom and Sue went to the park. They",
    ] {
        let a = complete(stock, prompt, 60).await;
        let b = complete(palu, prompt, 60).await;
        assert_eq!(a, b, "prompt {prompt:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_the_context_is_a_4xx_and_the_server_keeps_serving() {
    let dir = fixtures().join("palu-reference/stories260K-g1-r50");
    let addr = serve(&dir, KvCacheKind::Palu).await.unwrap();
    let long = "Once upon a time there was a dog. ".repeat(400); // far beyond 2048 positions
    let (status, body) = post(
        addr,
        "/v1/completions",
        &serde_json::json!({"model": "default", "prompt": long, "max_tokens": 8, "temperature": 0.0}),
    )
    .await;
    assert!((400..500).contains(&status), "status {status}: {body}");
    assert!(!complete(addr, "Once upon a time", 8).await.is_empty());
}

/// Resident memory of this process (the server runs in it), bytes, after the allocator has
/// returned its free pages to the system.
fn rss() -> u64 {
    unsafe { libc::malloc_trim(0) };
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 4096
}

/// Every distinct greedy output seen per (prompt, max_tokens).
type Outputs = std::collections::HashMap<(&'static str, usize), std::collections::BTreeSet<String>>;

/// 32 concurrent completions of four prompts at three lengths, recorded into `seen`.
async fn burst(addr: std::net::SocketAddr, seen: &mut Outputs) {
    let prompts = [
        "Once upon a time",
        "The little dog",
        "Tom and Sue went to the park. They",
        "Lily",
    ];
    let mut tasks = Vec::new();
    for i in 0..32 {
        let (p, n) = (prompts[i % prompts.len()], 12 + (i % 3) * 10);
        tasks.push(tokio::spawn(
            async move { (p, n, complete(addr, p, n).await) },
        ));
    }
    for t in tasks {
        let (p, n, text) = t.await.unwrap();
        assert!(!text.is_empty());
        seen.entry((p, n)).or_default().insert(text);
    }
}

/// The requests whose greedy output was not always the same (there should be none: greedy
/// decoding must not depend on which other sequences share a batch, or on prefix-cache hits).
fn varying(seen: &Outputs) -> Vec<(&(&'static str, usize), &std::collections::BTreeSet<String>)> {
    seen.iter().filter(|(_, outs)| outs.len() > 1).collect()
}

async fn serve_stories_palu(no_prefix_cache: bool) -> std::net::SocketAddr {
    serve_opts(EngineOptions {
        model_dir: fixtures().join("palu-reference/stories260K-g1-r50"),
        palu_config: None,
        palu_calib: None,
        palu_plan: None,
        kv_cache: KvCacheKind::Palu,
        latent_bits: None,
        max_seqs: 32,
        paged_attention: None,
        no_prefix_cache,
        isq: None,
        cpu: true,
        dtype: ModelDType::F32,
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_requests_of_mixed_lengths_are_all_answered_and_memory_returns_to_idle(
) {
    // Every finished sequence's latents must be freed (with the prefix cache on, the engine keeps
    // a bounded set of finished caches for reuse, by design). What a leak would cost: each
    // sequence's cache is pre-allocated for 512 positions × 148 latent floats (this checkpoint's
    // ranks, f32) = 296 KiB, so leaking a burst's 32 caches adds 9.3 MiB per burst, 28 MiB over
    // the last three. The allocator's arenas move RSS by up to about 7 MiB either way without a
    // trend (measured over 60 runs: e.g. idle 76092 KiB, bursts 68464, 75916, 74044, 75336). So:
    // the last burst within 8 MiB of the higher of idle and the first burst, and every burst
    // within 12 MiB of idle. Equal requests must give equal outputs, in every burst, in both modes.
    for no_prefix_cache in [true, false] {
        let addr = serve_stories_palu(no_prefix_cache).await;
        // Warm up (allocator pools, prefix cache), take the idle level, then bursts against it.
        let mut seen = Outputs::default();
        burst(addr, &mut seen).await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let idle = rss();
        let mut after = Vec::new();
        for _ in 0..4 {
            burst(addr, &mut seen).await;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            after.push(rss());
        }
        eprintln!(
            "prefix cache {}: RSS idle {} KiB, after bursts {:?} KiB",
            if no_prefix_cache { "off" } else { "on" },
            idle / 1024,
            after.iter().map(|a| a / 1024).collect::<Vec<_>>(),
        );
        let v = varying(&seen);
        assert!(v.is_empty(), "equal requests gave different outputs: {v:?}");
        let (first, last) = (after[0], after[after.len() - 1]);
        assert!(
            last <= first.max(idle) + (8 << 20),
            "RSS grew from {} KiB (idle {} KiB) after the first burst to {} KiB after the last",
            first / 1024,
            idle / 1024,
            last / 1024
        );
        for a in &after {
            assert!(
                *a <= idle + (12 << 20),
                "RSS {} KiB after a burst vs {} KiB idle",
                a / 1024,
                idle / 1024
            );
        }
    }
}

/// Greedy outputs must not depend on batching or prefix-cache hits. Two engine bugs broke this
/// (patches 0003 and 0004, patches/README.md): a parked completion re-prefilled over its own
/// cache after a prefix-cache hit, and the CPU decode attention mixing the sequences of a
/// batch. Ten bursts against one server, Palu and the stock model, prefix cache on: every
/// (prompt, length) must give one text across all 320 requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn equal_prompts_give_equal_outputs_under_concurrent_prefix_cache_hits() {
    let stock = serve(&fixtures().join("models/stories260K"), KvCacheKind::Default)
        .await
        .unwrap();
    for (name, addr) in [("palu", serve_stories_palu(false).await), ("stock", stock)] {
        let mut seen = Outputs::default();
        for _ in 0..10 {
            burst(addr, &mut seen).await;
        }
        let v = varying(&seen);
        assert!(
            v.is_empty(),
            "{name}: equal requests gave different outputs: {v:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_model_with_a_palu_config_is_decomposed_at_load_time() {
    // The shipped allocation for stories260K, applied at load time, serves the same text as the
    // checkpoint `palu compress --config` writes from it.
    let base = fixtures().join("models/stories260K");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/stories260k-g1-r50.toml");
    let at_load = serve_with(&base, KvCacheKind::Palu, Some(config.clone()))
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    let ac = palu::alloc_config::AllocConfig::from_file(&config).unwrap();
    let opts = palu::compress::CompressOptions {
        calib: Some(fixtures().join("text/c4-train-00000-first800.jsonl")),
        calib_samples: 64,
        calib_seq_len: 256,
        config: Some((config.clone(), ac)),
        ..Default::default()
    };
    palu::compress::compress_to_dir(&base, &ckpt, &opts).unwrap();
    let stored = serve(&ckpt, KvCacheKind::Palu).await.unwrap();
    assert_eq!(
        complete(at_load, "Once upon a time", 40).await,
        complete(stored, "Once upon a time", 40).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_server_tomls_select_model_and_kv_cache() {
    use palu::engine::server_config::ServerConfig;
    let cfgs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    // The stories260K file serves the authors' dump (relative paths resolve from the file's folder;
    // the fixtures may live elsewhere, so point the checkpoint at PALU_FIXTURES for the test).
    let path = cfgs.join("stories260k.server.toml");
    let c = ServerConfig::from_file(&path).unwrap();
    let mut o = c.engine_options(&path).unwrap();
    assert_eq!(o.kv_cache, KvCacheKind::Palu);
    assert!(o.model_dir.ends_with("palu-reference/stories260K-g1-r50"));
    o.model_dir = fixtures().join("palu-reference/stories260K-g1-r50");
    let engine = build_engine(&o).await.unwrap();
    drop(engine);
    let path = cfgs.join("smollm2.server.toml");
    let o = ServerConfig::from_file(&path)
        .unwrap()
        .engine_options(&path)
        .unwrap();
    assert_eq!(o.kv_cache, KvCacheKind::Palu);
    assert!(o
        .palu_config
        .as_ref()
        .unwrap()
        .ends_with("smollm2-135m-g3-r50.toml"));
    assert!(o
        .palu_calib
        .as_ref()
        .unwrap()
        .ends_with("c4-train-00000-first800.jsonl"));
    assert!(matches!(o.dtype, ModelDType::F32));
}

#[test]
fn bad_server_tomls_name_the_field() {
    use palu::engine::server_config::ServerConfig;
    let d = tempfile::tempdir().unwrap();
    let check = |text: &str| -> String {
        let p = d.path().join("s.toml");
        std::fs::write(&p, text).unwrap();
        let r = ServerConfig::from_file(&p).and_then(|c| c.engine_options(&p).map(|_| ()));
        r.unwrap_err()
            .to_string()
            .replace(&d.path().display().to_string(), "[DIR]")
    };
    assert_eq!(
        check("[model]\ndir = \"m\"\n[kv_cache]\nkind = \"palu\"\n"),
        "[DIR]/s.toml: kv_cache.kind = \"palu\" needs kv_cache.checkpoint (a Palu checkpoint) or kv_cache.config (a rank allocation to decompose model.dir with)"
    );
    assert_eq!(
        check("[model]\ndir = \"m\"\ndtype = \"f8\"\n"),
        "[DIR]/s.toml: model.dtype `f8`: expected auto, f32, f16 or bf16"
    );
    assert!(
        check("[model]\ndir = \"m\"\n[kv_cache]\nkind = \"quantized\"\n")
            .contains("unknown variant `quantized`")
    );
    assert!(check("[model]\ndirr = \"m\"\n").contains("unknown field `dirr`"));
    assert_eq!(
        check("[model]\ndir = \"m\"\n[paged_attention]\nblock_size = 64\n"),
        "[DIR]/s.toml: paged_attention.block_size 64: the engine takes 8, 16 or 32"
    );
    assert_eq!(
        check("[model]\ndir = \"m\"\n[paged_attention]\ncache_type = \"int8\"\n"),
        "[DIR]/s.toml: paged_attention.cache_type `int8`: expected auto or f8e4m3"
    );
    // A well-formed section selects the engine's paged attention.
    let p = d.path().join("ok.toml");
    std::fs::write(
        &p,
        "[model]\ndir = \"m\"\n[paged_attention]\ncontext_tokens = 65536\nblock_size = 16\ncache_type = \"f8e4m3\"\n",
    )
    .unwrap();
    let o = ServerConfig::from_file(&p)
        .unwrap()
        .engine_options(&p)
        .unwrap();
    assert_eq!(
        o.paged_attention,
        Some(PagedOptions {
            context_tokens: Some(65536),
            block_size: 16,
            fp8: true
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_full_rank_palu_equals_the_stock_engine_on_chat_completion_and_streaming() {
    let base = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("full");
    full_rank_checkpoint(&base, 3, 512, &ckpt);
    let stock = serve(&base, KvCacheKind::Default).await.unwrap();
    let palu = serve(&ckpt, KvCacheKind::Palu).await.unwrap();
    let q = "What is the capital of France?";
    let a = chat(stock, q, 24, false).await;
    assert_eq!(a, chat(palu, q, 24, false).await, "chat");
    assert_eq!(a, chat(palu, q, 24, true).await, "chat, streamed");
    assert!(a.contains("Paris"), "{a}");
    let c = complete(stock, "The capital of France is", 16).await;
    assert_eq!(
        c,
        complete(palu, "The capital of France is", 16).await,
        "completion"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isq_of_the_non_palu_weights_composes_with_the_latent_cache() {
    // In-situ quantization (Q8_0) of q/o/MLP/LM-head of the authors' stories260K dump: it still
    // loads, serves and tells a story (the Palu factors stay unquantized).
    let dir = fixtures().join("palu-reference/stories260K-g1-r50");
    let opts = EngineOptions {
        model_dir: dir.clone(),
        palu_config: None,
        palu_calib: None,
        palu_plan: None,
        kv_cache: KvCacheKind::Palu,
        latent_bits: None,
        max_seqs: 4,
        paged_attention: None,
        no_prefix_cache: false,
        isq: Some("Q8_0".into()),
        cpu: true,
        dtype: ModelDType::F32,
    };
    let addr = serve_opts(opts).await.unwrap();
    let text = complete(addr, "Once upon a time", 30).await;
    assert!(text.split_whitespace().count() >= 10, "{text:?}");
}

#[test]
fn the_startup_summary_gives_kv_bytes_and_tokens_per_budget() {
    let dir = fixtures().join("palu-reference/stories260K-g1-r50");
    let s = palu::engine::server::kv_summary(&dir, 16).unwrap();
    assert_eq!(
        s,
        "KV cache: 5 layers; default 640 B/token (16-bit K/V, 4 KV heads × 8); Palu 296 B/token (16-bit latents; 0.463× default, 53.8% of the K/V width removed); tokens per GiB of KV budget: default 1677722, Palu 3627506"
    );
    let s = palu::engine::server::kv_summary(&dir, 4).unwrap();
    assert!(
        s.contains("4-bit packed latents with f16 scales and i16 zeros"),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_cache_hits_give_the_same_text_as_no_prefix_cache() {
    prefix_cache_case(
        fixtures().join("palu-reference/stories260K-g1-r50"),
        KvCacheKind::Palu,
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_cache_hits_on_packed_4_bit_latents_give_the_same_text_as_no_prefix_cache() {
    prefix_cache_case(
        fixtures().join("palu-reference/stories260K-g1-r50"),
        KvCacheKind::Palu,
        Some(4),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_prefix_cache_hits_give_the_same_text_as_no_prefix_cache() {
    prefix_cache_case(
        fixtures().join("models/stories260K"),
        KvCacheKind::Default,
        None,
    )
    .await;
}

async fn prefix_cache_case(dir: PathBuf, kv: KvCacheKind, latent_bits: Option<u8>) {
    // A multi-turn exchange: each prompt extends the previous prompt and its completion, so the
    // engine restores the stored latent cache of the earlier sequence and feeds only the rest.
    let opts = |no_prefix_cache| EngineOptions {
        model_dir: dir.clone(),
        palu_config: None,
        palu_calib: None,
        palu_plan: None,
        kv_cache: kv,
        latent_bits,
        max_seqs: 4,
        paged_attention: None,
        no_prefix_cache,
        isq: None,
        cpu: true,
        dtype: ModelDType::F32,
    };
    let (cached, cached_stats) = serve_served(opts(false)).await;
    let (fresh, fresh_stats) = serve_served(opts(true)).await;
    let mut prompt = String::from("Once upon a time");
    for turn in 0..4 {
        let a = complete(cached, &prompt, 20).await;
        let b = complete(fresh, &prompt, 20).await;
        assert_eq!(a, b, "turn {turn}, prompt {prompt:?}");
        prompt.push_str(&a);
        prompt.push_str(" Then");
    }
    // The Palu model counts the tokens it was fed: prefix-cache hits must have saved some.
    if let (Some(c), Some(f)) = (cached_stats, fresh_stats) {
        let (c, f) = (c.reading().tokens_fed, f.reading().tokens_fed);
        assert!(
            c < f,
            "tokens fed with prefix caching {c}, without {f}: no hit"
        );
    }
}

async fn serve_served(
    opts: EngineOptions,
) -> (std::net::SocketAddr, Option<Arc<palu::engine::KvStats>>) {
    let (addr, served) = serve_http(&opts).await.unwrap();
    (addr, served.kv_stats)
}

/// A copy of the authors' stories260K dump whose config.json `edit` changes.
fn edited_authors_dump(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let src = fixtures().join("palu-reference/stories260K-g1-r50");
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let p = tmp.path().join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(&p, c.to_string()).unwrap();
    tmp
}

/// A startup error as users read it: the anyhow chain, paths of this machine replaced.
fn startup_error(err: anyhow::Error, dirs: &[(&Path, &str)]) -> String {
    let mut msg = format!("{err:#}");
    for (d, name) in dirs {
        msg = msg.replace(&d.display().to_string(), name);
    }
    msg.replace(&fixtures().display().to_string(), "[FIXTURES]")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_palu_toml_for_another_model_is_a_clear_startup_error() {
    // The SmolLM2 allocation applied to stories260K at load time.
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/smollm2-135m-g3-r50.toml");
    let err = serve_with(
        &fixtures().join("models/stories260K"),
        KvCacheKind::Palu,
        Some(config.clone()),
    )
    .await
    .unwrap_err();
    let cfgs = config.parent().unwrap().canonicalize().unwrap();
    let msg = startup_error(
        err,
        &[
            (config.parent().unwrap(), "[CONFIGS]"),
            (&cfgs, "[CONFIGS]"),
        ],
    );
    insta::assert_snapshot!("palu_toml_for_another_model", msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latent_bits_outside_the_supported_set_are_a_clear_startup_error() {
    let dir = fixtures().join("palu-reference/stories260K-g1-r50");
    let mut opts = EngineOptions {
        model_dir: dir,
        palu_config: None,
        palu_calib: None,
        palu_plan: None,
        kv_cache: KvCacheKind::Palu,
        latent_bits: Some(5),
        max_seqs: 4,
        paged_attention: None,
        no_prefix_cache: false,
        isq: None,
        cpu: true,
        dtype: ModelDType::F32,
    };
    let err = serve_opts(opts.clone()).await.unwrap_err();
    insta::assert_snapshot!("latent_bits_5", startup_error(err, &[]));
    // The same value in a server TOML names the field.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("s.toml");
    std::fs::write(
        &p,
        "[model]\ndir = \"m\"\n[kv_cache]\nkind = \"palu\"\ncheckpoint = \"c\"\nlatent_bits = 6\n",
    )
    .unwrap();
    let e = palu::engine::server_config::ServerConfig::from_file(&p)
        .and_then(|c| c.engine_options(&p).map(|_| ()))
        .unwrap_err();
    insta::assert_snapshot!(
        "latent_bits_6_in_toml",
        e.to_string()
            .replace(&d.path().display().to_string(), "[DIR]")
    );
    opts.latent_bits = Some(4);
    assert!(
        serve_opts(opts.clone()).await.is_ok(),
        "4 bits is supported"
    );
    // fp8 blocks hold 16-bit latents as fp8: with packed latents the pair is refused, naming
    // both flags.
    opts.paged_attention = Some(PagedOptions {
        fp8: true,
        ..PagedOptions::tokens(4096)
    });
    let err = serve_opts(opts.clone()).await.unwrap_err();
    insta::assert_snapshot!("palu_packed_with_fp8_blocks", startup_error(err, &[]));
    // Paged attention is the engine's CUDA path: on the CPU it is refused, saying what to do.
    opts.latent_bits = Some(16);
    opts.paged_attention = Some(PagedOptions::tokens(4096));
    let err = serve_opts(opts).await.unwrap_err();
    insta::assert_snapshot!("palu_paged_attention_on_cpu", startup_error(err, &[]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_cache_palu_with_an_unsupported_architecture_is_a_clear_startup_error() {
    // The authors' dump relabelled as a Gemma checkpoint.
    let tmp = edited_authors_dump(|c| c["model_type"] = serde_json::json!("gemma2"));
    let err = serve(tmp.path(), KvCacheKind::Palu).await.unwrap_err();
    insta::assert_snapshot!(
        "unsupported_architecture",
        startup_error(err, &[(tmp.path(), "[DIR]")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_model_or_ranks_that_disagree_with_the_tensors_are_clear_startup_errors() {
    let err = serve(&fixtures().join("models/stories260K"), KvCacheKind::Palu)
        .await
        .unwrap_err();
    insta::assert_snapshot!("plain_model_with_kv_cache_palu", startup_error(err, &[]));
    let tmp = edited_authors_dump(|c| {
        c["head_wise_ranks"]["model.layers.4.self_attn.k_proj"] = serde_json::json!([1, 1, 2, 1])
    });
    let err = serve(tmp.path(), KvCacheKind::Palu).await.unwrap_err();
    insta::assert_snapshot!(
        "ranks_disagree_with_tensors",
        startup_error(err, &[(tmp.path(), "[DIR]")])
    );
}
