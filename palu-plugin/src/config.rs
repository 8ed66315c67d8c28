//! The Hugging Face `config.json` of the Llama family, plain or Palu-compressed.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{read_to_string, PaluError};

/// Which member of the Llama family: they differ only in biases and masking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
}

impl Family {
    pub fn from_model_type(model_type: &str) -> Option<(Family, bool)> {
        Some(match model_type {
            "llama" => (Family::Llama, false),
            "mistral" => (Family::Mistral, false),
            "qwen2" => (Family::Qwen2, false),
            "palullama" => (Family::Llama, true),
            "palumistral" => (Family::Mistral, true),
            "paluqwen2" => (Family::Qwen2, true),
            _ => return None,
        })
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
        }
    }
    pub fn palu_model_type(self) -> &'static str {
        match self {
            Family::Llama => "palullama",
            Family::Mistral => "palumistral",
            Family::Qwen2 => "paluqwen2",
        }
    }
    pub fn palu_architecture(self) -> &'static str {
        match self {
            Family::Llama => "PaluLlamaForCausalLM",
            Family::Mistral => "PaluMistralForCausalLM",
            Family::Qwen2 => "PaluQwen2ForCausalLM",
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<u32>,
    head_wise_ranks: Option<BTreeMap<String, Vec<usize>>>,
    hidden_act: Option<String>,
}

fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

/// The resolved configuration the model code runs on.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub family: Family,
    /// True for `palu*` model types (the checkpoint stores factors, not `k_proj` / `v_proj`).
    pub is_palu: bool,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (Qwen2 always, Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Mistral's sliding attention window, when active.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    /// Palu ranks per module, `model.layers.N.self_attn.{k,v}_proj` -> one rank per group.
    pub head_wise_ranks: Option<BTreeMap<String, Vec<usize>>>,
    /// The file as read, to write derived configs that keep every field.
    pub raw: serde_json::Value,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, PaluError> {
        let text = read_to_string(path)?;
        Self::from_json_str(&text, path)
    }

    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, PaluError> {
        let json_err = |e: serde_json::Error| PaluError::Json {
            path: path.into(),
            msg: e.to_string(),
        };
        let raw: serde_json::Value = serde_json::from_str(text).map_err(json_err)?;
        let model_type = raw
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("<missing model_type>");
        let Some((family, is_palu)) = Family::from_model_type(model_type) else {
            return Err(PaluError::UnsupportedArch {
                path: path.into(),
                arch: model_type.to_string(),
            });
        };
        let c: RawConfig = serde_json::from_value(raw.clone()).map_err(json_err)?;
        if let Some(act) = &c.hidden_act {
            if act != "silu" {
                return Err(PaluError::invalid(
                    path,
                    format!("hidden_act `{act}` is not supported (only silu)"),
                ));
            }
        }
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
        if num_kv_heads == 0 || !c.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(PaluError::invalid(
                path,
                format!("num_attention_heads {} is not a multiple of num_key_value_heads {num_kv_heads}", c.num_attention_heads),
            ));
        }
        let sliding_window = match family {
            Family::Mistral => c.sliding_window,
            Family::Qwen2 if c.use_sliding_window == Some(true) => c.sliding_window,
            _ => None,
        };
        let _ = c.model_type;
        Ok(ModelConfig {
            family,
            is_palu,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: c.vocab_size,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            rope_scaling: c.rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            qkv_bias: family == Family::Qwen2 || c.attention_bias.unwrap_or(false),
            sliding_window,
            bos_token_id: c.bos_token_id,
            head_wise_ranks: c.head_wise_ranks,
            raw,
        })
    }

    /// Width of one K (or V) projection: H_kv * head_dim.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    pub fn module_name(layer: usize, kind: crate::lowrank::KvKind) -> String {
        format!("model.layers.{layer}.self_attn.{}", kind.proj_name())
    }
}
