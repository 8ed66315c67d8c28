//! The accuracy sweep behind docs/accuracy.md: calibrate once, then compress with every
//! configuration of a grid and measure perplexity, printing a Markdown table and writing JSON.
//!
//! cargo run --release --example accuracy -- MODEL_DIR --calib C4.jsonl --text WIKI.txt \
//!     --seq-len 1024 --windows 8 --grid main --out out/accuracy-smollm2.json
use std::path::PathBuf;

use clap::Parser;
use palu::alloc_config::HadamardMode;
use palu::compress::{compress_with, prepare, CompressOptions};
use palu::eval::{eval_tokens, perplexity, Protocol};
use palu::model::{LatentQuant, Model};
use palu::quant::ZeroPoint;
use palu::ranks::RankSearch;

#[derive(Parser)]
struct Args {
    model: PathBuf,
    #[arg(long)]
    calib: PathBuf,
    #[arg(long)]
    text: PathBuf,
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    windows: usize,
    #[arg(long, default_value_t = 16)]
    calib_samples: usize,
    #[arg(long, default_value_t = 1024)]
    calib_seq_len: usize,
    #[arg(long, default_value_t = 8)]
    fisher_samples: usize,
    #[arg(long, value_enum, default_value_t = Protocol::Auto)]
    protocol: Protocol,
    /// Comma-separated group sizes.
    #[arg(long, default_value = "1,3")]
    groups: String,
    /// Comma-separated kept ratios.
    #[arg(long, default_value = "0.7,0.5,0.3")]
    ratios: String,
    /// Comma-separated method:multiple entries.
    #[arg(long, default_value = "uniform:32,fisher-uniform:32,waterfill:8")]
    methods: String,
    /// Extra 16-bit rows, comma-separated g:ratio:method:multiple.
    #[arg(long, default_value = "")]
    extra: String,
    /// Write the palu.toml of this g:ratio:method:multiple to PATH (as `SPEC=PATH`).
    #[arg(long)]
    save_config: Option<String>,
    /// Latent-bit rows (bits with and without Hadamard) for this g:ratio:method:multiple.
    #[arg(long)]
    bits_for: Option<String>,
    #[arg(long, default_value = "8,4,3,2")]
    bits: String,
    /// Zero points for the latent-bit rows: free (palu-rs) and/or clamped (the authors').
    #[arg(long, default_value = "free")]
    zero_points: String,
    /// Print the per-layer latent outlier table (peak/RMS before and after rotation) of every row.
    #[arg(long)]
    outliers: bool,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Row {
    group_size: usize,
    method: String,
    rank_multiple: usize,
    target_ratio: f64,
    kv_reduction: f64,
    latent_bits: u8,
    hadamard: bool,
    zero_point: String,
    perplexity: f64,
    rel_baseline: f64,
    outlier_peak_to_rms: Option<(f64, f64)>,
}

fn list<T: std::str::FromStr>(s: &str) -> Vec<T> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.trim().parse().ok().expect("bad list item"))
        .collect()
}

