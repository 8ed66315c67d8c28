//! The compression pipeline: calibrate, whiten, decompose, allocate ranks, rotate, write.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use faer::Mat;

use crate::alloc_config::{
    AllocConfig, CalibrationInfo, CompressionInfo, Decompose, HadamardMode, LayerRanks, ModelInfo,
};
use crate::config::ModelConfig;
use crate::decompose::{mat_to_tensor, tensor_to_mat, Gram, GroupSvd, Whitening};
use crate::error::PaluError;
use crate::lowrank::{KvKind, LowRankProj};
use crate::model::{KvProj, Model, Site, Weights};
use crate::ranks::{self, ModuleStats, RankSearch, Ranks};

#[derive(Debug, Clone)]
pub struct CompressOptions {
    pub ratio: f64,
    pub group_size: usize,
    pub decompose: Decompose,
    pub rank_search: RankSearch,
    pub rank_multiple: usize,
    pub calib: Option<PathBuf>,
    pub calib_samples: usize,
    pub calib_seq_len: usize,
    pub fisher_samples: usize,
    pub seed: u64,
    pub hadamard: HadamardMode,
    pub latent_bits: u8,
    /// Re-apply this stored allocation instead of searching.
    pub config: Option<(PathBuf, AllocConfig)>,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions {
            ratio: 0.5,
            group_size: 1,
            decompose: Decompose::Whiten,
            rank_search: RankSearch::Waterfill,
            rank_multiple: 8,
            calib: None,
            calib_samples: 16,
            calib_seq_len: 1024,
            fisher_samples: 8,
            seed: 0,
            hadamard: HadamardMode::Off,
            latent_bits: 16,
            config: None,
        }
    }
}

/// What a compression produced, in memory (written by [`compress_to_dir`]).
pub struct Compressed {
    pub cfg: ModelConfig,
    pub weights: Weights,
    pub factors: BTreeMap<(usize, KvKind), LowRankProj>,
    pub alloc: AllocConfig,
    /// Per module: latent max/RMS channel ratio before and after rotation (outlier measure).
    pub outliers: BTreeMap<(usize, KvKind), (f64, f64)>,
}

impl Compressed {
    /// The compressed model, ready to evaluate.
    pub fn model(&self) -> Result<Model, PaluError> {
        let mut m = Model::from_weights(self.cfg.clone(), &self.weights)?;
        for l in 0..self.cfg.num_layers {
            m.set_palu(
                l,
                self.factors[&(l, KvKind::K)].clone(),
                self.factors[&(l, KvKind::V)].clone(),
            );
        }
        Ok(m)
    }
}

fn validate(cfg: &ModelConfig, opts: &CompressOptions, dir: &Path) -> Result<(), PaluError> {
    if cfg.is_palu {
        return Err(PaluError::invalid(
            dir.join("config.json"),
            "is already a Palu checkpoint; compress the original model",
        ));
    }
    if !(opts.ratio > 0.0 && opts.ratio <= 1.0) {
        return Err(PaluError::arg(
            "--ratio",
            opts.ratio,
            "must be in (0, 1]: the kept fraction of the K/V width (0.5 = Palu-50%)",
        ));
    }
    let g = opts.group_size;
    if g == 0 || !cfg.num_kv_heads.is_multiple_of(g) {
        return Err(PaluError::arg(
            "--group-size",
            g,
            format!(
                "must divide num_key_value_heads = {} (1 = per head, {} = all heads jointly)",
                cfg.num_kv_heads, cfg.num_kv_heads
            ),
        ));
    }
    if opts.rank_multiple == 0 {
        return Err(PaluError::arg("--rank-multiple", 0, "must be at least 1"));
    }
    crate::quant::check_bits(opts.latent_bits)?;
    Ok(())
}

