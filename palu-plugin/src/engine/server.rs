//! Building the engine and the OpenAI-compatible router, shared by `mistralrs-server` and the
//! integration tests.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::stats::KvStats;
use crate::planner::{CostModel, Plan, PlanInputs};
use mistralrs_core::{
    AutoDeviceMapParams, DefaultSchedulerMethod, DeviceMapSetting, IsqType, Loader,
    MemoryGpuConfig, MistralRs, MistralRsBuilder, ModelDType, NormalLoaderBuilder,
    NormalSpecificConfig, PagedAttentionConfig, PagedCacheType, SchedulerConfig, TokenSource,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvCacheKind {
    /// The engine's own K/V cache.
    Default,
    /// Palu: cache the low-rank latents of a Palu checkpoint.
    Palu,
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// A Palu checkpoint (`--kv-cache palu`), or a plain model (default cache, or Palu with
    /// `palu_config`, decomposed at load time).
    pub model_dir: PathBuf,
    /// Rank allocation to decompose a plain model with at load time (like in-situ quantization).
    pub palu_config: Option<PathBuf>,
    /// Calibration text for that decomposition (whitening).
    pub palu_calib: Option<PathBuf>,
    /// The per-layer plan (`palu plan`'s `plan.toml`). None: the checkpoint's `plan.toml` if it
    /// has one, else a plan made at startup for `max_seqs` sequences (latent keys; values fused
    /// where the cost model says so).
    pub palu_plan: Option<PathBuf>,
    pub kv_cache: KvCacheKind,
    /// Bits of the cached latents (2, 3, 4, 8; 16 = the activation dtype). None: the
    /// `compression.latent_bits` of `palu_config`, else of the checkpoint's `palu.toml`, else 16.
    pub latent_bits: Option<u8>,
    pub max_seqs: usize,
    /// The engine's paged attention (CUDA), as upstream's server runs by default there: K/V
    /// blocks for the default cache, latent rows in the same blocks for the Palu cache
    /// (`palu::paged`). `None`: the plain KV cache.
    pub paged_attention: Option<PagedOptions>,
    /// Turn the engine's prefix cache off (it is on by default, for both caches).
    pub no_prefix_cache: bool,
    pub isq: Option<String>,
    pub cpu: bool,
    pub dtype: ModelDType,
}

/// Paged attention settings (`--paged-attn-context`, `--pa-blk-size`, `--pa-cache-type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PagedOptions {
    /// Blocks for this many tokens in all; `None`: 90 % of the free GPU memory (the engine's
    /// default).
    pub context_tokens: Option<usize>,
    /// Tokens per block: 16 or 32 (the engine also takes 8; Palu's kernel reads whole 16-row
    /// chunks, so blocks of 8 run on its gather path).
    pub block_size: usize,
    /// Blocks of float8 e4m3 (`--pa-cache-type f8e4m3`): with Palu, 16-bit latents stored as
    /// fp8 (no scale, as the engine stores K/V).
    pub fp8: bool,
}

impl PagedOptions {
    /// Blocks of 32 tokens in the activation dtype for `tokens` tokens.
    pub fn tokens(tokens: usize) -> Self {
        Self {
            context_tokens: Some(tokens),
            block_size: 32,
            fp8: false,
        }
    }
}

/// One line for the startup log: KV geometry and bytes per token, default vs Palu.
pub fn kv_summary(dir: &Path, latent_bits: u8) -> Result<String> {
    let i = crate::checkpoint::inspect(dir)?;
    let palu = i
        .kv_bytes_palu
        .iter()
        .find(|x| x.0 == latent_bits)
        .map(|x| x.1)
        .unwrap_or(i.kv_bytes_default);
    let gib = (1u64 << 30) as f64;
    let latents = if latent_bits >= 16 {
        "16-bit latents".to_string()
    } else {
        format!("{latent_bits}-bit packed latents with f16 scales and i16 zeros")
    };
    Ok(format!(
        "KV cache: {} layers; default {} B/token (16-bit K/V, {} KV heads × {}); Palu {} B/token ({latents}; {:.3}× default, {:.1}% of the K/V width removed); tokens per GiB of KV budget: default {:.0}, Palu {:.0}",
        i.num_layers,
        i.kv_bytes_default,
        i.num_kv_heads,
        i.head_dim,
        palu,
        palu as f64 / i.kv_bytes_default as f64,
        100.0 * i.kv_reduction,
        gib / i.kv_bytes_default as f64,
        gib / palu as f64
    ))
}

