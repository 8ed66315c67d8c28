//! `mistralrs-server` with a Palu KV cache: upstream's OpenAI-compatible server (mistral.rs's
//! model subcommands, the router of mistralrs-server-core) plus `--kv-cache {default,palu}`.
//!
//! With the default cache every model subcommand (`plain`, `gguf`, `run`, `toml`, ...) goes to
//! mistralrs-server-core's own builder, as upstream's binary does. With `--kv-cache palu` the
//! model is a Palu checkpoint (`--palu-checkpoint DIR`, or `plain -m DIR`) or a plain model
//! decomposed at load time (`plain -m DIR --palu-config FILE.toml`).
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use mistralrs_core::ModelSelected;
use mistralrs_server_core::mistralrs_for_server_builder::MistralRsForServerBuilder;
use palu::engine::server::{router, router_for, start, EngineOptions, KvCacheKind, PagedOptions};
use palu::engine::server_config::{parse_dtype, ServerConfig};

#[derive(Parser, Debug)]
#[command(
    name = "mistralrs-server",
    version,
    about = "mistral.rs OpenAI-compatible server with the Palu low-rank KV cache",
    after_help = "Examples:\n  \
        mistralrs-server --kv-cache palu --palu-checkpoint out/smollm2-palu50 --cpu\n  \
        mistralrs-server --kv-cache palu --palu-latent-bits 4 plain -m out/smollm2-palu50\n  \
        mistralrs-server --kv-cache palu --palu-config configs/smollm2-135m-g3-r50.toml \\\n      \
            --palu-calib c4.jsonl plain -m out/smollm2\n  \
        mistralrs-server plain -m out/smollm2              # the stock engine, as upstream\n  \
        mistralrs-server --config configs/smollm2.server.toml"
)]
struct Args {
    /// Read the server, model and KV-cache selection from this TOML file (see configs/*.server.toml);
    /// the other flags are then ignored.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model directory (Hugging Face layout; a Palu checkpoint for --kv-cache palu). Shorthand
    /// for the `plain -m DIR` subcommand.
    #[arg(short = 'm', long)]
    model: Option<PathBuf>,
    /// Which KV cache to use.
    #[arg(long, value_enum, default_value_t = KvCacheKind::Default)]
    kv_cache: KvCacheKind,
    /// A Palu checkpoint directory (written by `palu compress` or by the Palu authors' code).
    #[arg(long)]
    palu_checkpoint: Option<PathBuf>,
    /// Decompose the plain model at load time with this rank allocation (palu.toml).
    #[arg(long)]
    palu_config: Option<PathBuf>,
    /// Calibration text for --palu-config (whitening), e.g. the C4 sample.
    #[arg(long)]
    palu_calib: Option<PathBuf>,
    /// Bits of the cached latents: 2, 3, 4 or 8 store packed integers with a scale and zero per
    /// token and group; 16 stores them in the activation dtype. Default: the rank allocation's
    /// (or the checkpoint's palu.toml) `latent_bits`, else 16.
    #[arg(long)]
    palu_latent_bits: Option<u8>,
    /// Per-layer plan (`palu plan` writes it): latent or full keys, fused or unfused values.
    /// Default: the checkpoint's plan.toml, else a plan made at startup (printed either way).
    #[arg(long)]
    palu_plan: Option<PathBuf>,
    /// IP to serve on.
    #[arg(long, default_value = "127.0.0.1")]
    serve_ip: String,
    /// Port to serve on.
    #[arg(short, long, default_value_t = 1234)]
    port: u16,
    /// Maximum running sequences.
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// Paged attention (CUDA) with KV blocks for this many tokens in all: K/V blocks for the
    /// default cache, latent rows in the same blocks for --kv-cache palu. Block size from
    /// --pa-blk-size (default 32), fp8 blocks with --pa-cache-type f8e4m3.
    #[arg(long, value_name = "TOKENS")]
    paged_attn_context: Option<usize>,
    /// Turn off the engine's prefix cache (reuse of the KV cache of earlier prompts).
    #[arg(long)]
    no_prefix_cache: bool,
    /// In-situ quantization of the non-Palu weights (e.g. Q4K, Q8_0).
    #[arg(long)]
    isq: Option<String>,
    /// Run on the CPU.
    #[arg(long)]
    cpu: bool,
    /// Activation dtype: auto, f32, f16, bf16 (the `plain` subcommand's -d takes precedence).
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Seed for the engine's sampler.
    #[arg(long)]
    seed: Option<u64>,
    // Upstream mistralrs-server's engine flags (the stock path, with a model subcommand).
    /// Log all responses and requests to this file.
    #[arg(long)]
    log: Option<String>,
    /// Disable the KV cache entirely (stock path).
    #[arg(long)]
    no_kv_cache: bool,
    /// Chat template file (JINJA or a tokenizer_config.json with `chat_template`).
    #[arg(short = 'c', long)]
    chat_template: Option<String>,
    /// Explicit JINJA chat template file, overriding everything else.
    #[arg(short = 'j', long)]
    jinja_explicit: Option<String>,
    /// Source of the Hugging Face token: `literal:<t>`, `env:<var>`, `path:<file>`, `cache`, `none`.
    #[arg(long, default_value = "cache")]
    token_source: String,
    /// Number of prefix caches to hold on the device (0 disables prefix caching).
    #[arg(long, default_value_t = 16)]
    prefix_cache_n: usize,
    /// Layers per device, e.g. `0:16;1:16` (see mistral.rs's device mapping).
    #[arg(short = 'n', long, value_delimiter = ';')]
    num_device_layers: Option<Vec<String>>,
    /// PagedAttention: GPU memory to reserve for the KV cache, in MB.
    #[arg(long = "pa-gpu-mem")]
    paged_attn_gpu_mem: Option<usize>,
    /// PagedAttention: fraction of GPU memory to use for the KV cache (0..1).
    #[arg(long = "pa-gpu-mem-usage")]
    paged_attn_gpu_mem_usage: Option<f32>,
    /// PagedAttention: total context length to allocate the KV cache for.
    #[arg(long = "pa-ctxt-len")]
    paged_ctxt_len: Option<usize>,
    /// PagedAttention: block size in tokens.
    #[arg(long = "pa-blk-size")]
    paged_attn_block_size: Option<usize>,
    /// PagedAttention: cache dtype, `auto` or `f8e4m3`.
    #[arg(long = "pa-cache-type")]
    cache_type: Option<String>,
    /// PagedAttention on (`true`) or off (`false`); default: on for CUDA, off elsewhere.
    #[arg(long = "paged-attn")]
    paged_attn: Option<bool>,
    /// The model, as upstream's mistralrs-server selects it.
    #[command(subcommand)]
    model_selected: Option<ModelSelected>,
}

