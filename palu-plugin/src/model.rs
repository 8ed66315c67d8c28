//! A plain candle implementation of the Llama family (Llama, Mistral, Qwen2) whose K/V
//! projections can be dense or Palu low-rank.
//!
//! The Palu attention caches the pre-RoPE latents `h = x·Aᵀ` and, at every step, rebuilds
//! `K = RoPE(B_k h_k)` once per KV head (reused by its query heads) and `V = B_v h_v`: the same
//! math the serving path runs. With `grad` on, every op used has a backward pass so that the
//! Fisher statistics can be taken through this very code.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor, D};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::PaluError;
use crate::lowrank::{linear, KvKind, LowRankProj};
use crate::quant;

#[derive(Debug, Clone)]
pub struct Linear {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.w, self.b.as_ref())
    }
}

/// K/V projections of one layer.
#[derive(Debug, Clone)]
pub enum KvProj {
    Dense { k: Linear, v: Linear },
    Palu { k: LowRankProj, v: LowRankProj },
}

/// Where a probe sees an intermediate value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// Input of `k_proj` / `v_proj` (after the input norm), `[b, t, d]`.
    KvInput,
    /// Latent before (simulated) quantization, `[b, t, R]`.
    Latent(KvKind),
    /// Reconstructed projection output (pre-RoPE), `[b, t, H_kv·dh]`.
    Output(KvKind),
}

pub type Probe<'a> = &'a mut dyn FnMut(usize, Site, &Tensor) -> Result<()>;

/// Per-layer cache: dense post-RoPE K/V `[b, H_kv, T, dh]`, or Palu latents `[b, T, R]`.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
}

#[derive(Debug, Clone, Default)]
pub struct Cache {
    pub layers: Vec<LayerCache>,
    pub seq_len: usize,
}

