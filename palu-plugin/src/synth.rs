//! Random-weight checkpoints in the exact Hugging Face layouts of the Llama family, for tests
//! that need an architecture without a fixture (Mistral's sliding window, Qwen2's k/v biases)
//! and for speed measurements at real model shapes. Never a proof of accuracy.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
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
    /// Element type of the stored weights (f32 for tests; bf16 halves a large checkpoint).
    pub dtype: DType,
    /// Write a Palu checkpoint (random factors in place of `k_proj` / `v_proj`).
    pub palu: Option<SynthPalu>,
}

/// Random low-rank factors: groups of `group_size` KV heads, rank `ratio · g · head_dim` per
/// group (rounded to a multiple of 8) for K and for V.
#[derive(Debug, Clone, Copy)]
pub struct SynthPalu {
    pub group_size: usize,
    pub ratio: f64,
}

impl SynthPalu {
    pub fn rank(&self, head_dim: usize) -> usize {
        let r = self.ratio * (self.group_size * head_dim) as f64;
        (((r / 8.0).round() as usize) * 8).clamp(8, self.group_size * head_dim)
    }
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
            dtype: DType::F32,
            palu: None,
        }
    }

    /// Real architectures' shapes (random weights): `llama3-8b`, `llama2-7b`, `smollm2-135m`,
    /// or `tiny`. `layers` overrides the depth (a speed run rarely needs all of them).
    pub fn preset(name: &str, layers: Option<usize>, seed: u64) -> Option<Self> {
        let mut s = SynthSpec::tiny("llama", seed);
        match name {
            "tiny" => {}
            "llama3-8b" => {
                (s.hidden, s.heads, s.kv_heads, s.head_dim) = (4096, 32, 8, 128);
                (s.intermediate, s.layers, s.vocab, s.max_positions) = (14336, 32, 128256, 131072);
                s.extra = serde_json::json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3",
                    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}});
            }
            "llama2-7b" => {
                (s.hidden, s.heads, s.kv_heads, s.head_dim) = (4096, 32, 32, 128);
                (s.intermediate, s.layers, s.vocab, s.max_positions) = (11008, 32, 32000, 4096);
            }
            "smollm2-135m" => {
                (s.hidden, s.heads, s.kv_heads, s.head_dim) = (576, 9, 3, 64);
                (s.intermediate, s.layers, s.vocab, s.max_positions) = (1536, 30, 49152, 8192);
                s.extra = serde_json::json!({"rope_theta": 100000.0, "tie_word_embeddings": false});
            }
            _ => return None,
        }
        if let Some(l) = layers {
            s.layers = l;
        }
        Some(s)
    }

    pub fn config_json(&self) -> serde_json::Value {
        let arch = match (self.model_type.as_str(), self.palu.is_some()) {
            ("mistral", false) => "MistralForCausalLM",
            ("qwen2", false) => "Qwen2ForCausalLM",
            (_, false) => "LlamaForCausalLM",
            ("mistral", true) => "PaluMistralForCausalLM",
            ("qwen2", true) => "PaluQwen2ForCausalLM",
            (_, true) => "PaluLlamaForCausalLM",
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
        cfg["torch_dtype"] = serde_json::json!(match self.dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        });
        if let Some(p) = &self.palu {
            cfg["model_type"] = serde_json::json!(format!("palu{}", self.model_type));
            let r = p.rank(self.head_dim);
            let groups = self.kv_heads / p.group_size;
            let mut ranks = serde_json::Map::new();
            for l in 0..self.layers {
                for kind in [crate::lowrank::KvKind::K, crate::lowrank::KvKind::V] {
                    let name = crate::config::ModelConfig::module_name(l, kind);
                    ranks.insert(name, serde_json::json!(vec![r; groups]));
                }
            }
            cfg["head_wise_ranks"] = serde_json::Value::Object(ranks);
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
                    .map_err(|e| PaluError::io(src.join(f), e))?;
            }
        }
    }
    // Each tensor draws its own seed from the spec's generator, in a fixed order, and is filled
    // in parallel from it (`uniform`): the checkpoint depends on the seed alone.
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let mut rand_t = |shape: &[usize], scale: f32, offset: f32| -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let v = uniform(n, rng.random::<u64>(), scale, offset);
        Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(spec.dtype)
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
    if let Some(p) = &spec.palu {
        if p.group_size == 0 || !spec.kv_heads.is_multiple_of(p.group_size) {
            return Err(PaluError::invalid(
                "synthetic checkpoint",
                format!(
                    "group size {} does not divide {} KV heads",
                    p.group_size, spec.kv_heads
                ),
            ));
        }
    }
    let bar = crate::progress::bar(spec.layers as u64, "synthesizing layers");
    for l in 0..spec.layers {
        bar.inc(1);
        let p = format!("model.layers.{l}");
        let dense: &[(&str, usize)] = if spec.palu.is_some() {
            &[("q_proj", q)]
        } else {
            &[("q_proj", q), ("k_proj", kv), ("v_proj", kv)]
        };
        for &(n, o) in dense {
            put(
                format!("{p}.self_attn.{n}.weight"),
                rand_t(&[o, h], 0.25, 0.0),
            )?;
            if bias {
                put(format!("{p}.self_attn.{n}.bias"), rand_t(&[o], 0.5, 0.0))?;
            }
        }
        if let Some(palu) = &spec.palu {
            // The authors' layout: `VT` [G·r, hidden] and per group `U.i` [g·dh, r] (+ bias).
            let (g, r) = (palu.group_size, palu.rank(spec.head_dim));
            let gdh = g * spec.head_dim;
            for n in ["k_proj", "v_proj"] {
                let m = format!("{p}.self_attn.{n}");
                put(
                    format!("{m}.VT.weight"),
                    rand_t(&[(spec.kv_heads / g) * r, h], 0.25, 0.0),
                )?;
                for i in 0..spec.kv_heads / g {
                    put(
                        format!("{m}.U.{i}.weight"),
                        rand_t(&[gdh, r], 1.0 / (r as f32).sqrt(), 0.0),
                    )?;
                    if bias {
                        put(format!("{m}.U.{i}.bias"), rand_t(&[gdh], 0.5, 0.0))?;
                    }
                }
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
    bar.finish_and_clear();
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&t, &path).map_err(|e| PaluError::invalid(&path, e.to_string()))
}

/// `n` values uniform in `[offset − scale, offset + scale)`, filled on all cores: chunk `i` of
/// 2^20 values comes from its own generator seeded by `(seed, i)`, so the values depend on the
/// seed, not on the thread count. (An 8B-shaped checkpoint is 7·10⁹ values: one generator took
/// minutes of a benchmark's device time.)
fn uniform(n: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
    const CHUNK: usize = 1 << 20;
    let mut v = vec![0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let mut chunks: Vec<(usize, &mut [f32])> = v.chunks_mut(CHUNK).enumerate().collect();
    let per_thread = chunks.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        while !chunks.is_empty() {
            let part: Vec<_> = chunks.drain(..per_thread.min(chunks.len())).collect();
            s.spawn(move || {
                for (i, chunk) in part {
                    let mut r = rand::rngs::StdRng::seed_from_u64(
                        seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    );
                    for x in chunk {
                        *x = (r.random::<f32>() * 2.0 - 1.0) * scale + offset;
                    }
                }
            });
        }
    });
    v
}

#[cfg(test)]
mod tests {
    /// The values depend on the seed only: the same seed gives the same values, another seed
    /// others, all within the range, across chunk boundaries.
    #[test]
    fn uniform_is_seeded_and_in_range() {
        let n = (1 << 20) * 3 + 17;
        let a = super::uniform(n, 7, 0.5, 1.0);
        assert_eq!(a, super::uniform(n, 7, 0.5, 1.0));
        assert_ne!(a, super::uniform(n, 8, 0.5, 1.0));
        assert!(a.iter().all(|&x| (0.5..1.5).contains(&x)));
        // Chunks are not copies of one another.
        assert_ne!(a[..1000], a[1 << 20..(1 << 20) + 1000]);
    }
}
