//! End-to-end decode throughput of the engine: a Llama-3-8B-shaped checkpoint with random weights
//! (`palu::synth`), `--streams` concurrent requests with `--context`-token prompts and `--gen`
//! generated tokens each, served by the stock engine (its paged attention on CUDA, block 32, as
//! upstream's server runs there) and by `--kv-cache palu` (the same shape at Palu-50 %, g = `--group-size`),
//! one after the other in this process. Prints one table: prefill and decode time, decode tokens
//! per second, the KV bytes per token each cache holds, and how many `--context`-token sequences
//! fit in `--kv-budget-gib` by that layout.
//!
//!   serve-bench --work DIR [--layers 4] [--context 16384] [--streams 16] [--gen 32]
//!               [--latent-bits 16] [--group-size 1] [--kv-budget-gib 40] [--cpu]
//!               [--configs stock,palu,palu-paged,stock-paged]
//!
//! `--configs` picks the servers, in that order: `stock` (the engine's plain KV cache), `palu`
//! (latents in the plain cache, 16-bit and `--latent-bits`; `--group-size` KV heads per low-rank
//! group: 1 M-LRD, 2 or 4 G-LRD, 8 J-LRD), `palu-paged` (latents in the
//! engine's paged blocks, CUDA), `stock-paged` (upstream's paged attention, CUDA: the default
//! server there). The × column compares with the first stock server that ran.
//!
//! While it waits for a server's streams it prints a heartbeat every 30 s (streams done, and on
//! CUDA the GPU's memory and utilization), so a stalled run shows itself before a timeout.
//!
//! Random weights: a speed measurement, never a proof of accuracy. The vocabulary is stories260K's
//! 512 tokens (its tokenizer serves the checkpoint), so the LM head is small next to a real
//! Llama-3's 128K: the step is attention- and MLP-bound, as a long-context decode is.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mistralrs_core::{
    Constraint, MistralRs, ModelDType, NormalRequest, Request, RequestMessage, Response,
    SamplingParams,
};
use palu::engine::server::{start, EngineOptions, KvCacheKind, PagedOptions};

#[derive(Clone)]
struct Args {
    work: PathBuf,
    layers: usize,
    context: usize,
    streams: usize,
    gen: usize,
    latent_bits: u8,
    group_size: usize,
    budget_gib: f64,
    cpu: bool,
    tokenizer: PathBuf,
    configs: Vec<String>,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        work: PathBuf::from("serve-bench"),
        layers: 4,
        context: 16384,
        streams: 16,
        gen: 32,
        latent_bits: 16,
        group_size: 1,
        budget_gib: 40.0,
        cpu: false,
        tokenizer: palu_integration_tests::fixtures().join("models/stories260K"),
        configs: ["stock", "palu", "palu-paged", "stock-paged"]
            .map(String::from)
            .to_vec(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--cpu" {
            a.cpu = true;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            let doc: Vec<&str> = include_str!("serve_bench.rs")
                .lines()
                .take_while(|l| l.starts_with("//!"))
                .map(|l| l.trim_start_matches("//!"))
                .collect();
            println!("{}", doc.join("\n"));
            std::process::exit(0);
        }
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        let n = || {
            v.parse::<usize>()
                .with_context(|| format!("{flag} {v}: not a number"))
        };
        match flag.as_str() {
            "--work" => a.work = PathBuf::from(&v),
            "--layers" => a.layers = n()?,
            "--context" => a.context = n()?,
            "--streams" => a.streams = n()?,
            "--gen" => a.gen = n()?,
            "--latent-bits" => a.latent_bits = n()? as u8,
            "--group-size" => a.group_size = n()?,
            "--kv-budget-gib" => a.budget_gib = v.parse().context("--kv-budget-gib")?,
            "--tokenizer-from" => a.tokenizer = PathBuf::from(&v),
            "--configs" => {
                a.configs = v.split(',').map(|c| c.trim().to_string()).collect();
                if let Some(bad) = a
                    .configs
                    .iter()
                    .find(|c| !["stock", "palu", "palu-paged", "stock-paged"].contains(&c.as_str()))
                {
                    bail!(
                        "--configs: unknown server `{bad}` (stock, palu, palu-paged, stock-paged)"
                    )
                }
            }
            other => bail!("unknown flag {other} (see --help)"),
        }
    }
    if a.streams == 0 || a.gen < 2 || a.context < 16 {
        bail!("--streams ≥ 1, --gen ≥ 2 and --context ≥ 16");
    }
    if ![1, 2, 4, 8].contains(&a.group_size) {
        bail!(
            "--group-size {}: the Llama-3-8B shape's 8 KV heads split into groups of 1, 2, 4 or 8",
            a.group_size
        );
    }
    Ok(a)
}

