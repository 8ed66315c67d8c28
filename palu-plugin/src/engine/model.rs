//! The engine-facing Palu model (Llama family).
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Embedding, Module};
use mistralrs_core::layers::{Activation, Mlp, RmsNorm};
use mistralrs_core::model_plugin::{
    AnyMoeBaseModelMixin, DeviceMapper, EitherCache, FlashParams, IsqModel, KvCache, MlpLayer,
    ModelConfigLike, ModelConfigMetadata, NormalCache, NormalLoadingMetadata, NormalModel,
    PagedAttentionInputMetadata, Sdpa, SdpaParams,
};
use mistralrs_quant::{QuantMethod, ReplicatedLayer, ShardedVarBuilder};

use super::stats::{tensor_bytes, KvStats};
use crate::config::ModelConfig;
use crate::latent_codec::LatentCodec;
use crate::lowrank::linear;
use crate::lowrank::{KvKind, LowRankProj};
use crate::model::{
    attention_probs, fused_o_proj, fused_value_inputs, latent_values, rebuild_k, Rope,
    LATENT_VALUES_MAX_ROWS,
};
use crate::planner::{Keys, Plan, Values};
use crate::quant::ZeroPoint;

/// The cache geometry the engine sees: one "KV head" per layer whose K width is `R_k[l]` and
/// V width `R_v[l]`, so pre-allocation, per-sequence clone-in/out, prefix caching and memory
/// accounting all work on latents.
#[derive(Clone)]
pub struct PaluGeometry {
    pub meta: ModelConfigMetadata,
    pub k_ranks: Vec<usize>,
    pub v_ranks: Vec<usize>,
    /// Packed low-bit latents (`latent_bits < 16`): the cache rows are bytes, which the engine's
    /// pre-allocation (in the activation dtype) cannot hold, so it is declined per layer and the
    /// cache grows from the first appended rows instead.
    pub packed: bool,
    /// `H_kv·dh`: the width of a full-key layer's cache rows.
    pub kv_width: usize,
    /// Paged attention: the per-layer widths below are the engine's block rows
    /// ([`Self::block_width`]) instead of the plain cache's latent widths.
    pub paged: Option<PagedRows>,
}

/// The bytes of one token's latent row per layer, for the engine's paged blocks.
#[derive(Clone, Debug)]
pub struct PagedRows {
    /// Per layer: (key row, value row) in elements of a 16-bit cache dtype, before rounding.
    pub rows: Vec<(usize, usize)>,
}

/// Block rows are whole multiples of 16 elements: the engine splits key rows into pieces of
/// 16 bytes (`x = 16 / dtype size`: 8 for 16-bit, 16 for fp8 blocks).
const BLOCK_ROW_ALIGN: usize = 16;

impl PaluGeometry {
    fn block_width(w: usize) -> usize {
        w.div_ceil(BLOCK_ROW_ALIGN) * BLOCK_ROW_ALIGN
    }
    fn k_width(&self, l: usize) -> usize {
        match &self.paged {
            Some(p) => Self::block_width(p.rows[l].0),
            None => self.k_ranks[l],
        }
    }
    fn v_width(&self, l: usize) -> usize {
        match &self.paged {
            Some(p) => Self::block_width(p.rows[l].1),
            None => self.v_ranks[l],
        }
    }
}

impl ModelConfigLike for PaluGeometry {
    fn max_seq_len(&self) -> usize {
        self.meta.max_seq_len
    }
    fn num_layers(&self) -> usize {
        self.meta.num_layers
    }
    fn hidden_size(&self) -> usize {
        self.meta.hidden_size
    }
    fn num_kv_heads(&self) -> usize {
        1
    }
    fn num_attn_heads(&self) -> usize {
        self.meta.num_attn_heads
    }
    fn k_head_dim(&self) -> usize {
        (0..self.k_ranks.len())
            .map(|l| self.k_width(l))
            .max()
            .unwrap_or(1)
    }
    fn v_head_dim(&self) -> usize {
        (0..self.v_ranks.len())
            .map(|l| self.v_width(l))
            .max()
            .unwrap_or(1)
    }
    fn k_head_dim_for_layer(&self, l: usize) -> usize {
        self.k_width(l)
    }
    fn v_head_dim_for_layer(&self, l: usize) -> usize {
        self.v_width(l)
    }
    fn uses_own_kv_cache_for_layer(&self, _layer_idx: usize) -> bool {
        // Packed rows cannot be pre-allocated in the activation dtype; paged layers keep
        // nothing in the plain cache.
        !self.packed && self.paged.is_none()
    }
    fn kv_cache_elements_per_token(&self) -> usize {
        // Averaged over layers (the engine multiplies by the layer count).
        let n = self.k_ranks.len();
        (0..n)
            .map(|l| self.k_width(l) + self.v_width(l))
            .sum::<usize>()
            .div_ceil(n.max(1))
    }
}

impl PaluGeometry {
    /// Layers with full keys cache `H_kv·dh`-wide K rows instead of key latents.
    pub fn apply_plan(&mut self, plan: &Plan) {
        for p in plan.layers.iter().filter(|p| p.keys == Keys::Full) {
            self.k_ranks[p.layer] = self.kv_width;
        }
    }

    pub fn from_config(cfg: &ModelConfig) -> std::result::Result<Self, crate::PaluError> {
        let hw = cfg.head_wise_ranks.as_ref().ok_or_else(|| {
            crate::PaluError::invalid(
                "config.json",
                "a Palu checkpoint needs `head_wise_ranks` (is this a palu* model?)",
            )
        })?;
        let ranks = |kind| -> std::result::Result<Vec<usize>, crate::PaluError> {
            (0..cfg.num_layers)
                .map(|l| {
                    let m = ModelConfig::module_name(l, kind);
                    hw.get(&m).map(|r| r.iter().sum()).ok_or_else(|| {
                        crate::PaluError::invalid(
                            "config.json",
                            format!("head_wise_ranks has no entry `{m}`"),
                        )
                    })
                })
                .collect()
        };
        Ok(PaluGeometry {
            meta: ModelConfigMetadata {
                max_seq_len: cfg.max_position_embeddings,
                num_layers: cfg.num_layers,
                hidden_size: cfg.hidden_size,
                num_kv_heads: 1,
                num_attn_heads: cfg.num_heads,
                sliding_window: cfg.sliding_window,
                k_head_dim: cfg.head_dim,
                v_head_dim: cfg.head_dim,
                kv_cache_layout: mistralrs_core::model_plugin::KvCacheLayout::Standard,
            },
            k_ranks: ranks(KvKind::K)?,
            v_ranks: ranks(KvKind::V)?,
            packed: false,
            kv_width: cfg.kv_width(),
            paged: None,
        })
    }
}