/// Engine options for the Palu path from the flags and an optional `plain` subcommand.
fn palu_options(args: &Args) -> Result<EngineOptions> {
    let mut dtype = parse_dtype(&args.dtype).map_err(|m| anyhow::anyhow!("--{m}"))?;
    let from_subcommand = match &args.model_selected {
        None => None,
        Some(ModelSelected::Plain { model_id, dtype: d, .. }) => {
            dtype = *d;
            Some(PathBuf::from(model_id))
        }
        Some(other) => bail!(
            "--kv-cache palu serves Llama, Mistral and Qwen2 text models through the `plain` subcommand (a model directory); `{}` is not supported with it. Use `plain -m DIR`, or --kv-cache default",
            subcommand_name(other)
        ),
    };
    let model_dir = match (&args.palu_checkpoint, &args.model, from_subcommand) {
        (Some(c), _, _) => c.clone(),
        (None, Some(m), _) => m.clone(),
        (None, None, Some(m)) => m,
        (None, None, None) => {
            bail!("--kv-cache palu needs a model: --palu-checkpoint DIR, -m DIR, or the `plain -m DIR` subcommand (or --config server.toml)")
        }
    };
    Ok(EngineOptions {
        model_dir,
        palu_config: args.palu_config.clone(),
        palu_calib: args.palu_calib.clone(),
        palu_plan: args.palu_plan.clone(),
        kv_cache: KvCacheKind::Palu,
        latent_bits: args.palu_latent_bits,
        max_seqs: args.max_seqs,
        paged_attention: paged_options(args)?,
        no_prefix_cache: args.no_prefix_cache,
        isq: args.isq.clone(),
        cpu: args.cpu,
        dtype,
    })
}