/// Compress the model in `model_dir` and write a checkpoint to `out`.
pub fn compress_to_dir(
    model_dir: &Path,
    out: &Path,
    opts: &CompressOptions,
) -> Result<Compressed, PaluError> {
    if out.exists() {
        return Err(PaluError::invalid(
            out,
            "already exists; remove it or choose another output directory",
        ));
    }
    let c = compress(model_dir, opts)?;
    crate::checkpoint::write_checkpoint(out, model_dir, &c.cfg, &c.weights, &c.factors, &c.alloc)?;
    Ok(c)
}

/// Everything compression learns from the calibration text; shared by every configuration of
/// one model (the sweep behind docs/accuracy.md reuses it).
pub struct Calibration {
    pub grams: Vec<Gram>,
    /// The first window's K/V inputs per layer, `[t, d]` (outlier statistics, Hadamard auto).
    pub samples: Vec<Option<Tensor>>,
    pub fisher: Option<crate::fisher::FisherInfo>,
    pub info: Option<CalibrationInfo>,
}

/// Load the model, run calibration as `opts` needs it.
pub fn prepare(
    model_dir: &Path,
    opts: &CompressOptions,
) -> Result<(ModelConfig, Weights, Model, Calibration, CompressOptions), PaluError> {
    let dev = Device::Cpu;
    let cfg = ModelConfig::from_file(&model_dir.join("config.json"))?;
    let mut opts = opts.clone();
    if let Some((path, ac)) = &opts.config {
        ac.validate_for(&cfg, path)?;
        opts.group_size = ac.compression.group_size;
        opts.decompose = ac.compression.decompose;
        opts.latent_bits = ac.compression.latent_bits;
        opts.hadamard = ac.compression.hadamard;
        opts.rank_multiple = ac.compression.rank_multiple;
        opts.rank_search = ac.compression.rank_search;
        opts.ratio = ac.compression.target_ratio;
    }
    validate(&cfg, &opts, model_dir)?;
    let weights = Weights::load(model_dir, &dev)?;
    let model = Model::from_weights(cfg.clone(), &weights)?;
    let needs_fisher = opts.config.is_none() && opts.rank_search.needs_fisher();
    let needs_calib =
        opts.decompose == Decompose::Whiten || needs_fisher || opts.hadamard == HadamardMode::Auto;
    let cal = if needs_calib {
        let calib = opts.calib.clone().ok_or_else(|| {
            PaluError::arg("--calib", "<none>", "is required for whitening, Fisher rank search and --hadamard auto (e.g. the C4 sample)")
        })?;
        let tok = crate::tokenizer::load(model_dir)?;
        let cal = calibrate(&model, &tok, &calib, &opts, needs_fisher)?;
        if let (Some((path, ac)), Some(now)) = (&opts.config, &cal.info) {
            if let Some(then) = &ac.calibration {
                if then.sha256 != now.sha256 {
                    tracing::warn!(
                        "{}: ranks were searched with calibration file {} (sha256 {}), whitening now uses {} (sha256 {})",
                        path.display(), then.source, then.sha256, now.source, now.sha256
                    );
                }
            }
        }
        cal
    } else {
        Calibration {
            grams: (0..cfg.num_layers)
                .map(|_| Gram::new(cfg.hidden_size))
                .collect(),
            samples: vec![None; cfg.num_layers],
            fisher: None,
            info: None,
        }
    };
    Ok((cfg, weights, model, cal, opts))
}