struct Attention {
    q: Arc<dyn QuantMethod>,
    o: Arc<dyn QuantMethod>,
    k: LowRankProj,
    v: LowRankProj,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    window: Option<usize>,
    rope: Arc<Rope>,
    /// Codecs of the packed K and V latent rows, when `latent_bits < 16`.
    packed: Option<(LatentCodec, LatentCodec)>,
    /// The planner's full keys (V-only Palu): the dense `W_k = B_k·A_k` `[H_kv·dh, d]` and key
    /// bias; the cache then holds post-RoPE K rows instead of key latents. `None`: latent keys.
    full_k: Option<(Tensor, Option<Tensor>)>,
    /// The planner's fused values: `o_proj·B_v` `[d, H·r_v/G]`, reading each query head's
    /// `r`-wide latent output, for decode steps (prefill rebuilds V and uses `o`).
    o_fused: Option<Arc<dyn QuantMethod>>,
    /// The fused CUDA decode kernel for one-token steps, where it covers the layer (a CUDA
    /// device, a shape with an instantiation; packed latents are unpacked on the device first);
    /// `None`: candle ops.
    decode: Option<crate::decode_op::LatentDecode>,
}

fn qmatmul(x: &Tensor, layer: &dyn QuantMethod) -> Result<Tensor> {
    match layer.quantized_act_type() {
        Some(t) => layer.forward(&x.to_dtype(t)?)?.to_dtype(x.dtype()),
        None => layer.forward(x),
    }
}

impl Attention {
    /// `mask`: the prefill mask of this forward pass, built by the first layer that needs it.
    fn forward(
        &self,
        x: &Tensor,
        start: usize,
        cache: &mut KvCache,
        mask: &mut PrefillMasks,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let q = qmatmul(x, &*self.q)?
            .reshape((b, t, self.n_heads, self.head_dim))?
            .transpose(1, 2)?;
        let (cos, sin) = self.rope.tables(start, t)?;
        let q = crate::model::apply_rope(&q, &cos, &sin, false)?;
        // The engine's cache holds [b, 1, T, R] latents.
        // The engine's offset is authoritative: it may re-feed the last position (a raw-logits
        // request's follow-up step does), whose latent is then recomputed in place. Missing
        // positions cannot be recomputed and are refused below.
        if let Some(len) = cache.k()?.map(|k| k.dim(2)).transpose()? {
            if len > start {
                cache.set_len(start)?;
            }
        }
        let (rows_k, rows_v) = self.new_rows(x, &cos, &sin)?;
        let (cached_k, cached_v) = cache.append(
            &rows_k.unsqueeze(1)?.contiguous()?,
            &rows_v.unsqueeze(1)?.contiguous()?,
        )?;
        if cached_k.dim(2)? != start + t {
            candle_core::bail!(
                "palu: the latent cache holds {} positions but the sequence is at {start} + {t}; refusing to attend with misplaced RoPE",
                cached_k.dim(2)?
            )
        }
        self.attend(x.dtype(), &q, cached_k, cached_v, start, mask)
    }

    /// The cache rows of the new tokens `x` (`[b, t, d]`, RoPE tables for their positions):
    /// `[b, t, row]` key and value rows — packed rows (U8) when the layer caches low-bit
    /// latents, else latents in the activation dtype; a full-key layer's key rows are its
    /// post-RoPE K (`[b, t, H_kv·dh]`), packed or not.
    fn new_rows(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let k_full = match &self.full_k {
            None => None,
            Some((w, bias)) => {
                let (n_kv, dh) = (self.n_kv, self.head_dim);
                let k = linear(x, w, bias.as_ref())?
                    .reshape((b, t, n_kv, dh))?
                    .transpose(1, 2)?
                    .contiguous()?;
                Some(
                    crate::model::apply_rope(&k, cos, sin, false)?
                        .transpose(1, 2)?
                        .reshape((b, t, n_kv * dh))?,
                )
            }
        };
        // Latent keys h_k = x·A_k; packed rows project and quantize in one kernel where it
        // applies.
        Ok(match &self.packed {
            Some((ck, cv)) => (
                match &k_full {
                    Some(k) => ck.encode(k)?,
                    None => ck.project_encode(x, &self.k.down)?,
                },
                cv.project_encode(x, &self.v.down)?,
            ),
            None => (
                match k_full {
                    Some(k) => k,
                    None => self.k.latent(x)?,
                },
                self.v.latent(x)?,
            ),
        })
    }

