//! End-to-end on the real fixtures: GGUF conversion, full-rank exactness, the latent cache,
//! re-applying a stored allocation, and the synthetic Mistral / Qwen2 layouts.
mod common;
use common::max_abs_diff;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use palu::alloc_config::AllocConfig;
use palu::compress::{compress, compress_to_dir, CompressOptions};
use palu::model::{Cache, Model};
use palu::ranks::RankSearch;

const STORIES_REFERENCE: &str = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high";

fn logits(m: &Model, ids: &[u32]) -> Tensor {
    m.forward(
        &Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        None,
        None,
    )
    .unwrap()
}

fn greedy_text(dir: &Path, prompt: &str, bos: bool, n: usize) -> String {
    let m = Model::load(dir, &Device::Cpu).unwrap();
    let tok = palu::tokenizer::load(dir).unwrap();
    let mut ids: Vec<u32> = if bos {
        vec![m.cfg.bos_token_id.unwrap()]
    } else {
        vec![]
    };
    ids.extend(palu::tokenizer::encode(&tok, prompt).unwrap());
    let out = m.generate_greedy(&ids, n, None).unwrap();
    tok.decode(&out, true).unwrap()
}

#[test]
fn stories260k_gguf_converts_to_the_reference_model() {
    let dir = common::converted("stories260K.gguf", "stories260K");
    assert!(greedy_text(&dir, "", true, 70).starts_with(STORIES_REFERENCE));
    // Same tensors as the Hugging Face fixture (Q/K permutation undone exactly).
    let ours = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let theirs = candle_core::safetensors::load(
        common::stories_dir().join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(ours.len(), theirs.len());
    for (k, v) in &theirs {
        assert_eq!(
            max_abs_diff(&ours[k], &v.to_dtype(DType::F32).unwrap()),
            0.0,
            "{k}"
        );
    }
    // The tokenizer rebuilt from GGUF metadata encodes like the fixture's tokenizer.json.
    let text =
        std::fs::read_to_string(common::fixtures().join("text/tinystories-sample.txt")).unwrap();
    let a = palu::tokenizer::encode(&palu::tokenizer::load(&dir).unwrap(), &text).unwrap();
    let b = palu::tokenizer::encode(
        &palu::tokenizer::load(&common::stories_dir()).unwrap(),
        &text,
    )
    .unwrap();
    assert_eq!(a, b);
}

#[test]
fn smollm2_gguf_converts_and_answers_paris() {
    let dir = common::smollm2();
    let text = greedy_text(&dir, "The capital of France is", false, 3);
    assert!(text.starts_with(" Paris"), "{text:?}");
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], true);
    // WikiText-2 with the paper's convention: the token count the fixtures README gives.
    let tok = palu::tokenizer::load(&dir).unwrap();
    let wt =
        std::fs::read_to_string(common::fixtures().join("text/wikitext-2-raw-test.txt")).unwrap();
    let ids = palu::eval::eval_tokens(&tok, &wt, palu::eval::Protocol::Wikitext, None).unwrap();
    assert_eq!(ids.len(), 304_978);
}

fn full_rank(model_dir: &Path, group_size: usize, samples: usize, seq: usize) -> (Model, Model) {
    let opts = CompressOptions {
        ratio: 1.0,
        group_size,
        rank_search: RankSearch::Uniform,
        rank_multiple: 1,
        calib: Some(common::c4()),
        calib_samples: samples,
        calib_seq_len: seq,
        ..Default::default()
    };
    let c = compress(model_dir, &opts).unwrap();
    assert_eq!(c.alloc.compression.achieved_kv_reduction, 0.0);
    (
        Model::load(model_dir, &Device::Cpu).unwrap(),
        c.model().unwrap(),
    )
}

#[test]
fn full_rank_reproduces_stories260k() {
    let text =
        std::fs::read_to_string(common::fixtures().join("text/tinystories-sample.txt")).unwrap();
    for g in [1, 2, 4] {
        let (base, palu) = full_rank(&common::stories_dir(), g, 8, 128);
        let tok = palu::tokenizer::load(&common::stories_dir()).unwrap();
        let ids =
            palu::eval::eval_tokens(&tok, &text, palu::eval::Protocol::Stories, Some(1)).unwrap();
        let d = max_abs_diff(&logits(&base, &ids[..256]), &logits(&palu, &ids[..256]));
        assert!(d <= 1e-3, "g={g}: max |Δlogit| = {d}");
    }
}