/// XᵀX of every layer's K/V input over the calibration windows, and Fisher information if asked.
pub fn calibrate(
    model: &Model,
    tok: &tokenizers::Tokenizer,
    calib: &Path,
    opts: &CompressOptions,
    fisher: bool,
) -> Result<Calibration, PaluError> {
    let cfg = &model.cfg;
    let n = opts
        .calib_samples
        .max(if fisher { opts.fisher_samples } else { 0 });
    let windows = crate::calib::windows(tok, calib, n, opts.calib_seq_len, opts.seed)?;
    let (sha, bytes) = crate::calib::file_sha256(calib)?;
    let info = CalibrationInfo {
        source: calib
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        sha256: sha,
        bytes,
        samples: opts.calib_samples,
        seq_len: opts.calib_seq_len,
        fisher_samples: if fisher { opts.fisher_samples } else { 0 },
        seed: opts.seed,
    };
    let mut grams: Vec<Gram> = (0..cfg.num_layers)
        .map(|_| Gram::new(cfg.hidden_size))
        .collect();
    let mut samples: Vec<Option<Tensor>> = vec![None; cfg.num_layers];
    tracing::info!(
        "calibrating on {} × {} tokens of {}",
        opts.calib_samples,
        opts.calib_seq_len,
        calib.display()
    );
    let pb = crate::progress::bar(opts.calib_samples as u64, "calibrate");
    for (wi, w) in windows.iter().take(opts.calib_samples).enumerate() {
        let ids = Tensor::new(w.as_slice(), &model.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(cerr)?;
        let mut probe = |l: usize, site: Site, x: &Tensor| -> candle_core::Result<()> {
            if site == Site::KvInput {
                grams[l].accumulate(x)?;
                if wi == 0 {
                    samples[l] = Some(x.squeeze(0)?);
                }
            }
            Ok(())
        };
        model.forward(&ids, None, Some(&mut probe)).map_err(cerr)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    let fisher = if fisher {
        tracing::info!(
            "Fisher information from {} backward passes of {} tokens",
            opts.fisher_samples,
            opts.calib_seq_len
        );
        Some(crate::fisher::fisher_info(model, &windows[..opts.fisher_samples]).map_err(cerr)?)
    } else {
        None
    };
    Ok(Calibration {
        grams,
        samples,
        fisher,
        info: Some(info),
    })
}

pub fn compress(model_dir: &Path, opts: &CompressOptions) -> Result<Compressed, PaluError> {
    let (cfg, weights, model, cal, opts) = prepare(model_dir, opts)?;
    compress_with(
        &cfg,
        weights,
        &model,
        &cal,
        &opts,
        &model_dir.join("config.json"),
    )
}

/// Decompose, allocate and rotate with a finished calibration.
pub fn compress_with(
    cfg: &ModelConfig,
    weights: Weights,
    model: &Model,
    cal: &Calibration,
    opts: &CompressOptions,
    cfg_path: &Path,
) -> Result<Compressed, PaluError> {
    validate(cfg, opts, cfg_path.parent().unwrap_or(Path::new(".")))?;
    let dev = Device::Cpu;
    let (d, dh, hkv, g) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_kv_heads,
        opts.group_size,
    );
    let groups = hkv / g;
    let gdh = g * dh;
    let grams = &cal.grams;
    let samples = &cal.samples;

    // 2. Whitening and the full SVD of every group.
    let mut whitening = Vec::with_capacity(cfg.num_layers);
    for (l, gram) in grams.iter().enumerate() {
        whitening.push(match opts.decompose {
            Decompose::Whiten => Whitening::from_gram(gram, l)?,
            Decompose::Svd => Whitening::identity(d),
        });
    }
    let mut svds: BTreeMap<(usize, KvKind), Vec<GroupSvd>> = BTreeMap::new();
    tracing::info!(
        "decomposing {} layers × K/V into {groups} group(s) of {g} head(s) ({:?})",
        cfg.num_layers,
        opts.decompose
    );
    let pb = crate::progress::bar((cfg.num_layers * 2) as u64, "decompose");
    for l in 0..cfg.num_layers {
        let KvProj::Dense { k, v } = &model.layers[l].attn.kv else {
            unreachable!("validated dense")
        };
        for (kind, lin) in [(KvKind::K, k), (KvKind::V, v)] {
            let w = tensor_to_mat(&lin.w).map_err(cerr)?;
            let mut gs = Vec::with_capacity(groups);
            for gi in 0..groups {
                let wi = w.subrows(gi * gdh, gdh);
                gs.push(GroupSvd::new(wi, &whitening[l])?);
            }
            svds.insert((l, kind), gs);
            pb.inc(1);
        }
    }
    pb.finish_and_clear();

    // 3. Ranks: stored, or searched.
    let ranks: Ranks = if let Some((_, ac)) = &opts.config {
        ac.ranks()
    } else {
        if opts.rank_search.needs_fisher() && cal.fisher.is_none() {
            return Err(PaluError::arg(
                "--rank-search",
                format!("{:?}", opts.rank_search),
                "needs Fisher information from calibration",
            ));
        }
        let stats: Vec<ModuleStats> = svds
            .iter()
            .map(|(&(l, kind), gs)| {
                let f = match &cal.fisher {
                    Some(f) => {
                        Some(crate::fisher::summarize(&f[&(l, kind)], groups).map_err(cerr)?)
                    }
                    None => None,
                };
                let gram = &grams[l];
                let power = if gram.n_tokens > 0 {
                    (0..d).map(|i| gram.xtx[(i, i)]).sum::<f64>() / (gram.n_tokens * d) as f64
                } else {
                    1.0
                };
                Ok(ModuleStats {
                    layer: l,
                    kind,
                    group_width: gdh,
                    group_cap: gdh.min(d),
                    fisher: f.as_ref().map_or(1.0, |f| f.mean),
                    group_fisher: f.map_or(vec![1.0; groups], |f| f.group_means),
                    input_power: power,
                    sigmas: gs.iter().map(|s| s.sigma.clone()).collect(),
                })
            })
            .collect::<Result<_, PaluError>>()?;
        ranks::allocate(opts.rank_search, &stats, opts.ratio, opts.rank_multiple)
    };

    tracing::info!(
        "ranks allocated ({:?}): KV reduction {:.2}%",
        opts.rank_search,
        100.0 * ranks::kv_reduction(&ranks, hkv * dh)
    );
    // 4. Factors, with the rotation folded in where asked.
    let mut factors = BTreeMap::new();
    let mut outliers = BTreeMap::new();
    let mut had_flags: BTreeMap<(usize, KvKind), bool> = BTreeMap::new();
    for (&(l, kind), gs) in &svds {
        let module = ModelConfig::module_name(l, kind);
        let rs = &ranks[&(l, kind)];
        let mut downs = Vec::new();
        let mut ups = Vec::new();
        let mut rot_downs = Vec::new();
        let mut rot_ups = Vec::new();
        for (gi, (svd, &r)) in gs.iter().zip(rs).enumerate() {
            let (a, b) = svd.factors(r, &whitening[l], &format!("{module} group {gi}"))?;
            let (t, _) = crate::hadamard::rotation(r, opts.seed);
            rot_downs.push(&t * &a);
            rot_ups.push(&b * t.transpose());
            downs.push(a);
            ups.push(b);
        }
        let bias = match &model.layers[l].attn.kv {
            KvProj::Dense { k, v } => match kind {
                KvKind::K => k.b.clone(),
                KvKind::V => v.b.clone(),
            },
            _ => None,
        };
        let plain = build_proj(&downs, &ups, bias.clone(), &dev)?;
        let rotated = build_proj(&rot_downs, &rot_ups, bias, &dev)?;
        let stored_flag = opts.config.as_ref().and_then(|(_, ac)| {
            ac.layers.iter().find(|x| x.index == l).map(|x| {
                if kind == KvKind::K {
                    x.hadamard_k
                } else {
                    x.hadamard_v
                }
            })
        });
        let sample = samples[l].as_ref();
        if let Some(x) = sample {
            let o0 = outlier_ratio(&plain, x).map_err(cerr)?;
            let o1 = outlier_ratio(&rotated, x).map_err(cerr)?;
            outliers.insert((l, kind), (o0, o1));
        }
        let use_rot = match (stored_flag, opts.hadamard) {
            (Some(f), _) if opts.hadamard != HadamardMode::Auto => f,
            (_, HadamardMode::Off) => false,
            (_, HadamardMode::On) => true,
            (_, HadamardMode::Auto) => {
                let bits = if opts.latent_bits >= 16 {
                    4
                } else {
                    opts.latent_bits
                };
                match sample {
                    Some(x) => {
                        quant_error(&rotated, x, bits).map_err(cerr)?
                            < quant_error(&plain, x, bits).map_err(cerr)?
                    }
                    None => false,
                }
            }
        };
        had_flags.insert((l, kind), use_rot);
        factors.insert((l, kind), if use_rot { rotated } else { plain });
    }

    let alloc = AllocConfig {
        format_version: crate::alloc_config::FORMAT_VERSION,
        model: ModelInfo {
            model_type: cfg.family.model_type().into(),
            num_layers: cfg.num_layers,
            hidden_size: d,
            num_kv_heads: hkv,
            head_dim: dh,
            source: cfg
                .raw
                .get("_name_or_path")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            config_sha256: crate::calib::file_sha256(cfg_path).ok().map(|(s, _)| s),
        },
        compression: CompressionInfo {
            group_size: g,
            decompose: opts.decompose,
            rank_search: opts.rank_search,
            target_ratio: opts.ratio,
            rank_multiple: opts.rank_multiple,
            hadamard: opts.hadamard,
            latent_bits: opts.latent_bits,
            achieved_kv_reduction: (ranks::kv_reduction(&ranks, hkv * dh) * 1e4).round() / 1e4,
        },
        calibration: cal.info.clone(),
        layers: (0..cfg.num_layers)
            .map(|l| LayerRanks {
                index: l,
                k: ranks[&(l, KvKind::K)].clone(),
                v: ranks[&(l, KvKind::V)].clone(),
                hadamard_k: had_flags[&(l, KvKind::K)],
                hadamard_v: had_flags[&(l, KvKind::V)],
            })
            .collect(),
    };
    Ok(Compressed {
        cfg: cfg.clone(),
        weights,
        factors,
        alloc,
        outliers,
    })
}

fn cerr(e: candle_core::Error) -> PaluError {
    PaluError::arg("compute", "candle", crate::error::candle_msg(&e))
}

fn build_proj(
    downs: &[Mat<f64>],
    ups: &[Mat<f64>],
    bias: Option<Tensor>,
    dev: &Device,
) -> Result<LowRankProj, PaluError> {
    let downs: Vec<Tensor> = downs
        .iter()
        .map(|a| mat_to_tensor(a.as_ref(), dev))
        .collect::<candle_core::Result<_>>()
        .map_err(cerr)?;
    let ups: Vec<Tensor> = ups
        .iter()
        .map(|b| mat_to_tensor(b.as_ref(), dev))
        .collect::<candle_core::Result<_>>()
        .map_err(cerr)?;
    let down = Tensor::cat(&downs, 0).map_err(cerr)?;
    LowRankProj::new(down, ups, bias).map_err(cerr)
}

/// Peak-to-RMS ratio of the latents of `x`: the largest |h| of any channel over the RMS of all
/// entries. Large when a few channels carry outliers (what the rotation is meant to remove).
pub fn outlier_ratio(p: &LowRankProj, x: &Tensor) -> candle_core::Result<f64> {
    let h = p.latent(x)?; // [t, R]
    let peak = h.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let rms = h.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()? as f64;
    Ok(peak / rms.max(1e-30))
}

/// Relative squared error of the rebuilt projection when latents are quantized to `bits`.
pub fn quant_error(p: &LowRankProj, x: &Tensor, bits: u8) -> candle_core::Result<f64> {
    let h = p.latent(x)?;
    let hq = crate::quant::fake_quant(&h, bits, &p.ranks, None, crate::quant::ZeroPoint::Free)?;
    let y = p.reconstruct(&h)?;
    let yq = p.reconstruct(&hq)?;
    let num = (yq - &y)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let den = y.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok(num / den.max(1e-30))
}
