//! The per-layer planner: which choice the cost model makes where, that a KV budget is never
//! exceeded, that plan.toml round-trips and that a plan for another checkpoint is refused.
use std::collections::BTreeMap;
use std::path::Path;

use palu::config::ModelConfig;
use palu::planner::{CostModel, Keys, Plan, PlanInputs, Values};

/// A Llama-3-8B-shaped Palu config (32/8 heads × 128) with the given (K, V) ranks per group and
/// layer; `g` KV heads per group.
fn llama3_palu(g: usize, ranks: &[(usize, usize)]) -> ModelConfig {
    let groups = 8 / g;
    let mut hw = BTreeMap::new();
    for (l, &(rk, rv)) in ranks.iter().enumerate() {
        hw.insert(
            format!("model.layers.{l}.self_attn.k_proj"),
            vec![rk; groups],
        );
        hw.insert(
            format!("model.layers.{l}.self_attn.v_proj"),
            vec![rv; groups],
        );
    }
    let json = serde_json::json!({
        "model_type": "palullama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": ranks.len(), "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "head_wise_ranks": hw,
    });
    ModelConfig::from_json_str(&json.to_string(), Path::new("config.json")).unwrap()
}

fn inputs(context: usize, batch: usize, kv_budget: Option<f64>) -> PlanInputs {
    PlanInputs {
        context,
        batch,
        latent_bits: 16,
        kv_budget,
    }
}

/// Stock 16-bit K/V bytes per token of a layer, and what a plan's layer caches.
fn stock_bytes(cfg: &ModelConfig) -> f64 {
    (cfg.num_layers * 2 * 2 * cfg.kv_width()) as f64
}
fn plan_bytes(cfg: &ModelConfig, plan: &Plan) -> f64 {
    plan.layers
        .iter()
        .map(|p| {
            let k = match p.keys {
                Keys::Latent => p.k_rank,
                Keys::Full => cfg.kv_width(),
            };
            (2 * (k + p.v_rank)) as f64
        })
        .sum()
}

#[test]
fn values_are_fused_exactly_where_a_group_rank_is_below_head_dim() {
    // Per group of g KV heads: rank < 128 (g = 1) → o_proj reads H·r < H·dh inputs.
    for (g, r, fused) in [
        (1, 64, true),
        (1, 120, true),
        (1, 128, false),
        (2, 128, false),
        (4, 256, false),
    ] {
        let cfg = llama3_palu(g, &[(r, r); 2]);
        let plan = Plan::make(&cfg, inputs(16384, 8, None), CostModel::default()).unwrap();
        for p in &plan.layers {
            assert_eq!(p.values == Values::Fused, fused, "g={g} r={r}: {p:?}");
            assert_eq!(p.keys, Keys::Latent, "no budget: keys stay latent");
            assert!(p.est_us <= p.latent_unfused_us, "{p:?}");
        }
    }
}

/// A cost model in which full keys pay: a full-K decode path at 2 TB/s. The measured one (candle
/// ops, 0.075 TB/s) never beats the fused kernel, so with the defaults keys always stay latent.
fn fast_full_keys() -> CostModel {
    CostModel {
        full_keys_tbps: 2.0,
        ..CostModel::default()
    }
}

#[test]
fn with_the_measured_executors_keys_stay_latent_whatever_the_budget() {
    let cfg = llama3_palu(4, &[(128, 256), (480, 256)]);
    let plan = Plan::make(&cfg, inputs(32768, 16, Some(1.0)), CostModel::default()).unwrap();
    assert!(plan.full_key_layers().is_empty(), "{plan}");
}

#[test]
fn a_kv_budget_buys_full_keys_where_they_save_most_and_is_never_exceeded() {
    // Four layers of rising key rank; at g = 4 every rebuild costs 4× the FLOPs of g = 1.
    let cfg = llama3_palu(4, &[(128, 256), (256, 256), (384, 256), (480, 256)]);
    let latent = Plan::make(&cfg, inputs(32768, 16, None), fast_full_keys()).unwrap();
    let stock = stock_bytes(&cfg);
    let base = plan_bytes(&cfg, &latent);
    assert!(latent.full_key_layers().is_empty());
    let mut last = 0;
    for budget in [0.3, base / stock, 0.6, 0.7, 0.8, 0.9, 1.0] {
        let plan = Plan::make(&cfg, inputs(32768, 16, Some(budget)), fast_full_keys()).unwrap();
        let used = plan_bytes(&cfg, &plan);
        // A budget below the latents' own size buys nothing (the latents are the floor).
        assert!(
            used <= (budget * stock).max(base) + 1e-9,
            "budget {budget}: {used} of {stock} bytes"
        );
        let full = plan.full_key_layers();
        assert!(
            full.len() >= last,
            "a larger budget never takes full keys away"
        );
        last = full.len();
        // The highest key ranks gain most per extra byte: full keys fill from the top.
        let expect: Vec<usize> = (4 - full.len()..4).collect();
        assert_eq!(full, expect, "budget {budget}");
        let total = |p: &Plan| p.layers.iter().map(|l| l.est_us).sum::<f64>();
        assert!(total(&plan) <= total(&latent) + 1e-9);
    }
    assert_eq!(
        last, 4,
        "the whole stock budget: every layer whose full keys are faster"
    );
}

