//! `palu`: compress Llama-family models with Palu low-rank KV projections, inspect and evaluate them.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use palu::alloc_config::{AllocConfig, Decompose, HadamardMode};
use palu::compress::CompressOptions;
use palu::eval::Protocol;
use palu::ranks::RankSearch;

#[derive(Parser)]
#[command(
    name = "palu",
    version,
    about = "Palu KV-cache compression for mistral.rs: low-rank K/V projections (arXiv 2407.21118)",
    long_about = "Palu caches a low-rank latent h = x·A of each token instead of its keys and values, and rebuilds K = h·B \
(then RoPE) and V at attention time.\n\nTypical flow:\n  palu convert-gguf model.gguf model/          # only if the model ships as GGUF\n  \
palu compress model/ model-palu/ --ratio 0.5 --calib c4.jsonl\n  palu inspect model-palu/\n  palu eval ppl model-palu/ --text wiki.test.raw --seq-len 1024"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert a GGUF Llama-family file to a Hugging Face directory (config.json, model.safetensors, tokenizer).
    ConvertGguf {
        /// The .gguf file (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and K-quants are dequantized to f32).
        input: PathBuf,
        /// Output directory (must not exist; written atomically).
        output: PathBuf,
    },
    /// Decompose k_proj/v_proj into low-rank factors and write a Palu checkpoint plus its palu.toml.
    Compress(CompressArgs),
    /// Summarise a checkpoint: ranks per layer, KV bytes per token before and after, tensor checks.
    Inspect {
        checkpoint: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also print how many sequences of --seq-len tokens fit in this much KV cache (GiB),
        /// for the default cache and each Palu latent width.
        #[arg(long, value_name = "GIB")]
        kv_budget: Option<f64>,
        /// Sequence length for --kv-budget.
        #[arg(long, default_value_t = 32768, value_name = "TOKENS")]
        seq_len: usize,
    },
    /// Plan each layer's decode: latent or full keys (V-only Palu), B_v after attention or folded
    /// into o_proj. Prints the table and writes plan.toml, which the server reads from the
    /// checkpoint directory (or --palu-plan / kv_cache.plan).
    Plan(PlanArgs),
    /// Fit the planner's cost model to a run of the kernel harness (`palu_decode_bench`'s
    /// output): prints the fit per row and writes the constants for `palu plan --cost-model`.
    Calibrate {
        /// The harness output (e.g. docs/bench/palu_decode_stop13.md); several files (one run per
        /// model) are read as one.
        #[arg(required = true)]
        harness: Vec<PathBuf>,
        /// Where to write the cost model TOML; `-` prints it.
        #[arg(long, default_value = "-")]
        out: PathBuf,
    },
    /// Evaluate a plain model or a Palu checkpoint.
    #[command(subcommand)]
    Eval(EvalCmd),
    /// Write a random-weight checkpoint with a real architecture's shapes (speed runs, tests; never a proof of accuracy).
    Synth(SynthArgs),
    /// Greedy generation from a prompt (plain or Palu model; Palu layers cache latents).
    Generate {
        model: PathBuf,
        /// Prompt text; empty for BOS only.
        #[arg(long, default_value = "")]
        prompt: String,
        /// Prepend the BOS token.
        #[arg(long)]
        bos: bool,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Simulated latent bits (2, 3, 4, 8; 16 = none).
        #[arg(long, default_value_t = 16)]
        latent_bits: u8,
    },
}