#[test]
fn full_rank_reproduces_smollm2() {
    let dir = common::smollm2();
    let (base, palu) = full_rank(&dir, 3, 4, 512);
    let tok = palu::tokenizer::load(&dir).unwrap();
    let wt =
        std::fs::read_to_string(common::fixtures().join("text/wikitext-2-raw-test.txt")).unwrap();
    let ids = palu::eval::eval_tokens(&tok, &wt, palu::eval::Protocol::Wikitext, None).unwrap();
    let d = max_abs_diff(&logits(&base, &ids[..128]), &logits(&palu, &ids[..128]));
    eprintln!("SmolLM2 full rank: max |Δlogit| = {d}");
    assert!(d <= 1e-3, "max |Δlogit| = {d}");
}

#[test]
fn latent_cache_decoding_equals_full_forward() {
    // The authors' checkpoint: decode token by token through the latent cache and compare every
    // step's logits with one full forward pass.
    let dir = common::fixtures().join("palu-reference/stories260K-g1-r50");
    let m = Model::load(&dir, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 % 500 + 3) as u32).collect();
    let full = logits(&m, &ids).squeeze(0).unwrap();
    let mut cache = Cache::new(m.layers.len());
    let prefill = m
        .forward(
            &Tensor::new(&ids[..17], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            Some(&mut cache),
            None,
        )
        .unwrap();
    assert!(
        max_abs_diff(
            &prefill.squeeze(0).unwrap(),
            &full.narrow(0, 0, 17).unwrap()
        ) < 1e-4
    );
    for t in 17..40 {
        let step = m
            .forward(
                &Tensor::new(&ids[t..t + 1], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                Some(&mut cache),
                None,
            )
            .unwrap();
        let d = max_abs_diff(&step.flatten_all().unwrap(), &full.get(t).unwrap());
        assert!(d < 1e-4, "step {t}: {d}");
    }
    // The cache holds latents: Σ ranks per token, not 2·H_kv·dh.
    let per_token: usize = cache
        .layers
        .iter()
        .map(|l| l.k.as_ref().unwrap().dim(2).unwrap() + l.v.as_ref().unwrap().dim(2).unwrap())
        .sum();
    assert_eq!(cache.layers[0].k.as_ref().unwrap().dims(), &[1, 40, 8]);
    assert_eq!(per_token, 8 + 16 + 12 + 24 + 8 + 24 + 8 + 24 + 4 + 20);
}

#[test]
fn compressed_checkpoint_round_trips_and_config_reapplies() {
    let out = tempfile::tempdir().unwrap();
    let a = out.path().join("a");
    let opts = CompressOptions {
        ratio: 0.5,
        rank_search: RankSearch::FisherUniform,
        rank_multiple: 1,
        calib: Some(common::c4()),
        calib_samples: 8,
        calib_seq_len: 256,
        fisher_samples: 4,
        ..Default::default()
    };
    let c = compress_to_dir(&common::stories_dir(), &a, &opts).unwrap();
    // The authors' layout: names, head_wise_ranks, model_type.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "palullama");
    assert_eq!(cfg["architectures"][0], "PaluLlamaForCausalLM");
    let hw = cfg["head_wise_ranks"].as_object().unwrap();
    assert_eq!(hw.len(), 10);
    let t = candle_core::safetensors::load(a.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(!t.contains_key("model.layers.0.self_attn.k_proj.weight"));
    for (module, ranks) in hw {
        let ranks: Vec<usize> = serde_json::from_value(ranks.clone()).unwrap();
        assert_eq!(
            t[&format!("{module}.VT.weight")].dims(),
            &[ranks.iter().sum::<usize>(), 64]
        );
        for (i, r) in ranks.iter().enumerate() {
            assert_eq!(t[&format!("{module}.U.{i}.weight")].dims(), &[8, *r]);
        }
    }
    // The stored model is the in-memory one.
    let loaded = Model::load(&a, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (1..60).collect();
    assert!(max_abs_diff(&logits(&loaded, &ids), &logits(&c.model().unwrap(), &ids)) < 1e-5);
    // Its palu.toml re-applies to the same ranks and factors, without a new search.
    let toml_path = a.join("palu.toml");
    let ac = AllocConfig::from_file(&toml_path).unwrap();
    assert_eq!(ac, c.alloc, "TOML round trip");
    let b = out.path().join("b");
    let opts_b = CompressOptions {
        config: Some((toml_path, ac.clone())),
        rank_search: RankSearch::Uniform,
        ..opts
    };
    let c2 = compress_to_dir(&common::stories_dir(), &b, &opts_b).unwrap();
    assert_eq!(c2.alloc.layers, c.alloc.layers);
    let ranks_b: HashMap<_, _> = c2
        .factors
        .iter()
        .map(|(k, p)| (*k, p.ranks.clone()))
        .collect();
    for (k, p) in &c.factors {
        assert_eq!(ranks_b[k], p.ranks);
    }
    assert!(
        max_abs_diff(
            &logits(&Model::load(&b, &Device::Cpu).unwrap(), &ids),
            &logits(&loaded, &ids)
        ) < 1e-5
    );
    // Every module kept at least one rank, achieved reduction is what the ranks say.
    let kept: usize = ac
        .layers
        .iter()
        .map(|l| l.k.iter().sum::<usize>() + l.v.iter().sum::<usize>())
        .sum();
    assert!((ac.compression.achieved_kv_reduction - (1.0 - kept as f64 / 320.0)).abs() < 1e-4);
}

/// A random-weight checkpoint in the exact Hugging Face layout of `model_type` (`extra` may set
/// `num_key_value_heads`, `head_dim` and any other config.json field).
fn synthetic(model_type: &str, extra: serde_json::Value) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let mut spec = palu::synth::SynthSpec::tiny(model_type, common::fresh_seed());
    if let Some(kv) = extra.get("num_key_value_heads").and_then(|v| v.as_u64()) {
        spec.kv_heads = kv as usize;
    }
    if let Some(dh) = extra.get("head_dim").and_then(|v| v.as_u64()) {
        spec.head_dim = dh as usize;
    }
    spec.extra = extra;
    palu::synth::write(&spec, d.path(), Some(&common::stories_dir())).unwrap();
    d
}

fn synthetic_full_rank(model_type: &str, extra: serde_json::Value) {
    let d = synthetic(model_type, extra);
    let out = tempfile::tempdir().unwrap();
    let ck = out.path().join("ckpt");
    let opts = CompressOptions {
        ratio: 1.0,
        group_size: 2,
        rank_search: RankSearch::Uniform,
        rank_multiple: 1,
        calib: Some(common::c4()),
        calib_samples: 4,
        calib_seq_len: 128,
        ..Default::default()
    };
    compress_to_dir(d.path(), &ck, &opts).unwrap();
    let base = Model::load(d.path(), &Device::Cpu).unwrap();
    let palu = Model::load(&ck, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..96).map(|i| (i * 13 % 500 + 3) as u32).collect();
    let dd = max_abs_diff(&logits(&base, &ids), &logits(&palu, &ids));
    assert!(dd <= 1e-3, "{model_type}: max |Δlogit| = {dd}");
    // A compressed (50%) model's latent-cache decoding equals its full forward too.
    let ck50 = out.path().join("ckpt50");
    compress_to_dir(d.path(), &ck50, &CompressOptions { ratio: 0.5, ..opts }).unwrap();
    let m = Model::load(&ck50, &Device::Cpu).unwrap();
    let full = logits(&m, &ids).squeeze(0).unwrap();
    let mut cache = Cache::new(m.layers.len());
    m.forward(
        &Tensor::new(&ids[..50], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        Some(&mut cache),
        None,
    )
    .unwrap();
    for t in 50..96 {
        let step = m
            .forward(
                &Tensor::new(&ids[t..t + 1], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                Some(&mut cache),
                None,
            )
            .unwrap();
        let dd = max_abs_diff(&step.flatten_all().unwrap(), &full.get(t).unwrap());
        assert!(dd < 1e-4, "{model_type} step {t}: {dd}");
    }
}

#[test]
fn mistral_layout_full_rank_is_exact() {
    // A 32-token sliding window, so that the 96-token test sequence is masked by it.
    synthetic_full_rank(
        "mistral",
        serde_json::json!({"sliding_window": 32, "architectures": ["MistralForCausalLM"]}),
    );
}

#[test]
fn qwen2_layout_with_biases_full_rank_is_exact() {
    let d = synthetic(
        "qwen2",
        serde_json::json!({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": false}),
    );
    let cfg = palu::config::ModelConfig::from_file(&d.path().join("config.json")).unwrap();
    assert!(cfg.qkv_bias);
    drop(d);
    synthetic_full_rank(
        "qwen2",
        serde_json::json!({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": false}),
    );
}

#[test]
fn sliding_window_changes_attention() {
    // The window really masks: the same weights with and without it differ past the window.
    let d = synthetic("mistral", serde_json::json!({"sliding_window": 16}));
    let m = Model::load(d.path(), &Device::Cpu).unwrap();
    let mut cfg = m.cfg.clone();
    cfg.sliding_window = None;
    let w = palu::model::Weights::load(d.path(), &Device::Cpu).unwrap();
    let m2 = Model::from_weights(cfg, &w).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 % 500 + 3) as u32).collect();
    let (a, b) = (
        logits(&m, &ids).squeeze(0).unwrap(),
        logits(&m2, &ids).squeeze(0).unwrap(),
    );
    assert!(max_abs_diff(&a.narrow(0, 0, 16).unwrap(), &b.narrow(0, 0, 16).unwrap()) < 1e-5);
    assert!(max_abs_diff(&a.narrow(0, 20, 20).unwrap(), &b.narrow(0, 20, 20).unwrap()) > 1e-3);
}

#[test]
fn llama_mha_with_wide_heads_full_rank_is_exact() {
    // MHA (8 KV heads) with head_dim 16 ≠ hidden / heads, J-LRD-like groups of 2 heads (rank cap 32).
    synthetic_full_rank(
        "llama",
        serde_json::json!({"num_key_value_heads": 8, "head_dim": 16}),
    );
}

#[test]
fn hadamard_auto_rotates_only_where_it_lowers_the_quantization_error() {
    let base = CompressOptions {
        ratio: 0.5,
        rank_search: RankSearch::Uniform,
        rank_multiple: 1,
        group_size: 4,
        calib: Some(common::c4()),
        calib_samples: 8,
        calib_seq_len: 256,
        latent_bits: 3,
        ..Default::default()
    };
    let plain = compress(
        &common::stories_dir(),
        &CompressOptions {
            hadamard: palu::alloc_config::HadamardMode::Off,
            ..base.clone()
        },
    )
    .unwrap();
    let on = compress(
        &common::stories_dir(),
        &CompressOptions {
            hadamard: palu::alloc_config::HadamardMode::On,
            ..base.clone()
        },
    )
    .unwrap();
    let auto = compress(
        &common::stories_dir(),
        &CompressOptions {
            hadamard: palu::alloc_config::HadamardMode::Auto,
            ..base
        },
    )
    .unwrap();
    // The calibration inputs of layer l, as the pipeline saw them.
    let model = Model::load(&common::stories_dir(), &Device::Cpu).unwrap();
    let tok = palu::tokenizer::load(&common::stories_dir()).unwrap();
    let w = palu::calib::windows(&tok, &common::c4(), 1, 256, 0).unwrap();
    let mut inputs = vec![None; 5];
    let mut probe = |l: usize, s: palu::model::Site, x: &Tensor| -> candle_core::Result<()> {
        if s == palu::model::Site::KvInput {
            inputs[l] = Some(x.squeeze(0)?);
        }
        Ok(())
    };
    model
        .forward(
            &Tensor::new(w[0].as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            None,
            Some(&mut probe),
        )
        .unwrap();
    let mut rotated = 0;
    for l in &auto.alloc.layers {
        for (kind, flag) in [
            (palu::lowrank::KvKind::K, l.hadamard_k),
            (palu::lowrank::KvKind::V, l.hadamard_v),
        ] {
            let x = inputs[l.index].as_ref().unwrap();
            let e_plain =
                palu::compress::quant_error(&plain.factors[&(l.index, kind)], x, 3).unwrap();
            let e_rot = palu::compress::quant_error(&on.factors[&(l.index, kind)], x, 3).unwrap();
            assert_eq!(
                flag,
                e_rot < e_plain,
                "layer {} {kind:?}: plain {e_plain}, rotated {e_rot}",
                l.index
            );
            rotated += usize::from(flag);
        }
    }
    eprintln!("hadamard auto rotated {rotated} of 10 modules");
}

/// llama.cpp's row permutation of q/k for interleaved RoPE (the inverse of `palu::gguf::unpermute`).
fn permute(t: &Tensor, n_head: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    t.reshape((n_head, 2, rows / n_head / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

#[test]
fn every_supported_gguf_quant_type_converts() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use rand::{Rng, SeedableRng};
    // A one-layer Llama with 256-wide rows (K-quant blocks), the stories260K tokenizer, and a
    // different quantization type on each tensor.
    let (d, heads, kv, dh, ff) = (256usize, 4usize, 2usize, 64usize, 512usize);
    let mut f = std::fs::File::open(common::fixtures().join("models/stories260K.gguf")).unwrap();
    let src = gguf_file::Content::read(&mut f).unwrap();
    let vocab = src.metadata["tokenizer.ggml.tokens"]
        .to_vec()
        .unwrap()
        .len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(common::fresh_seed());
    let mut randn = |r: usize, c: usize| {
        Tensor::from_vec(
            (0..r * c)
                .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                .collect::<Vec<_>>(),
            (r, c),
            &Device::Cpu,
        )
        .unwrap()
    };
    let originals: Vec<(&str, &str, Tensor, GgmlDType)> = vec![
        (
            "token_embd.weight",
            "model.embed_tokens.weight",
            randn(vocab, d),
            GgmlDType::Q8_0,
        ),
        (
            "output.weight",
            "lm_head.weight",
            randn(vocab, d),
            GgmlDType::Q6K,
        ),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            randn(heads * dh, d),
            GgmlDType::Q4_0,
        ),
        (
            "blk.0.attn_k.weight",
            "model.layers.0.self_attn.k_proj.weight",
            randn(kv * dh, d),
            GgmlDType::Q4_1,
        ),
        (
            "blk.0.attn_v.weight",
            "model.layers.0.self_attn.v_proj.weight",
            randn(kv * dh, d),
            GgmlDType::Q4K,
        ),
        (
            "blk.0.attn_output.weight",
            "model.layers.0.self_attn.o_proj.weight",
            randn(d, heads * dh),
            GgmlDType::F16,
        ),
        (
            "blk.0.ffn_gate.weight",
            "model.layers.0.mlp.gate_proj.weight",
            randn(ff, d),
            GgmlDType::Q5K,
        ),
        (
            "blk.0.ffn_up.weight",
            "model.layers.0.mlp.up_proj.weight",
            randn(ff, d),
            GgmlDType::Q3K,
        ),
        (
            "blk.0.ffn_down.weight",
            "model.layers.0.mlp.down_proj.weight",
            randn(d, ff),
            GgmlDType::Q2K,
        ),
    ];
    let ones = Tensor::ones(d, DType::F32, &Device::Cpu).unwrap();
    let mut qtensors: Vec<(String, QTensor)> = Vec::new();
    for (name, _, t, ty) in &originals {
        let stored = match *name {
            "blk.0.attn_q.weight" => permute(t, heads),
            "blk.0.attn_k.weight" => permute(t, kv),
            _ => t.clone(),
        };
        qtensors.push((name.to_string(), QTensor::quantize(&stored, *ty).unwrap()));
    }
    for n in [
        "blk.0.attn_norm.weight",
        "blk.0.ffn_norm.weight",
        "output_norm.weight",
    ] {
        qtensors.push((
            n.to_string(),
            QTensor::quantize(&ones, GgmlDType::F32).unwrap(),
        ));
    }
    use gguf_file::Value;
    let mut meta: Vec<(String, Value)> = src
        .metadata
        .iter()
        .filter(|(k, _)| {
            k.starts_with("tokenizer.")
                || k.starts_with("general.") && k.as_str() != "general.architecture"
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.push(("general.architecture".into(), Value::String("llama".into())));
    for (k, v) in [
        ("embedding_length", d),
        ("block_count", 1),
        ("feed_forward_length", ff),
        ("attention.head_count", heads),
        ("attention.head_count_kv", kv),
        ("context_length", 512),
    ] {
        meta.push((format!("llama.{k}"), Value::U32(v as u32)));
    }
    meta.push((
        "llama.attention.layer_norm_rms_epsilon".into(),
        Value::F32(1e-5),
    ));
    meta.push(("llama.rope.freq_base".into(), Value::F32(10000.0)));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("all-types.gguf");
    {
        let mut w = std::fs::File::create(&path).unwrap();
        let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut w, &m, &t).unwrap();
    }
    let out = tmp.path().join("hf");
    palu::gguf::convert(&path, &out).unwrap();
    let conv = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, hf, orig, ty) in &originals {
        // Relative error of the dequantized weight against the original: what each format allows.
        let got = &conv[*hf];
        let err = common::rel_l2(got, orig);
        let bound = match ty {
            GgmlDType::F16 => 1e-3,
            GgmlDType::Q8_0 => 0.01,
            GgmlDType::Q6K => 0.03,
            GgmlDType::Q5K => 0.06,
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => 0.12,
            GgmlDType::Q3K => 0.25,
            _ => 0.5, // Q2K
        };
        eprintln!("{name} ({ty:?}): relative error {err:.5}");
        assert!(
            err < bound,
            "{name} ({ty:?}): relative error {err} ≥ {bound}"
        );
    }
    let m = Model::load(&out, &Device::Cpu).unwrap();
    let lg = logits(&m, &[1, 20, 30, 40]);
    assert!(lg
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .is_finite());
}
