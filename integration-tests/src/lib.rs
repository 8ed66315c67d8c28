//! Integration tests against the mistral.rs engine (serving work): shared helpers.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use mistralrs_core::{
    Constraint, MistralRs, NormalRequest, Request, RequestMessage, Response, SamplingParams,
};

pub fn fixtures() -> PathBuf {
    std::env::var_os("PALU_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"))
}

fn scratch() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-fixtures");
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// SmolLM2-135M-Instruct converted from its GGUF fixture, shared by the tests of one run
/// (conversion is atomic; a process that loses the race reuses the winner's).
pub fn smollm2() -> PathBuf {
    let base = scratch().join("smollm2");
    if !base.join("config.json").exists() {
        if let Err(e) = palu::gguf::convert(
            &fixtures().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            &base,
        ) {
            assert!(base.join("config.json").exists(), "conversion failed: {e}");
        }
    }
    base
}

/// SmolLM2 at Palu-50 % with the shipped allocation (configs/smollm2-135m-g3-r50.toml), whitened
/// on the C4 sample with the allocation's calibration settings; shared like [`smollm2`].
pub fn smollm2_palu50() -> PathBuf {
    let out = scratch().join("smollm2-palu50");
    if !out.join("config.json").exists() {
        let config =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/smollm2-135m-g3-r50.toml");
        let ac = palu::alloc_config::AllocConfig::from_file(&config).unwrap();
        let cal = ac
            .calibration
            .clone()
            .expect("the shipped allocation records its calibration");
        let opts = palu::compress::CompressOptions {
            calib: Some(fixtures().join("text/c4-train-00000-first800.jsonl")),
            calib_samples: cal.samples,
            calib_seq_len: cal.seq_len,
            seed: cal.seed,
            config: Some((config, ac)),
            ..Default::default()
        };
        if let Err(e) = palu::compress::compress_to_dir(&smollm2(), &out, &opts) {
            assert!(out.join("config.json").exists(), "compression failed: {e}");
        }
    }
    out
}

/// Logits `[T', V]` (f32) of the positions of `tokens` the engine fed, from its own forward pass
/// (`return_raw_logits`, the mechanism of mistral.rs's perplexity example). `T' = T` without a
/// prefix-cache hit; a hit feeds (and returns) only the positions after the cached prefix.
pub async fn engine_logits(engine: &MistralRs, tokens: Vec<u32>) -> Result<Tensor> {
    let n = tokens.len();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let mut req = NormalRequest::new_simple(
        RequestMessage::CompletionTokens(tokens),
        SamplingParams {
            max_len: Some(1),
            ..SamplingParams::deterministic()
        },
        tx,
        engine.next_request_id(),
        None,
        None,
    );
    req.return_raw_logits = true;
    req.constraint = Constraint::None;
    engine
        .get_sender(None)?
        .send(Request::Normal(Box::new(req)))
        .await
        .context("engine request")?;
    let first = rx.recv().await;
    // Keep the channel open while the engine finishes the sequence: it answers errors of later
    // steps there, and unwraps the send (a closed channel would stop its thread).
    tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            if let Response::ModelError(e, _) | Response::CompletionModelError(e, _) = r {
                panic!("engine error after the raw logits: {e}");
            }
        }
    });
    match first {
        Some(Response::Raw { logits_chunks, .. }) => {
            let chunks: Vec<Tensor> = logits_chunks
                .iter()
                .map(|c| {
                    let c = c.to_dtype(DType::F32)?;
                    // [1, t, V] or [t, V]
                    if c.rank() == 3 {
                        c.squeeze(0)
                    } else {
                        Ok(c)
                    }
                })
                .collect::<candle_core::Result<_>>()?;
            let all = Tensor::cat(&chunks, 0)?;
            if all.dim(0)? > n {
                bail!(
                    "the engine returned logits for {} positions of a {n}-token prompt",
                    all.dim(0)?
                )
            }
            Ok(all)
        }
        Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => {
            bail!("engine error: {e}")
        }
        Some(Response::ModelError(e, _)) | Some(Response::CompletionModelError(e, _)) => {
            bail!("model error: {e}")
        }
        Some(_) => bail!("unexpected engine response to a raw-logits request"),
        None => bail!("the engine dropped the request"),
    }
}

/// Per-token NLL of `tokens[1..]` under `logits` (`[T, V]`), in f64.
pub fn nll(logits: &Tensor, tokens: &[u32]) -> Result<Vec<f64>> {
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    Ok(rows
        .iter()
        .zip(&tokens[1..])
        .map(|(row, &next)| {
            let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            lse - row[next as usize] as f64
        })
        .collect())
}