/// Write the stock and the Palu-50 % checkpoint once (reused by later runs); each only where a
/// server of `--configs` reads it (a 32-layer one is 16 GB).
fn checkpoints(a: &Args) -> Result<(PathBuf, PathBuf)> {
    let mut out = Vec::new();
    for palu in [false, true] {
        let needed = a.configs.iter().any(|c| c.starts_with("palu") == palu);
        let dir = a.work.join(format!(
            "llama3-8b-{}l-{}",
            a.layers,
            if palu {
                format!("palu50-g{}", a.group_size)
            } else {
                "dense".to_string()
            }
        ));
        if needed && !dir.join("config.json").exists() {
            let mut spec = palu::synth::SynthSpec::preset("llama3-8b", Some(a.layers), 7)
                .context("the llama3-8b preset")?;
            spec.dtype = candle_core::DType::BF16;
            spec.vocab = 512;
            spec.palu = palu.then_some(palu::synth::SynthPalu {
                group_size: a.group_size,
                ratio: 0.5,
            });
            palu::checkpoint::write_dir_atomically(&dir, |tmp| {
                palu::synth::write(&spec, tmp, Some(&a.tokenizer))?;
                unreachable_eos(tmp, spec.vocab)
                    .map_err(|e| palu::error::PaluError::invalid(tmp, format!("{e:#}")))
            })?;
        }
        out.push(dir);
    }
    Ok((out.remove(0), out.remove(0)))
}

/// Random weights emit stories260K's `</s>` about once in 512 tokens, which ended streams early
/// and unevenly (and mistral.rs 0.8.1 never applies `SamplingParams::logits_bias`). The
/// benchmark's tokenizer therefore ends streams with an added token past the model's `vocab`
/// logits, one it can never sample: every stream decodes exactly `--gen` tokens.
fn unreachable_eos(dir: &Path, vocab: usize) -> Result<()> {
    const EOS: &str = "<|serve_bench_eos|>";
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Value)| -> Result<()> {
        let path = dir.join(name);
        let mut v: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))?;
        f(&mut v);
        std::fs::write(&path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))
    };
    edit("tokenizer.json", &|t| {
        if let Some(added) = t["added_tokens"].as_array_mut() {
            added.push(
                serde_json::json!({"id": vocab, "content": EOS, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
            );
        }
    })?;
    edit("tokenizer_config.json", &|c| c["eos_token"] = EOS.into())
}

struct Run {
    label: String,
    prompt_s: f64,
    decode_s: f64,
    decode_tokens: usize,
    wall: Duration,
    kv_bytes_per_token: f64,
}

/// Every `HEARTBEAT` while a run waits: how many streams are done, and on CUDA the GPU's memory
/// and utilization (`nvidia-smi`), so a long run tells a slow step (busy, memory near full) from
/// a stall (idle) while it happens.
const HEARTBEAT: Duration = Duration::from_secs(30);

fn heartbeat(label: &str, done: usize, streams: usize, since: Instant, cpu: bool) -> String {
    let gpu = (!cpu)
        .then(|| {
            std::process::Command::new("nvidia-smi")
                .args([
                    "--query-gpu=memory.used,memory.total,utilization.gpu",
                    "--format=csv,noheader",
                ])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| format!("; GPU {}", String::from_utf8_lossy(&o.stdout).trim()))
        })
        .flatten()
        .unwrap_or_default();
    format!(
        "{label}: {done} of {streams} streams done after {:.0} s{gpu}",
        since.elapsed().as_secs_f64()
    )
}