    /// One layer over the engine's paged blocks (`pools`: this layer's key and value block
    /// tensors). The step's rows go to their slots; a decode step then reads every sequence's
    /// rows through its block table (the kernel, or a gather where it does not apply), and a
    /// prompt chunk attends over its sequence's cached prefix (prefix-cache hits, earlier
    /// chunks) read the same way, followed by its own rows. Sequences may sit at different
    /// offsets, as the engine's paged scheduler batches them.
    fn forward_paged(
        &self,
        x: &Tensor,
        offsets: &[usize],
        pools: &(Tensor, Tensor),
        step: &PagedStep,
        masks: &mut PrefillMasks,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, dh) = (self.n_heads, self.head_dim);
        if self.window.is_some() {
            candle_core::bail!("palu: paged attention over a sliding-window model is not supported; serve it without paged attention")
        }
        let (cos, sin) = step.rope_tables(&self.rope, offsets, t)?;
        let q = qmatmul(x, &*self.q)?
            .reshape((b, t, h, dh))?
            .transpose(1, 2)?;
        let q = crate::model::apply_rope(&q, &cos, &sin, false)?;
        // The copy into fp8 blocks (`--pa-cache-type f8e4m3`) converts 16-bit rows.
        let (rows_k, rows_v) = self.new_rows(x, &cos, &sin)?;
        let flat = |r: &Tensor| r.reshape((b * t, ()))?.contiguous();
        crate::paged::write_rows(&pools.0, &flat(&rows_k)?, &step.slots)?;
        crate::paged::write_rows(&pools.1, &flat(&rows_v)?, &step.slots)?;
        // fp8 blocks: this step attends to its own rows as the blocks hold them.
        let (rows_k, rows_v) = (
            crate::paged::round_through(&rows_k, pools.0.dtype())?,
            crate::paged::round_through(&rows_v, pools.1.dtype())?,
        );
        // The kernel reads the blocks in place where it reads their format: 16-bit latents, or
        // packed rows with a packed instantiation (else the rows are gathered and unpacked).
        let reads_blocks = |op: &&crate::decode_op::LatentDecode| {
            t == 1 && (self.packed.is_none() || op.packed.is_some())
        };
        if let Some(op) = self.decode.as_ref().filter(reads_blocks) {
            let lens = offsets.iter().map(|&o| o + 1).collect();
            let y = op
                .with_lens(lens)
                .with_pages(step.tables.clone(), step.block_size)
                .forward(&q.squeeze(2)?.contiguous()?, &pools.0, &pools.1)?;
            return self.kernel_output(y, x.dtype());
        }
        let mut outs = Vec::with_capacity(b);
        for (i, &start) in offsets.iter().enumerate() {
            let (mut k, mut v) = (rows_k.narrow(0, i, 1)?, rows_v.narrow(0, i, 1)?);
            if start > 0 {
                let rows =
                    crate::paged::sequence_rows(&step.host_tables()?[i], step.block_size, start)?;
                let rows = Tensor::from_vec(rows, start, x.device())?;
                let prefix = |pool: &Tensor, new: &Tensor| -> Result<Tensor> {
                    let w = new.dim(2)?;
                    let old = crate::paged::read_rows(pool, &rows, w, new.dtype())?;
                    Tensor::cat(&[&old.unsqueeze(0)?, new], 1)
                };
                k = prefix(&pools.0, &k)?;
                v = prefix(&pools.1, &v)?;
            }
            outs.push(self.attend(
                x.dtype(),
                &q.narrow(0, i, 1)?,
                k.unsqueeze(1)?.contiguous()?,
                v.unsqueeze(1)?.contiguous()?,
                start,
                masks,
            )?);
        }
        Tensor::cat(&outs, 0)
    }

    /// Attention of `q` (`[b, H, t, dh]`, RoPE applied at `start..start+t`) over the cached rows
    /// `[b, 1, start + t, row]` (latents, packed rows or full keys as the layer caches them),
    /// through `o_proj`: `[b, t, d]` in `dtype`.
    fn attend(
        &self,
        dtype: DType,
        q: &Tensor,
        cached_k: Tensor,
        cached_v: Tensor,
        start: usize,
        mask: &mut PrefillMasks,
    ) -> Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        // Packed rows go to the kernel as they are where it reads them; otherwise unpacked
        // (on the tensor's device) to the activation dtype.
        let fused = self.decode.as_ref().filter(|_| t == 1);
        let (hk, hv) = match &self.packed {
            Some(_) if fused.is_some_and(|op| op.packed.is_some()) => (cached_k, cached_v),
            Some((ck, cv)) => (ck.decode(&cached_k, dtype)?, cv.decode(&cached_v, dtype)?),
            None => (cached_k, cached_v),
        };
        if let Some(op) = fused {
            // [b, H, dh] f32 from the kernel; every sequence of the batch is at `start`.
            let y = op.with_lens(vec![start + 1; b]).forward(
                &q.squeeze(2)?.contiguous()?,
                &hk.squeeze(1)?,
                &hv.squeeze(1)?,
            )?;
            return self.kernel_output(y, dtype);
        }
        let (hk, hv) = (hk.squeeze(1)?, hv.squeeze(1)?);
        let k = match &self.full_k {
            None => rebuild_k(&hk, &self.k, self.n_kv, &self.rope, false)?,
            Some(_) => {
                let total = hk.dim(1)?;
                hk.reshape((b, total, self.n_kv, self.head_dim))?
                    .transpose(1, 2)?
            }
        };
        if t > LATENT_VALUES_MAX_ROWS {
            return qmatmul(&self.prefill_attention(q, &k, &hv, start, mask)?, &*self.o);
        }
        let probs = attention_probs(q, &k, start, self.window, false)?;
        match &self.o_fused {
            Some(o_fused) => qmatmul(
                &fused_value_inputs(&probs, &hv, &self.v, self.n_kv, t)?,
                &**o_fused,
            ),
            None => qmatmul(
                &latent_values(&probs, &hv, &self.v, self.n_kv, self.n_heads, self.head_dim)?,
                &*self.o,
            ),
        }
    }

    /// The layer's output from the decode kernel's `[b, H, dh]` f32 (or `[b, H, r_v]` for fused
    /// values): `[b, 1, d]` in `dtype`.
    fn kernel_output(&self, y: Tensor, dtype: DType) -> Result<Tensor> {
        let (b, h, _) = y.dims3()?;
        let dh = self.head_dim;
        let mut y = y.to_dtype(dtype)?;
        if let Some(o_fused) = &self.o_fused {
            // [b, H, r_v]: the value bias is folded into o_fused's bias.
            let rv = y.dim(2)?;
            return qmatmul(&y.reshape((b, 1, h * rv))?, &**o_fused);
        }
        if let Some(bias) = &self.v.bias {
            // Probabilities sum to one: the bias of V passes through attention unchanged.
            y = y
                .reshape((b, self.n_kv, h / self.n_kv, dh))?
                .broadcast_add(&bias.reshape((1, self.n_kv, 1, dh))?)?;
        }
        qmatmul(&y.reshape((b, 1, h * dh))?, &*self.o)
    }

    /// Prefill: K (rebuilt with RoPE, or the cached full K) and V (rebuilt once) of every cached
    /// position go to the engine's own attention (flash attention where the engine is built with
    /// it, else its chunked SDPA), so a Palu prompt costs what a stock prompt does plus the
    /// rebuild. `q` is `[b, H, t, dh]` at positions `start..start+t`, `k` `[b, H_kv, T, dh]`,
    /// `hv` the value latents `[b, T, R_v]`; returns `[b, t, H·dh]`.
    ///
    /// One sequence at a time (as the paged path calls it): the engine's chunked SDPA
    /// materializes its mask, scores and softmax as `[b·H, 1024, T]` tensors per query chunk,
    /// 34 GB each for 16 prompts of 32K tokens; per sequence they are b× smaller, for the same
    /// arithmetic.
    fn prefill_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        hv: &Tensor,
        start: usize,
        masks: &mut PrefillMasks,
    ) -> Result<Tensor> {
        let b = q.dim(0)?;
        if b == 1 {
            return self.prefill_attention_one(q, k, hv, start, masks);
        }
        let outs = (0..b)
            .map(|i| {
                self.prefill_attention_one(
                    &q.narrow(0, i, 1)?,
                    &k.narrow(0, i, 1)?,
                    &hv.narrow(0, i, 1)?,
                    start,
                    masks,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outs, 0)
    }

    /// [`Self::prefill_attention`] for a batch of one.
    fn prefill_attention_one(
        &self,
        q: &Tensor,
        k: &Tensor,
        hv: &Tensor,
        start: usize,
        masks: &mut PrefillMasks,
    ) -> Result<Tensor> {
        let (b, h, t, dh) = q.dims4()?;
        let total = hv.dim(1)?;
        let v = self
            .v
            .reconstruct(hv)?
            .reshape((b, total, self.n_kv, dh))?
            .transpose(1, 2)?;
        let mask = masks.get(start, t, self.window, q.dtype(), q.device())?;
        let params = SdpaParams {
            n_kv_groups: h / self.n_kv,
            softcap: None,
            softmax_scale: 1.0 / (dh as f32).sqrt(),
            sliding_window: self.window,
            sinks: None,
        };
        Sdpa.run_attention(
            &q.contiguous()?,
            &k.contiguous()?,
            &v.contiguous()?,
            Some(&mask),
            // Flash attention's non-varlen causal path: every sequence of a Palu batch is at
            // the same offset (forward_inner refuses others), so no cumulative lengths.
            None,
            &params,
        )?
        .transpose(1, 2)?
        .reshape((b, t, h * dh))
    }
}

/// The prefill masks of one forward pass, shared by the layers (at 32K tokens one holds 32K²
/// elements): one per (start, length, device, dtype); a paged batch can hold sequences at
/// several offsets.
#[derive(Default)]
pub(crate) struct PrefillMasks(Vec<((usize, usize), Tensor)>);

impl PrefillMasks {
    fn get(
        &mut self,
        start: usize,
        t: usize,
        window: Option<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let hit = self.0.iter().find(|(key, m)| {
            *key == (start, t) && m.device().same_device(device) && m.dtype() == dtype
        });
        if let Some((_, m)) = hit {
            return Ok(m.clone());
        }
        let m = prefill_mask(start, t, window, dtype, device)?;
        self.0.push(((start, t), m.clone()));
        Ok(m)
    }
}

/// The additive prefill mask `[1, 1, t, start + t]` for queries at `start..start+t`: 0 where
/// key `j` is visible from position `p` (`j ≤ p`, and `p − j < window` with a sliding window),
/// −∞ elsewhere, as `model::attention_mask` (the reference) builds it. Rank 4 keeps the
/// engine's SDPA on its chunked path for long prompts (a rank-2 mask sends it to one that
/// materializes all scores). Built on `device` from two position ranges, once per forward pass
/// (see `prefill_attention`): on the host a 32K-token prompt's mask was a 4 GiB f32 buffer and
/// a billion-step loop, a 128K one 64 GiB.
pub(crate) fn prefill_mask(
    start: usize,
    t: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let total = start + t;
    let pos = |a: usize, b: usize| -> Result<Tensor> {
        let (a, b) = (u32::try_from(a), u32::try_from(b));
        match (a, b) {
            (Ok(a), Ok(b)) => Tensor::arange(a, b, device),
            _ => candle_core::bail!("prefill mask: positions beyond u32 ({start} + {t})"),
        }
    };
    let rows = pos(start, total)?.unsqueeze(1)?; // [t, 1]: the queries' positions p
    let cols = pos(0, total)?.unsqueeze(0)?; // [1, total]: the keys' positions j
    let mut visible = cols.broadcast_le(&rows)?; // j ≤ p
    if let Some(w) = window {
        // p − j < w  ⇔  j + w > p (unsigned, no underflow).
        let shifted = pos(w, total + w)?.unsqueeze(0)?;
        visible = (visible * shifted.broadcast_gt(&rows)?)?;
    }
    let zero = Tensor::zeros((), dtype, device)?.broadcast_as((t, total))?;
    let hidden = Tensor::full(f32::NEG_INFINITY, (), device)?
        .to_dtype(dtype)?
        .broadcast_as((t, total))?;
    visible
        .where_cond(&zero, &hidden)?
        .unsqueeze(0)?
        .unsqueeze(0)?
        .contiguous()
}

/// One forward pass's paged-attention inputs on one device.
pub(crate) struct PagedStep {
    /// `[b·t]` i64: the slot of each new row (negative: padding, not written).
    slots: Tensor,
    /// `[b, max_blocks]` u32 block tables.
    tables: Tensor,
    block_size: usize,
    /// The block tables on the host, read once when a prompt has a cached prefix.
    host: std::sync::OnceLock<Vec<Vec<u32>>>,
    /// RoPE tables of the batch's positions, `[b, t, dh/2]`: one table per device serves all its
    /// layers, so they are built once per forward pass.
    rope: std::sync::OnceLock<(Tensor, Tensor)>,
}

impl PagedStep {
    fn new(meta: &PagedAttentionInputMetadata, device: &Device, block_size: usize) -> Result<Self> {
        let loc = device.location();
        let pick = |m: Option<&std::collections::HashMap<_, Tensor>>, what: &str| {
            m.and_then(|m| m.get(&loc)).cloned().ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "palu: paged attention metadata has no {what} for {loc:?}"
                ))
            })
        };
        Ok(Self {
            slots: pick(Some(&meta.slot_mappings), "slot mapping")?
                .flatten_all()?
                .to_dtype(DType::I64)?,
            tables: pick(meta.block_tables.as_ref(), "block tables")?,
            block_size,
            host: std::sync::OnceLock::new(),
            rope: std::sync::OnceLock::new(),
        })
    }

    /// The inputs of sequences `first .. first + n` of the step (`t` new tokens each): their
    /// slots and block tables.
    fn sequences(self, first: usize, n: usize, t: usize) -> Result<Self> {
        if first == 0 && n == self.tables.dim(0)? {
            return Ok(self);
        }
        Ok(Self {
            slots: self.slots.narrow(0, first * t, n * t)?,
            tables: self.tables.narrow(0, first, n)?,
            block_size: self.block_size,
            host: std::sync::OnceLock::new(),
            rope: std::sync::OnceLock::new(),
        })
    }

    /// cos/sin `[b, t, dh/2]` for sequences starting at `offsets`.
    fn rope_tables(&self, rope: &Rope, offsets: &[usize], t: usize) -> Result<(Tensor, Tensor)> {
        if let Some(r) = self.rope.get() {
            return Ok(r.clone());
        }
        let mut cos = Vec::with_capacity(offsets.len());
        let mut sin = Vec::with_capacity(offsets.len());
        for &o in offsets {
            let (c, s) = rope.tables(o, t)?;
            cos.push(c);
            sin.push(s);
        }
        let r = (Tensor::stack(&cos, 0)?, Tensor::stack(&sin, 0)?);
        let _ = self.rope.set(r.clone());
        Ok(r)
    }

    fn host_tables(&self) -> Result<&Vec<Vec<u32>>> {
        if self.host.get().is_none() {
            let t = self
                .tables
                .to_device(&Device::Cpu)?
                .to_dtype(DType::U32)?
                .to_vec2::<u32>()?;
            let _ = self.host.set(t);
        }
        Ok(self.host.get().expect("set above"))
    }
}

