//! `mistralrs-server` with a Palu KV cache: upstream's OpenAI-compatible server (the router of
//! mistralrs-server-core) plus `--kv-cache {default,palu}`.
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use palu::engine::server::{router_for, start, EngineOptions, KvCacheKind};
use palu::engine::server_config::{parse_dtype, ServerConfig};

#[derive(Parser, Debug)]
#[command(
    name = "mistralrs-server",
    version,
    about = "mistral.rs OpenAI-compatible server with the Palu low-rank KV cache"
)]
struct Args {
    /// Read the server, model and KV-cache selection from this TOML file (see configs/*.server.toml);
    /// the other flags are then ignored.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model directory (Hugging Face layout; a Palu checkpoint for --kv-cache palu).
    #[arg(short = 'm', long)]
    model: Option<PathBuf>,
    /// Which KV cache to use.
    #[arg(long, value_enum, default_value_t = KvCacheKind::Default)]
    kv_cache: KvCacheKind,
    /// A Palu checkpoint directory (written by `palu compress` or by the Palu authors' code).
    #[arg(long)]
    palu_checkpoint: Option<PathBuf>,
    /// Decompose the plain model given with -m at load time with this rank allocation (palu.toml).
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
    #[arg(long, default_value = "127.0.0.1")]
    serve_ip: String,
    #[arg(short, long, default_value_t = 1234)]
    port: u16,
    /// Maximum running sequences.
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// Turn off the engine's prefix cache (reuse of the KV cache of earlier prompts).
    #[arg(long)]
    no_prefix_cache: bool,
    /// In-situ quantization of the non-Palu weights (e.g. Q4K, Q8_0).
    #[arg(long)]
    isq: Option<String>,
    /// Run on the CPU.
    #[arg(long)]
    cpu: bool,
    /// Activation dtype: auto, f32, f16, bf16.
    #[arg(long, default_value = "auto")]
    dtype: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    mistralrs_core::initialize_logging();
    let (opts, ip, port) = match &args.config {
        Some(path) => {
            let c = ServerConfig::from_file(path)?;
            (
                c.engine_options(path)?,
                c.server.serve_ip.clone(),
                c.server.port,
            )
        }
        None => {
            let model_dir = match (args.kv_cache, &args.palu_checkpoint, &args.model) {
                (KvCacheKind::Palu, Some(c), _) => c.clone(),
                (_, _, Some(m)) => m.clone(),
                _ => anyhow::bail!("give a model directory with -m/--model (or --palu-checkpoint with --kv-cache palu), or --config server.toml"),
            };
            let dtype = parse_dtype(&args.dtype).map_err(|m| anyhow::anyhow!("--{m}"))?;
            let opts = EngineOptions {
                model_dir,
                palu_config: args.palu_config,
                palu_calib: args.palu_calib,
                kv_cache: args.kv_cache,
                latent_bits: args.palu_latent_bits,
                max_seqs: args.max_seqs,
                no_prefix_cache: args.no_prefix_cache,
                isq: args.isq,
                cpu: args.cpu,
                dtype,
            };
            (opts, args.serve_ip, args.port)
        }
    };
    let served = start(&opts).await?;
    let app = router_for(&served).await?;
    let listener = tokio::net::TcpListener::bind((ip.as_str(), port)).await?;
    tracing::info!(
        "serving {} on http://{}",
        opts.model_dir.display(),
        listener.local_addr()?
    );
    axum::serve(listener, app).await?;
    Ok(())
}