fn method(s: &str) -> RankSearch {
    <RankSearch as clap::ValueEnum>::from_str(s, true).expect("method")
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let base_opts = CompressOptions {
        calib: Some(a.calib.clone()),
        calib_samples: a.calib_samples,
        calib_seq_len: a.calib_seq_len,
        fisher_samples: a.fisher_samples,
        rank_search: RankSearch::FisherUniform,
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let (cfg, weights, model, cal, _) = prepare(&a.model, &base_opts)?;
    eprintln!("calibration + Fisher: {:.0} s", t0.elapsed().as_secs_f64());
    let tok = palu::tokenizer::load(&a.model)?;
    let text = std::fs::read_to_string(&a.text)?;
    let ids = eval_tokens(&tok, &text, a.protocol, cfg.bos_token_id)?;
    let base = if a.windows > 0 {
        perplexity(&model, &ids, a.seq_len, Some(a.windows))?.perplexity
    } else {
        f64::NAN
    };
    println!(
        "model {} | text {} | {} windows × {} | baseline ppl {:.3}",
        a.model.display(),
        a.text.display(),
        a.windows,
        a.seq_len,
        base
    );
    println!();
    println!(
        "| g | allocation | target kept | real KV reduction | bits | Hadamard | ppl | × baseline |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    let mut run = |g: usize,
                   m: &str,
                   mult: usize,
                   ratio: f64,
                   bits: u8,
                   had: bool,
                   zp: ZeroPoint|
     -> anyhow::Result<()> {
        let opts = CompressOptions {
            group_size: g,
            rank_search: method(m),
            rank_multiple: mult,
            ratio,
            hadamard: if had {
                HadamardMode::On
            } else {
                HadamardMode::Off
            },
            ..base_opts.clone()
        };
        let c = compress_with(
            &cfg,
            palu::model::Weights {
                dir: a.model.clone(),
                tensors: weights.tensors.clone(),
                shapes: Default::default(),
            },
            &model,
            &cal,
            &opts,
            &a.model.join("config.json"),
        )?;
        if let Some((spec, path)) = a.save_config.as_deref().and_then(|s| s.split_once('=')) {
            if spec == format!("{g}:{ratio}:{m}:{mult}") && bits >= 16 && !had {
                std::fs::write(path, c.alloc.to_toml())?;
            }
        }
        let mut pm: Model = c.model()?;
        pm.latent_quant = LatentQuant::bits(bits).map(|q| LatentQuant {
            zero_point: zp,
            ..q
        });
        let p = if a.windows > 0 {
            perplexity(&pm, &ids, a.seq_len, Some(a.windows))?.perplexity
        } else {
            f64::NAN
        };
        if a.outliers {
            println!("\nlatent peak/RMS per layer (g={g}, {m}/{mult}, ratio {ratio}): K before → after rotation, V before → after");
            for l in 0..cfg.num_layers {
                let k = c
                    .outliers
                    .get(&(l, palu::lowrank::KvKind::K))
                    .copied()
                    .unwrap_or((f64::NAN, f64::NAN));
                let v = c
                    .outliers
                    .get(&(l, palu::lowrank::KvKind::V))
                    .copied()
                    .unwrap_or((f64::NAN, f64::NAN));
                println!(
                    "layer {l:>2}: K {:6.2} → {:6.2}   V {:6.2} → {:6.2}",
                    k.0, k.1, v.0, v.1
                );
            }
            println!();
        }
        let red = c.alloc.compression.achieved_kv_reduction;
        let n = c.outliers.len().max(1) as f64;
        let outl = (!c.outliers.is_empty()).then(|| {
            (
                c.outliers.values().map(|o| o.0).sum::<f64>() / n,
                c.outliers.values().map(|o| o.1).sum::<f64>() / n,
            )
        });
        println!(
            "| {g} | {m}/{mult} | {ratio} | {:.1}% | {bits}{} | {} | {p:.3} | {:.3} |",
            100.0 * red,
            if bits < 16 && zp == ZeroPoint::Clamped {
                " (clamped zero)"
            } else {
                ""
            },
            if had { "yes" } else { "no" },
            p / base
        );
        rows.push(Row {
            group_size: g,
            method: m.into(),
            rank_multiple: mult,
            target_ratio: ratio,
            kv_reduction: red,
            latent_bits: bits,
            hadamard: had,
            zero_point: format!("{zp:?}"),
            perplexity: p,
            rel_baseline: p / base,
            outlier_peak_to_rms: outl,
        });
        Ok(())
    };
    for g in list::<usize>(&a.groups) {
        for ratio in list::<f64>(&a.ratios) {
            for mm in a.methods.split(',') {
                let (m, mult) = mm.split_once(':').unwrap_or((mm, "32"));
                run(g, m, mult.parse()?, ratio, 16, false, ZeroPoint::Free)?;
            }
        }
    }
    for spec in a.extra.split(',').filter(|s| !s.is_empty()) {
        let p: Vec<&str> = spec.split(':').collect();
        run(
            p[0].parse()?,
            p[2],
            p[3].parse()?,
            p[1].parse()?,
            16,
            false,
            ZeroPoint::Free,
        )?;
    }
    if let Some(spec) = &a.bits_for {
        let p: Vec<&str> = spec.split(':').collect();
        let (g, ratio, m, mult): (usize, f64, &str, usize) =
            (p[0].parse()?, p[1].parse()?, p[2], p[3].parse()?);
        for zp in a.zero_points.split(',') {
            let zp = <ZeroPoint as clap::ValueEnum>::from_str(zp, true).expect("zero point");
            for bits in list::<u8>(&a.bits) {
                for had in [false, true] {
                    run(g, m, mult, ratio, bits, had, zp)?;
                }
            }
        }
    }
    if let Some(out) = &a.out {
        std::fs::write(
            out,
            serde_json::to_string_pretty(&serde_json::json!({"baseline": base, "rows": rows}))?,
        )?;
    }
    Ok(())
}
