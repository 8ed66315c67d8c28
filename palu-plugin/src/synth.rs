//! Random-weight checkpoints in the exact Hugging Face layouts of the Llama family, for tests
//! that need an architecture without a fixture (Mistral's sliding window, Qwen2's k/v biases)
//! and for speed measurements at real model shapes. Never a proof of accuracy.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::PaluError;

/// Shape of a synthetic checkpoint.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// `llama`, `mistral` or `qwen2` (q/k/v biases).
    pub model_type: String,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub vocab: usize,
    pub max_positions: usize,
    /// Extra config.json fields (e.g. `sliding_window`, `rope_scaling`).
    pub extra: serde_json::Value,
    pub seed: u64,
}

impl SynthSpec {
    /// A small model (64 wide, 8 heads of 8, 2 layers, 512 tokens of vocabulary: the size of the
    /// stories260K tokenizer, so that tokenizer can serve it).
    pub fn tiny(model_type: &str, seed: u64) -> Self {
        SynthSpec {
            model_type: model_type.into(),
            hidden: 64,
            heads: 8,
            kv_heads: 4,
            head_dim: 8,
            intermediate: 96,
            layers: 2,
            vocab: 512,
            max_positions: 512,
            extra: serde_json::json!({}),
            seed,
        }
    }

    pub fn config_json(&self) -> serde_json::Value {
        let arch = match self.model_type.as_str() {
            "mistral" => "MistralForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let mut cfg = serde_json::json!({
            "architectures": [arch],
            "model_type": self.model_type, "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim, "vocab_size": self.vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "max_position_embeddings": self.max_positions, "tie_word_embeddings": false, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
        });
        if let Some(extra) = self.extra.as_object() {
            for (k, v) in extra {
                cfg[k] = v.clone();
            }
        }
        cfg
    }
}

/// Write `config.json` and `model.safetensors` (f32, uniform weights scaled per role) to `dir`;
/// copy `tokenizer_from`'s `tokenizer.json` (and `tokenizer_config.json`) when given.
pub fn write(spec: &SynthSpec, dir: &Path, tokenizer_from: Option<&Path>) -> Result<(), PaluError> {
    std::fs::create_dir_all(dir).map_err(|e| PaluError::io(dir, e))?;
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, spec.config_json().to_string())
        .map_err(|e| PaluError::io(&cfg_path, e))?;
    if let Some(src) = tokenizer_from {
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            if src.join(f).exists() {
                std::fs::copy(src.join(f), dir.join(f))
                    .map_err(|e| PaluError::io(&src.join(f), e))?;
            }
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let mut rand_t = |shape: &[usize], scale: f32, offset: f32| -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale + offset)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    };
    let (h, q, kv, ff) = (
        spec.hidden,
        spec.heads * spec.head_dim,
        spec.kv_heads * spec.head_dim,
        spec.intermediate,
    );
    let bias = spec.model_type == "qwen2";
    let mut t = HashMap::new();
    let mut put = |name: String, x: candle_core::Result<Tensor>| -> Result<(), PaluError> {
        t.insert(
            name,
            x.map_err(|e| PaluError::invalid("synthetic checkpoint", e.to_string()))?,
        );
        Ok(())
    };
    put(
        "model.embed_tokens.weight".into(),
        rand_t(&[spec.vocab, h], 1.0, 0.0),
    )?;
    put("lm_head.weight".into(), rand_t(&[spec.vocab, h], 0.2, 0.0))?;
    put("model.norm.weight".into(), rand_t(&[h], 0.1, 1.0))?;
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        for (n, o) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            put(
                format!("{p}.self_attn.{n}.weight"),
                rand_t(&[o, h], 0.25, 0.0),
            )?;
            if bias {
                put(format!("{p}.self_attn.{n}.bias"), rand_t(&[o], 0.5, 0.0))?;
            }
        }
        put(
            format!("{p}.self_attn.o_proj.weight"),
            rand_t(&[h, q], 0.2, 0.0),
        )?;
        put(
            format!("{p}.mlp.gate_proj.weight"),
            rand_t(&[ff, h], 0.2, 0.0),
        )?;
        put(
            format!("{p}.mlp.up_proj.weight"),
            rand_t(&[ff, h], 0.2, 0.0),
        )?;
        put(
            format!("{p}.mlp.down_proj.weight"),
            rand_t(&[h, ff], 0.2, 0.0),
        )?;
        put(
            format!("{p}.input_layernorm.weight"),
            rand_t(&[h], 0.1, 1.0),
        )?;
        put(
            format!("{p}.post_attention_layernorm.weight"),
            rand_t(&[h], 0.1, 1.0),
        )?;
    }
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&t, &path).map_err(|e| PaluError::invalid(&path, e.to_string()))
}