impl Cache {
    pub fn new(num_layers: usize) -> Self {
        Cache {
            layers: vec![LayerCache::default(); num_layers],
            seq_len: 0,
        }
    }
    /// Bytes held by the cache tensors (as stored here, f32 on CPU).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// Rotary tables from the model's own configuration (theta, Llama-3 scaling). The cos/sin
/// tables are computed once for the positions seen so far and grown by doubling: decode steps
/// rebuild every cached key each step, in every layer, and would otherwise redo the trig.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    dev: Device,
    cached: std::sync::Arc<std::sync::Mutex<Option<(Tensor, Tensor)>>>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, dev: &Device) -> Self {
        let dh = cfg.head_dim;
        let mut inv_freq: Vec<f64> = (0..dh / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / dh as f64))
            .collect();
        if let Some(s) = &cfg.rope_scaling {
            apply_rope_scaling(&mut inv_freq, s);
        }
        Rope {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
            dev: dev.clone(),
            cached: Default::default(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Per-pair frequencies `[dh/2]` (theta and scaling applied): what the CUDA kernels read.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// cos and sin, `[t, dh/2]`, for positions `start .. start + t`.
    pub fn tables(&self, start: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let end = start + t;
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if cached
            .as_ref()
            .is_none_or(|(c, _)| c.dim(0).is_ok_and(|n| n < end))
        {
            let n = end.next_power_of_two().max(64);
            let half = self.inv_freq.len();
            let mut ang = Vec::with_capacity(n * half);
            for p in 0..n {
                for &f in &self.inv_freq {
                    ang.push(p as f32 * f);
                }
            }
            let ang = Tensor::from_vec(ang, (n, half), &self.dev)?;
            *cached = Some((ang.cos()?, ang.sin()?));
        }
        let (cos, sin) = cached.as_ref().expect("filled above");
        Ok((cos.narrow(0, start, t)?, sin.narrow(0, start, t)?))
    }
}

fn apply_rope_scaling(inv_freq: &mut [f64], s: &RopeScaling) {
    match s.rope_type.as_str() {
        "llama3" => {
            let factor = s.factor.unwrap_or(8.0);
            let lo = s.low_freq_factor.unwrap_or(1.0);
            let hi = s.high_freq_factor.unwrap_or(4.0);
            let old = s.original_max_position_embeddings.unwrap_or(8192) as f64;
            let (lo_wl, hi_wl) = (old / lo, old / hi);
            for f in inv_freq.iter_mut() {
                let wl = 2.0 * std::f64::consts::PI / *f;
                *f = if wl < hi_wl {
                    *f
                } else if wl > lo_wl {
                    *f / factor
                } else {
                    let smooth = (old / wl - lo) / (hi - lo);
                    (1.0 - smooth) * *f / factor + smooth * *f
                };
            }
        }
        "linear" => {
            let factor = s.factor.unwrap_or(1.0);
            inv_freq.iter_mut().for_each(|f| *f /= factor);
        }
        _ => {}
    }
}

/// Rotate-half RoPE on `[b, h, t, dh]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor, grad: bool) -> Result<Tensor> {
    let (cos, sin) = (&cos.to_dtype(x.dtype())?, &sin.to_dtype(x.dtype())?);
    if !grad {
        return candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin);
    }
    let dh = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, dh / 2)?;
    let x2 = x.narrow(D::Minus1, dh / 2, dh / 2)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)?.add(&rot.broadcast_mul(&sin)?)
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, grad: bool) -> Result<Tensor> {
    if !grad {
        return candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32);
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

fn softmax(x: &Tensor, grad: bool) -> Result<Tensor> {
    if !grad {
        return candle_nn::ops::softmax_last_dim(&x.contiguous()?);
    }
    // Subtracting the (detached) max changes nothing mathematically but keeps exp finite.
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Additive mask `[t, T]` for queries at `start..start+t` over keys `0..start+t`.
pub fn attention_mask(
    start: usize,
    t: usize,
    window: Option<usize>,
    dev: &Device,
) -> Result<Tensor> {
    let total = start + t;
    let mut m = vec![0f32; t * total];
    for i in 0..t {
        let p = start + i;
        for j in 0..total {
            let visible = j <= p && window.is_none_or(|w| p - j < w);
            if !visible {
                m[i * total + j] = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_vec(m, (t, total), dev)
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q: Linear,
    pub kv: KvProj,
    pub o: Linear,
    n_heads: usize,
    n_kv: usize,
    dh: usize,
    window: Option<usize>,
}

/// Simulated low-bit latents (quantize then dequantize), per token and per low-rank group; or,
/// with `fp8`, each latent rounded to float8 e4m3 (no scale, as mistral.rs's `f8e4m3` paged
/// cache stores K/V).
#[derive(Debug, Clone, Copy)]
pub struct LatentQuant {
    pub bits: u8,
    pub sub_group: Option<usize>,
    pub zero_point: quant::ZeroPoint,
    pub fp8: bool,
}

impl LatentQuant {
    pub fn bits(bits: u8) -> Option<Self> {
        (bits < 16).then_some(LatentQuant {
            bits,
            sub_group: None,
            zero_point: quant::ZeroPoint::Free,
            fp8: false,
        })
    }

    /// Latents stored as float8 e4m3.
    pub fn fp8() -> Self {
        LatentQuant {
            bits: 8,
            sub_group: None,
            zero_point: quant::ZeroPoint::Free,
            fp8: true,
        }
    }

    fn apply(&self, h: &Tensor, ranks: &[usize]) -> Result<Tensor> {
        if self.fp8 {
            return h.to_dtype(DType::F8E4M3)?.to_dtype(h.dtype());
        }
        quant::fake_quant(h, self.bits, ranks, self.sub_group, self.zero_point)
    }
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        rope: &Rope,
        cache: Option<&mut LayerCache>,
        start: usize,
        lq: Option<LatentQuant>,
        grad: bool,
        probe: &mut Option<Probe>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, hkv, dh) = (self.n_heads, self.n_kv, self.dh);
        if let Some(p) = probe.as_mut() {
            p(layer, Site::KvInput, x)?;
        }
        let q = self.q.forward(x)?.reshape((b, t, h, dh))?.transpose(1, 2)?;
        let (cos_q, sin_q) = rope.tables(start, t)?;
        let q = apply_rope(&q, &cos_q, &sin_q, grad)?;

        let to_heads =
            |y: Tensor| -> Result<Tensor> { y.reshape((b, t, hkv, dh))?.transpose(1, 2) };
        let (k, v) = match &self.kv {
            KvProj::Dense { k, v } => {
                let kn = to_heads(k.forward(x)?)?;
                let kn = apply_rope(&kn, &cos_q, &sin_q, grad)?;
                let vn = to_heads(v.forward(x)?)?;
                if let Some(p) = probe.as_mut() {
                    p(layer, Site::Output(KvKind::V), &vn)?;
                }
                match cache {
                    Some(c) => {
                        let k = append(&mut c.k, kn, 2)?;
                        let v = append(&mut c.v, vn, 2)?;
                        (k, v)
                    }
                    None => (kn, vn),
                }
            }
            KvProj::Palu { k: kp, v: vp } => {
                let mut hk = kp.latent(x)?;
                let mut hv = vp.latent(x)?;
                if let Some(p) = probe.as_mut() {
                    p(layer, Site::Latent(KvKind::K), &hk)?;
                    p(layer, Site::Latent(KvKind::V), &hv)?;
                }
                if let Some(lq) = lq {
                    hk = lq.apply(&hk, &kp.ranks)?;
                    hv = lq.apply(&hv, &vp.ranks)?;
                }
                let (hk, hv) = match cache {
                    Some(c) => (append(&mut c.k, hk, 1)?, append(&mut c.v, hv, 1)?),
                    None => (hk, hv),
                };
                if let Some(p) = probe.as_mut() {
                    p(layer, Site::Output(KvKind::K), &kp.reconstruct(&hk)?)?;
                    p(layer, Site::Output(KvKind::V), &vp.reconstruct(&hv)?)?;
                }
                let out =
                    latent_attention(&q, &hk, &hv, kp, vp, hkv, rope, start, self.window, grad)?;
                return self.o.forward(&out);
            }
        };
        let out = grouped_attention(&q, &k, &v, start, self.window, grad)?;
        self.o.forward(&out)
    }
}

/// Rebuild K (with RoPE for positions `0..T`) and V, `[b, H_kv, T, dh]` each, from the cached
/// latents `[b, T, R]`. RoPE depends on the position, so `B_k` cannot be folded into q: every
/// step rebuilds every cached key, once per KV head.
pub fn rebuild_kv(
    hk: &Tensor,
    hv: &Tensor,
    kp: &LowRankProj,
    vp: &LowRankProj,
    n_kv: usize,
    rope: &Rope,
    grad: bool,
) -> Result<(Tensor, Tensor)> {
    let (b, total, _) = hv.dims3()?;
    let k = rebuild_k(hk, kp, n_kv, rope, grad)?;
    let vr = vp.reconstruct(hv)?;
    let dh = vr.dim(D::Minus1)? / n_kv;
    Ok((k, vr.reshape((b, total, n_kv, dh))?.transpose(1, 2)?))
}

/// Rebuild K with RoPE for positions `0..T`, `[b, H_kv, T, dh]`, from key latents `[b, T, R]`.
pub fn rebuild_k(
    hk: &Tensor,
    kp: &LowRankProj,
    n_kv: usize,
    rope: &Rope,
    grad: bool,
) -> Result<Tensor> {
    let (b, total, _) = hk.dims3()?;
    let kr = kp.reconstruct(hk)?;
    let dh = kr.dim(D::Minus1)? / n_kv;
    let (cos, sin) = rope.tables(0, total)?;
    apply_rope(
        &kr.reshape((b, total, n_kv, dh))?.transpose(1, 2)?,
        &cos,
        &sin,
        grad,
    )
}

/// Query rows (`t` per sequence) up to which values are attended in latent space.
pub const LATENT_VALUES_MAX_ROWS: usize = 16;

/// Attention of `q` `[b, H, t, dh]` (positions `start..start+t`) over a latent cache
/// (`hk`, `hv` `[b, T, R]`); returns `[b, t, H·dh]`. Keys are rebuilt with RoPE. Values: for a
/// few query rows (decode) the probabilities attend to the value latents and each KV head's
/// `B_v` block is applied to the `r`-wide result (`P·(H·Bᵀ) = (P·H)·Bᵀ`), which never builds the
/// `[T, g·dh]` values; for many rows (prefill) rebuilding V once is cheaper.
#[allow(clippy::too_many_arguments)]
pub fn latent_attention(
    q: &Tensor,
    hk: &Tensor,
    hv: &Tensor,
    kp: &LowRankProj,
    vp: &LowRankProj,
    n_kv: usize,
    rope: &Rope,
    start: usize,
    window: Option<usize>,
    grad: bool,
) -> Result<Tensor> {
    let (_, h, t, dh) = q.dims4()?;
    if t > LATENT_VALUES_MAX_ROWS {
        let (k, v) = rebuild_kv(hk, hv, kp, vp, n_kv, rope, grad)?;
        return grouped_attention(q, &k, &v, start, window, grad);
    }
    let k = rebuild_k(hk, kp, n_kv, rope, grad)?;
    let probs = attention_probs(q, &k, start, window, grad)?; // [b, H_kv, rep·t, T]
    latent_values(&probs, hv, vp, n_kv, h, dh)
}

/// Values in latent space, then each KV head's `B_v` block (and the value bias): `[b, t, H·dh]`
/// from `probs` `[b, H_kv, H/H_kv·t, T]` of `h` query heads over the value latents `hv`.
pub fn latent_values(
    probs: &Tensor,
    hv: &Tensor,
    vp: &LowRankProj,
    n_kv: usize,
    h: usize,
    dh: usize,
) -> Result<Tensor> {
    let b = probs.dim(0)?;
    let t = probs.dim(2)? * n_kv / h;
    let outs = latent_value_outputs(probs, hv, vp, n_kv, t)?;
    let mut ups = Vec::with_capacity(outs.len());
    for (a, up) in outs.iter().zip(&vp.ups) {
        // [b, g·rep, t, r] → [b, g, rep·t, r] · B_jᵀ per KV head j of the group.
        let (_, _, _, r) = a.dims4()?;
        let g = up.dim(0)? / dh;
        let a = a.reshape((b, g, h / n_kv * t, r))?;
        let up = up
            .reshape((g, dh, r))?
            .transpose(1, 2)?
            .contiguous()?
            .unsqueeze(0)?;
        ups.push(a.broadcast_matmul(&up)?); // [b, g, rep·t, dh]
    }
    let mut out = Tensor::cat(&ups, 1)?;
    if let Some(bias) = &vp.bias {
        // Probabilities sum to one, so the bias of V passes through attention unchanged.
        out = out.broadcast_add(&bias.reshape((1, n_kv, 1, dh))?)?;
    }
    out.reshape((b, h, t, dh))?
        .transpose(1, 2)?
        .reshape((b, t, h * dh))
}

/// Each query head's attention output in latent space, before `B_v`: per value group `i`,
/// `[b, g·rep, t, r_i]` (query heads in order) from `probs` `[b, H_kv, rep·t, T]` over the value
/// latents `hv` `[b, T, R_v]`. `P·(H·Bᵀ) = (P·H)·Bᵀ`: `T·r` reads instead of building `[T, g·dh]`.
pub fn latent_value_outputs(
    probs: &Tensor,
    hv: &Tensor,
    vp: &LowRankProj,
    n_kv: usize,
    t: usize,
) -> Result<Vec<Tensor>> {
    let (b, _, rows, total) = probs.dims4()?;
    let g = n_kv / vp.ranks.len();
    let rep = rows / t;
    let mut outs = Vec::with_capacity(vp.ranks.len());
    let mut off = 0;
    for (i, &r) in vp.ranks.iter().enumerate() {
        let p = probs.narrow(1, i * g, g)?.reshape((b, g * rows, total))?;
        let a = p.matmul(&hv.narrow(2, off, r)?.contiguous()?)?;
        outs.push(a.reshape((b, g * rep, t, r))?);
        off += r;
    }
    Ok(outs)
}

/// [`latent_value_outputs`] laid out for a fused `o_proj` (`W_o·B_v`, [`fused_o_proj`]):
/// `[b, t, Σ_heads r]`, query heads in order, each its group's `r_i` latent columns.
pub fn fused_value_inputs(
    probs: &Tensor,
    hv: &Tensor,
    vp: &LowRankProj,
    n_kv: usize,
    t: usize,
) -> Result<Tensor> {
    let outs = latent_value_outputs(probs, hv, vp, n_kv, t)?
        .into_iter()
        .map(|a| {
            let (b, heads, t, r) = a.dims4()?;
            a.transpose(1, 2)?.reshape((b, t, heads * r))
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&outs, 2)
}

/// `o_proj` with each query head's block multiplied by its KV head's `B_v` block, so that it reads
/// the `r`-wide latent attention outputs ([`fused_value_inputs`]) directly: `W_o` `[d, H·dh]`
/// becomes `[d, Σ_heads r]`. A value bias passes through attention unchanged (probabilities sum
/// to one), so it becomes the output bias `W_o·bias` (`None` without a value bias).
pub fn fused_o_proj(
    w_o: &Tensor,
    vp: &LowRankProj,
    n_heads: usize,
    n_kv: usize,
    dh: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    let rep = n_heads / n_kv;
    let g = n_kv / vp.ranks.len();
    let w = w_o.to_dtype(DType::F32)?;
    let mut cols = Vec::with_capacity(n_heads);
    for qh in 0..n_heads {
        let kv = qh / rep;
        let up = vp.ups[kv / g]
            .narrow(0, (kv % g) * dh, dh)?
            .to_dtype(DType::F32)?
            .contiguous()?; // [dh, r]
        cols.push(w.narrow(1, qh * dh, dh)?.contiguous()?.matmul(&up)?);
    }
    let fused = Tensor::cat(&cols, 1)?.to_dtype(w_o.dtype())?;
    let bias = match &vp.bias {
        Some(bias) => {
            let per_head = (0..n_heads)
                .map(|qh| bias.narrow(0, qh / rep * dh, dh))
                .collect::<Result<Vec<_>>>()?;
            let rep_bias = Tensor::cat(&per_head, 0)?.to_dtype(DType::F32)?;
            Some(
                w.matmul(&rep_bias.unsqueeze(1)?)?
                    .squeeze(1)?
                    .to_dtype(w_o.dtype())?,
            )
        }
        None => None,
    };
    Ok((fused, bias))
}

/// Query rows per block of [`grouped_attention`]. The probabilities of a block are
/// `[b, H, rows, T]`: a 32K-token prompt in one block would need 32K·32K floats per head.
pub const ATTENTION_QUERY_BLOCK: usize = 512;

/// Causal (optionally sliding-window) attention of `q` `[b, H, t, dh]` at positions
/// `start..start+t` over `k`, `v` `[b, H_kv, start+t, dh]`; returns `[b, t, H·dh]`. The query
/// heads of each KV head are folded into rows (`[b, H_kv, rep·t, dh]`), so K/V are never repeated.
/// Long prompts are attended in blocks of [`ATTENTION_QUERY_BLOCK`] query rows.
pub fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    window: Option<usize>,
    grad: bool,
) -> Result<Tensor> {
    grouped_attention_blocked(q, k, v, start, window, grad, ATTENTION_QUERY_BLOCK)
}

/// [`grouped_attention`] in blocks of `block` query rows; each block sees the keys up to its
/// last position, so the result is the same for any block size.
pub fn grouped_attention_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    window: Option<usize>,
    grad: bool,
    block: usize,
) -> Result<Tensor> {
    let t = q.dim(2)?;
    if t <= block.max(1) {
        return attend(q, k, v, start, window, grad);
    }
    let mut outs = Vec::with_capacity(t.div_ceil(block));
    for o in (0..t).step_by(block) {
        let rows = block.min(t - o);
        let seen = start + o + rows;
        outs.push(attend(
            &q.narrow(2, o, rows)?,
            &k.narrow(2, 0, seen)?,
            &v.narrow(2, 0, seen)?,
            start + o,
            window,
            grad,
        )?);
    }
    Tensor::cat(&outs, 1)
}

fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    window: Option<usize>,
    grad: bool,
) -> Result<Tensor> {
    let (b, h, t, dh) = q.dims4()?;
    let probs = attention_probs(q, k, start, window, grad)?;
    let out = probs.matmul(&v.contiguous()?)?; // [b, H_kv, rep·t, dh]
    out.reshape((b, h, t, dh))?
        .transpose(1, 2)?
        .reshape((b, t, h * dh))
}

/// Softmax probabilities of [`grouped_attention`], `[b, H_kv, rep·t, T]`.
pub fn attention_probs(
    q: &Tensor,
    k: &Tensor,
    start: usize,
    window: Option<usize>,
    grad: bool,
) -> Result<Tensor> {
    let (b, h, t, dh) = q.dims4()?;
    let hkv = k.dim(1)?;
    let total = k.dim(2)?;
    let rep = h / hkv;
    let q = q.reshape((b, hkv, rep * t, dh))?;
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? / (dh as f64).sqrt())?;
    let mask = attention_mask(start, t, window, q.device())?.to_dtype(scores.dtype())?;
    let scores = scores
        .reshape((b, hkv, rep, t, total))?
        .broadcast_add(&mask)?;
    softmax(&scores, grad)?.reshape((b, hkv, rep * t, total))
}

