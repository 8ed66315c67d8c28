//! Integration tests against the mistral.rs engine (serving work): shared helpers.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use mistralrs_core::{
    Constraint, MistralRs, NormalRequest, Request, RequestMessage, Response, SamplingParams,
};
use palu::engine::server::{router_for, start, EngineOptions, Served};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn fixtures() -> PathBuf {
    std::env::var_os("PALU_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"))
}

/// Where converted fixtures are cached: `PALU_SCRATCH`, else `target/test-fixtures` (a test
/// binary run away from its checkout, as on the GPU machine, sets the variable).
fn scratch() -> PathBuf {
    let p = std::env::var_os("PALU_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-fixtures"));
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

pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The evaluation windows of the WikiText-2 protocol (fixtures README), as `palu eval ppl` cuts them.
pub fn wikitext_windows(model_dir: &Path, seq_len: usize, n: usize) -> Vec<Vec<u32>> {
    let tok = palu::tokenizer::load(model_dir).unwrap();
    let text = std::fs::read_to_string(fixtures().join("text/wikitext-2-raw-test.txt")).unwrap();
    let ids = palu::eval::eval_tokens(&tok, &text, palu::eval::Protocol::Wikitext, None).unwrap();
    ids.chunks_exact(seq_len)
        .take(n)
        .map(<[u32]>::to_vec)
        .collect()
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

/// A full-rank (ratio 1.0) Palu checkpoint of `base` in `out`, whitened on the C4 sample.
pub fn full_rank_checkpoint(base: &Path, group_size: usize, calib_seq_len: usize, out: &Path) {
    let opts = palu::compress::CompressOptions {
        ratio: 1.0,
        group_size,
        rank_search: palu::ranks::RankSearch::Uniform,
        rank_multiple: 1,
        calib: Some(fixtures().join("text/c4-train-00000-first800.jsonl")),
        calib_samples: 4,
        calib_seq_len,
        ..Default::default()
    };
    palu::compress::compress_to_dir(base, out, &opts).unwrap();
}

/// Start the engine and serve its OpenAI router (plus `/v1/palu/kv_cache`) on an ephemeral
/// loopback port.
pub async fn serve_http(opts: &EngineOptions) -> Result<(std::net::SocketAddr, Served)> {
    let served = start(opts).await?;
    let app = router_for(&served).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Ok((addr, served))
}

/// One HTTP/1.1 request on a fresh connection; returns (status, body) with chunked transfer
/// encoding undone.
async fn request(addr: std::net::SocketAddr, head: String, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{head}Host: {addr}\r\nConnection: close\r\n\r\n{body}").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.split("\r\n")
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, l)| l)
            .collect::<String>()
    } else {
        body
    };
    (status, body)
}

/// POST JSON; returns (status, body).
pub async fn post(
    addr: std::net::SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> (u16, String) {
    let body = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    request(addr, head, &body).await
}

/// GET a JSON document (status 200 asserted).
pub async fn get_json(addr: std::net::SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = request(addr, format!("GET {path} HTTP/1.1\r\n"), "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Greedy `/v1/completions` text.
pub async fn complete(addr: std::net::SocketAddr, prompt: &str, n: usize) -> String {
    let (status, body) = post(
        addr,
        "/v1/completions",
        &serde_json::json!({"model": "default", "prompt": prompt, "max_tokens": n, "temperature": 0.0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// Concatenated text of an SSE stream (`"stream": true`) from /v1/chat/completions or /v1/completions.
pub fn sse_text(body: &str) -> String {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| d.trim() != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .map(|v| {
            let c = &v["choices"][0];
            c["delta"]["content"]
                .as_str()
                .or(c["text"].as_str())
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// Greedy `/v1/chat/completions` answer to one user message, streamed or not.
pub async fn chat(addr: std::net::SocketAddr, q: &str, n: usize, stream: bool) -> String {
    let (status, body) = post(
        addr,
        "/v1/chat/completions",
        &serde_json::json!({"model": "default", "messages": [{"role": "user", "content": q}],
                            "max_tokens": n, "temperature": 0.0, "stream": stream}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    if stream {
        sse_text(&body)
    } else {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// The checkpoint's plan (`palu plan`'s defaults for 4 × 4096 tokens) with each layer's choices
/// set by `choose(layer)`, written to `path`.
pub fn write_plan(
    ckpt: &Path,
    path: &Path,
    choose: impl Fn(usize) -> (palu::planner::Keys, palu::planner::Values),
) -> PathBuf {
    use palu::planner::{CostModel, Plan, PlanInputs};
    let cfg = palu::config::ModelConfig::from_file(&ckpt.join("config.json")).unwrap();
    let inputs = PlanInputs {
        context: 4096,
        batch: 4,
        latent_bits: 16,
        kv_budget: None,
    };
    let mut plan = Plan::make(&cfg, inputs, CostModel::default()).unwrap();
    for p in &mut plan.layers {
        (p.keys, p.values) = choose(p.layer);
    }
    std::fs::write(path, plan.to_toml()).unwrap();
    path.to_path_buf()
}

/// A plan mixing every choice: full keys in every third layer, fused values in every second.
pub fn mixed_choice(layer: usize) -> (palu::planner::Keys, palu::planner::Values) {
    use palu::planner::{Keys, Values};
    (
        if layer % 3 == 1 {
            Keys::Full
        } else {
            Keys::Latent
        },
        if layer % 2 == 0 {
            Values::Fused
        } else {
            Values::Unfused
        },
    )
}