struct Block {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Box<dyn MlpLayer>,
}

pub struct PaluTextModel {
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Arc<dyn QuantMethod>,
    cache: EitherCache,
    device: Device,
    mapper: Box<dyn DeviceMapper + Send + Sync>,
    geometry: PaluGeometry,
    max_seq_len: usize,
    stats: Arc<KvStats>,
    /// Elements of one token's widest activation (the MLP's gate and up projections).
    widest_activation: usize,
    /// The most elements an activation of one forward pass may hold ([`ActivationLimit`]).
    max_activation_elems: usize,
}

/// candle 0.10's CUDA kernels launch and index with 32-bit element counts
/// (huggingface/candle#3604): at 2^32 elements a launch fails with `CUDA_ERROR_INVALID_VALUE`,
/// just above it a grid-stride loop wraps and never ends (the 16 × 32K serve-bench run of stop 13
/// hung on the 524K-token step's 7.5·10⁹-element MLP activation), and between 2^31 and 2^32 the
/// loop index can wrap once. So on CUDA a paged step's activations stay at or below 2^31
/// elements (`PALU_MAX_ACTIVATION_ELEMS` overrides): a prefill of many long prompts runs as
/// sub-batches of sequences; a single prompt chunk above the limit is a clear error instead of a
/// hang. The CPU backend indexes with `usize`.
pub struct ActivationLimit;

