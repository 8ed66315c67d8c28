//! The `palu` command line: help text, inspect and eval output, and errors as users see them.
mod common;

use std::process::Command;

fn palu(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_palu"))
        .args(args)
        .env("PALU_QUIET", "1")
        .env("PALU_LOG", "warn")
        .env("COLUMNS", "100")
        .output()
        .unwrap();
    let f = common::fixtures().display().to_string();
    let clean = |b: Vec<u8>| String::from_utf8(b).unwrap().replace(&f, "[FIXTURES]");
    (out.status.success(), clean(out.stdout), clean(out.stderr))
}

#[test]
fn help_teaches_the_flow() {
    let (ok, out, _) = palu(&["--help"]);
    assert!(ok);
    insta::assert_snapshot!("help", out);
}

#[test]
fn compress_help() {
    let (ok, out, _) = palu(&["compress", "--help"]);
    assert!(ok);
    insta::assert_snapshot!("compress_help", out);
}

#[test]
fn eval_ppl_help() {
    let (ok, out, _) = palu(&["eval", "ppl", "--help"]);
    assert!(ok);
    insta::assert_snapshot!("eval_ppl_help", out);
}

#[test]
fn inspect_the_authors_checkpoint() {
    let dir = common::fixtures().join("palu-reference/stories260K-g1-r50");
    let (ok, out, err) = palu(&["inspect", dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    insta::assert_snapshot!("inspect_reference", out);
}

#[test]
fn eval_ppl_of_the_authors_checkpoint() {
    let f = common::fixtures();
    let (ok, out, err) = palu(&[
        "eval",
        "ppl",
        f.join("palu-reference/stories260K-g1-r50")
            .to_str()
            .unwrap(),
        "--text",
        f.join("text/tinystories-sample.txt").to_str().unwrap(),
        "--seq-len",
        "256",
    ]);
    assert!(ok, "{err}");
    insta::assert_snapshot!("eval_reference", out);
}

#[test]
fn errors_exit_nonzero_with_one_clear_line() {
    let f = common::fixtures();
    let (ok, _, err) = palu(&[
        "eval",
        "ppl",
        f.join("models/stories260K").to_str().unwrap(),
        "--text",
        "/nonexistent.txt",
    ]);
    assert!(!ok);
    insta::assert_snapshot!("missing_text", err);
    let (ok, _, err) = palu(&[
        "eval",
        "ppl",
        f.join("models/stories260K").to_str().unwrap(),
        "--text",
        f.join("text/tinystories-sample.txt").to_str().unwrap(),
        "--latent-bits",
        "5",
    ]);
    assert!(!ok);
    insta::assert_snapshot!("bad_bits", err);
    let (ok, _, err) = palu(&[
        "compress",
        f.join("models/stories260K").to_str().unwrap(),
        "/tmp/palu-never-written",
        "--group-size",
        "3",
    ]);
    assert!(!ok);
    assert!(!std::path::Path::new("/tmp/palu-never-written").exists());
    insta::assert_snapshot!("bad_group_size", err);
}

#[cfg(feature = "engine")]
fn server(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mistralrs-server"))
        .args(args)
        .env("COLUMNS", "100")
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .unwrap();
    let s = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.success(), s(out.stdout), s(out.stderr))
}

#[cfg(feature = "engine")]
#[test]
fn server_help_lists_upstream_subcommands_and_the_palu_flags() {
    let (ok, out, _) = server(&["--help"]);
    assert!(ok);
    insta::assert_snapshot!("server_help", out);
}

#[cfg(feature = "engine")]
#[test]
fn server_with_palu_and_an_unsupported_model_subcommand_is_a_clear_error() {
    let (ok, _, err) = server(&["--kv-cache", "palu", "gguf", "-m", "x", "-f", "x.gguf"]);
    assert!(!ok);
    insta::assert_snapshot!("server_palu_gguf_error", err.trim());
}

/// `palu inspect --kv-budget` answers how many sequences fit: by the cache layout, for the
/// default cache and each latent width; a budget that is not a positive number is refused.
#[test]
fn inspect_kv_capacity() {
    let dir = common::fixtures().join("palu-reference/stories260K-g1-r50");
    let d = dir.to_str().unwrap();
    let (ok, out, err) = palu(&["inspect", d, "--kv-budget", "1", "--seq-len", "4096"]);
    assert!(ok, "{err}");
    let cap = &out[out.find("capacity").expect("a capacity section")..];
    insta::assert_snapshot!("inspect_capacity", cap);
    // 640 B/token by default: 2^30 / (640 · 4096) = 409.6 → 409 whole sequences.
    assert!(cap.contains("default 16-bit              409"), "{cap}");
    let (ok, _, err) = palu(&["inspect", d, "--kv-budget=-2"]);
    assert!(!ok);
    assert!(err.contains("--kv-budget = -2"), "{err}");
}

/// `palu synth` writes a Palu checkpoint with random factors that loads, passes `inspect`'s
/// tensor checks, and runs; its mistakes are one clear line.
#[test]
fn synth_writes_a_loadable_palu_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tiny-palu");
    let o = out.to_str().unwrap();
    let (ok, stdout, stderr) = palu(&[
        "synth",
        o,
        "--shape",
        "tiny",
        "--palu-ratio",
        "0.5",
        "--group-size",
        "2",
        "--dtype",
        "bf16",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Palu rank 8 per group of 2"), "{stdout}");
    let i = palu::checkpoint::inspect(&out).unwrap();
    assert_eq!(
        (i.model_type.as_str(), i.group_size),
        ("palullama", Some(2))
    );
    assert!((i.kv_reduction - 0.5).abs() < 1e-9, "{}", i.kv_reduction);
    let model = palu::model::Model::load(&out, &candle_core::Device::Cpu).unwrap();
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 3]], &candle_core::Device::Cpu).unwrap();
    let logits = model.forward(&ids, None, None).unwrap();
    assert_eq!(logits.dims(), &[1, 4, 512]);
    let (ok, _, stderr) = palu(&["synth", o]);
    assert!(!ok && stderr.contains("already exists"), "{stderr}");
    let (ok, _, stderr) = palu(&[
        "synth",
        tmp.path().join("x").to_str().unwrap(),
        "--palu-ratio",
        "1.5",
    ]);
    assert!(!ok && stderr.contains("--palu-ratio 1.5"), "{stderr}");
}