/// The latent bits to serve with: explicit, else the allocation's, else the checkpoint's
/// `palu.toml`, else 16.
pub fn resolve_latent_bits(o: &EngineOptions) -> Result<u8> {
    let bits = match (o.latent_bits, &o.palu_config) {
        (Some(b), _) => {
            crate::quant::check_bits(b).map_err(|e| anyhow::anyhow!("--palu-latent-bits: {e}"))?;
            b
        }
        (None, Some(cfg)) => {
            crate::alloc_config::AllocConfig::from_file(cfg)?
                .compression
                .latent_bits
        }
        (None, None) => {
            let p = o.model_dir.join("palu.toml");
            if p.exists() {
                crate::alloc_config::AllocConfig::from_file(&p)?
                    .compression
                    .latent_bits
            } else {
                16
            }
        }
    };
    crate::quant::check_bits(bits)?;
    Ok(bits)
}

/// The plan the Palu model runs with: `--palu-plan`, else `<checkpoint>/plan.toml`, else one made
/// now for `max_seqs` sequences at the model's context length with the default cost model.
pub fn resolve_plan(
    o: &EngineOptions,
    cfg: &crate::config::ModelConfig,
    latent_bits: u8,
) -> Result<Plan> {
    let file = o
        .palu_plan
        .clone()
        .or_else(|| Some(o.model_dir.join("plan.toml")).filter(|p| p.exists()));
    let Some(path) = file else {
        let inputs = PlanInputs {
            context: cfg.max_position_embeddings,
            batch: o.max_seqs.max(1),
            latent_bits,
            kv_budget: None,
        };
        return Ok(Plan::make(cfg, inputs, CostModel::default())?);
    };
    let plan = Plan::from_toml_file(&path)?;
    plan.check(cfg, &path)?;
    if plan.inputs.latent_bits != latent_bits {
        tracing::warn!(
            "{}: the plan was made for {}-bit latents, the cache holds {latent_bits}-bit ones; its choices apply, its time estimates do not",
            path.display(),
            plan.inputs.latent_bits
        );
    }
    tracing::info!("palu plan from {}", path.display());
    Ok(plan)
}

/// A running engine and, with `--kv-cache palu`, the live KV-cache measurements of its model.
pub struct Served {
    pub engine: Arc<MistralRs>,
    pub kv_stats: Option<Arc<KvStats>>,
}

/// Decompose a plain model with a stored rank allocation into a Palu checkpoint, cached next to
/// the system's temporary files by the hash of (model config, allocation, calibration file).
pub fn decompose_at_load(model_dir: &Path, config: &Path, calib: Option<&Path>) -> Result<PathBuf> {
    let ac = crate::alloc_config::AllocConfig::from_file(config)?;
    let calib = calib.map(Path::to_path_buf).ok_or_else(|| {
        anyhow::anyhow!("--palu-config {} needs --palu-calib FILE (the calibration text for whitening, e.g. the C4 sample)", config.display())
    })?;
    let key = {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(
            std::fs::read(model_dir.join("config.json"))
                .with_context(|| format!("{}/config.json", model_dir.display()))?,
        );
        h.update(std::fs::read(config)?);
        h.update(crate::calib::file_sha256(&calib)?.0);
        format!("{:x}", h.finalize())
    };
    let out = std::env::temp_dir()
        .join("palu-load-cache")
        .join(&key[..16]);
    if out.join("config.json").exists() {
        tracing::info!("using the Palu decomposition cached at {}", out.display());
        return Ok(out);
    }
    tracing::info!(
        "decomposing {} with {} at load time",
        model_dir.display(),
        config.display()
    );
    let opts = crate::compress::CompressOptions {
        calib: Some(calib),
        config: Some((config.to_path_buf(), ac.clone())),
        calib_samples: ac.calibration.as_ref().map_or(16, |c| c.samples),
        calib_seq_len: ac.calibration.as_ref().map_or(1024, |c| c.seq_len),
        seed: ac.calibration.as_ref().map_or(0, |c| c.seed),
        ..Default::default()
    };
    crate::compress::compress_to_dir(model_dir, &out, &opts)?;
    Ok(out)
}

/// Load the model into a running engine.
pub async fn build_engine(o: &EngineOptions) -> Result<Arc<MistralRs>> {
    Ok(start(o).await?.engine)
}

