//! The per-layer execution plan (DESIGN.md §4): for each layer, whether decode rebuilds K from
//! its latents or keeps K full (V-only Palu), and whether each KV head's `B_v` is applied after
//! attention or folded into `o_proj`. Chosen from a cost model whose constants were calibrated by
//! measured kernel times (docs/kernels.md, "Planner"), printed at startup and recorded in
//! `plan.toml` (`palu plan`).
//!
//! Time of one decode step of one layer, `B` sequences of `L` cached tokens (µs):
//! - latent keys: `max(bytes / BW, 2·B·L·g·dh·R_k / F_rebuild)`. The fused kernel is bound by
//!   instruction issue, not bytes, so `F_rebuild` is a measured rate, not a peak.
//! - full keys: `B·L·H_kv·dh·bytes / BW_full` (read once per KV head).
//! - values: the latent read `B·L·R_v·bytes / BW`, plus `o_proj`: its weight read and GEMM at
//!   width `H·dh` (unfused) or `(H/G)·R_v` (fused: one `r`-wide latent output per query head).
//!
//! Memory is the sure win and latency the contested one: keys stay latent unless a KV budget
//! larger than the latents is given, and then the layers where full keys save the most time
//! per extra byte keep full keys first.
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{read_to_string, PaluError};
use crate::lowrank::KvKind;

/// Constants of the cost model. Defaults: one H200, fitted by `palu calibrate` to the kernel
/// harness's stop-14 run (docs/bench/palu_decode_stop14*.md, the 48 rows with batch ≥ 8, every
/// row within ±21 % of the model) and the criterion rows of docs/kernels.md ("Planner").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostModel {
    /// Device-to-device copy bandwidth, TB/s (measured by the kernel harness: 4.26).
    pub hbm_tbps: f64,
    /// Effective FLOP rate of the fused kernel's key rebuild, TFLOP/s: the slope of its time
    /// over the rebuild FLOPs (the kernel is bound by instruction issue, not bytes).
    pub rebuild_tflops: f64,
    /// Fixed cost of one fused decode step (launches, split combine), µs: the fit's intercept.
    pub step_overhead_us: f64,
    /// Slowdown of the fused kernel when it reads packed latents (median 4-bit / fp16).
    pub packed_factor: f64,
    /// Bandwidth at which a full-K layer's decode (candle ops: q·Kᵀ per KV head, softmax, the
    /// latent values) reads K, TB/s: its whole time over the K bytes (criterion on the H200,
    /// 16K × batch 8: 3.57 ms for 268 MB, 0.075).
    pub full_keys_tbps: f64,
    /// Dense f16/bf16 GEMM rate of `o_proj`, TFLOP/s (assumed; at decode batch sizes `o_proj`
    /// is bound by its weight read, so this term is small).
    pub gemm_tflops: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel {
            hbm_tbps: 4.26,
            rebuild_tflops: 207.8,
            step_overhead_us: 38.3,
            packed_factor: 1.489,
            full_keys_tbps: 0.075,
            gemm_tflops: 600.0,
        }
    }
}

/// What the plan is made for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanInputs {
    /// Cached tokens per sequence the decode cost is evaluated at.
    pub context: usize,
    /// Concurrent sequences.
    pub batch: usize,
    /// Width of a cached value: 16, or 2/3/4/8 for packed rows.
    pub latent_bits: u8,
    /// KV bytes per token the plan may use, as a fraction of the stock 16-bit K/V cache. Absent:
    /// latents only (every layer keeps its keys latent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_budget: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keys {
    /// Cache `h_k`, rebuild `K = RoPE(B_k h_k)` at every step.
    Latent,
    /// Cache the full post-RoPE K (`W_k = B_k A_k`): V-only Palu for this layer.
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Values {
    /// Attend over the value latents, then apply each KV head's `B_v`, then `o_proj`.
    Unfused,
    /// `o_proj · B_v` folded into one matrix that reads the `r`-wide latent outputs directly.
    Fused,
}

/// One layer's choice and what the cost model says of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerPlan {
    pub layer: usize,
    pub keys: Keys,
    pub values: Values,
    /// The checkpoint's ranks (sum over groups), checked when the plan is loaded.
    pub k_rank: usize,
    pub v_rank: usize,
    /// Modeled decode time of the layer with this plan, and with latent keys and unfused values.
    pub est_us: f64,
    pub latent_unfused_us: f64,
}

/// A whole model's plan: what `plan.toml` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub inputs: PlanInputs,
    pub cost_model: CostModel,
    #[serde(rename = "layer")]
    pub layers: Vec<LayerPlan>,
}

