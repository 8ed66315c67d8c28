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
        if layer.is_multiple_of(2) {
            Values::Fused
        } else {
            Values::Unfused
        },
    )
}

/// A Palu model loaded without the engine around it, to drive its forward pass over the
/// engine's paged blocks with inputs built here (the engine has no paged attention on the CPU,
/// so this is how the paged path is tested there; the GPU test drives it the same way).
pub mod direct {
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Arc;

    use anyhow::Result;
    use candle_core::{DType, Device, Tensor};
    use mistralrs_core::model_plugin::{
        FlashParams, NormalLoadingMetadata, NormalModel, PagedAttentionInputMetadata,
    };
    use mistralrs_core::DeviceMapSetting;
    use palu::engine::{KvStats, PaluTextModel};

    /// The Palu checkpoint at `dir` on `device` in `dtype`; `paged`: as the engine loads it
    /// for paged attention (block rows in its geometry).
    pub fn load(
        dir: &Path,
        bits: u8,
        paged: bool,
        device: &Device,
        dtype: DType,
    ) -> Result<PaluTextModel> {
        load_planned(dir, bits, paged, device, dtype, None)
    }

    /// [`load`] with a per-layer plan (full keys, fused values).
    pub fn load_planned(
        dir: &Path,
        bits: u8,
        paged: bool,
        device: &Device,
        dtype: DType,
        plan: Option<&palu::planner::Plan>,
    ) -> Result<PaluTextModel> {
        let cfg = palu::config::ModelConfig::from_file(&dir.join("config.json"))?;
        let files: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        // SAFETY: the checkpoint files are not modified while mapped (a test's own files).
        let vb = unsafe {
            mistralrs_quant::ShardedSafeTensors::sharded(
                &files,
                dtype,
                device,
                None,
                Arc::new(|_| true),
            )?
        };
        let mapper = DeviceMapSetting::dummy().into_mapper(
            cfg.num_layers,
            device,
            None,
            std::slice::from_ref(device),
        )?;
        let meta = NormalLoadingMetadata {
            mapper,
            loading_isq: false,
            real_device: device.clone(),
            multi_progress: Arc::new(indicatif::MultiProgress::new()),
            matformer_slicing_config: None,
        };
        Ok(PaluTextModel::new(
            &cfg,
            vb,
            meta,
            bits,
            plan,
            Arc::new(KvStats::default()),
            paged,
        )?)
    }

    /// Logits of every position of `ids` from a fresh prefill of the plain (unpaged) model.
    pub fn prefill_logits(model: &PaluTextModel, ids: &[u32]) -> Result<Tensor> {
        let dev = model.device().clone();
        let x = Tensor::new(ids, &dev)?.unsqueeze(0)?;
        Ok(model
            .forward(
                &x,
                &[0],
                vec![(0, ids.len())],
                vec![0],
                None,
                &FlashParams::empty(true),
            )?
            .squeeze(0)?)
    }

    /// One layer's key and value block tensors per layer, as the engine's `CacheEngine`
    /// allocates them from the model's geometry, and a free list of shuffled block ids.
    pub struct Pools {
        pub layers: Vec<(Tensor, Tensor)>,
        pub block_size: usize,
        free: Vec<u32>,
    }

    impl Pools {
        pub fn new(
            model: &PaluTextModel,
            blocks: usize,
            block_size: usize,
            dtype: DType,
            seed: u64,
        ) -> Result<Self> {
            let geo = model.model_config();
            let dev = model.device();
            let x = 16 / dtype.size_in_bytes();
            let mut layers = Vec::new();
            for l in 0..geo.num_layers() {
                let (wk, wv) = (geo.k_head_dim_for_layer(l), geo.v_head_dim_for_layer(l));
                layers.push((
                    Tensor::zeros((blocks, 1, wk / x, block_size, x), dtype, dev)?,
                    Tensor::zeros((blocks, 1, wv, block_size), dtype, dev)?,
                ));
            }
            // A deterministic shuffle (block ids far from 0..n, as after some traffic).
            let mut free: Vec<u32> = (0..blocks as u32).collect();
            let mut s = seed | 1;
            for i in (1..free.len()).rev() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                free.swap(i, (s % (i as u64 + 1)) as usize);
            }
            Ok(Self {
                layers,
                block_size,
                free,
            })
        }

        /// A fresh block.
        pub fn take(&mut self) -> u32 {
            self.free.pop().expect("the test's pool has enough blocks")
        }

