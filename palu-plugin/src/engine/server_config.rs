//! `mistralrs-server --config server.toml`: the server, model and KV-cache selection in one file.
//!
//! ```toml
//! [server]
//! serve_ip = "127.0.0.1"
//! port = 1234
//! max_seqs = 16
//!
//! [model]
//! dir = "out/smollm2"            # relative paths are relative to this file
//! dtype = "f32"                  # auto | f32 | f16 | bf16
//! cpu = true
//! # isq = "Q4K"
//!
//! [kv_cache]
//! kind = "palu"                  # default | palu
//! # checkpoint = "out/smollm2-palu50"       # a Palu checkpoint, or:
//! config = "../configs/smollm2-135m-g3-r50.toml"   # decompose `model.dir` at load time
//! calib = "../../shared/fixtures/text/c4-train-00000-first800.jsonl"
//! # latent_bits = 4             # 2 | 3 | 4 | 8 packed, 16 = activation dtype
//! # plan = "plan.toml"          # per-layer plan (`palu plan`); default: the checkpoint's
//!
//! # [paged_attention]            # CUDA: the engine's paged blocks (latent rows with palu)
//! # context_tokens = 65536       # blocks for this many tokens; default 90 % of free memory
//! # block_size = 32              # 8 | 16 | 32
//! # cache_type = "auto"          # auto | f8e4m3 (16-bit latents stored as fp8)
//! ```
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::server::{EngineOptions, KvCacheKind};
use crate::error::{read_to_string, PaluError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default)]
    pub server: ServerSection,
    pub model: ModelSection,
    #[serde(default)]
    pub kv_cache: KvCacheSection,
    /// Present: the engine's paged attention (CUDA).
    pub paged_attention: Option<PagedSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagedSection {
    pub context_tokens: Option<usize>,
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    #[serde(default = "default_cache_type")]
    pub cache_type: String,
}

fn default_block_size() -> usize {
    32
}
fn default_cache_type() -> String {
    "auto".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    #[serde(default = "default_ip")]
    pub serve_ip: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_max_seqs")]
    pub max_seqs: usize,
    #[serde(default)]
    pub no_prefix_cache: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            serve_ip: default_ip(),
            port: default_port(),
            max_seqs: default_max_seqs(),
            no_prefix_cache: false,
        }
    }
}

fn default_ip() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    1234
}
fn default_max_seqs() -> usize {
    16
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub dir: Option<PathBuf>,
    #[serde(default = "default_dtype")]
    pub dtype: String,
    #[serde(default)]
    pub cpu: bool,
    pub isq: Option<String>,
}

fn default_dtype() -> String {
    "auto".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvCacheSection {
    #[serde(default)]
    pub kind: Kind,
    pub checkpoint: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub calib: Option<PathBuf>,
    /// 2, 3, 4, 8 (packed) or 16; default: the allocation's or checkpoint's `latent_bits`.
    pub latent_bits: Option<u8>,
    /// A per-layer plan (`palu plan`); default: the checkpoint's `plan.toml`, else one made at
    /// startup.
    pub plan: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Default,
    Palu,
}

pub fn parse_dtype(s: &str) -> Result<mistralrs_core::ModelDType, String> {
    Ok(match s {
        "auto" => mistralrs_core::ModelDType::Auto,
        "f32" => mistralrs_core::ModelDType::F32,
        "f16" => mistralrs_core::ModelDType::F16,
        "bf16" => mistralrs_core::ModelDType::BF16,
        other => return Err(format!("dtype `{other}`: expected auto, f32, f16 or bf16")),
    })
}

impl ServerConfig {
    pub fn from_file(path: &Path) -> Result<Self, PaluError> {
        let text = read_to_string(path)?;
        toml::from_str(&text).map_err(|e| PaluError::Toml {
            path: path.into(),
            msg: e.to_string(),
        })
    }

    /// Engine options, with paths resolved relative to the config file.
    pub fn engine_options(&self, path: &Path) -> Result<EngineOptions, PaluError> {
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &Option<PathBuf>| {
            p.as_ref().map(|p| {
                if p.is_absolute() {
                    p.clone()
                } else {
                    base.join(p)
                }
            })
        };
        let kind = match self.kv_cache.kind {
            Kind::Default => KvCacheKind::Default,
            Kind::Palu => KvCacheKind::Palu,
        };
        let model_dir =
            match (kind, rel(&self.kv_cache.checkpoint), rel(&self.model.dir)) {
                (KvCacheKind::Palu, Some(c), _) => c,
                (_, _, Some(d)) => d,
                _ => return Err(PaluError::invalid(
                    path,
                    "model.dir is required (or kv_cache.checkpoint with kv_cache.kind = \"palu\")",
                )),
            };
        if kind == KvCacheKind::Palu
            && self.kv_cache.checkpoint.is_none()
            && self.kv_cache.config.is_none()
        {
            return Err(PaluError::invalid(
                path,
                "kv_cache.kind = \"palu\" needs kv_cache.checkpoint (a Palu checkpoint) or kv_cache.config (a rank allocation to decompose model.dir with)",
            ));
        }
        let dtype = parse_dtype(&self.model.dtype)
            .map_err(|m| PaluError::invalid(path, format!("model.{m}")))?;
        Ok(EngineOptions {
            model_dir,
            palu_config: rel(&self.kv_cache.config),
            palu_calib: rel(&self.kv_cache.calib),
            palu_plan: rel(&self.kv_cache.plan),
            kv_cache: kind,
            latent_bits: match self.kv_cache.latent_bits {
                Some(b) => {
                    crate::quant::check_bits(b)
                        .map_err(|e| PaluError::invalid(path, format!("kv_cache.{e}")))?;
                    Some(b)
                }
                None => None,
            },
            max_seqs: self.server.max_seqs,
            paged_attention: match &self.paged_attention {
                None => None,
                Some(p) => {
                    if ![8, 16, 32].contains(&p.block_size) {
                        return Err(PaluError::invalid(
                            path,
                            format!(
                                "paged_attention.block_size {}: the engine takes 8, 16 or 32",
                                p.block_size
                            ),
                        ));
                    }
                    let fp8 = match p.cache_type.as_str() {
                        "auto" => false,
                        "f8e4m3" => true,
                        other => {
                            return Err(PaluError::invalid(
                                path,
                                format!(
                                    "paged_attention.cache_type `{other}`: expected auto or f8e4m3"
                                ),
                            ))
                        }
                    };
                    Some(super::server::PagedOptions {
                        context_tokens: p.context_tokens,
                        block_size: p.block_size,
                        fp8,
                    })
                }
            },
            no_prefix_cache: self.server.no_prefix_cache,
            isq: self.model.isq.clone(),
            cpu: self.model.cpu,
            dtype,
        })
    }
}
