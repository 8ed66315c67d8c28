//! Bad input gets one clear error naming the file, tensor or field, and what to do.
//! Messages are snapshotted (paths redacted to `[DIR]`).
mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use palu::alloc_config::AllocConfig;
use palu::compress::{compress_to_dir, CompressOptions};
use palu::model::Model;
use palu::ranks::RankSearch;

/// A private copy of a fixture directory we may break.
fn copy_dir(src: &Path) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), t.path().join(e.file_name())).unwrap();
    }
    t
}

fn redact(msg: String, dirs: &[&Path]) -> String {
    let mut m = msg;
    for d in dirs {
        m = m.replace(&d.display().to_string(), "[DIR]");
    }
    m.replace(&common::fixtures().display().to_string(), "[FIXTURES]")
}

fn edit_tensors(dir: &Path, f: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let p = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, &p).unwrap();
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

/// The error of loading `dir`, which the server's validation (headers and factors only, no
/// model in memory) must report word for word.
fn load_err(dir: &Path) -> String {
    let loaded = Model::load(dir, &Device::Cpu)
        .expect_err("load must fail")
        .to_string();
    let validated = Model::validate(dir)
        .expect_err("validation must fail")
        .to_string();
    assert_eq!(
        validated, loaded,
        "Model::validate and Model::load disagree"
    );
    redact(loaded, &[dir])
}

#[test]
fn missing_tensor() {
    let d = copy_dir(&common::stories_dir());
    edit_tensors(d.path(), |t| {
        t.remove("model.layers.2.mlp.up_proj.weight");
    });
    insta::assert_snapshot!(load_err(d.path()), @"[DIR]: tensor `model.layers.2.mlp.up_proj.weight` is missing");
}

#[test]
fn palu_ranks_disagree_with_tensors() {
    let d = copy_dir(&common::fixtures().join("palu-reference/stories260K-g1-r50"));
    edit_config(d.path(), |c| {
        c["head_wise_ranks"]["model.layers.1.self_attn.v_proj"] = serde_json::json!([6, 6, 5, 6])
    });
    insta::assert_snapshot!(load_err(d.path()), @"[DIR]: tensor `model.layers.1.self_attn.v_proj.VT.weight` has shape [24, 64], expected [23, 64] (from head_wise_ranks[`model.layers.1.self_attn.v_proj`] = [6, 6, 5, 6])");
}

#[test]
fn palu_missing_up_factor() {
    let d = copy_dir(&common::fixtures().join("palu-reference/stories260K-g1-r50"));
    edit_tensors(d.path(), |t| {
        t.remove("model.layers.3.self_attn.k_proj.U.2.weight");
    });
    insta::assert_snapshot!(load_err(d.path()), @"[DIR]: tensor `model.layers.3.self_attn.k_proj.U.2.weight` is missing (from head_wise_ranks[`model.layers.3.self_attn.k_proj`] = [2, 2, 2, 2])");
}

#[test]
fn nan_in_factors() {
    let d = copy_dir(&common::fixtures().join("palu-reference/stories260K-g1-r50"));
    edit_tensors(d.path(), |t| {
        let u = t["model.layers.0.self_attn.v_proj.U.1.weight"]
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let mut v: Vec<f32> = u.flatten_all().unwrap().to_vec1().unwrap();
        v[5] = f32::NAN;
        t.insert(
            "model.layers.0.self_attn.v_proj.U.1.weight".into(),
            Tensor::from_vec(v, u.dims(), &Device::Cpu).unwrap(),
        );
    });
    insta::assert_snapshot!(load_err(d.path()), @"[DIR]: tensor `model.layers.0.self_attn.v_proj.U.1.weight` holds non-finite values (NaN or infinity); the checkpoint is corrupt, re-create it");
}

#[test]
fn unsupported_architecture() {
    let d = copy_dir(&common::stories_dir());
    edit_config(d.path(), |c| {
        c["model_type"] = serde_json::json!("gpt_neox")
    });
    insta::assert_snapshot!(load_err(d.path()), @"[DIR]/config.json: unsupported architecture `gpt_neox`: palu supports the Llama family (llama, mistral, qwen2 and their palu* variants)");
}

