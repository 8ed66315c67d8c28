//! The rank-allocation file (`palu.toml`): everything a Palu checkpoint's `config.json` leaves
//! out, readable, editable and versionable. `palu compress --config` re-applies it.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{read_to_string, PaluError};
use crate::lowrank::KvKind;
use crate::ranks::{RankSearch, Ranks};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Decompose {
    /// SVD of the calibration-whitened weight (the authors' default).
    Whiten,
    /// Plain SVD of the weight.
    Svd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum HadamardMode {
    Off,
    On,
    /// Per module, only where it lowers the quantization error of the rebuilt K/V.
    Auto,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocConfig {
    pub format_version: u32,
    pub model: ModelInfo,
    pub compression: CompressionInfo,
    pub calibration: Option<CalibrationInfo>,
    #[serde(rename = "layer")]
    pub layers: Vec<LayerRanks>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub model_type: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub config_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionInfo {
    /// KV heads per low-rank group (1 = M-LRD, num_kv_heads = J-LRD).
    pub group_size: usize,
    pub decompose: Decompose,
    pub rank_search: RankSearch,
    /// Requested kept fraction of the K/V width.
    pub target_ratio: f64,
    pub rank_multiple: usize,
    pub hadamard: HadamardMode,
    /// Bits of the cached latents (16 = unquantized).
    pub latent_bits: u8,
    /// Fraction of K/V width actually removed by the stored ranks.
    pub achieved_kv_reduction: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationInfo {
    pub source: String,
    pub sha256: String,
    pub bytes: u64,
    pub samples: usize,
    pub seq_len: usize,
    pub fisher_samples: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRanks {
    pub index: usize,
    pub k: Vec<usize>,
    pub v: Vec<usize>,
    #[serde(default)]
    pub hadamard_k: bool,
    #[serde(default)]
    pub hadamard_v: bool,
}

impl AllocConfig {
    pub fn from_file(path: &Path) -> Result<Self, PaluError> {
        let text = read_to_string(path)?;
        let c: AllocConfig = toml::from_str(&text).map_err(|e| PaluError::Toml {
            path: path.into(),
            msg: e.to_string(),
        })?;
        if c.format_version != FORMAT_VERSION {
            return Err(PaluError::invalid(
                path,
                format!(
                    "format_version {} is not supported (this palu reads {FORMAT_VERSION})",
                    c.format_version
                ),
            ));
        }
        crate::quant::check_bits(c.compression.latent_bits)
            .map_err(|e| PaluError::invalid(path, format!("compression.{e}")))?;
        Ok(c)
    }

    pub fn to_toml(&self) -> String {
        let mut s = String::from(
            "# Palu rank allocation (palu-rs). Edit ranks and re-apply with\n#   palu compress MODEL OUT --config this.toml\n",
        );
        s.push_str(&toml::to_string(self).expect("serializable"));
        s
    }

    pub fn ranks(&self) -> Ranks {
        let mut r = Ranks::new();
        for l in &self.layers {
            r.insert((l.index, KvKind::K), l.k.clone());
            r.insert((l.index, KvKind::V), l.v.clone());
        }
        r
    }

    /// Check that this allocation fits `cfg` and return an error naming the field that does not.
    pub fn validate_for(&self, cfg: &ModelConfig, path: &Path) -> Result<(), PaluError> {
        let m = &self.model;
        let want = (
            cfg.family.model_type(),
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_kv_heads,
            cfg.head_dim,
        );
        let model_type = m.model_type.trim_start_matches("palu");
        if (
            model_type,
            m.num_layers,
            m.hidden_size,
            m.num_kv_heads,
            m.head_dim,
        ) != want
        {
            return Err(PaluError::invalid(
                path,
                format!(
                    "written for a different model: [model] says {} with {} layers, hidden {}, {} KV heads of {}; this model is {} with {} layers, hidden {}, {} KV heads of {}",
                    m.model_type, m.num_layers, m.hidden_size, m.num_kv_heads, m.head_dim, want.0, want.1, want.2, want.3, want.4
                ),
            ));
        }
        let g = self.compression.group_size;
        if g == 0 || !cfg.num_kv_heads.is_multiple_of(g) {
            return Err(PaluError::invalid(
                path,
                format!(
                    "compression.group_size = {g} does not divide num_key_value_heads {}",
                    cfg.num_kv_heads
                ),
            ));
        }
        let groups = cfg.num_kv_heads / g;
        let cap = (g * cfg.head_dim).min(cfg.hidden_size);
        let mut seen = vec![false; cfg.num_layers];
        for l in &self.layers {
            if l.index >= cfg.num_layers || seen[l.index] {
                return Err(PaluError::invalid(
                    path,
                    format!("layer.index = {} is out of range or repeated", l.index),
                ));
            }
            seen[l.index] = true;
            for (kind, rs) in [("k", &l.k), ("v", &l.v)] {
                if rs.len() != groups {
                    return Err(PaluError::invalid(
                        path,
                        format!(
                            "layer {} {kind}: {} ranks given, group_size {g} needs {groups}",
                            l.index,
                            rs.len()
                        ),
                    ));
                }
                if let Some(r) = rs.iter().find(|&&r| r == 0 || r > cap) {
                    return Err(PaluError::invalid(
                        path,
                        format!("layer {} {kind}: rank {r} is outside 1..={cap} (a group of {g} heads × {} dims)", l.index, cfg.head_dim),
                    ));
                }
            }
        }
        if let Some(missing) = seen.iter().position(|s| !s) {
            return Err(PaluError::invalid(
                path,
                format!("no [[layer]] entry with index = {missing}"),
            ));
        }
        Ok(())
    }
}
