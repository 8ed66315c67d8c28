//! Shared test helpers: fixture paths and converted fixture models (built once per run).
#![allow(dead_code)]
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    let p = std::env::var_os("PALU_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    assert!(
        p.join("README.md").exists(),
        "fixtures not found at {} (set PALU_FIXTURES to the shared fixtures directory)",
        p.display()
    );
    p
}

pub fn scratch() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-fixtures");
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// A GGUF fixture converted to the Hugging Face layout, shared by the tests of one run.
/// Concurrent test processes may race: the conversion is atomic and the loser reuses the winner's.
pub fn converted(gguf: &str, name: &str) -> PathBuf {
    let out = scratch().join(name);
    if !out.join("config.json").exists() {
        let r = palu::gguf::convert(&fixtures().join("models").join(gguf), &out);
        if let Err(e) = r {
            assert!(
                out.join("config.json").exists(),
                "conversion of {gguf} failed: {e}"
            );
        }
    }
    out
}

pub fn smollm2() -> PathBuf {
    converted("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")
}

pub fn stories_dir() -> PathBuf {
    fixtures().join("models/stories260K")
}

pub fn c4() -> PathBuf {
    fixtures().join("text/c4-train-00000-first800.jsonl")
}

/// A seed that differs on every run (fresh random inputs), printed so that a failure can be replayed.
pub fn fresh_seed() -> u64 {
    let s = std::env::var("PALU_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("PALU_TEST_SEED={s}");
    s
}

/// Relative L2 distance ‖got − want‖ / ‖want‖ of two tensors of one shape (f32).
pub fn rel_l2(got: &candle_core::Tensor, want: &candle_core::Tensor) -> f32 {
    let sq = |t: &candle_core::Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    (sq(&(got - want).unwrap()) / sq(want)).sqrt()
}
