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

/// Largest |got − want| of two tensors of one shape, compared in f32 (any float dtype).
pub fn max_abs_diff(got: &candle_core::Tensor, want: &candle_core::Tensor) -> f32 {
    let f = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
    (&f(got) - &f(want))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Decoded rows of two encodings of nearly equal latents: the largest difference in units of
/// (one code step + the dtype's rounding of the latents on each side, `eps` relative), and the
/// fraction of identical bytes. A value on a rounding boundary lands one code away; rounding h
/// moves a group's range, so every dequantized value by up to that rounding.
pub fn row_agreement(
    c: &palu::latent_codec::LatentCodec,
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    eps: f32,
) -> (f32, f64) {
    let da = c
        .decode(a, candle_core::DType::F32)
        .unwrap()
        .flatten_to(0)
        .unwrap();
    let db = c
        .decode(b, candle_core::DType::F32)
        .unwrap()
        .flatten_to(0)
        .unwrap();
    let (va, vb): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (da.to_vec2().unwrap(), db.to_vec2().unwrap());
    let mut worst = 0f32;
    for (ra, rb) in va.iter().zip(&vb) {
        let (lo, hi) = rb
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        let step = ((hi - lo) / ((1u32 << c.bits()) - 1) as f32).max(1e-6);
        let tol = step + 2.0 * eps * lo.abs().max(hi.abs()) + 1e-6;
        let d = ra
            .iter()
            .zip(rb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        worst = worst.max(d / tol);
    }
    let (ba, bb): (Vec<u8>, Vec<u8>) = (
        a.flatten_all().unwrap().to_vec1().unwrap(),
        b.flatten_all().unwrap().to_vec1().unwrap(),
    );
    let same = ba.iter().zip(&bb).filter(|(x, y)| x == y).count();
    (worst, same as f64 / ba.len() as f64)
}
