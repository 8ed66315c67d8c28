//! The low-rank K/V projection: `x -> h = x·Aᵀ` (the cached latent) and `h -> B·h (+ bias)`.
//!
//! Tensor layout follows the authors' checkpoints: the down factor `VT` is `[R, d]` with the
//! groups' rows concatenated, each up factor `U.i` is `[g·dh, r_i]` and produces the output rows
//! of KV heads `i·g .. i·g+g`.
use candle_core::{Result, Tensor, D};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvKind {
    K,
    V,
}

impl KvKind {
    pub const BOTH: [KvKind; 2] = [KvKind::K, KvKind::V];
    pub fn proj_name(self) -> &'static str {
        match self {
            KvKind::K => "k_proj",
            KvKind::V => "v_proj",
        }
    }
}

/// `y = x Wᵀ + b` for `x` of any leading shape.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let (lead, din) = dims.split_at(dims.len() - 1);
    let n: usize = lead.iter().product();
    let x2 = x.reshape((n, din[0]))?;
    let y = x2.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

#[derive(Debug, Clone)]
pub struct LowRankProj {
    /// Down factor A, `[R, d]` (the authors' `VT`).
    pub down: Tensor,
    /// Up factors B_i, `[g·dh, r_i]` (the authors' `U.i`).
    pub ups: Vec<Tensor>,
    /// Output bias (Qwen2), `[G·g·dh]`: the authors store it per group as `U.i.bias`.
    pub bias: Option<Tensor>,
    pub ranks: Vec<usize>,
    /// Block-diagonal `[G·g·dh, R]` made of the B_i, so that one matmul rebuilds every group.
    up_blockdiag: Tensor,
    /// `[G, r, g·dh]`: the B_iᵀ stacked, when G > 1 groups share one rank. Rebuilding through
    /// it is one batched matmul with G× fewer multiply-adds than the block-diagonal one (whose
    /// off-diagonal blocks are zeros): M-LRD on Llama-3-8B has G = 8.
    ups_t: Option<Tensor>,
    /// Simulate a float8 rebuild ([`LowRankProj::with_fp8_rebuild`]): the latents are rounded to
    /// e4m3 (scaled per token and group) as they enter `reconstruct`.
    fp8_latents: bool,
}

/// Largest finite float8 e4m3 value.
const E4M3_MAX: f64 = 448.0;

/// `t` rounded to float8 e4m3 with one scale per row (last dimension), `absmax / 448`, as an fp8
/// GEMM's operands are stored: each row's largest magnitude maps to e4m3's largest finite value.
/// All-zero rows stay zero.
pub fn fp8_round_rows(t: &Tensor) -> Result<Tensor> {
    let scale = (t
        .abs()?
        .max_keepdim(D::Minus1)?
        .clamp(1e-30, f64::INFINITY)?
        / E4M3_MAX)?;
    let q = t
        .broadcast_div(&scale)?
        .to_dtype(candle_core::DType::F8E4M3)?
        .to_dtype(t.dtype())?;
    q.broadcast_mul(&scale)
}

impl LowRankProj {
    pub fn new(down: Tensor, ups: Vec<Tensor>, bias: Option<Tensor>) -> Result<Self> {
        let ranks: Vec<usize> = ups.iter().map(|u| u.dim(1)).collect::<Result<_>>()?;
        let total: usize = ranks.iter().sum();
        if down.dim(0)? != total {
            candle_core::bail!(
                "down factor has {} rows but the up factors' ranks sum to {total}",
                down.dim(0)?
            )
        }
        let up_blockdiag = block_diag(&ups)?;
        let uniform = ranks.len() > 1 && ranks.windows(2).all(|w| w[0] == w[1]);
        let ups_t = if uniform {
            let t: Vec<Tensor> = ups.iter().map(|u| u.t()).collect::<Result<_>>()?;
            Some(Tensor::stack(&t, 0)?.contiguous()?)
        } else {
            None
        };
        Ok(Self {
            down,
            ups,
            bias,
            ranks,
            up_blockdiag,
            ups_t,
            fp8_latents: false,
        })
    }