impl ActivationLimit {
    pub const CUDA_DEFAULT: usize = 1 << 31;

    fn for_device(device: &Device) -> usize {
        let env = std::env::var("PALU_MAX_ACTIVATION_ELEMS").ok();
        match env.as_deref().map(str::parse::<usize>) {
            Some(Ok(n)) if n > 0 => n,
            Some(_) => {
                tracing::warn!(
                    "PALU_MAX_ACTIVATION_ELEMS={}: not a positive element count; using the default",
                    env.unwrap_or_default()
                );
                Self::default_for(device)
            }
            None => Self::default_for(device),
        }
    }

    fn default_for(device: &Device) -> usize {
        if device.is_cuda() {
            Self::CUDA_DEFAULT
        } else {
            usize::MAX
        }
    }
}

fn lowrank(
    vb: &ShardedVarBuilder,
    cfg: &ModelConfig,
    l: usize,
    kind: KvKind,
) -> Result<LowRankProj> {
    let module = ModelConfig::module_name(l, kind);
    let ranks = cfg
        .head_wise_ranks
        .as_ref()
        .and_then(|m| m.get(&module))
        .ok_or_else(|| {
            candle_core::Error::Msg(format!("head_wise_ranks has no entry `{module}`"))
        })?;
    let gdh = cfg.kv_width() / ranks.len();
    let vbm = vb.pp(kind.proj_name());
    let down = vbm.get((ranks.iter().sum::<usize>(), cfg.hidden_size), "VT.weight")?;
    let mut ups = Vec::new();
    let mut biases = Vec::new();
    for (i, &r) in ranks.iter().enumerate() {
        let u = vbm.pp(format!("U.{i}"));
        ups.push(u.get((gdh, r), "weight")?);
        if cfg.qkv_bias {
            biases.push(u.get(gdh, "bias")?);
        }
    }
    let bias = if biases.is_empty() {
        None
    } else {
        Some(Tensor::cat(&biases, 0)?)
    };
    LowRankProj::new(down, ups, bias)
}