#[test]
fn plan_toml_round_trips_and_reads_as_a_table() {
    let cfg = llama3_palu(1, &[(64, 64), (96, 128), (128, 32)]);
    let plan = Plan::make(&cfg, inputs(32768, 16, Some(0.75)), fast_full_keys()).unwrap();
    let text = plan.to_toml();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.toml");
    std::fs::write(&path, &text).unwrap();
    let back = Plan::from_toml_file(&path).unwrap();
    assert_eq!(back, plan);
    back.check(&cfg, &path).unwrap();
    insta::assert_snapshot!("plan_toml", text);
    insta::assert_snapshot!("plan_table", plan.to_string());
}

#[test]
fn a_plan_for_other_ranks_or_layers_names_the_file_and_layer() {
    let cfg = llama3_palu(1, &[(64, 64), (64, 64)]);
    let plan = Plan::make(&cfg, inputs(4096, 1, None), CostModel::default()).unwrap();
    let other = llama3_palu(1, &[(64, 64), (72, 64)]);
    let fewer = llama3_palu(1, &[(64, 64)]);
    let p = Path::new("ckpt/plan.toml");
    let errs = [
        plan.check(&other, p).unwrap_err().to_string(),
        plan.check(&fewer, p).unwrap_err().to_string(),
        Plan::make(&cfg, inputs(0, 1, None), CostModel::default())
            .unwrap_err()
            .to_string(),
        Plan::make(&cfg, inputs(4096, 1, Some(-1.0)), CostModel::default())
            .unwrap_err()
            .to_string(),
    ];
    insta::assert_snapshot!("plan_errors", errs.join("\n"));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("plan.toml");
    std::fs::write(&bad, "[inputs]\ncontext = \"long\"\n").unwrap();
    let e = Plan::from_toml_file(&bad).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}: invalid TOML", bad.display())),
        "{e}"
    );
    assert!(e.contains("context"), "{e}");
}

/// The default cost model is the fit of the committed harness run, and `fit_harness` reads a
/// harness table: constants, per-row predictions, and a clear error for anything else.
#[test]
fn the_default_cost_model_is_the_fit_of_the_committed_h200_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Stop 13's run, one file per model (palu calibrate reads them as one text), and the header
    // of the configs file it wrote naming them.
    let files = [
        "docs/bench/palu_decode_stop14.md",
        "docs/bench/palu_decode_stop14_llama2.md",
    ];
    let text: String = files
        .iter()
        .map(|f| std::fs::read_to_string(root.join(f)).unwrap() + "\n")
        .collect();
    let toml = std::fs::read_to_string(root.join("configs/h200.cost-model.toml")).unwrap();
    assert!(
        toml.starts_with(&format!("# palu calibrate {}\n", files.join(" "))),
        "{toml}"
    );
    let cal = CostModel::fit_harness(&text, CostModel::default()).unwrap();
    let d = CostModel::default();
    let close = |a: f64, b: f64| (a / b - 1.0).abs() < 2e-3;
    assert!(close(cal.cost.rebuild_tflops, d.rebuild_tflops), "{cal}");
    assert!(
        close(cal.cost.step_overhead_us, d.step_overhead_us),
        "{cal}"
    );
    assert!(close(cal.cost.packed_factor, d.packed_factor), "{cal}");
    assert!(close(cal.cost.hbm_tbps, d.hbm_tbps), "{cal}");
    assert_eq!(
        cal.rows.len(),
        48,
        "both models, g = 1, 2 and 4, 4K-128K, batch 8 and 32, each row once (printed twice)"
    );
    for r in &cal.rows {
        let err = r.predicted_us / r.measured_us - 1.0;
        assert!(err.abs() < 0.25, "{r:?}");
    }
    let e = CostModel::fit_harness("| shape | g |\n|---|---|\n", CostModel::default()).unwrap_err();
    assert_eq!(e, "harness header without the column `Palu-50% fp16 µs`");
    let e = CostModel::fit_harness("no table here\n", CostModel::default()).unwrap_err();
    assert!(e.contains("fewer than two harness rows"), "{e}");
}