#[test]
fn malformed_config_json() {
    let d = copy_dir(&common::stories_dir());
    std::fs::write(d.path().join("config.json"), "{\"model_type\": \"llama\", ").unwrap();
    insta::assert_snapshot!(load_err(d.path()), @"[DIR]/config.json: invalid JSON: EOF while parsing a value at line 1 column 24");
}

fn compress_err(opts: CompressOptions) -> String {
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("ckpt");
    let e = compress_to_dir(&common::stories_dir(), &target, &opts)
        .err()
        .expect("compress must fail");
    assert!(
        !target.exists(),
        "a failed compression left {}",
        target.display()
    );
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "a failed compression left a partial directory"
    );
    redact(e.to_string(), &[out.path()])
}

fn calib_opts() -> CompressOptions {
    CompressOptions {
        calib: Some(common::c4()),
        calib_samples: 4,
        calib_seq_len: 128,
        fisher_samples: 2,
        ..Default::default()
    }
}

#[test]
fn group_size_must_divide_kv_heads() {
    insta::assert_snapshot!(compress_err(CompressOptions { group_size: 3, ..calib_opts() }),
        @"--group-size = 3: must divide num_key_value_heads = 4 (1 = per head, 4 = all heads jointly)");
}

#[test]
fn ratio_outside_unit_interval() {
    insta::assert_snapshot!(compress_err(CompressOptions { ratio: 1.5, ..calib_opts() }),
        @"--ratio = 1.5: must be in (0, 1]: the kept fraction of the K/V width (0.5 = Palu-50%)");
    insta::assert_snapshot!(compress_err(CompressOptions { ratio: 0.0, ..calib_opts() }),
        @"--ratio = 0: must be in (0, 1]: the kept fraction of the K/V width (0.5 = Palu-50%)");
}

#[test]
fn calibration_file_too_short() {
    let opts = CompressOptions {
        calib: Some(common::fixtures().join("text/tinystories-sample.txt")),
        calib_samples: 16,
        calib_seq_len: 1024,
        ..Default::default()
    };
    insta::assert_snapshot!(compress_err(opts), @"[FIXTURES]/text/tinystories-sample.txt: too short for 16 calibration samples of 1024 tokens: it holds 1882 tokens (1 windows); lower --calib-samples or --calib-seq-len, or use a longer file");
}

#[test]
fn whitening_without_calibration() {
    insta::assert_snapshot!(compress_err(CompressOptions { calib: None, ..Default::default() }),
        @"--calib = <none>: is required for whitening, Fisher rank search and --hadamard auto (e.g. the C4 sample)");
}

#[test]
fn non_finite_calibration_statistics() {
    let mut g = palu::decompose::Gram::new(4);
    g.accumulate(&Tensor::new(&[[1f32, 2., f32::INFINITY, 0.5]], &Device::Cpu).unwrap())
        .unwrap();
    let e = palu::decompose::Whitening::from_gram(&g, 7)
        .err()
        .unwrap()
        .to_string();
    insta::assert_snapshot!(e, @"calibration statistics of layer 7 = XᵀX: hold non-finite values (the model overflowed on the calibration text); check the model weights or calibrate in f32");
}

fn write_toml(text: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("alloc.toml");
    std::fs::write(&p, text).unwrap();
    (d, p)
}

const STORIES_TOML: &str = r#"format_version = 1
[model]
model_type = "llama"
num_layers = 5
hidden_size = 64
num_kv_heads = 4
head_dim = 8
[compression]
group_size = 1
decompose = "whiten"
rank_search = "fisher-uniform"
target_ratio = 0.5
rank_multiple = 1
hadamard = "off"
latent_bits = 16
achieved_kv_reduction = 0.5
"#;

fn layers(k: &str) -> String {
    (0..5)
        .map(|i| {
            format!(
                "[[layer]]\nindex = {i}\nk = {}\nv = [4, 4, 4, 4]\n",
                if i == 2 { k } else { "[4, 4, 4, 4]" }
            )
        })
        .collect()
}

fn toml_err(text: &str) -> String {
    let (d, p) = write_toml(text);
    let cfg =
        palu::config::ModelConfig::from_file(&common::stories_dir().join("config.json")).unwrap();
    let e = AllocConfig::from_file(&p)
        .and_then(|a| a.validate_for(&cfg, &p))
        .expect_err("must fail");
    redact(e.to_string(), &[d.path()])
}