impl PaluTextModel {
    /// `latent_bits` 16 caches the latents in the activation dtype; 2, 3, 4 or 8 caches packed
    /// rows ([`LatentCodec`]). `paged`: the engine runs paged attention, and the latents live in
    /// its blocks ([`crate::paged`]).
    pub fn new(
        cfg: &ModelConfig,
        vb: ShardedVarBuilder,
        meta: NormalLoadingMetadata,
        latent_bits: u8,
        plan: Option<&Plan>,
        stats: Arc<KvStats>,
        paged: bool,
    ) -> Result<Self> {
        crate::quant::check_bits(latent_bits)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mapper = meta.mapper;
        let vb_m = vb.pp("model");
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed_w = mapper
            .set_nm_device(vb_m.pp("embed_tokens"), false)
            .get((v, d), "weight")?;
        let embed = Embedding::new(embed_w.clone(), d);
        let lm_head = if cfg.tie_word_embeddings {
            ReplicatedLayer::from_linear(candle_nn::Linear::new(
                mapper.cast_nm_device(&embed_w, meta.loading_isq)?,
                None,
            ))?
        } else {
            ReplicatedLayer::new(
                d,
                v,
                &None,
                false,
                mapper.set_nm_device(vb.pp("lm_head"), meta.loading_isq),
            )?
        };
        let norm = RmsNorm::new(
            d,
            cfg.rms_norm_eps,
            mapper.set_nm_device(vb_m.pp("norm"), false),
        )?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        // Layers whose one-token decode steps run on candle ops instead of the fused kernel.
        let mut on_candle = Vec::new();
        let mut unpacked_first = Vec::new();
        // One RoPE table per device, shared by the layers mapped there.
        let mut ropes: Vec<Arc<Rope>> = Vec::new();
        for l in 0..cfg.num_layers {
            let device = mapper
                .device_for(l, false)
                .unwrap_or(&meta.real_device)
                .clone();
            let rope = match ropes.iter().find(|r| r.device().same_device(&device)) {
                Some(r) => Arc::clone(r),
                None => {
                    ropes.push(Arc::new(Rope::new(cfg, &device)));
                    Arc::clone(ropes.last().unwrap())
                }
            };
            let vb_l = vb_m.pp(format!("layers.{l}"));
            let vb_a = mapper.set_device(l, vb_l.pp("self_attn"), meta.loading_isq);
            let vb_f = mapper.set_device(l, vb_l.pp("self_attn"), false);
            let (h, dh) = (cfg.num_heads, cfg.head_dim);
            let k = lowrank(&vb_f, cfg, l, KvKind::K)?;
            let v = lowrank(&vb_f, cfg, l, KvKind::V)?;
            let layer_plan = plan.map(|p| &p.layers[l]);
            let full_keys = layer_plan.is_some_and(|p| p.keys == Keys::Full);
            let fused_values = layer_plan.is_some_and(|p| p.values == Values::Fused);
            // Full keys: one quantization group per KV head when packed.
            let key_groups = if full_keys {
                vec![dh; cfg.num_kv_heads]
            } else {
                k.ranks.clone()
            };
            let packed = if latent_bits < 16 {
                let codec = |ranks: &[usize]| {
                    LatentCodec::new(latent_bits, ranks, ZeroPoint::Free)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))
                };
                Some((codec(&key_groups)?, codec(&v.ranks)?))
            } else {
                None
            };
            let decode = if full_keys {
                None
            } else {
                decode_kernel(&k, &v, cfg, &rope, vb_f.dtype(), &device, packed.as_ref())?.map(
                    |op| {
                        if fused_values {
                            op.with_latent_out()
                        } else {
                            op
                        }
                    },
                )
            };
            let full_k = if full_keys {
                Some((k.dense_weight()?, k.bias.clone()))
            } else {
                None
            };
            let o_fused = if fused_values {
                let w_o = vb_f.pp("o_proj").get((d, h * dh), "weight")?;
                let (w, bias) = fused_o_proj(&w_o, &v, h, cfg.num_kv_heads, dh)?;
                Some(ReplicatedLayer::from_linear(candle_nn::Linear::new(
                    w, bias,
                ))?)
            } else {
                None
            };
            match &decode {
                None => on_candle.push(l),
                Some(op) if packed.is_some() && op.packed.is_none() => unpacked_first.push(l),
                _ => {}
            }
            let attn = Attention {
                q: ReplicatedLayer::new(d, h * dh, &None, cfg.qkv_bias, vb_a.pp("q_proj"))?,
                o: ReplicatedLayer::new(h * dh, d, &None, false, vb_a.pp("o_proj"))?,
                k,
                v,
                n_heads: h,
                n_kv: cfg.num_kv_heads,
                head_dim: dh,
                window: cfg.sliding_window,
                rope,
                packed,
                full_k,
                o_fused,
                decode,
            };
            let comm = mapper.get_comm_for(l)?;
            let mlp = Mlp::new(
                mapper.set_device(l, vb_l.pp("mlp"), meta.loading_isq),
                d,
                cfg.intermediate_size,
                &None,
                Activation::Silu,
                &comm,
            )?;
            blocks.push(Block {
                input_norm: RmsNorm::new(
                    d,
                    cfg.rms_norm_eps,
                    mapper.set_device(l, vb_l.pp("input_layernorm"), false),
                )?,
                attn,
                post_norm: RmsNorm::new(
                    d,
                    cfg.rms_norm_eps,
                    mapper.set_device(l, vb_l.pp("post_attention_layernorm"), false),
                )?,
                mlp: Box::new(mlp),
            });
        }
        // The per-layer choice, printed once at startup.
        match on_candle.len() {
            0 => tracing::info!(
                "palu: one-token decode steps on the fused CUDA kernel in all {} layers{}",
                cfg.num_layers,
                match (latent_bits < 16, unpacked_first.len()) {
                    (false, _) => String::new(),
                    (true, 0) => format!(" (reading the {latent_bits}-bit packed latents directly)"),
                    (true, n) if n == cfg.num_layers =>
                        format!(" ({latent_bits}-bit latents unpacked on the device first: no packed instantiation for the shape)"),
                    (true, _) => format!(
                        " ({latent_bits}-bit latents read packed, but unpacked on the device first in layers {unpacked_first:?})"
                    ),
                }
            ),
            n if n == cfg.num_layers => tracing::info!(
                "palu: decode attention by candle ops (the fused kernel needs a CUDA build and device, f16/bf16, no sliding window and a shape it covers)"
            ),
            n => tracing::info!(
                "palu: one-token decode steps on the fused CUDA kernel in {} of {} layers; candle ops in layers {on_candle:?} (no instantiation for their shape)",
                cfg.num_layers - n,
                cfg.num_layers
            ),
        }
        let mut geometry =
            PaluGeometry::from_config(cfg).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        geometry.packed = latent_bits < 16;
        if let Some(plan) = plan {
            geometry.apply_plan(plan);
            tracing::info!("{}", plan.summary());
        }
        if paged {
            // Block rows: the latent row in the activation dtype, or the packed row's bytes
            // in 16-bit elements.
            let rows = blocks
                .iter()
                .enumerate()
                .map(|(l, b)| match &b.attn.packed {
                    Some((ck, cv)) => (ck.row_bytes().div_ceil(2), cv.row_bytes().div_ceil(2)),
                    None => (geometry.k_ranks[l], geometry.v_ranks[l]),
                })
                .collect();
            geometry.paged = Some(PagedRows { rows });
        }
        let max_activation_elems = ActivationLimit::for_device(&meta.real_device);
        Ok(PaluTextModel {
            embed,
            blocks,
            norm,
            lm_head,
            cache: EitherCache::Normal(NormalCache::new(
                cfg.num_layers,
                cfg.max_position_embeddings,
            )),
            device: meta.real_device,
            mapper,
            geometry,
            max_seq_len: cfg.max_position_embeddings,
            stats,
            widest_activation: (2 * cfg.intermediate_size)
                .max(cfg.hidden_size)
                .max(cfg.num_heads * cfg.head_dim),
            max_activation_elems,
        })
    }

    /// Override the per-step activation limit ([`ActivationLimit`]): tests drive the sub-batched
    /// paged prefill on the CPU with a small one.
    pub fn set_max_activation_elems(&mut self, n: usize) {
        self.max_activation_elems = n.max(1);
    }

    /// Sequences per sub-batch for a step of `b` sequences of `t` new tokens, or the error for a
    /// chunk too large even alone.
    fn sequences_per_pass(&self, b: usize, t: usize) -> Result<usize> {
        let per_seq = t.saturating_mul(self.widest_activation);
        if per_seq > self.max_activation_elems {
            candle_core::bail!(
                "palu: a prompt chunk of {t} tokens makes a {t} × {} activation ({per_seq} elements), more than the {} one step may hold on this device (candle 0.10's CUDA kernels index 32-bit element counts, huggingface/candle#3604); serve prompts of at most {} tokens per step",
                self.widest_activation,
                self.max_activation_elems,
                self.max_activation_elems / self.widest_activation
            )
        }
        Ok((self.max_activation_elems / per_seq.max(1)).clamp(1, b.max(1)))
    }

    fn forward_inner(
        &self,
        ids: &Tensor,
        seqlen_offsets: &[usize],
        context_lens: Vec<(usize, usize)>,
    ) -> Result<Tensor> {
        let start = seqlen_offsets.first().copied().unwrap_or(0);
        if seqlen_offsets.iter().any(|&o| o != start) {
            candle_core::bail!("palu: a batch mixes sequences at different positions ({seqlen_offsets:?}); the latent cache needs equal offsets")
        }
        // The plain cache prefills a batch in one pass: refuse only what certainly fails or
        // hangs (more than 2^32 − 1 elements), not the margin the paged path keeps.
        let (b, t) = ids.dims2()?;
        let elems = b.saturating_mul(t).saturating_mul(self.widest_activation);
        if self.device.is_cuda() && elems > u32::MAX as usize {
            candle_core::bail!(
                "palu: {b} prompts of {t} tokens in one step make {elems} elements per activation; candle 0.10's CUDA kernels index at most 2^32 − 1 (huggingface/candle#3604), and the plain latent cache prefills a batch in one pass: serve with paged attention (--paged-attn-context), which splits such steps, or with fewer concurrent requests"
            )
        }
        self.stats.record_fed(ids.elem_count() as u64);
        let mut x = self.embed.forward(ids)?;
        let mut cache = self.cache.normal();
        let mut mask = PrefillMasks::default();
        for (l, blk) in self.blocks.iter().enumerate() {
            x = self.mapper.map(x, l)?;
            let a = blk.attn.forward(
                &blk.input_norm.forward(&x)?,
                start,
                &mut cache.0[l],
                &mut mask,
            )?;
            x = (x + a)?;
            x = (&x + blk.mlp.forward(&blk.post_norm.forward(&x)?)?)?;
        }
        self.record_cache_bytes(&cache)?;
        drop(cache);
        // Only the positions the engine asks for reach the LM head.
        self.head(x, context_lens)
    }
}