/// `streams` requests at once, each `context` prompt tokens (distinct, so no prefix is shared)
/// and exactly `gen` new tokens. Returns the engine's own timings, worst stream: prompt
/// (prefill) seconds, completion (decode) seconds, and the decode steps' tokens (each stream's
/// tokens after its first, which the prefill produces).
async fn run(engine: &MistralRs, a: &Args, label: &str) -> Result<(f64, f64, usize)> {
    let since = Instant::now();
    let mut rxs = Vec::new();
    for s in 0..a.streams {
        let prompt: Vec<u32> = (0..a.context)
            .map(|i| 3 + ((i * 7 + s * 131 + i / 5) % 500) as u32)
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut req = NormalRequest::new_simple(
            RequestMessage::CompletionTokens(prompt),
            SamplingParams {
                max_len: Some(a.gen),
                ..SamplingParams::deterministic()
            },
            tx,
            engine.next_request_id(),
            None,
            None,
        );
        req.constraint = Constraint::None;
        engine
            .get_sender(None)?
            .send(Request::Normal(Box::new(req)))
            .await
            .context("engine request")?;
        rxs.push(rx);
    }
    let (mut prompt_s, mut decode_s, mut tokens) = (0f64, 0f64, 0usize);
    for (done, mut rx) in rxs.into_iter().enumerate() {
        let response = loop {
            match tokio::time::timeout(HEARTBEAT, rx.recv()).await {
                Ok(r) => break r,
                Err(_) => eprintln!("{}", heartbeat(label, done, a.streams, since, a.cpu)),
            }
        };
        match response {
            Some(Response::CompletionDone(c)) => {
                prompt_s = prompt_s.max(c.usage.total_prompt_time_sec as f64);
                decode_s = decode_s.max(c.usage.total_completion_time_sec as f64);
                tokens += c.usage.completion_tokens.saturating_sub(1);
            }
            Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => {
                bail!("engine error: {e}")
            }
            Some(Response::CompletionModelError(e, _)) | Some(Response::ModelError(e, _)) => {
                bail!("model error: {e}")
            }
            Some(_) => bail!("unexpected engine response"),
            None => bail!("the engine dropped a request"),
        }
    }
    Ok((prompt_s, decode_s, tokens))
}

async fn serve(dir: &Path, kv: KvCacheKind, paged: bool, bits: u8, a: &Args) -> Result<Run> {
    let t_load = Instant::now();
    let served = start(&EngineOptions {
        model_dir: dir.to_path_buf(),
        palu_config: None,
        palu_calib: None,
        palu_plan: None,
        kv_cache: kv,
        latent_bits: (kv == KvCacheKind::Palu).then_some(bits),
        max_seqs: a.streams,
        // Upstream's paged attention (CUDA), blocks of 32 for every stream's whole sequence:
        // K/V blocks stock, latent rows in the blocks with Palu.
        paged_attention: paged.then(|| PagedOptions::tokens(a.streams * (a.context + a.gen + 64))),
        no_prefix_cache: true,
        isq: None,
        cpu: a.cpu,
        dtype: if a.cpu {
            ModelDType::F32
        } else {
            ModelDType::BF16
        },
    })
    .await?;
    let label = label(kv, paged, bits);
    eprintln!(
        "{label}: engine up in {:.1} s",
        t_load.elapsed().as_secs_f64()
    );
    // A short warm-up request (kernel loading, cuBLAS handles), not timed.
    let mut warm = a.clone();
    (warm.streams, warm.context, warm.gen) = (1, 64, 2);
    run(&served.engine, &warm, &label).await?;
    eprintln!(
        "{label}: warm-up done; {} requests of {} tokens sent",
        a.streams, a.context
    );
    let t = Instant::now();
    let (prompt_s, decode_s, decode_tokens) = run(&served.engine, a, &label).await?;
    let wall = t.elapsed();
    let kv_bytes_per_token = kv_bytes(dir, kv, bits)?;
    Ok(Run {
        label,
        prompt_s,
        decode_s,
        decode_tokens,
        wall,
        kv_bytes_per_token,
    })
}

fn label(kv: KvCacheKind, paged: bool, bits: u8) -> String {
    match kv {
        KvCacheKind::Default if paged => "stock, paged attention (block 32)".into(),
        KvCacheKind::Default => "stock, engine KV cache (no paged attention)".into(),
        KvCacheKind::Palu if paged => {
            format!("--kv-cache palu, {bits}-bit latents in paged blocks (block 32)")
        }
        KvCacheKind::Palu => format!("--kv-cache palu, {bits}-bit latents"),
    }
}