fn append(slot: &mut Option<Tensor>, new: Tensor, dim: usize) -> Result<Tensor> {
    let all = match slot.take() {
        Some(old) => Tensor::cat(&[&old, &new], dim)?,
        None => new,
    };
    *slot = Some(all.clone());
    Ok(all)
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate.forward(x)?.silu()?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub attn: Attention,
    mlp: Mlp,
    input_norm: Tensor,
    post_norm: Tensor,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub cfg: ModelConfig,
    embed: Tensor,
    pub layers: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    rope: Rope,
    /// Use only ops with a backward pass (for Fisher statistics).
    pub grad: bool,
    /// Simulated low-bit latents.
    pub latent_quant: Option<LatentQuant>,
    pub device: Device,
}

/// The safetensors weights of a model directory, as f32 on one device.
pub struct Weights {
    pub dir: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    /// Tensors known by their header only ([`Weights::headers`]): name → shape. `get` checks
    /// their shape and hands out an empty placeholder.
    pub shapes: HashMap<String, Vec<usize>>,
}

pub fn weight_files(dir: &Path) -> std::result::Result<Vec<PathBuf>, PaluError> {
    let rd = std::fs::read_dir(dir).map_err(|e| PaluError::io(dir, e))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n == "model.safetensors"
                || n == "consolidated.safetensors"
                || (n.starts_with("model-") && n.ends_with(".safetensors"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(PaluError::invalid(
            dir,
            "no weights found: expected model.safetensors or model-0000N-of-0000M.safetensors (convert a GGUF with `palu convert-gguf`)",
        ));
    }
    Ok(files)
}

impl Weights {
    pub fn load(dir: &Path, dev: &Device) -> std::result::Result<Self, PaluError> {
        let mut tensors = HashMap::new();
        for f in weight_files(dir)? {
            let m = candle_core::safetensors::load(&f, dev).map_err(|e| {
                PaluError::invalid(
                    &f,
                    format!("cannot read safetensors: {}", crate::error::candle_msg(&e)),
                )
            })?;
            for (k, v) in m {
                let v = v
                    .to_dtype(DType::F32)
                    .map_err(|e| PaluError::invalid(&f, crate::error::candle_msg(&e)))?;
                tensors.insert(k, v);
            }
        }
        Ok(Weights {
            dir: dir.to_path_buf(),
            tensors,
            shapes: HashMap::new(),
        })
    }

    /// The tensors `keep(name)` selects loaded as f32 on the CPU, every other one known by its
    /// safetensors header only (memory-mapped, never read): what validating a checkpoint
    /// before serving it needs, at the cost of its factors instead of the whole model (an
    /// 8B model in f32 is 32 GB and a minute of conversion).
    pub fn headers(
        dir: &Path,
        keep: impl Fn(&str) -> bool,
    ) -> std::result::Result<Self, PaluError> {
        let (mut tensors, mut shapes) = (HashMap::new(), HashMap::new());
        for f in weight_files(dir)? {
            let bad = |e: candle_core::Error| {
                PaluError::invalid(
                    &f,
                    format!("cannot read safetensors: {}", crate::error::candle_msg(&e)),
                )
            };
            // Safety: the file is mapped read-only for the duration of this call; a checkpoint
            // rewritten underneath a running validation is outside what this checks.
            let m = unsafe { candle_core::safetensors::MmapedSafetensors::new(&f) }.map_err(bad)?;
            for (name, view) in m.tensors() {
                if keep(&name) {
                    let t = m
                        .load(&name, &Device::Cpu)
                        .and_then(|t| t.to_dtype(DType::F32))
                        .map_err(bad)?;
                    tensors.insert(name, t);
                } else {
                    shapes.insert(name, view.shape().to_vec());
                }
            }
        }
        Ok(Weights {
            dir: dir.to_path_buf(),
            tensors,
            shapes,
        })
    }

    /// A tensor checked for presence, shape and finiteness.
    pub fn get(&self, name: &str, shape: &[usize]) -> std::result::Result<Tensor, PaluError> {
        if let Some(got) = self.shapes.get(name) {
            if got.as_slice() != shape {
                return Err(PaluError::TensorShape {
                    path: self.dir.clone(),
                    name: name.into(),
                    got: got.clone(),
                    expected: shape.to_vec(),
                    hint: String::new(),
                });
            }
            return Tensor::zeros(0, DType::F32, &Device::Cpu)
                .map_err(|e| PaluError::invalid(&self.dir, crate::error::candle_msg(&e)));
        }
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| PaluError::MissingTensor {
                path: self.dir.clone(),
                name: name.to_string(),
                hint: String::new(),
            })?;
        if t.dims() != shape {
            return Err(PaluError::TensorShape {
                path: self.dir.clone(),
                name: name.into(),
                got: t.dims().to_vec(),
                expected: shape.to_vec(),
                hint: String::new(),
            });
        }
        check_finite(t, &self.dir, name)?;
        Ok(t.clone())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.shapes.contains_key(name)
    }
}