#[test]
fn rank_larger_than_the_group() {
    insta::assert_snapshot!(toml_err(&format!("{STORIES_TOML}{}", layers("[4, 9, 4, 4]"))),
        @"[DIR]/alloc.toml: layer 2 k: rank 9 is outside 1..=8 (a group of 1 heads × 8 dims)");
}

#[test]
fn malformed_toml() {
    insta::assert_snapshot!(toml_err("format_version = 1\n[model\nmodel_type = 'llama'\n"), @r"
    [DIR]/alloc.toml: invalid TOML: TOML parse error at line 2, column 7
      |
    2 | [model
      |       ^
    invalid table header
    expected `.`, `]`
    ");
}

#[test]
fn toml_for_another_model() {
    let text = STORIES_TOML
        .replace("num_layers = 5", "num_layers = 30")
        .replace("hidden_size = 64", "hidden_size = 576");
    insta::assert_snapshot!(toml_err(&format!("{text}{}", layers("[4, 4, 4, 4]"))),
        @"[DIR]/alloc.toml: written for a different model: [model] says llama with 30 layers, hidden 576, 4 KV heads of 8; this model is llama with 5 layers, hidden 64, 4 KV heads of 8");
}

#[test]
fn toml_with_unknown_field_and_bad_bits() {
    let e = toml_err(&format!(
        "{}{}",
        STORIES_TOML.replace("latent_bits = 16", "latent_bits = 5"),
        layers("[4, 4, 4, 4]")
    ));
    insta::assert_snapshot!(e, @"[DIR]/alloc.toml: compression.latent_bits = 5: must be one of 2, 3, 4, 8 or 16 (16 = no quantization)");
    let e = toml_err(&format!(
        "{}{}",
        STORIES_TOML.replace("group_size = 1", "group_size = 1\ngroupsize = 2"),
        layers("[4, 4, 4, 4]")
    ));
    assert!(e.contains("unknown field `groupsize`"), "{e}");
}

/// A minimal GGUF v3 file whose only tensor uses IQ2_XXS (type 16), which candle cannot dequantize.
fn gguf_with_type(ty: u32) -> Vec<u8> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(vec![0u8; 1024]);
    b
}

#[test]
fn unsupported_gguf_quant_type() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.gguf");
    std::fs::write(&p, gguf_with_type(16)).unwrap();
    let out = d.path().join("out");
    let e = palu::gguf::convert(&p, &out).err().unwrap().to_string();
    assert!(!out.exists());
    insta::assert_snapshot!(redact(e, &[d.path()]), @"[DIR]/m.gguf: cannot read GGUF: unknown dtype for tensor 16 (palu convert-gguf supports F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)");
}

#[test]
fn latent_bits_outside_the_supported_set() {
    insta::assert_snapshot!(palu::quant::check_bits(5).unwrap_err().to_string(),
        @"latent_bits = 5: must be one of 2, 3, 4, 8 or 16 (16 = no quantization)");
}

#[test]
fn failed_write_leaves_nothing_behind() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("ckpt");
    let r = palu::checkpoint::write_dir_atomically(&out, |tmp| {
        std::fs::write(tmp.join("model.safetensors"), b"half").unwrap();
        Err(palu::PaluError::invalid(tmp, "disk full"))
    });
    assert!(r.is_err());
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    // And an existing output is never overwritten.
    std::fs::create_dir(&out).unwrap();
    let e = palu::checkpoint::write_dir_atomically(&out, |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert_eq!(
        redact(e, &[d.path()]),
        "[DIR]/ckpt: already exists; remove it or choose another output directory"
    );
}

#[test]
fn uniform_rank_search_needs_no_fisher() {
    // Sanity: the options used above are otherwise valid.
    let out = tempfile::tempdir().unwrap();
    let opts = CompressOptions {
        rank_search: RankSearch::Uniform,
        rank_multiple: 1,
        ..calib_opts()
    };
    compress_to_dir(&common::stories_dir(), &out.path().join("ok"), &opts).unwrap();
}