/// The attention shape of one layer, as the cost model sees it.
#[derive(Debug, Clone)]
struct LayerShape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    /// Low-rank groups of K and V (G) and KV heads per group (g).
    k_groups: usize,
    v_groups: usize,
    k_rank: usize,
    v_rank: usize,
}

impl LayerShape {
    fn of(cfg: &ModelConfig, l: usize) -> Result<Self, PaluError> {
        let ranks = |kind| -> Result<&Vec<usize>, PaluError> {
            let m = ModelConfig::module_name(l, kind);
            cfg.head_wise_ranks
                .as_ref()
                .and_then(|hw| hw.get(&m))
                .ok_or_else(|| {
                    PaluError::invalid("config.json", format!("head_wise_ranks has no entry `{m}`"))
                })
        };
        let (k, v) = (ranks(KvKind::K)?, ranks(KvKind::V)?);
        Ok(LayerShape {
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            hidden: cfg.hidden_size,
            k_groups: k.len(),
            v_groups: v.len(),
            k_rank: k.iter().sum(),
            v_rank: v.iter().sum(),
        })
    }
}

/// Bytes one cached token takes in one layer: 16-bit values, or packed codes with an f16 scale
/// and an i16 zero per quantization group (`latent_codec`).
fn row_bytes(width: usize, groups: usize, bits: u8) -> f64 {
    if bits >= 16 {
        2.0 * width as f64
    } else {
        (width * bits as usize).div_ceil(8) as f64 + 4.0 * groups as f64
    }
}

/// One row of the kernel harness's table as the fit saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct FitRow {
    pub shape: String,
    pub g: usize,
    pub context: usize,
    pub batch: usize,
    /// Rebuild FLOPs of the step (`2·B·L·g·dh·R_k`).
    pub flops: f64,
    pub measured_us: f64,
    pub predicted_us: f64,
}

/// The cost model fitted to a harness run, with the rows it was fitted to.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub cost: CostModel,
    pub rows: Vec<FitRow>,
}

/// (H_kv, head_dim) of the harness's attention shapes (`kernels/bench/palu_decode_bench.cu`).
fn harness_shape(name: &str) -> Option<(usize, usize)> {
    match name {
        "llama3-8b" => Some((8, 128)),
        "llama2-7b" => Some((32, 128)),
        _ => None,
    }
}