impl PaluTextModel {
    /// The forward pass over the engine's paged blocks (`pools`: per layer).
    fn forward_paged(
        &self,
        ids: &Tensor,
        seqlen_offsets: &[usize],
        context_lens: Vec<(usize, usize)>,
        pools: &[(Tensor, Tensor)],
        meta: &PagedAttentionInputMetadata,
    ) -> Result<Tensor> {
        if pools.len() != self.blocks.len() {
            candle_core::bail!(
                "palu: the engine passed {} paged layers for a model of {}",
                pools.len(),
                self.blocks.len()
            )
        }
        let (b, t) = ids.dims2()?;
        let per_pass = self.sequences_per_pass(b, t)?;
        let mut masks = PrefillMasks::default();
        // Sequences are independent within a step (each writes its own slots and reads its own
        // blocks): run them in sub-batches whose activations stay under the limit (one pass,
        // the whole step, almost always).
        let mut logits = Vec::with_capacity(b.div_ceil(per_pass));
        for first in (0..b).step_by(per_pass) {
            let n = per_pass.min(b - first);
            logits.push(self.forward_paged_seqs(
                &ids.narrow(0, first, n)?,
                &seqlen_offsets[first..first + n],
                context_lens[first..first + n].to_vec(),
                pools,
                meta,
                first,
                &mut masks,
            )?);
        }
        match logits.len() {
            1 => Ok(logits.pop().expect("one pass")),
            _ => Tensor::cat(&logits, 0),
        }
    }

    /// [`Self::forward_paged`] for the step's sequences `first .. first + ids.dim(0)`.
    #[allow(clippy::too_many_arguments)]
    fn forward_paged_seqs(
        &self,
        ids: &Tensor,
        seqlen_offsets: &[usize],
        context_lens: Vec<(usize, usize)>,
        pools: &[(Tensor, Tensor)],
        meta: &PagedAttentionInputMetadata,
        first: usize,
        masks: &mut PrefillMasks,
    ) -> Result<Tensor> {
        let (n, t) = ids.dims2()?;
        self.stats.record_fed(ids.elem_count() as u64);
        let mut x = self.embed.forward(ids)?;
        let mut step: Option<PagedStep> = None;
        for (l, blk) in self.blocks.iter().enumerate() {
            x = self.mapper.map(x, l)?;
            if step
                .as_ref()
                .is_none_or(|s| !s.slots.device().same_device(x.device()))
            {
                let bs = crate::paged::pool_rows(&pools[l].0)?.block_size;
                step = Some(PagedStep::new(meta, x.device(), bs)?.sequences(first, n, t)?);
            }
            let a = blk.attn.forward_paged(
                &blk.input_norm.forward(&x)?,
                seqlen_offsets,
                &pools[l],
                step.as_ref().expect("set above"),
                masks,
            )?;
            x = (x + a)?;
            x = (&x + blk.mlp.forward(&blk.post_norm.forward(&x)?)?)?;
        }
        self.head(x, context_lens)
    }

    /// The final norm and the LM head over the positions the engine asks for.
    fn head(&self, x: Tensor, context_lens: Vec<(usize, usize)>) -> Result<Tensor> {
        let x = self.norm.forward(&x.to_device(&self.device)?)?;
        let mut rows = Vec::with_capacity(context_lens.len());
        for (i, (s, n)) in context_lens.into_iter().enumerate() {
            rows.push(x.narrow(0, i, 1)?.narrow(1, s, n)?);
        }
        let x = Tensor::cat(&rows, 0)?;
        qmatmul(&x, &*self.lm_head)
    }

