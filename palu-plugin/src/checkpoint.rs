//! Palu checkpoints in the authors' layout: `config.json` with `model_type` `palu*`,
//! `head_wise_ranks` and `original_model_name_or_path`; tensors `…{k,v}_proj.VT.weight` and
//! `…{k,v}_proj.U.{i}.weight` (+ `.bias`), every other tensor under its Hugging Face name;
//! plus palu-rs's `palu.toml`. Output directories are written to a temporary directory beside
//! the target and renamed at the end, so a failure leaves nothing half-written.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;
use serde_json::json;

use crate::alloc_config::AllocConfig;
use crate::config::ModelConfig;
use crate::error::PaluError;
use crate::lowrank::{KvKind, LowRankProj};
use crate::model::Weights;

pub const ALLOC_FILE: &str = "palu.toml";

/// Run `fill` on a fresh temporary directory and move it to `out` only if it succeeds.
pub fn write_dir_atomically(
    out: &Path,
    fill: impl FnOnce(&Path) -> Result<(), PaluError>,
) -> Result<(), PaluError> {
    if out.exists() {
        return Err(PaluError::invalid(
            out,
            "already exists; remove it or choose another output directory",
        ));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| PaluError::io(&parent, e))?;
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.partial-"))
        .tempdir_in(&parent)
        .map_err(|e| PaluError::io(&parent, e))?;
    fill(tmp.path())?;
    let kept = tmp.keep();
    std::fs::rename(&kept, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&kept);
        PaluError::io(out, e)
    })
}

fn is_dense_kv(name: &str) -> bool {
    [
        "k_proj.weight",
        "v_proj.weight",
        "k_proj.bias",
        "v_proj.bias",
    ]
    .iter()
    .any(|s| name.ends_with(&format!("self_attn.{s}")))
}

/// Tensors of a Palu checkpoint: the source weights minus dense K/V, plus the factors.
pub fn palu_tensors(
    w: &Weights,
    factors: &BTreeMap<(usize, KvKind), LowRankProj>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut out: HashMap<String, Tensor> = w
        .tensors
        .iter()
        .filter(|(k, _)| !is_dense_kv(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (&(l, kind), p) in factors {
        let m = ModelConfig::module_name(l, kind);
        out.insert(format!("{m}.VT.weight"), p.down.contiguous()?);
        let gdh = p.ups.first().map(|u| u.dim(0)).transpose()?.unwrap_or(0);
        for (i, u) in p.ups.iter().enumerate() {
            out.insert(format!("{m}.U.{i}.weight"), u.contiguous()?);
            if let Some(b) = &p.bias {
                out.insert(
                    format!("{m}.U.{i}.bias"),
                    b.narrow(0, i * gdh, gdh)?.contiguous()?,
                );
            }
        }
    }
    Ok(out)
}

/// `config.json` of the Palu checkpoint derived from the source model's.
pub fn palu_config_json(
    cfg: &ModelConfig,
    ranks: &BTreeMap<(usize, KvKind), Vec<usize>>,
    source: &str,
) -> serde_json::Value {
    let mut c = cfg.raw.clone();
    c["model_type"] = json!(cfg.family.palu_model_type());
    c["architectures"] = json!([cfg.family.palu_architecture()]);
    let hw: BTreeMap<String, Vec<usize>> = ranks
        .iter()
        .map(|(&(l, k), r)| (ModelConfig::module_name(l, k), r.clone()))
        .collect();
    c["head_wise_ranks"] = json!(hw);
    c["original_model_name_or_path"] = json!(source);
    c
}

/// Write a complete Palu checkpoint directory.
pub fn write_checkpoint(
    out: &Path,
    src_dir: &Path,
    cfg: &ModelConfig,
    w: &Weights,
    factors: &BTreeMap<(usize, KvKind), LowRankProj>,
    alloc: &AllocConfig,
) -> Result<(), PaluError> {
    let ranks: BTreeMap<_, _> = factors.iter().map(|(k, p)| (*k, p.ranks.clone())).collect();
    let source = cfg
        .raw
        .get("_name_or_path")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| src_dir.display().to_string());
    let config = palu_config_json(cfg, &ranks, &source);
    let tensors = palu_tensors(w, factors)
        .map_err(|e| PaluError::invalid(out, crate::error::candle_msg(&e)))?;
    write_dir_atomically(out, |tmp| {
        let st = tmp.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &st)
            .map_err(|e| PaluError::invalid(&st, crate::error::candle_msg(&e)))?;
        crate::gguf::write_json(&tmp.join("config.json"), &config)?;
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "special_tokens_map.json",
        ] {
            let s = src_dir.join(f);
            if s.exists() {
                std::fs::copy(&s, tmp.join(f)).map_err(|e| PaluError::io(&s, e))?;
            }
        }
        let t = tmp.join(ALLOC_FILE);
        std::fs::write(&t, alloc.to_toml()).map_err(|e| PaluError::io(&t, e))
    })
}

/// What `palu inspect` reports about a checkpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspection {
    pub model_type: String,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub group_size: Option<usize>,
    /// `[layer, R_k, R_v]`.
    pub ranks: Vec<(usize, Vec<usize>, Vec<usize>)>,
    /// KV bytes per token (all layers) of the uncompressed model in 16-bit.
    pub kv_bytes_default: usize,
    /// Palu latents in 16-bit, and at 8/4/3/2 bits with an f16 scale and zero per group.
    pub kv_bytes_palu: Vec<(u8, usize)>,
    pub kv_reduction: f64,
    pub tensors_checked: usize,
}