/// Paged attention from the flags: on with --paged-attn-context or --paged-attn true.
fn paged_options(args: &Args) -> Result<Option<PagedOptions>> {
    let on = match args.paged_attn {
        Some(on) => on,
        None => args.paged_attn_context.is_some(),
    };
    if !on {
        return Ok(None);
    }
    let fp8 = match args.cache_type.as_deref() {
        None | Some("auto") => false,
        Some("f8e4m3") => true,
        Some(other) => bail!("--pa-cache-type {other}: expected `auto` or `f8e4m3`"),
    };
    let block_size = args.paged_attn_block_size.unwrap_or(32);
    if ![8, 16, 32].contains(&block_size) {
        bail!("--pa-blk-size {block_size}: the engine's paged attention takes 8, 16 or 32");
    }
    Ok(Some(PagedOptions {
        context_tokens: args.paged_attn_context.or(args.paged_ctxt_len),
        block_size,
        fp8,
    }))
}

fn subcommand_name(m: &ModelSelected) -> String {
    format!("{m:?}")
        .split([' ', '{', '('])
        .next()
        .unwrap_or("?")
        .to_lowercase()
}

async fn serve(app: axum::Router, ip: &str, port: u16, what: &str) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((ip, port)).await?;
    tracing::info!("serving {what} on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    mistralrs_core::initialize_logging();
    if args.kv_cache == KvCacheKind::Default && args.config.is_none() {
        if let Some(model) = args.model_selected.clone() {
            // The stock path: exactly what upstream's server builds from a model subcommand.
            let token_source: mistralrs_core::TokenSource = args
                .token_source
                .parse()
                .map_err(|e| anyhow::anyhow!("--token-source {}: {e}", args.token_source))?;
            let mut b = MistralRsForServerBuilder::new()
                .with_model(model)
                .with_max_seqs(args.max_seqs)
                .with_cpu(args.cpu)
                .with_seed_optional(args.seed)
                .with_log_optional(args.log.clone())
                .with_no_kv_cache(args.no_kv_cache)
                .with_chat_template_optional(args.chat_template.clone())
                .with_jinja_explicit_optional(args.jinja_explicit.clone())
                .with_token_source(token_source)
                .with_prefix_cache_n(if args.no_prefix_cache {
                    0
                } else {
                    args.prefix_cache_n
                })
                .with_num_device_layers_optional(args.num_device_layers.clone())
                .with_in_situ_quant_optional(args.isq.clone())
                .with_paged_attn_gpu_mem_optional(args.paged_attn_gpu_mem)
                .with_paged_attn_gpu_mem_usage_optional(args.paged_attn_gpu_mem_usage)
                .with_paged_ctxt_len_optional(args.paged_ctxt_len)
                .with_paged_attn_block_size_optional(args.paged_attn_block_size)
                .set_paged_attn(args.paged_attn);
            if let Some(t) = &args.cache_type {
                let t: mistralrs_core::PagedCacheType = t
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--pa-cache-type {t}: {e}"))?;
                b = b.with_paged_attn_cache_type(t);
            }
            let engine = b.build().await?;
            return serve(
                router(engine).await?,
                &args.serve_ip,
                args.port,
                "the selected model",
            )
            .await;
        }
    }
    let opts = match &args.config {
        Some(path) => {
            let c = ServerConfig::from_file(path)?;
            let o = c.engine_options(path)?;
            let served = start(&o).await?;
            let app = router_for(&served).await?;
            return serve(
                app,
                &c.server.serve_ip,
                c.server.port,
                &o.model_dir.display().to_string(),
            )
            .await;
        }
        None if args.kv_cache == KvCacheKind::Palu => palu_options(&args)?,
        None => {
            let Some(m) = args.model.clone() else {
                bail!("give a model: a subcommand (`plain -m DIR`, `gguf ...`, see --help), -m DIR, or --config server.toml")
            };
            EngineOptions {
                model_dir: m,
                palu_config: None,
                palu_calib: None,
                palu_plan: None,
                kv_cache: KvCacheKind::Default,
                latent_bits: None,
                max_seqs: args.max_seqs,
                paged_attention: paged_options(&args)?,
                no_prefix_cache: args.no_prefix_cache,
                isq: args.isq.clone(),
                cpu: args.cpu,
                dtype: parse_dtype(&args.dtype).map_err(|m| anyhow::anyhow!("--{m}"))?,
            }
        }
    };
    let served = start(&opts).await?;
    let app = router_for(&served).await?;
    serve(
        app,
        &args.serve_ip,
        args.port,
        &opts.model_dir.display().to_string(),
    )
    .await
}