/// Load the model into a running engine, keeping the handle on its KV-cache measurements.
pub async fn start(o: &EngineOptions) -> Result<Served> {
    let latent_bits = if o.kv_cache == KvCacheKind::Palu {
        resolve_latent_bits(o)?
    } else {
        16
    };
    let stats = Arc::new(KvStats::default());
    let mut o = o.clone();
    if o.kv_cache == KvCacheKind::Palu {
        if let Some(cfg) = &o.palu_config {
            o.model_dir = decompose_at_load(&o.model_dir, cfg, o.palu_calib.as_deref())?;
        }
    }
    let o = &o;
    let model_id = o.model_dir.to_string_lossy().into_owned();
    let builder = NormalLoaderBuilder::new(
        NormalSpecificConfig::default(),
        None,
        None,
        Some(model_id),
        false,
        None,
    );
    let loader: Box<dyn Loader> = match o.kv_cache {
        KvCacheKind::Palu => {
            // Fail early, naming the file and tensor, before the engine starts.
            let cfg_path = o.model_dir.join("config.json");
            let cfg = crate::config::ModelConfig::from_file(&cfg_path)?;
            if !cfg.is_palu {
                anyhow::bail!(
                    "{}: model_type `{}` is not a Palu checkpoint; compress it with `palu compress` first, or serve it with --kv-cache default",
                    cfg_path.display(),
                    cfg.family.model_type()
                );
            }
            crate::model::Model::validate(&o.model_dir).with_context(|| {
                format!("{}: not a loadable Palu checkpoint", o.model_dir.display())
            })?;
            tracing::info!("{}", kv_summary(&o.model_dir, latent_bits)?);
            let plan = resolve_plan(o, &cfg, latent_bits)?;
            builder.build_with_loader(Box::new(super::PaluLoader {
                latent_bits,
                stats: Arc::clone(&stats),
                plan: Some(plan),
            }))?
        }
        KvCacheKind::Default => builder.build(None)?,
    };
    let device = if o.cpu {
        candle_core::Device::Cpu
    } else {
        candle_core::Device::cuda_if_available(0)?
    };
    let isq: Option<IsqType> = o
        .isq
        .as_deref()
        .map(|s| mistralrs_core::parse_isq_value(s, Some(&device)))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let paged = match o.paged_attention {
        None => None,
        Some(p) => {
            if p.fp8 && o.kv_cache == KvCacheKind::Palu && latent_bits < 16 {
                anyhow::bail!(
                    "--pa-cache-type f8e4m3 stores 16-bit Palu latents as fp8; it does not compose with {latent_bits}-bit packed latents: choose one (--palu-latent-bits 16 with f8e4m3, or auto blocks with packed latents)"
                )
            }
            if device.is_cpu() {
                anyhow::bail!("paged attention runs on CUDA only (the engine has no CPU paged attention); drop it or run on a GPU")
            }
            Some(PagedAttentionConfig::new(
                Some(p.block_size),
                match p.context_tokens {
                    Some(tokens) => MemoryGpuConfig::ContextSize(tokens),
                    None => MemoryGpuConfig::Utilization(0.9),
                },
                if p.fp8 {
                    PagedCacheType::F8E4M3
                } else {
                    PagedCacheType::Auto
                },
            )?)
        }
    };
    let pipeline = loader.load_model_from_hf(
        None,
        TokenSource::None,
        &o.dtype,
        &device,
        true,
        DeviceMapSetting::Auto(AutoDeviceMapParams::default_text()),
        isq,
        paged,
    )?;
    let max_seqs = o
        .max_seqs
        .try_into()
        .context("--max-seqs must be at least 1")?;
    let cache_config = pipeline.lock().await.get_metadata().cache_config.clone();
    let method = match cache_config {
        Some(config) if o.paged_attention.is_some() => SchedulerConfig::PagedAttentionMeta {
            max_num_seqs: o.max_seqs,
            config,
        },
        _ => SchedulerConfig::DefaultScheduler {
            method: DefaultSchedulerMethod::Fixed(max_seqs),
        },
    };
    let mut b = MistralRsBuilder::new(pipeline, method, false, None);
    if o.no_prefix_cache {
        b = b.with_no_prefix_cache(true);
    }
    let kv_stats = (o.kv_cache == KvCacheKind::Palu).then_some(stats);
    Ok(Served {
        engine: b.build().await,
        kv_stats,
    })
}

/// The OpenAI-compatible HTTP router of mistralrs-server-core over `engine`.
pub async fn router(engine: Arc<MistralRs>) -> Result<axum::Router> {
    mistralrs_server_core::mistralrs_server_router_builder::MistralRsServerRouterBuilder::new()
        .with_mistralrs(engine)
        .build()
        .await
}

/// [`router`] plus `GET /v1/palu/kv_cache`: the bytes the Palu model's live cache tensors held
/// at its last forward pass (JSON [`KvReading`](super::KvReading)).
pub async fn router_for(served: &Served) -> Result<axum::Router> {
    let app = router(Arc::clone(&served.engine)).await?;
    Ok(match &served.kv_stats {
        Some(stats) => {
            let stats = Arc::clone(stats);
            app.route(
                "/v1/palu/kv_cache",
                axum::routing::get(move || {
                    let stats = Arc::clone(&stats);
                    async move { axum::Json(stats.reading()) }
                }),
            )
        }
        None => app,
    })
}