pub fn check_finite(t: &Tensor, path: &Path, name: &str) -> std::result::Result<(), PaluError> {
    let s = t
        .abs()
        .and_then(|a| a.sum_all())
        .and_then(|s| s.to_scalar::<f32>())
        .map_err(|e| PaluError::invalid(path, crate::error::candle_msg(&e)))?;
    if !s.is_finite() {
        return Err(PaluError::NonFinite {
            path: path.into(),
            name: name.into(),
        });
    }
    Ok(())
}

impl Model {
    /// Load a plain or Palu model directory.
    pub fn load(dir: &Path, dev: &Device) -> std::result::Result<Self, PaluError> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let w = Weights::load(dir, dev)?;
        Self::from_weights(cfg, &w)
    }

    /// The checks of [`Model::load`] without loading the model: every tensor present with its
    /// shape (from the safetensors headers), the Palu factors of `k_proj` / `v_proj` loaded and
    /// checked as `load` checks them (ranks, shapes, finite values). What the server runs
    /// before the engine loads the checkpoint onto its device.
    pub fn validate(dir: &Path) -> std::result::Result<ModelConfig, PaluError> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let factors =
            |name: &str| name.contains(".self_attn.k_proj.") || name.contains(".self_attn.v_proj.");
        let w = Weights::headers(dir, factors)?;
        Self::from_weights(cfg.clone(), &w)?;
        Ok(cfg)
    }

    pub fn from_weights(cfg: ModelConfig, w: &Weights) -> std::result::Result<Self, PaluError> {
        let (d, v, ff) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (h, hkv, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let embed = w.get("model.embed_tokens.weight", &[v, d])?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            embed.clone()
        } else {
            w.get("lm_head.weight", &[v, d])?
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let lin = |name: &str,
                       o: usize,
                       i: usize,
                       bias: bool|
             -> std::result::Result<Linear, PaluError> {
                let w_ = w.get(&format!("{p}.{name}.weight"), &[o, i])?;
                let b = if bias {
                    Some(w.get(&format!("{p}.{name}.bias"), &[o])?)
                } else {
                    None
                };
                Ok(Linear { w: w_, b })
            };
            let kv = if cfg.is_palu {
                KvProj::Palu {
                    k: load_lowrank(w, &cfg, l, KvKind::K)?,
                    v: load_lowrank(w, &cfg, l, KvKind::V)?,
                }
            } else {
                KvProj::Dense {
                    k: lin("self_attn.k_proj", hkv * dh, d, cfg.qkv_bias)?,
                    v: lin("self_attn.v_proj", hkv * dh, d, cfg.qkv_bias)?,
                }
            };
            layers.push(Block {
                attn: Attention {
                    q: lin("self_attn.q_proj", h * dh, d, cfg.qkv_bias)?,
                    kv,
                    o: lin("self_attn.o_proj", d, h * dh, false)?,
                    n_heads: h,
                    n_kv: hkv,
                    dh,
                    window: cfg.sliding_window,
                },
                mlp: Mlp {
                    gate: lin("mlp.gate_proj", ff, d, false)?,
                    up: lin("mlp.up_proj", ff, d, false)?,
                    down: lin("mlp.down_proj", d, ff, false)?,
                },
                input_norm: w.get(&format!("{p}.input_layernorm.weight"), &[d])?,
                post_norm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
            });
        }
        let norm = w.get("model.norm.weight", &[d])?;
        let device = embed.device().clone();
        let rope = Rope::new(&cfg, &device);
        Ok(Model {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            grad: false,
            latent_quant: None,
            device,
        })
    }

    /// Logits `[b, t, V]` for token ids `[b, t]`, continuing `cache` when given.
    pub fn forward(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut Cache>,
        mut probe: Option<Probe>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let start = cache.as_ref().map_or(0, |c| c.seq_len);
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))?;
        let eps = self.cfg.rms_norm_eps;
        for (l, blk) in self.layers.iter().enumerate() {
            let xn = rms_norm(&x, &blk.input_norm, eps, self.grad)?;
            let lc = cache.as_mut().map(|c| &mut c.layers[l]);
            let a = blk.attn.forward(
                l,
                &xn,
                &self.rope,
                lc,
                start,
                self.latent_quant,
                self.grad,
                &mut probe,
            )?;
            x = (x + a)?;
            let xn = rms_norm(&x, &blk.post_norm, eps, self.grad)?;
            x = (&x + blk.mlp.forward(&xn)?)?;
        }
        if let Some(c) = cache {
            c.seq_len += t;
        }
        let x = rms_norm(&x, &self.norm, eps, self.grad)?;
        linear(&x, &self.lm_head, None)
    }

    /// Greedy decoding with the cache (latents for Palu layers), returning the new token ids.
    pub fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new: usize,
        eos: Option<u32>,
    ) -> Result<Vec<u32>> {
        let mut cache = Cache::new(self.layers.len());
        let mut out = Vec::new();
        let mut input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?;
        for _ in 0..max_new {
            let logits = self.forward(&input, Some(&mut cache), None)?;
            let last = logits.i_last()?;
            let next = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
            if Some(next) == eos {
                break;
            }
            out.push(next);
            input = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
        }
        Ok(out)
    }

    pub fn set_palu(&mut self, layer: usize, k: LowRankProj, v: LowRankProj) {
        self.layers[layer].attn.kv = KvProj::Palu { k, v };
    }

    /// Simulate the key rebuild in float8 e4m3 in every Palu layer
    /// ([`LowRankProj::with_fp8_rebuild`]); values are untouched. Returns how many layers changed.
    pub fn use_fp8_key_rebuild(&mut self) -> Result<usize> {
        let mut n = 0;
        for layer in &mut self.layers {
            if let KvProj::Palu { k, .. } = &mut layer.attn.kv {
                *k = k.with_fp8_rebuild()?;
                n += 1;
            }
        }
        Ok(n)
    }
}