    /// This projection with its rebuild simulated in float8 e4m3 (an fp8 tensor-core rebuild, as
    /// Hopper's `wgmma` can run it): each up factor rounded with one scale per output row, and
    /// every latent rounded with one scale per token and group when it is rebuilt; products
    /// accumulate in the model's precision. For measuring the accuracy such a kernel would have.
    pub fn with_fp8_rebuild(&self) -> Result<Self> {
        let ups = self
            .ups
            .iter()
            .map(fp8_round_rows)
            .collect::<Result<Vec<_>>>()?;
        let mut p = Self::new(self.down.clone(), ups, self.bias.clone())?;
        p.fp8_latents = true;
        Ok(p)
    }

    /// The latents as the float8 rebuild reads them: rounded per token and group.
    fn round_latents_fp8(&self, h: &Tensor) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(self.ranks.len());
        let mut at = 0;
        for &r in &self.ranks {
            parts.push(fp8_round_rows(&h.narrow(D::Minus1, at, r)?.contiguous()?)?);
            at += r;
        }
        Tensor::cat(&parts, D::Minus1)
    }

    pub fn total_rank(&self) -> usize {
        self.ranks.iter().sum()
    }

    pub fn out_dim(&self) -> Result<usize> {
        self.up_blockdiag.dim(0)
    }

    /// `[.., d] -> [.., R]`: the values palu caches.
    pub fn latent(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.down, None)
    }

    /// `[.., R] -> [.., G·g·dh]`: rebuild K or V (pre-RoPE) from cached latents.
    pub fn reconstruct(&self, h: &Tensor) -> Result<Tensor> {
        let rounded;
        let h = if self.fp8_latents {
            rounded = self.round_latents_fp8(h)?;
            &rounded
        } else {
            h
        };
        let Some(ups_t) = &self.ups_t else {
            return linear(h, &self.up_blockdiag, self.bias.as_ref());
        };
        // Per group: [N, G, r] → [G, N, r] · [G, r, g·dh] → [N, G·g·dh].
        let (groups, r, gdh) = ups_t.dims3()?;
        let dims = h.dims().to_vec();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let per_group = h
            .reshape((n, groups, r))?
            .transpose(0, 1)?
            .contiguous()?
            .matmul(ups_t)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank ≥ 1") = groups * gdh;
        let out = per_group.transpose(0, 1)?.reshape(out_dims)?;
        match &self.bias {
            Some(b) => out.broadcast_add(b),
            None => Ok(out),
        }
    }

    /// The dense equivalent `B·A` (`[G·g·dh, d]`), for checks and tests.
    pub fn dense_weight(&self) -> Result<Tensor> {
        self.up_blockdiag.matmul(&self.down)
    }
}

/// Block-diagonal matrix of `[m_i, n_i]` blocks.
pub fn block_diag(blocks: &[Tensor]) -> Result<Tensor> {
    let rows: usize = blocks.iter().map(|b| b.dim(0)).sum::<Result<usize>>()?;
    let cols: usize = blocks.iter().map(|b| b.dim(1)).sum::<Result<usize>>()?;
    let dev = blocks
        .first()
        .map(|b| b.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let dtype = blocks
        .first()
        .map(|b| b.dtype())
        .unwrap_or(candle_core::DType::F32);
    let mut row_tensors = Vec::with_capacity(blocks.len());
    let mut col = 0;
    for b in blocks {
        let (m, n) = b.dims2()?;
        let mut parts = Vec::new();
        if col > 0 {
            parts.push(Tensor::zeros((m, col), dtype, &dev)?);
        }
        parts.push(b.clone());
        if cols - col - n > 0 {
            parts.push(Tensor::zeros((m, cols - col - n), dtype, &dev)?);
        }
        row_tensors.push(Tensor::cat(&parts, D::Minus1)?);
        col += n;
    }
    let out = Tensor::cat(&row_tensors, 0)?;
    debug_assert_eq!(out.dims(), &[rows, cols]);
    Ok(out)
}
