//! GGUF (llama.cpp) to the Hugging Face layout: `config.json`, `model.safetensors` (f32),
//! `tokenizer.json`, `tokenizer_config.json`.
//!
//! Dequantization is candle's (`candle_core::quantized`); llama.cpp stores the rows of
//! `attn_q` / `attn_k` permuted for interleaved RoPE, which is undone here for the Hugging Face
//! rotate-half convention.
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::error::PaluError;

pub const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

pub struct Converted {
    pub architecture: String,
    pub num_tensors: usize,
    pub tensor_types: Vec<(String, usize)>,
}

fn meta<'a>(
    c: &'a gguf_file::Content,
    key: &str,
    path: &Path,
) -> Result<&'a gguf_file::Value, PaluError> {
    c.metadata
        .get(key)
        .ok_or_else(|| PaluError::invalid(path, format!("GGUF metadata key `{key}` is missing")))
}

fn meta_usize(c: &gguf_file::Content, key: &str, path: &Path) -> Result<usize, PaluError> {
    let v = meta(c, key, path)?;
    v.to_u64()
        .map(|x| x as usize)
        .or_else(|_| v.to_u32().map(|x| x as usize))
        .or_else(|_| v.to_i32().map(|x| x as usize))
        .map_err(|e| PaluError::invalid(path, format!("GGUF metadata `{key}`: {e}")))
}

fn meta_f64(c: &gguf_file::Content, key: &str) -> Option<f64> {
    let v = c.metadata.get(key)?;
    v.to_f32().map(|x| x as f64).or_else(|_| v.to_f64()).ok()
}