trait LastToken {
    fn i_last(&self) -> Result<Tensor>;
}
impl LastToken for Tensor {
    /// `[1, t, V] -> [V]` at the last position.
    fn i_last(&self) -> Result<Tensor> {
        let t = self.dim(1)?;
        self.narrow(1, t - 1, 1)?.flatten_all()
    }
}

/// Load `VT` / `U.i` factors of one module, checked against `head_wise_ranks`.
fn load_lowrank(
    w: &Weights,
    cfg: &ModelConfig,
    l: usize,
    kind: KvKind,
) -> std::result::Result<LowRankProj, PaluError> {
    let module = ModelConfig::module_name(l, kind);
    let ranks = cfg
        .head_wise_ranks
        .as_ref()
        .and_then(|m| m.get(&module))
        .ok_or_else(|| {
            PaluError::invalid(
                w.dir.join("config.json"),
                format!("head_wise_ranks has no entry `{module}`"),
            )
        })?;
    let g_count = ranks.len();
    if g_count == 0 || !cfg.num_kv_heads.is_multiple_of(g_count) {
        return Err(PaluError::invalid(
            w.dir.join("config.json"),
            format!("head_wise_ranks[`{module}`] has {g_count} groups, which does not divide num_key_value_heads {}", cfg.num_kv_heads),
        ));
    }
    let gdh = cfg.kv_width() / g_count;
    let hint = format!(" (from head_wise_ranks[`{module}`] = {ranks:?})");
    let total: usize = ranks.iter().sum();
    let shape_err = |name: String, got: &[usize], expected: Vec<usize>| PaluError::TensorShape {
        path: w.dir.clone(),
        name,
        got: got.to_vec(),
        expected,
        hint: hint.clone(),
    };
    let vt_name = format!("{module}.VT.weight");
    let vt = w
        .tensors
        .get(&vt_name)
        .ok_or_else(|| PaluError::MissingTensor {
            path: w.dir.clone(),
            name: vt_name.clone(),
            hint: " (a Palu checkpoint stores the down factor there)".into(),
        })?;
    if vt.dims() != [total, cfg.hidden_size] {
        return Err(shape_err(vt_name, vt.dims(), vec![total, cfg.hidden_size]));
    }
    check_finite(vt, &w.dir, &vt_name)?;
    let mut ups = Vec::new();
    let mut biases = Vec::new();
    for (i, &r) in ranks.iter().enumerate() {
        if r > gdh.min(cfg.hidden_size) {
            return Err(PaluError::invalid(
                w.dir.join("config.json"),
                format!(
                    "head_wise_ranks[`{module}`][{i}] = {r} exceeds the group's full rank {}",
                    gdh.min(cfg.hidden_size)
                ),
            ));
        }
        let name = format!("{module}.U.{i}.weight");
        let u = w
            .tensors
            .get(&name)
            .ok_or_else(|| PaluError::MissingTensor {
                path: w.dir.clone(),
                name: name.clone(),
                hint: hint.clone(),
            })?;
        if u.dims() != [gdh, r] {
            return Err(shape_err(name, u.dims(), vec![gdh, r]));
        }
        check_finite(u, &w.dir, &name)?;
        ups.push(u.clone());
        if cfg.qkv_bias {
            biases.push(w.get(&format!("{module}.U.{i}.bias"), &[gdh])?);
        }
    }
    let bias = if biases.is_empty() {
        None
    } else {
        Some(
            Tensor::cat(&biases, 0)
                .map_err(|e| PaluError::invalid(&w.dir, crate::error::candle_msg(&e)))?,
        )
    };
    LowRankProj::new(vt.clone(), ups, bias).map_err(|e| {
        PaluError::invalid(
            &w.dir,
            format!("{module}: {}", crate::error::candle_msg(&e)),
        )
    })
}

/// Mean negative log-likelihood of `ids[1..]` given `logits[..-1]`, per token, `[t-1]`.
pub fn token_nll(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    // logits [t, V], ids [t]
    let t = logits.dim(0)?;
    let lg = logits.narrow(0, 0, t - 1)?;
    let tgt = ids.narrow(0, 1, t - 1)?;
    let lsm = candle_nn::ops::log_softmax(&lg, D::Minus1)?;
    lsm.gather(&tgt.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}