/// KV bytes per token of the cache layout (all layers), as `palu inspect` computes it.
fn kv_bytes(dir: &Path, kv: KvCacheKind, bits: u8) -> Result<f64> {
    let i = palu::checkpoint::inspect(dir)?;
    Ok(match kv {
        KvCacheKind::Default => i.kv_bytes_default as f64,
        KvCacheKind::Palu => i
            .kv_bytes_palu
            .iter()
            .find(|x| x.0 == bits)
            .map_or(i.kv_bytes_default as f64, |x| x.1 as f64),
    })
}

fn main() -> Result<()> {
    let a = parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let t = Instant::now();
    let (dense, palu_dir) = checkpoints(&a)?;
    eprintln!("checkpoints ready in {:.1} s", t.elapsed().as_secs_f64());
    // Stock with its plain cache, Palu with 16-bit and `--latent-bits` latents, then stock with
    // upstream's paged attention (CUDA). A configuration that fails is reported, not fatal;
    // each row is printed as it finishes.
    // Paged attention last: where its kernel fails it can take the process down with it.
    let mut configs = Vec::new();
    let bits: &[u8] = if a.latent_bits == 16 {
        &[16]
    } else {
        &[16, a.latent_bits]
    };
    for c in &a.configs {
        match c.as_str() {
            "stock" => configs.push((&dense, KvCacheKind::Default, false, 16u8)),
            "palu" => configs.extend(
                bits.iter()
                    .map(|&b| (&palu_dir, KvCacheKind::Palu, false, b)),
            ),
            "palu-paged" if !a.cpu => configs.extend(
                bits.iter()
                    .map(|&b| (&palu_dir, KvCacheKind::Palu, true, b)),
            ),
            "stock-paged" if !a.cpu => configs.push((&dense, KvCacheKind::Default, true, 16)),
            _ => eprintln!("{c}: paged attention runs on CUDA only; skipped with --cpu"),
        }
    }
    let mut runs: Vec<std::result::Result<Run, (String, String)>> = Vec::new();
    for (dir, kv, paged, bits) in configs {
        let r = rt.block_on(serve(dir, kv, paged, bits, &a));
        match &r {
            Ok(r) => eprintln!(
                "{}: prefill {:.2} s, decode {:.2} s for {} tokens ({:.1} tok/s), wall {:.2} s",
                r.label,
                r.prompt_s,
                r.decode_s,
                r.decode_tokens,
                r.decode_tokens as f64 / r.decode_s,
                r.wall.as_secs_f64()
            ),
            Err(e) => eprintln!("{}: failed: {e:#}", label(kv, paged, bits)),
        }
        runs.push(r.map_err(|e| {
            (
                label(kv, paged, bits),
                format!("{e:#}").lines().next().unwrap_or("").to_string(),
            )
        }));
    }
    println!(
        "\nLlama-3-8B shape ({} layers, random weights, vocab 512, Palu-50 % g = {}), {} streams × {} prompt tokens, {} new tokens each, {}",
        a.layers,
        a.group_size,
        a.streams,
        a.context,
        a.gen,
        if a.cpu { "CPU f32" } else { "GPU bf16" }
    );
    println!(
        "| cache | prefill s (engine, worst stream) | decode s | decode tok/s | × stock | KV B/token | {}-token seqs in {} GiB | × stock | wall s |",
        a.context, a.budget_gib
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let tps = |r: &Run| r.decode_tokens as f64 / r.decode_s;
    let fit = |r: &Run| {
        (a.budget_gib * (1u64 << 30) as f64 / (r.kv_bytes_per_token * a.context as f64)).floor()
    };
    // The baseline: the first stock configuration that ran (else the first that ran).
    let Some(base) = runs
        .iter()
        .flatten()
        .find(|r| r.label.starts_with("stock"))
        .or_else(|| runs.iter().flatten().next())
    else {
        bail!("no configuration ran")
    };
    let (base_tps, base_fit) = (tps(base), fit(base));
    for r in &runs {
        match r {
            Ok(r) => println!(
                "| {} | {:.2} | {:.2} | {:.1} | {:.2}× | {:.0} | {:.0} | {:.2}× | {:.1} |",
                r.label,
                r.prompt_s,
                r.decode_s,
                tps(r),
                tps(r) / base_tps,
                r.kv_bytes_per_token,
                fit(r),
                fit(r) / base_fit,
                r.wall.as_secs_f64()
            ),
            Err((label, e)) => println!("| {label} | fails: {e} | | | | | | | |"),
        }
    }
    println!("(× stock: against {})", base.label);
    Ok(())
}