        /// Grows `table` to hold `len` tokens.
        pub fn reserve(&mut self, table: &mut Vec<u32>, len: usize) {
            while table.len() * self.block_size < len {
                let b = self.take();
                table.push(b);
            }
        }
    }

    /// One sequence of a paged step: its new tokens, the position of the first, its block
    /// table (covering offset + new tokens).
    pub struct Seq<'a> {
        pub new: &'a [u32],
        pub offset: usize,
        pub table: &'a [u32],
    }

    /// One forward pass over the pools, with inputs laid out as the engine's
    /// `make_prompt_chunk` / `make_completion_chunk` lay them out (right-padded tokens, slot -1
    /// for padding, padded block tables). Returns the logits of every position, `[B, T, V]`.
    pub fn paged_step(model: &PaluTextModel, pools: &Pools, seqs: &[Seq]) -> Result<Tensor> {
        let dev = model.device().clone();
        let t = seqs.iter().map(|s| s.new.len()).max().unwrap();
        let bs = pools.block_size;
        let (mut ids, mut slots, mut tables) = (Vec::new(), Vec::new(), Vec::new());
        let cols = seqs.iter().map(|s| s.table.len()).max().unwrap();
        for s in seqs {
            for i in 0..t {
                ids.push(s.new.get(i).copied().unwrap_or(0));
                slots.push(if i < s.new.len() {
                    let p = s.offset + i;
                    (s.table[p / bs] as usize * bs + p % bs) as i64
                } else {
                    -1
                });
            }
            tables.extend(
                s.table
                    .iter()
                    .copied()
                    .chain(std::iter::repeat(0))
                    .take(cols),
            );
        }
        let b = seqs.len();
        let loc = dev.location();
        let one = |x: Tensor| HashMap::from([(loc, x)]);
        let mut meta = PagedAttentionInputMetadata::dummy(&dev)?;
        meta.slot_mappings = one(Tensor::from_vec(slots, (b, t), &dev)?);
        meta.block_tables = Some(one(Tensor::from_vec(tables, (b, cols), &dev)?));
        let lens: Vec<u32> = seqs
            .iter()
            .map(|s| (s.offset + s.new.len()) as u32)
            .collect();
        meta.max_context_len = lens.iter().max().map(|&m| m as usize);
        meta.context_lens = Some(one(Tensor::new(lens.as_slice(), &dev)?));
        let x = Tensor::from_vec(ids, (b, t), &dev)?;
        let offsets: Vec<usize> = seqs.iter().map(|s| s.offset).collect();
        Ok(model.forward(
            &x,
            &offsets,
            vec![(0, t); b],
            offsets.clone(),
            Some((pools.layers.clone(), &meta)),
            &FlashParams::empty(true),
        )?)
    }

    /// Logits `[T, V]` (f32) of a whole sequence prefilled over fresh blocks in chunks of
    /// `chunk` tokens: every chunk after the first reads the earlier ones from the blocks, as
    /// the engine's chunked prefill and prefix-cache hits do.
    pub fn paged_prefill_logits(
        model: &PaluTextModel,
        pools: &mut Pools,
        ids: &[u32],
        chunk: usize,
    ) -> Result<Tensor> {
        let mut table = Vec::new();
        pools.reserve(&mut table, ids.len());
        let mut out = Vec::new();
        for (i, c) in ids.chunks(chunk).enumerate() {
            let l = paged_step(
                model,
                pools,
                &[Seq {
                    new: c,
                    offset: i * chunk,
                    table: &table,
                }],
            )?;
            out.push(l.squeeze(0)?.to_dtype(DType::F32)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// Largest |Δ| of two logit tensors relative to the largest |logit|, and how many rows' top
    /// tokens agree.
    pub fn compare(got: &Tensor, want: &Tensor) -> (f32, usize, usize) {
        let got = got.to_dtype(DType::F32).unwrap();
        let want = want.to_dtype(DType::F32).unwrap();
        let scalar = |t: Tensor| t.max_all().unwrap().to_scalar::<f32>().unwrap();
        let d = scalar((&got - &want).unwrap().abs().unwrap());
        let m = scalar(want.abs().unwrap());
        let top = |t: &Tensor| {
            t.argmax(candle_core::D::Minus1)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()
        };
        let (a, b) = (top(&got), top(&want));
        let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        (d / m, agree, a.len())
    }

    /// Logits `[t, V]` of `ids` fed to the plain (unpaged) model at `offset`: its cache keeps
    /// the positions before `offset` (the engine's convention) and appends these.
    pub fn plain_logits(model: &PaluTextModel, ids: &[u32], offset: usize) -> Result<Tensor> {
        let dev = model.device().clone();
        let x = Tensor::new(ids, &dev)?.unsqueeze(0)?;
        Ok(model
            .forward(
                &x,
                &[offset],
                vec![(0, ids.len())],
                vec![offset],
                None,
                &FlashParams::empty(true),
            )?
            .squeeze(0)?)
    }

    /// Prefill, a prefix-cache hit that shares blocks, and batched decode steps at different
    /// offsets over paged blocks, each against the plain model running the same schedule one
    /// sequence at a time (the same rows computed from the same batches, so packed latents
    /// quantize identically): A (40 tokens) from nothing; B, whose first 32 tokens are A's, fed
    /// from position 32 over A's first blocks; then A and B decoded together for three steps
    /// with the plain model's greedy tokens.
    ///
    /// `pool_dtype`: the blocks' dtype (`None`: the activation dtype; F8E4M3 as with
    /// `--pa-cache-type f8e4m3`); `plan`: a per-layer plan on both models. Prints each step's
    /// distance and returns the report.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_steps_match_the_plain_cache(
        device: &Device,
        dtype: DType,
        pool_dtype: Option<DType>,
        bits: u8,
        block_size: usize,
        tol: f32,
        min_agree: f32,
        plan: Option<&palu::planner::Plan>,
    ) -> Vec<String> {
        let dir = crate::smollm2_palu50();
        let tok = palu::tokenizer::load(&dir).unwrap();
        let plain = load_planned(&dir, bits, false, device, dtype, plan).unwrap();
        let paged = load_planned(&dir, bits, true, device, dtype, plan).unwrap();
        let mut pools = Pools::new(&paged, 64, block_size, pool_dtype.unwrap_or(dtype), 7).unwrap();
        let enc = |s: &str| palu::tokenizer::encode(&tok, s).unwrap();
        let mut a = enc("The history of the city goes back to the Roman settlement on the river, when traders from the south built a bridge and a market that grew into a town over the next centuries. In the middle ages the town was ruled by a bishop, and later by the dukes who built the castle, the walls and the great church that still stands in the old market square.");
        a.truncate(40);
        assert_eq!(a.len(), 40, "prompt A is 40 tokens");
        let mut b = a[..32].to_vec();
        b.extend(enc(
            " and the castle on the hill was built by the first duke",
        ));
        let steps = 3;
        // The plain model's schedule, one sequence at a time; greedy tokens from it.
        let greedy = |l: &Tensor| {
            l.get(l.dim(0).unwrap() - 1)
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap()
        };
        let ref_a = plain_logits(&plain, &a, 0).unwrap();
        let mut dec_a = Vec::new();
        let mut last = greedy(&ref_a);
        for s in 0..steps {
            a.push(last);
            let l = plain_logits(&plain, &[last], 40 + s).unwrap();
            last = greedy(&l);
            dec_a.push(l);
        }
        plain_logits(&plain, &a[..40], 0).unwrap();
        let ref_b = plain_logits(&plain, &b[32..], 32).unwrap();
        let mut dec_b = Vec::new();
        let mut last = greedy(&ref_b);
        let nb = b.len();
        for s in 0..steps {
            b.push(last);
            let l = plain_logits(&plain, &[last], nb + s).unwrap();
            last = greedy(&l);
            dec_b.push(l);
        }
        let mut report = Vec::new();
        let mut check = |what: &str, got: &Tensor, want: &Tensor| {
            let (rel, agree, rows) = compare(got, want);
            report.push(format!(
                "{what}: max |Δ| / max |logit| {rel:.2e}, top-1 agrees in {agree}/{rows} rows"
            ));
            assert!(
                rel < tol,
                "{what}: max |Δ| / max |logit| {rel:.2e} (tolerance {tol:.0e})"
            );
            assert!(
                agree as f32 >= min_agree * rows as f32,
                "{what}: top-1 agrees in {agree}/{rows} rows"
            );
        };
        // 1. Prefill A from nothing.
        let mut ta = Vec::new();
        pools.reserve(&mut ta, 40 + steps);
        let got = paged_step(
            &paged,
            &pools,
            &[Seq {
                new: &a[..40],
                offset: 0,
                table: &ta,
            }],
        )
        .unwrap();
        check("prefill A", &got.squeeze(0).unwrap(), &ref_a);
        // 2. B's prompt: its first 32 tokens are cached in A's blocks (shared, as the engine's
        // prefix cache shares them), only the rest is fed.
        let shared = 32 / block_size;
        let mut tb = ta[..shared].to_vec();
        pools.reserve(&mut tb, b.len());
        let got = paged_step(
            &paged,
            &pools,
            &[Seq {
                new: &b[32..nb],
                offset: 32,
                table: &tb,
            }],
        )
        .unwrap();
        check(
            "prefill B over A's shared blocks",
            &got.squeeze(0).unwrap(),
            &ref_b,
        );
        // 3. A and B decoded in one batch at their own offsets.
        for s in 0..steps {
            let got = paged_step(
                &paged,
                &pools,
                &[
                    Seq {
                        new: &a[40 + s..41 + s],
                        offset: 40 + s,
                        table: &ta,
                    },
                    Seq {
                        new: &b[nb + s..nb + s + 1],
                        offset: nb + s,
                        table: &tb,
                    },
                ],
            )
            .unwrap();
            let want = Tensor::cat(&[&dec_a[s], &dec_b[s]], 0).unwrap();
            check(
                &format!("decode step {s} (A at {}, B at {})", 40 + s, nb + s),
                &got.squeeze(1).unwrap(),
                &want,
            );
        }
        println!(
            "{dtype:?}, {bits}-bit latents, blocks of {block_size} ({:?}):\n  {}",
            pool_dtype.unwrap_or(dtype),
            report.join("\n  ")
        );
        report
    }
}