#[derive(Args)]
struct SynthArgs {
    /// Output directory (written atomically; must not exist).
    output: PathBuf,
    /// Shapes: llama3-8b, llama2-7b, smollm2-135m or tiny.
    #[arg(long, default_value = "tiny")]
    shape: String,
    /// Number of layers (default: the architecture's).
    #[arg(long)]
    layers: Option<usize>,
    /// Stored element type: f32, f16 or bf16 (a full Llama-3-8B is 16 GB in bf16).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Write a Palu checkpoint with random factors keeping this fraction of each group's
    /// g·head_dim (e.g. 0.5 for Palu-50 %), instead of dense k_proj / v_proj.
    #[arg(long)]
    palu_ratio: Option<f64>,
    /// KV heads per low-rank group for --palu-ratio (1: M-LRD, all: J-LRD).
    #[arg(long, default_value_t = 1)]
    group_size: usize,
    /// Copy tokenizer.json (and tokenizer_config.json) from this model directory, so the
    /// engine can serve the checkpoint (its vocabulary must not exceed the shape's).
    #[arg(long)]
    tokenizer_from: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct PlanArgs {
    /// A Palu checkpoint directory.
    checkpoint: PathBuf,
    /// Cached tokens per sequence the decode step is costed at.
    #[arg(long, default_value_t = 32768, value_name = "TOKENS")]
    context: usize,
    /// Concurrent sequences.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Latent width the server will cache: 16, or 2/3/4/8 packed.
    #[arg(long, default_value_t = 16)]
    latent_bits: u8,
    /// KV bytes the plan may use, as a fraction of the stock 16-bit K/V cache (e.g. 0.75):
    /// layers whose full keys save the most time per extra byte keep full keys. Without it
    /// every layer keeps latent keys (the memory the checkpoint was compressed for).
    #[arg(long, value_name = "FRACTION")]
    kv_budget: Option<f64>,
    /// Cost-model constants (a TOML table with the fields of `[cost_model]` in plan.toml);
    /// default: the H200 calibration in docs/kernels.md.
    #[arg(long)]
    cost_model: Option<PathBuf>,
    /// Where to write the plan (default: <checkpoint>/plan.toml); `-` prints it only.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Perplexity over non-overlapping windows (every token but each window's first is scored).
    Ppl(PplArgs),
}

#[derive(Args)]
struct PplArgs {
    model: PathBuf,
    /// Evaluation text (e.g. wikitext-2-raw-test.txt, tinystories-sample.txt).
    #[arg(long)]
    text: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Score only the first N windows.
    #[arg(long)]
    windows: Option<usize>,
    /// Simulated low-bit latents (quantize-dequantize per token and group): 2, 3, 4, 8 or 16 (off).
    #[arg(long, default_value_t = 16)]
    latent_bits: u8,
    /// Latents as float8 e4m3 (no scale, as mistral.rs's `--pa-cache-type f8e4m3` stores K/V)
    /// instead of integer codes; implies 8 bits.
    #[arg(long)]
    fp8: bool,
    /// Simulate the key rebuild in float8 e4m3, as an fp8 tensor-core kernel would run it: B_k
    /// scaled per row, each latent scaled per token and group, rounded to e4m3 before the product.
    /// Needs a Palu checkpoint.
    #[arg(long)]
    fp8_rebuild: bool,
    /// Zero point of the quantizer: free (palu-rs) or clamped to the code range (the authors').
    #[arg(long, value_enum, default_value_t = palu::quant::ZeroPoint::Free)]
    zero_point: palu::quant::ZeroPoint,
    /// Split each low-rank group's latent into quantization sub-groups of this many channels.
    #[arg(long)]
    quant_group: Option<usize>,
    /// Tokenization protocol (auto: stories when the text has <|endoftext|>, else wikitext).
    #[arg(long, value_enum, default_value_t = Protocol::Auto)]
    protocol: Protocol,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CompressArgs {
    /// Hugging Face model directory (Llama, Mistral or Qwen2).
    model: PathBuf,
    /// Output directory for the Palu checkpoint (must not exist; written atomically).
    output: PathBuf,
    /// Kept fraction of the K/V width (0.5 = Palu-50%); the achieved value after rounding is reported.
    #[arg(long, default_value_t = 0.5)]
    ratio: f64,
    /// KV heads per low-rank group: 1 = M-LRD, num_kv_heads = J-LRD, between = G-LRD.
    #[arg(long, default_value_t = 1)]
    group_size: usize,
    #[arg(long, value_enum, default_value_t = Decompose::Whiten)]
    decompose: Decompose,
    /// waterfill (palu-rs, best measured) | fisher-uniform (the authors' default) | fisher (per group) | uniform.
    #[arg(long, value_enum, default_value_t = RankSearch::Waterfill)]
    rank_search: RankSearch,
    /// Round every group rank to a multiple of this [default: 8 for waterfill, 32 (the authors'
    /// kernel tile) otherwise].
    #[arg(long)]
    rank_multiple: Option<usize>,
    /// Calibration text or JSONL file with a `text` field per line (e.g. the C4 sample).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration windows for whitening.
    #[arg(long, default_value_t = 16)]
    calib_samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 1024)]
    calib_seq_len: usize,
    /// Calibration windows for the Fisher backward passes.
    #[arg(long, default_value_t = 8)]
    fisher_samples: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fold an orthonormal (Hadamard) rotation into the factors: off, on, or auto (per module, where it helps).
    #[arg(long, value_enum, default_value_t = HadamardMode::Off, num_args = 0..=1, default_missing_value = "on")]
    hadamard: HadamardMode,
    /// Bits the latents will be cached at (recorded in palu.toml; guides --hadamard auto).
    #[arg(long, default_value_t = 16)]
    latent_bits: u8,
    /// Re-apply a stored rank allocation (palu.toml) instead of searching.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PALU_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Synth(a) => {
            let Some(mut spec) = palu::synth::SynthSpec::preset(&a.shape, a.layers, a.seed) else {
                anyhow::bail!(
                    "--shape {}: unknown; one of llama3-8b, llama2-7b, smollm2-135m, tiny",
                    a.shape
                )
            };
            spec.dtype = match a.dtype.as_str() {
                "f32" => candle_core::DType::F32,
                "f16" => candle_core::DType::F16,
                "bf16" => candle_core::DType::BF16,
                other => anyhow::bail!("--dtype {other}: one of f32, f16, bf16"),
            };
            if let Some(ratio) = a.palu_ratio {
                if !(ratio > 0.0 && ratio <= 1.0) {
                    anyhow::bail!("--palu-ratio {ratio}: must be in (0, 1]")
                }
                spec.palu = Some(palu::synth::SynthPalu {
                    group_size: a.group_size,
                    ratio,
                });
            }
            palu::checkpoint::write_dir_atomically(&a.output, |tmp| {
                palu::synth::write(&spec, tmp, a.tokenizer_from.as_deref())
            })?;
            println!(
                "wrote {} ({} layers, {} heads / {} KV heads of {}{}, {:?}, random weights)",
                a.output.display(),
                spec.layers,
                spec.heads,
                spec.kv_heads,
                spec.head_dim,
                spec.palu
                    .map(|p| format!(
                        ", Palu rank {} per group of {}",
                        p.rank(spec.head_dim),
                        p.group_size
                    ))
                    .unwrap_or_default(),
                spec.dtype
            );
        }
        Cmd::ConvertGguf { input, output } => {
            let c = palu::gguf::convert(&input, &output)?;
            let types: Vec<String> = c
                .tensor_types
                .iter()
                .map(|(t, n)| format!("{n}×{t}"))
                .collect();
            println!(
                "converted {} ({}; {} tensors: {}) -> {}",
                input.display(),
                c.architecture,
                c.num_tensors,
                types.join(", "),
                output.display()
            );
        }
        Cmd::Compress(a) => {
            let config = match &a.config {
                Some(p) => Some((p.clone(), AllocConfig::from_file(p)?)),
                None => None,
            };
            let opts = CompressOptions {
                ratio: a.ratio,
                group_size: a.group_size,
                decompose: a.decompose,
                rank_search: a.rank_search,
                rank_multiple: a.rank_multiple.unwrap_or(
                    if a.rank_search == RankSearch::Waterfill {
                        8
                    } else {
                        32
                    },
                ),
                calib: a.calib,
                calib_samples: a.calib_samples,
                calib_seq_len: a.calib_seq_len,
                fisher_samples: a.fisher_samples,
                seed: a.seed,
                hadamard: a.hadamard,
                latent_bits: a.latent_bits,
                config,
            };
            let c = palu::compress::compress_to_dir(&a.model, &a.output, &opts)?;
            let comp = &c.alloc.compression;
            println!(
                "wrote {} ({:?}, g={}, {:?}): KV reduction {:.2}% (target {:.0}%)",
                a.output.display(),
                comp.rank_search,
                comp.group_size,
                comp.decompose,
                100.0 * comp.achieved_kv_reduction,
                100.0 * (1.0 - comp.target_ratio)
            );
            println!(
                "rank allocation: {}",
                a.output.join(palu::checkpoint::ALLOC_FILE).display()
            );
        }
        Cmd::Inspect {
            checkpoint,
            json,
            kv_budget,
            seq_len,
        } => {
            let r = palu::checkpoint::inspect(&checkpoint)?;
            let cap = kv_budget.map(|g| r.capacity(g, seq_len)).transpose()?;
            if json {
                let mut v = serde_json::to_value(&r)?;
                if let Some(c) = &cap {
                    v["capacity"] = serde_json::to_value(c)?;
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{r}");
                if let Some(c) = &cap {
                    print!("{c}");
                }
            }
        }
        Cmd::Plan(a) => {
            let cfg = palu::config::ModelConfig::from_file(&a.checkpoint.join("config.json"))?;
            let cost = match &a.cost_model {
                Some(p) => toml::from_str(&palu::error::read_to_string(p)?).map_err(|e| {
                    palu::PaluError::Toml {
                        path: p.clone(),
                        msg: e.to_string(),
                    }
                })?,
                None => palu::planner::CostModel::default(),
            };
            let inputs = palu::planner::PlanInputs {
                context: a.context,
                batch: a.batch,
                latent_bits: a.latent_bits,
                kv_budget: a.kv_budget,
            };
            let plan = palu::planner::Plan::make(&cfg, inputs, cost)?;
            println!("{plan}");
            let out = a.out.unwrap_or_else(|| a.checkpoint.join("plan.toml"));
            if out.as_os_str() != "-" {
                std::fs::write(&out, plan.to_toml()).map_err(|e| palu::PaluError::io(&out, e))?;
                println!("wrote {}", out.display());
            }
        }
        Cmd::Calibrate { harness, out } => {
            let mut text = String::new();
            for h in &harness {
                let one = palu::error::read_to_string(h)?;
                // Each file must be a harness run on its own, so an error names its file.
                palu::planner::CostModel::fit_harness(&one, Default::default())
                    .map_err(|m| palu::PaluError::invalid(h, m))?;
                text += &one;
                text.push('\n');
            }
            let cal = palu::planner::CostModel::fit_harness(&text, Default::default())
                .map_err(|m| palu::PaluError::invalid(&harness[0], m))?;
            print!("{cal}");
            let names: Vec<String> = harness.iter().map(|h| h.display().to_string()).collect();
            let toml = format!(
                "# palu calibrate {}\n{}",
                names.join(" "),
                toml::to_string(&cal.cost).expect("a cost model serializes")
            );
            if out.as_os_str() == "-" {
                print!("{toml}");
            } else {
                std::fs::write(&out, toml).map_err(|e| palu::PaluError::io(&out, e))?;
                println!("wrote {}", out.display());
            }
        }
        Cmd::Eval(EvalCmd::Ppl(a)) => {
            palu::quant::check_bits(a.latent_bits)?;
            let mut model = palu::model::Model::load(&a.model, &candle_core::Device::Cpu)?;
            model.latent_quant = if a.fp8 {
                Some(palu::model::LatentQuant::fp8())
            } else {
                palu::model::LatentQuant::bits(a.latent_bits).map(|q| palu::model::LatentQuant {
                    zero_point: a.zero_point,
                    sub_group: a.quant_group,
                    ..q
                })
            };
            if a.fp8_rebuild && model.use_fp8_key_rebuild()? == 0 {
                return Err(palu::PaluError::invalid(
                    &a.model,
                    "--fp8-rebuild needs a Palu checkpoint (this model has no low-rank K/V layers)",
                )
                .into());
            }
            let tok = palu::tokenizer::load(&a.model)?;
            let text =
                std::fs::read_to_string(&a.text).map_err(|e| palu::PaluError::io(&a.text, e))?;
            let ids = palu::eval::eval_tokens(&tok, &text, a.protocol, model.cfg.bos_token_id)?;
            let p = palu::eval::perplexity(&model, &ids, a.seq_len, a.windows)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                println!("model       {}", a.model.display());
                println!("text        {} ({} tokens)", a.text.display(), ids.len());
                println!(
                    "windows     {} of {} × {} tokens, {} scored",
                    p.windows, p.total_windows, a.seq_len, p.scored_tokens
                );
                println!(
                    "latents     {}",
                    if a.fp8 {
                        "float8 e4m3 (simulated)".to_string()
                    } else if a.latent_bits < 16 {
                        format!("{}-bit (simulated)", a.latent_bits)
                    } else {
                        "16-bit".into()
                    }
                );
                if a.fp8_rebuild {
                    println!("key rebuild float8 e4m3 (simulated: B_k per row, latents per token and group)");
                }
                println!("perplexity  {:.4}", p.perplexity);
            }
        }
        Cmd::Generate {
            model,
            prompt,
            bos,
            max_tokens,
            latent_bits,
        } => {
            palu::quant::check_bits(latent_bits)?;
            let mut m = palu::model::Model::load(&model, &candle_core::Device::Cpu)?;
            m.latent_quant = palu::model::LatentQuant::bits(latent_bits);
            let tok = palu::tokenizer::load(&model)?;
            let mut ids = Vec::new();
            if bos {
                ids.extend(m.cfg.bos_token_id);
            }
            ids.extend(palu::tokenizer::encode(&tok, &prompt)?);
            let eos = m
                .cfg
                .raw
                .get("eos_token_id")
                .and_then(|v| v.as_u64())
                .map(|v| v as u32);
            let out = m.generate_greedy(&ids, max_tokens, eos)?;
            let text = tok
                .decode(&out, true)
                .map_err(|e| anyhow::anyhow!("decode: {e}"))?;
            println!("{prompt}{text}");
        }
    }
    Ok(())
}