/// Load (which checks every factor against `head_wise_ranks`, shapes and finiteness) and summarise.
pub fn inspect(dir: &Path) -> Result<Inspection, PaluError> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let w = Weights::load(dir, &candle_core::Device::Cpu)?;
    let n = w.tensors.len();
    let model = crate::model::Model::from_weights(cfg.clone(), &w)?;
    let kv_default = 2 * 2 * cfg.num_layers * cfg.kv_width();
    let mut ranks = Vec::new();
    let mut group_size = None;
    for (l, blk) in model.layers.iter().enumerate() {
        if let crate::model::KvProj::Palu { k, v } = &blk.attn.kv {
            group_size = Some(cfg.num_kv_heads / k.ranks.len());
            ranks.push((l, k.ranks.clone(), v.ranks.clone()));
        }
    }
    let kv_bytes_palu = [16u8, 8, 4, 3, 2]
        .iter()
        .map(|&b| {
            let bytes = ranks
                .iter()
                .map(|(_, k, v)| {
                    crate::quant::bytes_per_token(k.iter().sum(), k.len(), b)
                        + crate::quant::bytes_per_token(v.iter().sum(), v.len(), b)
                })
                .sum();
            (b, bytes)
        })
        .collect();
    let kept: usize = ranks
        .iter()
        .map(|(_, k, v)| k.iter().sum::<usize>() + v.iter().sum::<usize>())
        .sum();
    let kv_reduction = if ranks.is_empty() {
        0.0
    } else {
        1.0 - kept as f64 / (2 * cfg.num_layers * cfg.kv_width()) as f64
    };
    Ok(Inspection {
        model_type: cfg.raw["model_type"].as_str().unwrap_or("").to_string(),
        num_layers: cfg.num_layers,
        num_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        group_size,
        ranks,
        kv_bytes_default: kv_default,
        kv_bytes_palu,
        kv_reduction,
        tensors_checked: n,
    })
}

/// How many sequences of `seq_len` tokens fit in a KV-cache budget, by layout: the default
/// 16-bit cache, then each Palu width (16, 8, 4, 3, 2 bits). Whole sequences only.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Capacity {
    pub budget_bytes: f64,
    pub seq_len: usize,
    /// `(label, bytes per token, sequences)`, the default first.
    pub rows: Vec<(String, usize, u64)>,
}

impl Inspection {
    /// The capacity table for a budget in GiB; a clear error for a budget or length that is not
    /// positive and finite.
    pub fn capacity(&self, budget_gib: f64, seq_len: usize) -> Result<Capacity, PaluError> {
        if !(budget_gib.is_finite() && budget_gib > 0.0) {
            return Err(PaluError::arg(
                "--kv-budget",
                budget_gib,
                "must be a positive number of GiB",
            ));
        }
        if seq_len == 0 {
            return Err(PaluError::arg(
                "--seq-len",
                seq_len,
                "must be at least 1 token",
            ));
        }
        let budget = budget_gib * (1u64 << 30) as f64;
        let fit = |bytes: usize| (budget / (bytes as f64 * seq_len as f64)).floor() as u64;
        let mut rows = vec![(
            "default 16-bit".to_string(),
            self.kv_bytes_default,
            fit(self.kv_bytes_default),
        )];
        if self.group_size.is_some() {
            for &(b, bytes) in &self.kv_bytes_palu {
                let label = if b >= 16 {
                    "palu 16-bit".to_string()
                } else {
                    format!("palu {b}-bit")
                };
                rows.push((label, bytes, fit(bytes)));
            }
        }
        Ok(Capacity {
            budget_bytes: budget,
            seq_len,
            rows,
        })
    }
}

impl std::fmt::Display for Capacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "capacity       sequences of {} tokens in {:.2} GiB of KV cache (by layout):",
            self.seq_len,
            self.budget_bytes / (1u64 << 30) as f64
        )?;
        let base = self.rows.first().map(|r| r.2).unwrap_or(0);
        for (label, _, n) in &self.rows {
            if base > 0 && label != "default 16-bit" {
                writeln!(
                    f,
                    "               {label:<22} {n:>8}  ({:.2}× default)",
                    *n as f64 / base as f64
                )?;
            } else {
                writeln!(f, "               {label:<22} {n:>8}")?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "architecture   {} ({} layers, {} heads, {} KV heads × {})",
            self.model_type, self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim
        )?;
        match self.group_size {
            None => {
                return writeln!(
                    f,
                    "not a Palu checkpoint: KV bytes/token {} (16-bit)",
                    self.kv_bytes_default
                )
            }
            Some(g) => writeln!(f, "group size     {g} KV head(s) per low-rank group")?,
        }
        writeln!(
            f,
            "tensors        {} checked against head_wise_ranks: ok",
            self.tensors_checked
        )?;
        writeln!(f, "layer  k ranks                v ranks")?;
        for (l, k, v) in &self.ranks {
            writeln!(f, "{l:>5}  {:<22} {:?}", format!("{k:?}"), v)?;
        }
        writeln!(
            f,
            "KV reduction   {:.2}% of the K/V width",
            100.0 * self.kv_reduction
        )?;
        writeln!(
            f,
            "KV bytes/token default 16-bit: {}",
            self.kv_bytes_default
        )?;
        for (b, bytes) in &self.kv_bytes_palu {
            let label = if *b >= 16 {
                "palu 16-bit".to_string()
            } else {
                format!("palu {b}-bit (+scales)")
            };
            writeln!(
                f,
                "               {label:<22} {bytes:>8}  ({:.3}× default)",
                *bytes as f64 / self.kv_bytes_default as f64
            )?;
        }
        Ok(())
    }
}