/// Convert `gguf` into a Hugging Face model directory `out` (written atomically).
pub fn convert(gguf: &Path, out: &Path) -> Result<Converted, PaluError> {
    let mut f = File::open(gguf).map_err(|e| PaluError::io(gguf, e))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| {
        PaluError::invalid(
            gguf,
            format!(
                "cannot read GGUF: {} (palu convert-gguf supports {SUPPORTED_TYPES})",
                crate::error::candle_msg(&e)
            ),
        )
    })?;
    let arch = meta(&content, "general.architecture", gguf)?
        .to_string()
        .map_err(|e| PaluError::invalid(gguf, crate::error::candle_msg(&e)))?
        .clone();
    if arch != "llama" && arch != "qwen2" {
        return Err(PaluError::UnsupportedArch {
            path: gguf.into(),
            arch,
        });
    }
    for (name, info) in &content.tensor_infos {
        let ok = matches!(
            info.ggml_dtype,
            GgmlDType::F32
                | GgmlDType::F16
                | GgmlDType::BF16
                | GgmlDType::Q4_0
                | GgmlDType::Q4_1
                | GgmlDType::Q5_0
                | GgmlDType::Q5_1
                | GgmlDType::Q8_0
                | GgmlDType::Q2K
                | GgmlDType::Q3K
                | GgmlDType::Q4K
                | GgmlDType::Q5K
                | GgmlDType::Q6K
                | GgmlDType::Q8K
        );
        if !ok {
            return Err(PaluError::invalid(
                gguf,
                format!(
                    "tensor `{name}` has unsupported quant type {:?}; supported: {SUPPORTED_TYPES}",
                    info.ggml_dtype
                ),
            ));
        }
    }
    let p = |k: &str| format!("{arch}.{k}");
    let d = meta_usize(&content, &p("embedding_length"), gguf)?;
    let n_layers = meta_usize(&content, &p("block_count"), gguf)?;
    let ff = meta_usize(&content, &p("feed_forward_length"), gguf)?;
    let n_head = meta_usize(&content, &p("attention.head_count"), gguf)?;
    let n_kv = meta_usize(&content, &p("attention.head_count_kv"), gguf).unwrap_or(n_head);
    let head_dim = meta_usize(&content, &p("attention.key_length"), gguf).unwrap_or(d / n_head);
    let ctx = meta_usize(&content, &p("context_length"), gguf).unwrap_or(4096);
    let eps = meta_f64(&content, &p("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5);
    let theta = meta_f64(&content, &p("rope.freq_base")).unwrap_or(10_000.0);

    let dev = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut type_counts: HashMap<String, usize> = HashMap::new();
    let pb = crate::progress::bar(content.tensor_infos.len() as u64, "dequantize");
    let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    names.sort();
    for name in names {
        let info = &content.tensor_infos[&name];
        *type_counts
            .entry(format!("{:?}", info.ggml_dtype))
            .or_default() += 1;
        let q = content.tensor(&mut f, &name, &dev).map_err(|e| {
            PaluError::invalid(
                gguf,
                format!("tensor `{name}`: {}", crate::error::candle_msg(&e)),
            )
        })?;
        let t = q.dequantize(&dev).map_err(|e| {
            PaluError::invalid(
                gguf,
                format!("tensor `{name}`: {}", crate::error::candle_msg(&e)),
            )
        })?;
        let err = |e: candle_core::Error| {
            PaluError::invalid(
                gguf,
                format!("tensor `{name}`: {}", crate::error::candle_msg(&e)),
            )
        };
        let (hf, t) = match hf_name(&name) {
            Some(hf) if arch == "llama" && name.ends_with("attn_q.weight") => {
                (hf, unpermute(&t, n_head).map_err(err)?)
            }
            Some(hf) if arch == "llama" && name.ends_with("attn_k.weight") => {
                (hf, unpermute(&t, n_kv).map_err(err)?)
            }
            Some(hf) => (hf, t),
            None if name == "rope_freqs.weight" => {
                pb.inc(1);
                continue;
            }
            None => {
                return Err(PaluError::invalid(
                    gguf,
                    format!("tensor `{name}` has no Hugging Face counterpart in a {arch} model"),
                ))
            }
        };
        tensors.insert(hf, t);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let tied = !tensors.contains_key("lm_head.weight");
    let vocab = tensors
        .get("model.embed_tokens.weight")
        .ok_or_else(|| PaluError::MissingTensor {
            path: gguf.into(),
            name: "token_embd.weight".into(),
            hint: String::new(),
        })?
        .dim(0)
        .map_err(|e| PaluError::invalid(gguf, crate::error::candle_msg(&e)))?;

    let tok = build_tokenizer(&content, gguf)?;
    let bos = content
        .metadata
        .get("tokenizer.ggml.bos_token_id")
        .and_then(|v| v.to_u32().ok());
    let eos = content
        .metadata
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.to_u32().ok());
    let mut config = json!({
        "architectures": [if arch == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": arch,
        "hidden_size": d,
        "intermediate_size": ff,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": ctx,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "attention_bias": false,
    });
    if let Some(b) = bos {
        config["bos_token_id"] = json!(b);
    }
    if let Some(e) = eos {
        config["eos_token_id"] = json!(e);
    }
    if let Some(name) = content
        .metadata
        .get("general.name")
        .and_then(|v| v.to_string().ok())
    {
        config["_name_or_path"] = json!(name);
    }
    let tok_config = tokenizer_config(&content, &tok);

    crate::checkpoint::write_dir_atomically(out, |tmp| {
        let st = tmp.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &st)
            .map_err(|e| PaluError::invalid(&st, crate::error::candle_msg(&e)))?;
        write_json(&tmp.join("config.json"), &config)?;
        write_json(&tmp.join("tokenizer.json"), &tok)?;
        write_json(&tmp.join("tokenizer_config.json"), &tok_config)?;
        Ok(())
    })?;
    let mut tensor_types: Vec<(String, usize)> = type_counts.into_iter().collect();
    tensor_types.sort();
    Ok(Converted {
        architecture: arch,
        num_tensors: tensors.len(),
        tensor_types,
    })
}

pub fn write_json(path: &Path, v: &Value) -> Result<(), PaluError> {
    let s = serde_json::to_string_pretty(v).expect("json value serializes");
    std::fs::write(path, s + "\n").map_err(|e| PaluError::io(path, e))
}

fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (stem, suffix) = tail.rsplit_once('.')?;
    let hf = match stem {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undo llama.cpp's `permute`: GGUF row `h·dh + 2j + c` holds Hugging Face row `h·dh + c·dh/2 + j`.
pub fn unpermute(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let dh = rows / n_head;
    t.reshape((n_head, dh / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

fn strings(c: &gguf_file::Content, key: &str, path: &Path) -> Result<Vec<String>, PaluError> {
    let v = meta(c, key, path)?
        .to_vec()
        .map_err(|e| PaluError::invalid(path, format!("`{key}`: {e}")))?;
    v.iter()
        .map(|x| {
            x.to_string()
                .cloned()
                .map_err(|e| PaluError::invalid(path, format!("`{key}`: {e}")))
        })
        .collect()
}

/// A `tokenizers` JSON equivalent to the tokenizer embedded in the GGUF.
pub fn build_tokenizer(c: &gguf_file::Content, path: &Path) -> Result<Value, PaluError> {
    let model = meta(c, "tokenizer.ggml.model", path)?
        .to_string()
        .map_err(|e| PaluError::invalid(path, crate::error::candle_msg(&e)))?;
    let tokens = strings(c, "tokenizer.ggml.tokens", path)?;
    let types: Vec<i32> = c
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Control (3) and user-defined (4) tokens are matched before the model runs.
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == 3})
        })
        .collect();
    let tok = match model.as_str() {
        "llama" => {
            let ids: HashMap<&str, usize> = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.as_str(), i))
                .collect();
            // SentencePiece BPE merges: every split of a piece into two pieces, ranked by the
            // merged piece's id (SentencePiece's merge priority), then by the left piece.
            let mut merges: Vec<(usize, usize, String, String)> = Vec::new();
            for (i, t) in tokens.iter().enumerate() {
                if types.get(i) != Some(&1) {
                    continue;
                }
                for (k, _) in t.char_indices().skip(1) {
                    let (l, r) = t.split_at(k);
                    if let (Some(&li), Some(_)) = (ids.get(l), ids.get(r)) {
                        merges.push((i, li, l.to_string(), r.to_string()));
                    }
                }
            }
            merges.sort();
            let merges: Vec<Value> = merges
                .into_iter()
                .map(|(_, _, l, r)| json!([l, r]))
                .collect();
            let unk = c
                .metadata
                .get("tokenizer.ggml.unknown_token_id")
                .and_then(|v| v.to_u32().ok())
                .map(|i| tokens[i as usize].clone())
                .unwrap_or_else(|| "<unk>".into());
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "\u{2581}"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
                "pre_tokenizer": null, "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                          "ignore_merges": false, "vocab": vocab, "merges": merges}
            })
        }
        "gpt2" => {
            let merges = strings(c, "tokenizer.ggml.merges", path)?;
            let pre = c
                .metadata
                .get("tokenizer.ggml.pre")
                .and_then(|v| v.to_string().ok())
                .cloned()
                .unwrap_or_default();
            let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
            let pre_tokenizer = match pre.as_str() {
                "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level]}),
                "" | "default" | "gpt2" | "gpt-2" => byte_level,
                "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
                     "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
                other => {
                    return Err(PaluError::invalid(
                        path,
                        format!("tokenizer.ggml.pre `{other}` is not supported (known: smollm, starcoder, gpt2, default, llama-bpe)"),
                    ))
                }
            };
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": null, "pre_tokenizer": pre_tokenizer,
                "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": false, "vocab": vocab, "merges": merges}
            })
        }
        other => {
            return Err(PaluError::invalid(
                path,
                format!("tokenizer.ggml.model `{other}` is not supported (llama or gpt2)"),
            ))
        }
    };
    // Validate by loading it.
    tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&tok).expect("json")).map_err(|e| {
        PaluError::invalid(
            path,
            format!("the tokenizer built from this GGUF does not load: {e}"),
        )
    })?;
    Ok(tok)
}

fn tokenizer_config(c: &gguf_file::Content, tok: &Value) -> Value {
    let tokens = tok["model"]["vocab"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let by_id = |key: &str| -> Option<String> {
        let id = c.metadata.get(key)?.to_u32().ok()? as u64;
        tokens
            .iter()
            .find(|(_, v)| v.as_u64() == Some(id))
            .map(|(k, _)| k.clone())
    };
    let mut cfg = json!({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": false});
    if let Some(b) = by_id("tokenizer.ggml.bos_token_id") {
        cfg["bos_token"] = json!(b);
    }
    if let Some(e) = by_id("tokenizer.ggml.eos_token_id") {
        cfg["eos_token"] = json!(e);
    }
    if let Some(u) = by_id("tokenizer.ggml.unknown_token_id") {
        cfg["unk_token"] = json!(u);
    }
    if let Some(p) = by_id("tokenizer.ggml.padding_token_id") {
        cfg["pad_token"] = json!(p);
    }
    if let Some(v) = c
        .metadata
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
    {
        cfg["add_bos_token"] = json!(v);
    }
    if let Some(t) = c
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
    {
        cfg["chat_template"] = json!(t);
    }
    cfg
}