    /// Measure the bytes the layers' cache tensors hold right now, per cached token.
    fn record_cache_bytes(&self, cache: &NormalCache) -> Result<()> {
        let (mut bytes, mut allocated, mut tokens) = (0u64, 0u64, 0u64);
        for layer in &cache.0 {
            if let (Some(k), Some(v)) = (layer.k()?, layer.v()?) {
                bytes += tensor_bytes(&k) + tensor_bytes(&v);
                // [b, 1, T, row]: every layer holds the same tokens.
                tokens = (k.dim(0)? * k.dim(2)?) as u64;
            }
            if let KvCache::Normal { k, v } = layer {
                allocated += [&k.all_data, &v.all_data]
                    .into_iter()
                    .flatten()
                    .map(tensor_bytes)
                    .sum::<u64>();
            }
        }
        self.stats.record(bytes, allocated, tokens);
        Ok(())
    }
}

impl NormalModel for PaluTextModel {
    fn forward(
        &self,
        input_ids: &Tensor,
        seqlen_offsets: &[usize],
        context_lens: Vec<(usize, usize)>,
        _position_ids: Vec<usize>,
        metadata: Option<(Vec<(Tensor, Tensor)>, &PagedAttentionInputMetadata)>,
        _flash_params: &FlashParams,
    ) -> Result<Tensor> {
        match metadata {
            Some((pools, meta)) => {
                self.forward_paged(input_ids, seqlen_offsets, context_lens, &pools, meta)
            }
            None => self.forward_inner(input_ids, seqlen_offsets, context_lens),
        }
    }
    fn xlora_forward(
        &self,
        _input_ids: &Tensor,
        _input_ids_full: &Tensor,
        _seqlen_offsets: &[usize],
        _seqlen_offsets_full: &[usize],
        _no_kv_cache: bool,
        _non_granular_state: &Option<mistralrs_core::model_plugin::NonGranularState>,
        _context_lens: Vec<(usize, usize)>,
        _position_ids: Vec<usize>,
        _flash_params: &FlashParams,
        _flash_params_full: &FlashParams,
    ) -> Result<Tensor> {
        candle_core::bail!("palu: X-LoRA is not supported with a Palu KV cache")
    }
    fn is_xlora(&self) -> bool {
        false
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn cache(&self) -> &EitherCache {
        &self.cache
    }
    fn cache_mut(&mut self) -> &mut EitherCache {
        &mut self.cache
    }
    fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }
    fn config(&self) -> &ModelConfigMetadata {
        &self.geometry.meta
    }
    fn model_config(&self) -> Arc<dyn ModelConfigLike + Send + Sync> {
        Arc::new(self.geometry.clone())
    }
}

impl IsqModel for PaluTextModel {
    fn get_layers(
        &mut self,
    ) -> (
        Vec<(&mut Arc<dyn QuantMethod>, Option<usize>)>,
        &dyn DeviceMapper,
    ) {
        let mut layers = vec![(&mut self.lm_head, None)];
        for (i, b) in self.blocks.iter_mut().enumerate() {
            layers.push((&mut b.attn.q, Some(i)));
            layers.push((&mut b.attn.o, Some(i)));
            if let Some(o_fused) = &mut b.attn.o_fused {
                layers.push((o_fused, Some(i)));
            }
            layers.extend(b.mlp.get_isq_layers().into_iter().map(|m| (m, Some(i))));
        }
        (layers, &*self.mapper)
    }
    fn residual_tensors(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
}

impl AnyMoeBaseModelMixin for PaluTextModel {}

/// The fused decode kernel for a layer where it applies: a CUDA build on a CUDA device, f16 or
/// bf16 activations, no sliding window, and an instantiation for the shape (see
/// kernels/README.md). Packed latents are read as they are where a packed instantiation covers
/// the shape, else unpacked on the device first.
fn decode_kernel(
    k: &LowRankProj,
    v: &LowRankProj,
    cfg: &ModelConfig,
    rope: &Rope,
    dtype: DType,
    device: &Device,
    packed: Option<&(LatentCodec, LatentCodec)>,
) -> Result<Option<crate::decode_op::LatentDecode>> {
    #[cfg(feature = "cuda")]
    {
        let groups = k.ranks.len();
        let eligible = device.is_cuda()
            && matches!(dtype, DType::F16 | DType::BF16)
            && cfg.sliding_window.is_none()
            && groups > 0
            // Latent rows are read in 16-byte pieces: group offsets a multiple of 8 halves.
            && k.ranks[0] % 8 == 0
            && v.ranks[0] % 8 == 0
            && palu_kernels::decode_supported(
                cfg.head_dim,
                cfg.num_kv_heads / groups,
                cfg.num_heads / cfg.num_kv_heads,
                k.ranks[0],
                v.ranks[0],
            );
        if eligible {
            let op = crate::decode_op::LatentDecode::from_projections(
                k,
                v,
                cfg.num_heads,
                cfg.num_kv_heads,
                rope.inv_freq(),
                dtype,
            )?;
            let reads_packed = |(ck, _): &(LatentCodec, LatentCodec)| {
                palu_kernels::decode_packed_supported(
                    cfg.head_dim,
                    cfg.num_kv_heads / groups,
                    cfg.num_heads / cfg.num_kv_heads,
                    k.ranks[0],
                    v.ranks[0],
                    ck.bits(),
                )
            };
            return Ok(match packed {
                Some(codecs) if reads_packed(codecs) => {
                    op.map(|op| op.with_packed(codecs.0.clone(), codecs.1.clone()))
                }
                _ => op,
            });
        }
    }
    let _ = (k, v, cfg, rope, dtype, device, packed);
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device-built prefill mask is the reference mask, element for element (0 and −∞),
    /// with and without a prefix and a sliding window, in f32 and bf16.
    #[test]
    fn prefill_mask_equals_the_reference_mask() {
        let dev = Device::Cpu;
        for (start, t) in [(0, 1), (0, 7), (5, 3), (9, 12), (0, 33)] {
            for window in [None, Some(1), Some(4), Some(100)] {
                let want = crate::model::attention_mask(start, t, window, &dev).unwrap();
                for dtype in [DType::F32, DType::BF16] {
                    let got = prefill_mask(start, t, window, dtype, &dev).unwrap();
                    assert_eq!(got.dims(), &[1, 1, t, start + t]);
                    let got: Vec<Vec<f32>> = got
                        .squeeze(0)
                        .and_then(|m| m.squeeze(0))
                        .and_then(|m| m.to_dtype(DType::F32))
                        .and_then(|m| m.to_vec2())
                        .unwrap();
                    let want: Vec<Vec<f32>> = want.to_vec2().unwrap();
                    assert_eq!(got, want, "start {start} t {t} window {window:?} {dtype:?}");
                }
            }
        }
    }
}
