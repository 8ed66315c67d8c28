//! Fisher information of every `k_proj` / `v_proj` weight from real gradients of the LM loss:
//! `fisher = sqrt(Σ_batches grad² / n_batches)` elementwise; a module's importance is the mean
//! of its entries, a group's the mean over the group's rows.
use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use crate::lowrank::KvKind;
use crate::model::{token_nll, KvProj, Linear, Model};

#[derive(Debug, Clone)]
pub struct ModuleFisher {
    pub mean: f64,
    pub group_means: Vec<f64>,
}

/// Elementwise `sqrt(Σ grad² / n)` of every `k_proj` / `v_proj` weight.
pub type FisherInfo = BTreeMap<(usize, KvKind), Tensor>;

/// Run a backward pass per calibration window.
pub fn fisher_info(model: &Model, windows: &[Vec<u32>]) -> candle_core::Result<FisherInfo> {
    let mut m = model.clone();
    m.grad = true;
    m.latent_quant = None;
    let mut vars: Vec<((usize, KvKind), Var)> = Vec::new();
    for (l, blk) in m.layers.iter_mut().enumerate() {
        if let KvProj::Dense { k, v } = &mut blk.attn.kv {
            let kv = Var::from_tensor(&k.w)?;
            let vv = Var::from_tensor(&v.w)?;
            *k = Linear {
                w: kv.as_tensor().clone(),
                b: k.b.clone(),
            };
            *v = Linear {
                w: vv.as_tensor().clone(),
                b: v.b.clone(),
            };
            vars.push(((l, KvKind::K), kv));
            vars.push(((l, KvKind::V), vv));
        } else {
            candle_core::bail!(
                "Fisher information needs the dense model (layer {l} is already low-rank)"
            )
        }
    }
    let mut sums: Vec<Option<Tensor>> = vec![None; vars.len()];
    let pb = crate::progress::bar(windows.len() as u64, "fisher");
    for w in windows {
        let ids = Tensor::new(w.as_slice(), &m.device)?;
        let logits = m.forward(&ids.unsqueeze(0)?, None, None)?.squeeze(0)?;
        let loss = token_nll(&logits, &ids)?.mean_all()?;
        let grads = loss.backward()?;
        for (i, (_, var)) in vars.iter().enumerate() {
            let g2 = grads.get(var.as_tensor()).map(|g| g.sqr()).transpose()?;
            if let Some(g2) = g2 {
                sums[i] = Some(match sums[i].take() {
                    Some(s) => (s + g2)?,
                    None => g2,
                });
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let n = windows.len().max(1) as f64;
    let mut out = FisherInfo::new();
    for ((key, var), sum) in vars.iter().zip(sums) {
        let f = match sum {
            Some(s) => (s / n)?.sqrt()?,
            None => var.as_tensor().zeros_like()?,
        };
        out.insert(*key, f);
    }
    Ok(out)
}

/// Module and per-group importance from elementwise Fisher values `[G·g·dh, d]`.
pub fn summarize(f: &Tensor, groups: usize) -> candle_core::Result<ModuleFisher> {
    let mean = f.mean_all()?.to_scalar::<f32>()? as f64;
    let rows = f.dim(0)? / groups;
    let group_means = (0..groups)
        .map(|g| {
            Ok(f.narrow(0, g * rows, rows)?
                .mean_all()?
                .to_scalar::<f32>()? as f64)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(ModuleFisher { mean, group_means })
}