impl CostModel {
    /// Fit the fused kernel's constants to the output of `palu_decode_bench` (its shape table,
    /// Palu-50 %: rank 64·g per group of g KV heads): `rebuild_tflops` and `step_overhead_us`
    /// by least squares (in relative error) of `t = overhead + FLOPs / F` over the rows with
    /// batch ≥ 8 (batch 1 is
    /// bound by occupancy, not by the rebuild), `packed_factor` as the median 4-bit / fp16 ratio
    /// of those rows, `hbm_tbps` from the copy line. The other constants come from `base`.
    pub fn fit_harness(text: &str, base: CostModel) -> Result<Calibration, String> {
        let mut cost = base;
        if let Some(line) = text
            .lines()
            .find(|l| l.starts_with("device-to-device copy:"))
        {
            let v = line
                .split_whitespace()
                .nth(2)
                .and_then(|x| x.parse::<f64>().ok())
                .ok_or_else(|| format!("cannot read the bandwidth in `{line}`"))?;
            cost.hbm_tbps = v;
        }
        let num = |c: &str| {
            c.split_whitespace()
                .next()
                .and_then(|x| x.parse::<f64>().ok())
        };
        let mut rows: Vec<FitRow> = Vec::new();
        let mut packed = Vec::new();
        // Columns by the header's names where the table has one (stop 12 on: columns were
        // added over time); the stop-10 format by position: ["", shape, g, L, batch, fp16 µs,
        // roofline, ×, %, stock, 8-bit, 4-bit, ...].
        // The header comes after the first copy of the rows (printed as they are measured).
        let (mut col_fp16, mut col_4bit) = (5, 11);
        let split = |line: &str| {
            line.split('|')
                .map(str::trim)
                .map(String::from)
                .collect::<Vec<_>>()
        };
        if let Some(head) = text
            .lines()
            .map(split)
            .find(|c| c.get(1).map(String::as_str) == Some("shape"))
        {
            let find = |name: &str| {
                head.iter()
                    .position(|c| c == name)
                    .ok_or_else(|| format!("harness header without the column `{name}`"))
            };
            col_fp16 = find("Palu-50% fp16 µs")?;
            col_4bit = find("4-bit µs (× roofline, × stock)")?;
        }
        for line in text.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let Some((h_kv, dh)) = cells.get(1).and_then(|s| harness_shape(s)) else {
                continue;
            };
            let parse = || -> Option<(usize, usize, usize, f64)> {
                let g = cells.get(2)?.parse().ok()?;
                let l = cells.get(3)?.strip_suffix('K')?.parse::<usize>().ok()? * 1024;
                let b = cells.get(4)?.parse().ok()?;
                Some((g, l, b, num(cells.get(col_fp16)?)?))
            };
            let Some((g, l, b, us)) = parse() else {
                return Err(format!("cannot read the harness row `{line}`"));
            };
            if b < 8 {
                continue;
            }
            // The harness prints each row as it is measured and again under the header.
            let key = |r: &FitRow| (r.shape == cells[1], r.g, r.context, r.batch);
            if rows.iter().any(|r| key(r) == (true, g, l, b)) {
                continue;
            }
            let r_k = 64 * h_kv; // Palu-50 %: 64·g per group, H_kv/g groups
            let flops = 2.0 * (b * l * g * dh * r_k) as f64;
            if g == 1 {
                if let Some(p4) = cells.get(col_4bit).and_then(|c| num(c)) {
                    packed.push(p4 / us);
                }
            }
            rows.push(FitRow {
                shape: cells[1].to_string(),
                g,
                context: l,
                batch: b,
                flops,
                measured_us: us,
                predicted_us: 0.0,
            });
        }
        if rows.len() < 2 {
            return Err(
                "fewer than two harness rows with batch ≥ 8: is this palu_decode_bench's output?"
                    .into(),
            );
        }
        // Least squares of t = c + s·flops in relative error (weights 1/t²): the rows span
        // 50 µs to 6 ms, and a plain fit would serve the largest rows only.
        let w: Vec<f64> = rows.iter().map(|r| r.measured_us.powi(-2)).collect();
        let sw: f64 = w.iter().sum();
        let (mx, my) = rows.iter().zip(&w).fold((0.0, 0.0), |(a, b), (r, w)| {
            (a + w * r.flops / sw, b + w * r.measured_us / sw)
        });
        let (sxy, sxx) = rows.iter().zip(&w).fold((0.0, 0.0), |(a, b), (r, w)| {
            (
                a + w * (r.flops - mx) * (r.measured_us - my),
                b + w * (r.flops - mx).powi(2),
            )
        });
        let slope = sxy / sxx; // µs per FLOP
        if !(slope.is_finite() && slope > 0.0) {
            return Err(
                "the harness rows do not grow with the rebuild FLOPs; nothing to fit".into(),
            );
        }
        cost.rebuild_tflops = 1e-6 / slope; // FLOP/µs = 1e6 FLOP/s; ÷ 1e12 for TFLOP/s
        cost.step_overhead_us = (my - slope * mx).max(0.0);
        if !packed.is_empty() {
            packed.sort_by(f64::total_cmp);
            cost.packed_factor = packed[packed.len() / 2];
        }
        for r in &mut rows {
            r.predicted_us = cost.step_overhead_us + slope * r.flops;
        }
        Ok(Calibration { cost, rows })
    }

    fn us(bytes: f64, tbps: f64) -> f64 {
        bytes / (tbps * 1e12) * 1e6
    }

    fn keys_us(&self, s: &LayerShape, keys: Keys, inp: &PlanInputs) -> f64 {
        let n = (inp.batch * inp.context) as f64;
        match keys {
            Keys::Latent => {
                let g = s.kv_heads / s.k_groups;
                let flops = 2.0 * n * (g * s.head_dim * s.k_rank) as f64;
                let issue = flops / (self.rebuild_tflops * 1e12) * 1e6;
                let bytes = Self::us(
                    n * row_bytes(s.k_rank, s.k_groups, inp.latent_bits),
                    self.hbm_tbps,
                );
                let packed = if inp.latent_bits < 16 {
                    self.packed_factor
                } else {
                    1.0
                };
                issue.max(bytes) * packed
            }
            Keys::Full => Self::us(
                n * row_bytes(s.kv_heads * s.head_dim, s.kv_heads, inp.latent_bits),
                self.full_keys_tbps,
            ),
        }
    }

    /// Width of `o_proj`'s input: `H·dh`, or one `r`-wide latent per query head when fused.
    fn o_width(s: &LayerShape, values: Values) -> usize {
        match values {
            Values::Unfused => s.heads * s.head_dim,
            // Each group's r_i-wide latent serves its H/G query heads: Σ = H·R_v/G.
            Values::Fused => s.heads * s.v_rank / s.v_groups,
        }
    }

    fn values_us(&self, s: &LayerShape, values: Values, inp: &PlanInputs) -> f64 {
        let n = (inp.batch * inp.context) as f64;
        let latents = Self::us(
            n * row_bytes(s.v_rank, s.v_groups, inp.latent_bits),
            self.hbm_tbps,
        );
        let w = (s.hidden * Self::o_width(s, values)) as f64;
        let o_proj = Self::us(2.0 * w, self.hbm_tbps)
            + 2.0 * inp.batch as f64 * w / (self.gemm_tflops * 1e12) * 1e6;
        latents + o_proj
    }

    /// Rounded to 0.1 µs: the model is not more precise than that, and plan.toml stays readable.
    fn layer_us(&self, s: &LayerShape, keys: Keys, values: Values, inp: &PlanInputs) -> f64 {
        let us =
            self.step_overhead_us + self.keys_us(s, keys, inp) + self.values_us(s, values, inp);
        (us * 10.0).round() / 10.0
    }
}

