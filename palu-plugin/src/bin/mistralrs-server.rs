//! `mistralrs-server` with a Palu KV cache: upstream's OpenAI-compatible server (the router of
//! mistralrs-server-core) plus `--kv-cache {default,palu}`.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use mistralrs_core::{
    AutoDeviceMapParams, DefaultSchedulerMethod, DeviceMapSetting, IsqType, Loader, MistralRsBuilder, ModelDType,
    NormalLoaderBuilder, NormalSpecificConfig, SchedulerConfig, TokenSource,
};
use mistralrs_server_core::mistralrs_server_router_builder::MistralRsServerRouterBuilder;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KvCacheKind {
    /// The engine's own K/V cache.
    Default,
    /// Palu: cache low-rank latents of a Palu checkpoint.
    Palu,
}

#[derive(Parser, Debug)]
#[command(name = "mistralrs-server", version, about = "mistral.rs OpenAI-compatible server with the Palu low-rank KV cache")]
struct Args {
    /// Model directory (Hugging Face layout; a Palu checkpoint for --kv-cache palu).
    #[arg(short = 'm', long)]
    model: Option<PathBuf>,
    /// Which KV cache to use.
    #[arg(long, value_enum, default_value_t = KvCacheKind::Default)]
    kv_cache: KvCacheKind,
    /// A Palu checkpoint directory (written by `palu compress` or the Palu authors' code).
    #[arg(long)]
    palu_checkpoint: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    serve_ip: String,
    #[arg(short, long, default_value_t = 1234)]
    port: u16,
    /// Maximum running sequences.
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// In-situ quantization of the non-Palu weights (e.g. Q4K, Q8_0).
    #[arg(long)]
    isq: Option<String>,
    /// Run on the CPU.
    #[arg(long)]
    cpu: bool,
}

fn kv_summary(dir: &std::path::Path) -> Result<String> {
    let i = palu::checkpoint::inspect(dir)?;
    let palu16 = i.kv_bytes_palu.first().map(|x| x.1).unwrap_or(i.kv_bytes_default);
    Ok(format!(
        "KV geometry: {} layers; default {} B/token (16-bit K/V of {} KV heads × {}), Palu {} B/token ({:.3}×, {:.1}% of the K/V width removed)",
        i.num_layers,
        i.kv_bytes_default,
        i.num_kv_heads,
        i.head_dim,
        palu16,
        palu16 as f64 / i.kv_bytes_default as f64,
        100.0 * i.kv_reduction
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    mistralrs_core::initialize_logging();
    let dir = match (args.kv_cache, &args.palu_checkpoint, &args.model) {
        (KvCacheKind::Palu, Some(c), _) => c.clone(),
        (_, _, Some(m)) => m.clone(),
        _ => anyhow::bail!("give a model directory with -m/--model (or --palu-checkpoint with --kv-cache palu)"),
    };
    let model_id = dir.to_string_lossy().into_owned();
    let builder = NormalLoaderBuilder::new(NormalSpecificConfig::default(), None, None, Some(model_id.clone()), false, None);
    let loader: Box<dyn Loader> = match args.kv_cache {
        KvCacheKind::Palu => {
            // Fail early, with the file and tensor named, before the engine starts.
            palu::model::Model::load(&dir, &candle_core::Device::Cpu).with_context(|| format!("{}: not a loadable Palu checkpoint", dir.display()))?;
            tracing::info!("{}", kv_summary(&dir)?);
            builder.build_with_loader(Box::new(palu::engine::PaluLoader))?
        }
        KvCacheKind::Default => builder.build(None)?,
    };
    let device = if args.cpu { candle_core::Device::Cpu } else { candle_core::Device::cuda_if_available(0)? };
    let isq = args.isq.as_deref().map(|s| mistralrs_core::parse_isq_value(s, Some(&device))).transpose().map_err(anyhow::Error::msg)?;
    let isq: Option<IsqType> = isq;
    let pipeline = loader.load_model_from_hf(
        None,
        TokenSource::None,
        &ModelDType::Auto,
        &device,
        false,
        DeviceMapSetting::Auto(AutoDeviceMapParams::default_text()),
        isq,
        None,
    )?;
    let method = SchedulerConfig::DefaultScheduler {
        method: DefaultSchedulerMethod::Fixed(args.max_seqs.try_into().context("--max-seqs must be at least 1")?),
    };
    let mistralrs = MistralRsBuilder::new(pipeline, method, false, None).build().await;
    let app = MistralRsServerRouterBuilder::new().with_mistralrs(Arc::clone(&mistralrs)).build().await?;
    let listener = tokio::net::TcpListener::bind((args.serve_ip.as_str(), args.port)).await?;
    tracing::info!("serving {} on http://{}", model_id, listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
