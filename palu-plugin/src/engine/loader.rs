//! The engine-side loader for Palu checkpoints (`palullama` / `palumistral` / `paluqwen2`).
use std::collections::HashMap;
use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use candle_core::DType;
use mistralrs_core::matformer::MatformerSliceConfig;
use mistralrs_core::model_plugin::{
    AttentionImplementation, DeviceMappedModelLoader, IsqModelLoader, ModelConfigLike,
    NormalLoadingMetadata, NormalModel, NormalModelLoader, XLoraConfig,
};
use mistralrs_core::{AutoDeviceMapParams, Ordering};
use mistralrs_quant::ShardedVarBuilder;
use regex::Regex;

use super::model::{PaluGeometry, PaluTextModel};
use super::stats::KvStats;
use crate::config::ModelConfig;
use crate::planner::Plan;

/// Loads a Palu checkpoint as a mistral.rs text model (hand it to
/// `NormalLoaderBuilder::build_with_loader`).
#[derive(Debug, Clone)]
pub struct PaluLoader {
    /// 16: latents in the activation dtype; 2, 3, 4, 8: packed rows with scales and zeros.
    pub latent_bits: u8,
    /// Where the model reports the bytes its live cache tensors hold.
    pub stats: Arc<KvStats>,
    /// Per layer: latent or full keys, fused or unfused values (`None`: latent and unfused).
    pub plan: Option<Plan>,
}

impl Default for PaluLoader {
    fn default() -> Self {
        PaluLoader {
            latent_bits: 16,
            stats: Arc::default(),
            plan: None,
        }
    }
}

fn parse(config: &str) -> Result<ModelConfig> {
    let cfg = ModelConfig::from_json_str(config, Path::new("config.json"))?;
    if !cfg.is_palu {
        anyhow::bail!(
            "config.json: model_type `{}` is not a Palu checkpoint; compress it first (`palu compress`) or serve it with --kv-cache default",
            cfg.family.model_type()
        );
    }
    Ok(cfg)
}

impl NormalModelLoader for PaluLoader {
    fn load(
        &self,
        config: &str,
        vb: ShardedVarBuilder,
        meta: NormalLoadingMetadata,
        attention: AttentionImplementation,
    ) -> Result<Box<dyn NormalModel + Send + Sync>> {
        let cfg = parse(config)?;
        let paged = matches!(attention, AttentionImplementation::PagedAttention);
        if paged && cfg.sliding_window.is_some() {
            anyhow::bail!("palu: paged attention over a sliding-window model is not supported; start the server without paged attention")
        }
        Ok(Box::new(PaluTextModel::new(
            &cfg,
            vb,
            meta,
            self.latent_bits,
            self.plan.as_ref(),
            Arc::clone(&self.stats),
            paged,
        )?))
    }
    fn load_xlora(
        &self,
        _config: &str,
        _vb: ShardedVarBuilder,
        _lora_config: &[((String, String), mistralrs_core::model_plugin::LoraConfig)],
        _xlora_config: Option<XLoraConfig>,
        _xlora_ordering: Ordering,
        _meta: NormalLoadingMetadata,
        _preload: &Option<
            HashMap<String, (ShardedVarBuilder, mistralrs_core::model_plugin::LoraConfig)>,
        >,
    ) -> Result<Box<dyn NormalModel + Send + Sync>> {
        anyhow::bail!("palu: X-LoRA adapters are not supported with a Palu KV cache")
    }
    fn is_gptx(&self, _config: &str) -> Result<bool> {
        Ok(true)
    }
    fn supports_paged_attention(&self, _config: &str) -> Result<bool> {
        Ok(true)
    }
    fn get_config_repr(&self, config: &str) -> Result<Box<dyn Debug>> {
        let c = parse(config)?;
        let geo = PaluGeometry::from_config(&c)?;
        Ok(Box::new(format!(
            "{} ({} layers, {} heads, {} KV heads × {}), Palu latent widths per layer K {:?} V {:?}",
            c.family.palu_model_type(),
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            geo.k_ranks,
            geo.v_ranks
        )))
    }
}

impl IsqModelLoader for PaluLoader {
    fn isq_layer_regexes(&self, _config: &str) -> Result<Vec<Regex>> {
        // Everything but the Palu factors, which are small and feed the latent cache.
        Ok(vec![
            Regex::new(r"lm_head\.(weight|bias)$")?,
            Regex::new(r"layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$")?,
            Regex::new(r"layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)$")?,
            Regex::new(r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)$")?,
        ])
    }
    fn immediate_isq_predicates(&self, config: &str) -> Result<Vec<Regex>> {
        self.isq_layer_regexes(config)
    }
}

impl DeviceMappedModelLoader for PaluLoader {
    fn mapped_max_act_size_elems(
        &self,
        config: &str,
        params: &AutoDeviceMapParams,
    ) -> Result<usize> {
        let AutoDeviceMapParams::Text {
            max_seq_len,
            max_batch_size,
        } = params
        else {
            anyhow::bail!("palu: expected text device-map parameters")
        };
        let cfg = parse(config)?;
        // Attention scores of one layer (the rebuilt K/V are smaller).
        Ok(max_batch_size * cfg.num_heads * max_seq_len * max_seq_len)
    }
    fn non_mapped_max_act_size_elems(
        &self,
        _config: &str,
        _params: &AutoDeviceMapParams,
    ) -> Result<usize> {
        Ok(0)
    }
    fn non_mapped_size_in_bytes(
        &self,
        config: &str,
        dtype: DType,
        pack: usize,
        _m: Option<&MatformerSliceConfig>,
    ) -> Result<usize> {
        let cfg = parse(config)?;
        let embed = cfg.hidden_size * cfg.vocab_size / pack;
        let head = if cfg.tie_word_embeddings && pack == 1 {
            0
        } else {
            embed
        };
        Ok((embed + head + cfg.hidden_size) * dtype.size_in_bytes())
    }
    fn layer_sizes_in_bytes(
        &self,
        config: &str,
        dtype: DType,
        pack: usize,
        _m: Option<&MatformerSliceConfig>,
    ) -> Result<Vec<usize>> {
        let cfg = parse(config)?;
        let geo = PaluGeometry::from_config(&cfg)?;
        let (d, qd, ff) = (
            cfg.hidden_size,
            cfg.num_heads * cfg.head_dim,
            cfg.intermediate_size,
        );
        Ok((0..cfg.num_layers)
            .map(|l| {
                let dense = (2 * d * qd + 3 * d * ff) / pack + 2 * d;
                let factors = (geo.k_ranks[l] + geo.v_ranks[l]) * (d + cfg.kv_width());
                (dense + factors) * dtype.size_in_bytes()
            })
            .collect())
    }
    fn num_layers(&self, config: &str) -> Result<usize> {
        Ok(parse(config)?.num_layers)
    }
    fn model_config(&self, config: &str) -> Result<Box<dyn ModelConfigLike>> {
        let mut geo = PaluGeometry::from_config(&parse(config)?)?;
        geo.packed = self.latent_bits < 16;
        if let Some(plan) = &self.plan {
            geo.apply_plan(plan);
        }
        Ok(Box::new(geo))
    }
}