/// `palu plan` prints the per-layer table and writes plan.toml (which loads and matches the
/// checkpoint); `--out -` only prints; a plain model is refused in one line.
#[test]
fn plan_prints_the_table_and_writes_plan_toml() {
    let src = common::fixtures().join("palu-reference/stories260K-g1-r50");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("plan.toml");
    let s = src.to_str().unwrap();
    let (ok, stdout, err) = palu(&[
        "plan",
        s,
        "--context",
        "4096",
        "--batch",
        "8",
        "--kv-budget",
        "0.9",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let table = stdout.replace(&tmp.path().display().to_string(), "[TMP]");
    insta::assert_snapshot!("plan_table", table);
    let plan = palu::planner::Plan::from_toml_file(&out).unwrap();
    let cfg = palu::config::ModelConfig::from_file(&src.join("config.json")).unwrap();
    plan.check(&cfg, &out).unwrap();
    let (ok, only, _) = palu(&[
        "plan",
        s,
        "--context",
        "4096",
        "--batch",
        "8",
        "--kv-budget",
        "0.9",
        "--out",
        "-",
    ]);
    assert!(ok);
    assert!(!only.contains("wrote"), "{only}");
    let plain = common::fixtures().join("models/stories260K");
    let (ok, _, err) = palu(&["plan", plain.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("is not a Palu checkpoint"), "{err}");
}

/// `--fp8` stores the simulated latents as float8 e4m3 (what mistral.rs's f8e4m3 cache type
/// would hold): the perplexity moves off the 16-bit one, by less than integer 2-bit codes move it.
/// Perplexity (`--json`) of the authors' stories260K checkpoint on TinyStories, windows of 256,
/// with `extra` flags.
fn reference_ppl(extra: &[&str]) -> f64 {
    let f = common::fixtures();
    let ckpt = f.join("palu-reference/stories260K-g1-r50");
    let text = f.join("text/tinystories-sample.txt");
    let mut args = vec![
        "eval",
        "ppl",
        ckpt.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--seq-len",
        "256",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = palu(&args);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["perplexity"].as_f64().unwrap()
}

#[test]
fn eval_ppl_with_fp8_latents() {
    let ppl = reference_ppl;
    let (full, fp8, two) = (ppl(&[]), ppl(&["--fp8"]), ppl(&["--latent-bits", "2"]));
    assert!(fp8.is_finite() && fp8 != full, "16-bit {full}, fp8 {fp8}");
    assert!(
        (fp8 - full).abs() < (two - full).abs(),
        "16-bit {full}, fp8 {fp8}, 2-bit {two}"
    );
}

/// `--fp8-rebuild` simulates the key rebuild in float8 e4m3 (B_k per row, latents per token and
/// group): on the authors' stories260K checkpoint it moves perplexity (8.1050 → 8.1435 when
/// written) but by well under the 2 % an unscaled or mis-scaled rounding would exceed; on a
/// plain model it is a clear error naming the directory.
#[test]
fn eval_ppl_with_an_fp8_key_rebuild() {
    let f = common::fixtures();
    let text = f.join("text/tinystories-sample.txt");
    let ppl = reference_ppl;
    let (full, fp8) = (ppl(&[]), ppl(&["--fp8-rebuild"]));
    assert!(
        fp8.is_finite() && fp8 != full,
        "16-bit {full}, fp8 rebuild {fp8}"
    );
    assert!(
        (fp8 / full - 1.0).abs() < 0.02,
        "16-bit {full}, fp8 rebuild {fp8}"
    );

    let plain = f.join("models/stories260K");
    let (ok, _, err) = palu(&[
        "eval",
        "ppl",
        plain.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--fp8-rebuild",
    ]);
    assert!(!ok);
    insta::assert_snapshot!("fp8_rebuild_needs_palu", err);
}

/// `palu calibrate` reads one harness run per model as one fit and writes the header naming
/// them; a file that is not a harness run is an error naming that file.
#[test]
fn calibrate_reads_one_run_per_model_and_names_a_bad_file() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (a, b) = (
        root.join("docs/bench/palu_decode_stop13.md"),
        root.join("docs/bench/palu_decode_stop13_llama2.md"),
    );
    let (ok, out, err) = palu(&["calibrate", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("(48 rows, batch ≥ 8)"), "{out}");
    assert!(
        out.contains(&format!("# palu calibrate {} {}", a.display(), b.display())),
        "{out}"
    );
    let bad = root.join("README.md");
    let (ok, _, err) = palu(&["calibrate", a.to_str().unwrap(), bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains(&format!("{}: fewer than two harness rows", bad.display())),
        "{err}"
    );
}