impl Plan {
    /// Plan every layer of a Palu checkpoint's config.
    pub fn make(cfg: &ModelConfig, inputs: PlanInputs, cost: CostModel) -> Result<Plan, PaluError> {
        if !cfg.is_palu {
            return Err(PaluError::invalid(
                "config.json",
                format!(
                    "model_type `{}` is not a Palu checkpoint: compress it first (`palu compress`)",
                    cfg.family.model_type()
                ),
            ));
        }
        crate::quant::check_bits(inputs.latent_bits)
            .map_err(|e| PaluError::arg("latent_bits", inputs.latent_bits, e.to_string()))?;
        if inputs.context == 0 || inputs.batch == 0 {
            return Err(PaluError::arg(
                "context × batch",
                format!("{} × {}", inputs.context, inputs.batch),
                "both must be at least 1",
            ));
        }
        if let Some(b) = inputs.kv_budget {
            if !(b.is_finite() && b > 0.0) {
                return Err(PaluError::arg(
                    "kv_budget",
                    b,
                    "a positive fraction of the stock 16-bit K/V cache",
                ));
            }
        }
        let shapes = (0..cfg.num_layers)
            .map(|l| LayerShape::of(cfg, l))
            .collect::<Result<Vec<_>, _>>()?;
        let mut layers: Vec<LayerPlan> = shapes
            .iter()
            .enumerate()
            .map(|(l, s)| {
                let cost_of = |v| cost.values_us(s, v, &inputs);
                let values = if cost_of(Values::Fused) < cost_of(Values::Unfused) {
                    Values::Fused
                } else {
                    Values::Unfused
                };
                LayerPlan {
                    layer: l,
                    keys: Keys::Latent,
                    values,
                    k_rank: s.k_rank,
                    v_rank: s.v_rank,
                    est_us: cost.layer_us(s, Keys::Latent, values, &inputs),
                    latent_unfused_us: cost.layer_us(s, Keys::Latent, Values::Unfused, &inputs),
                }
            })
            .collect();
        if let Some(budget) = inputs.kv_budget {
            let bits = inputs.latent_bits;
            let stock: f64 = shapes
                .iter()
                .map(|s| 2.0 * row_bytes(s.kv_heads * s.head_dim, s.kv_heads, 16))
                .sum();
            let latent = |s: &LayerShape| row_bytes(s.k_rank, s.k_groups, bits);
            let full = |s: &LayerShape| row_bytes(s.kv_heads * s.head_dim, s.kv_heads, bits);
            let mut used: f64 = shapes
                .iter()
                .map(|s| latent(s) + row_bytes(s.v_rank, s.v_groups, bits))
                .sum();
            // Layers where full keys are faster, best time saved per extra byte first.
            let mut gains: Vec<(usize, f64, f64)> = shapes
                .iter()
                .enumerate()
                .filter_map(|(l, s)| {
                    let dt = cost.keys_us(s, Keys::Latent, &inputs)
                        - cost.keys_us(s, Keys::Full, &inputs);
                    let db = full(s) - latent(s);
                    (dt > 0.0).then_some((l, dt, db))
                })
                .collect();
            gains.sort_by(|a, b| (b.1 / b.2.max(1.0)).total_cmp(&(a.1 / a.2.max(1.0))));
            for (l, _, db) in gains {
                if used + db <= budget * stock {
                    used += db;
                    let p = &mut layers[l];
                    p.keys = Keys::Full;
                    p.est_us = cost.layer_us(&shapes[l], Keys::Full, p.values, &inputs);
                }
            }
        }
        Ok(Plan {
            inputs,
            cost_model: cost,
            layers,
        })
    }

    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("a plan serializes");
        format!(
            "# The per-layer execution plan of this Palu checkpoint (`palu plan`; docs/kernels.md,\n\
             # \"Planner\"). The server reads it from the checkpoint directory and prints it at\n\
             # startup. keys: latent (rebuild K from h_k) | full (cache K: V-only Palu);\n\
             # values: unfused (B_v after attention) | fused (B_v folded into o_proj).\n{body}"
        )
    }

    pub fn from_toml_file(path: &Path) -> Result<Plan, PaluError> {
        toml::from_str(&read_to_string(path)?).map_err(|e| PaluError::Toml {
            path: path.into(),
            msg: e.to_string(),
        })
    }

    /// A plan made for another checkpoint (other layer count or ranks) is an error naming the
    /// file and the layer.
    pub fn check(&self, cfg: &ModelConfig, path: &Path) -> Result<(), PaluError> {
        if self.layers.len() != cfg.num_layers {
            return Err(PaluError::invalid(
                path,
                format!(
                    "the plan has {} layers, the checkpoint {}; re-run `palu plan` on this checkpoint",
                    self.layers.len(),
                    cfg.num_layers
                ),
            ));
        }
        for (l, p) in self.layers.iter().enumerate() {
            let s = LayerShape::of(cfg, l)?;
            if p.layer != l || p.k_rank != s.k_rank || p.v_rank != s.v_rank {
                return Err(PaluError::invalid(
                    path,
                    format!(
                        "layer[{l}] (layer = {}, k_rank = {}, v_rank = {}) does not match the checkpoint's layer {l} (k_rank = {}, v_rank = {}); re-run `palu plan` on this checkpoint",
                        p.layer, p.k_rank, p.v_rank, s.k_rank, s.v_rank
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn full_key_layers(&self) -> Vec<usize> {
        self.layers
            .iter()
            .filter(|p| p.keys == Keys::Full)
            .map(|p| p.layer)
            .collect()
    }

    pub fn fused_value_layers(&self) -> Vec<usize> {
        self.layers
            .iter()
            .filter(|p| p.values == Values::Fused)
            .map(|p| p.layer)
            .collect()
    }

    /// One startup line.
    pub fn summary(&self) -> String {
        let (est, base): (f64, f64) = self.layers.iter().fold((0.0, 0.0), |(a, b), p| {
            (a + p.est_us, b + p.latent_unfused_us)
        });
        format!(
            "palu plan ({} tokens × {} sequences, {}-bit): keys full in layers {:?}, values fused in layers {:?}; modeled decode step {:.0} µs (latent keys, unfused values: {:.0} µs)",
            self.inputs.context,
            self.inputs.batch,
            self.inputs.latent_bits,
            self.full_key_layers(),
            self.fused_value_layers(),
            est,
            base
        )
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inputs;
        writeln!(
            f,
            "plan for {} cached tokens × {} sequences, {}-bit latents{}",
            i.context,
            i.batch,
            i.latent_bits,
            match i.kv_budget {
                Some(b) => format!(", KV budget {:.0}% of the stock 16-bit cache", 100.0 * b),
                None => ", latent keys only (no KV budget given)".into(),
            }
        )?;
        writeln!(
            f,
            "| layer | K rank | V rank | keys | values | modeled µs | latent+unfused µs |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|")?;
        for p in &self.layers {
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {:.1} | {:.1} |",
                p.layer,
                p.k_rank,
                p.v_rank,
                format!("{:?}", p.keys).to_lowercase(),
                format!("{:?}", p.values).to_lowercase(),
                p.est_us,
                p.latent_unfused_us
            )?;
        }
        write!(f, "{}", self.summary())
    }
}

impl fmt::Display for Calibration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.cost;
        writeln!(
            f,
            "fitted: rebuild {:.1} TFLOP/s, step overhead {:.1} µs, packed factor {:.2}, copy bandwidth {:.2} TB/s ({} rows, batch ≥ 8)",
            c.rebuild_tflops,
            c.step_overhead_us,
            c.packed_factor,
            c.hbm_tbps,
            self.rows.len()
        )?;
        writeln!(
            f,
            "| shape | g | L | batch | GFLOP | measured µs | model µs | error |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|")?;
        for r in &self.rows {
            writeln!(
                f,
                "| {} | {} | {}K | {} | {:.1} | {:.1} | {:.1} | {:+.0}% |",
                r.shape,
                r.g,
                r.context / 1024,
                r.batch,
                r.flops / 1e9,
                r.measured_us,
                r.predicted_us,
                100.0 * (r.predicted_us / r.measured_us - 1.0)
            )?;
        }
        Ok(())
    }
}
