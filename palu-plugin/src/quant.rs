//! Low-rank-aware latent quantization: asymmetric round-to-nearest per token and per group.
//!
//! `scale = (max − min) / (2^b − 1)`, `zero = round(−min / scale)`, `q = clamp(round(x / scale) + zero)`,
//! `x̂ = (q − zero) · scale`. Groups are contiguous channel ranges of a token's latent (one per
//! low-rank group, optionally split further into sub-groups of fixed width).
use candle_core::{Result, Tensor};

pub const SUPPORTED_BITS: [u8; 5] = [2, 3, 4, 8, 16];

/// How the zero point is chosen.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum ZeroPoint {
    /// `zero = round(−min / scale)`, any integer: the grid always spans `[min, max]`.
    #[default]
    Free,
    /// The authors' quantizer: `zero` clamped to `[0, 2^b − 1]`. A group whose values all have
    /// one sign then loses its offset (e.g. `[0.26, 0.14]` at 3 bits becomes `[0.12, 0.12]`);
    /// kept to reproduce their numbers.
    Clamped,
}

/// Parameters of one quantized group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupParams {
    pub scale: f32,
    pub zero: f32,
}

pub fn check_bits(bits: u8) -> std::result::Result<(), crate::PaluError> {
    if SUPPORTED_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(crate::PaluError::arg(
            "latent_bits",
            bits,
            "must be one of 2, 3, 4, 8 or 16 (16 = no quantization)",
        ))
    }
}

/// Quantize one group to integer codes.
pub fn quantize_group(x: &[f32], bits: u8, zp: ZeroPoint, codes: &mut [u8]) -> GroupParams {
    let qmax = ((1u32 << bits) - 1) as f32;
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in x {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let scale = ((hi - lo) / qmax).max(1e-8);
    let zero = match zp {
        ZeroPoint::Free => (-lo / scale).round(),
        ZeroPoint::Clamped => (-lo / scale).round().clamp(0.0, qmax),
    };
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = ((v / scale).round() + zero).clamp(0.0, qmax) as u8;
    }
    GroupParams { scale, zero }
}

pub fn dequantize_group(codes: &[u8], p: GroupParams, out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = (c as f32 - p.zero) * p.scale;
    }
}

/// Channel ranges of the quantization groups of a latent of width `Σ group_widths`.
pub fn group_ranges(
    group_widths: &[usize],
    sub_group: Option<usize>,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut off = 0;
    for &w in group_widths {
        let step = sub_group.filter(|&s| s > 0 && s < w).unwrap_or(w);
        let mut s = 0;
        while s < w {
            let e = (s + step).min(w);
            out.push(off + s..off + e);
            s = e;
        }
        off += w;
    }
    out
}

/// Quantize-then-dequantize `[.., R]` latents (what a low-bit cache returns to attention).
pub fn fake_quant(
    h: &Tensor,
    bits: u8,
    group_widths: &[usize],
    sub_group: Option<usize>,
    zp: ZeroPoint,
) -> Result<Tensor> {
    if bits >= 16 {
        return Ok(h.clone());
    }
    let dims = h.dims().to_vec();
    let r = *dims.last().unwrap();
    let data: Vec<f32> = h
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let ranges = group_ranges(group_widths, sub_group);
    let mut out = vec![0f32; data.len()];
    let mut codes = vec![0u8; r];
    for (row, orow) in data.chunks(r).zip(out.chunks_mut(r)) {
        for g in &ranges {
            let p = quantize_group(&row[g.clone()], bits, zp, &mut codes[g.clone()]);
            dequantize_group(&codes[g.clone()], p, &mut orow[g.clone()]);
        }
    }
    Tensor::from_vec(out, dims, h.device())?.to_dtype(h.dtype())
}

/// Pack `bits`-wide codes into a little-endian bit stream.
pub fn pack(codes: &[u8], bits: u8) -> Vec<u8> {
    let mut out = vec![0u8; (codes.len() * bits as usize).div_ceil(8)];
    for (i, &c) in codes.iter().enumerate() {
        let bit = i * bits as usize;
        let v = (c as u16) << (bit % 8);
        out[bit / 8] |= v as u8;
        if bit % 8 + bits as usize > 8 {
            out[bit / 8 + 1] |= (v >> 8) as u8;
        }
    }
    out
}

pub fn unpack(packed: &[u8], bits: u8, n: usize) -> Vec<u8> {
    let mask = (1u16 << bits) - 1;
    (0..n)
        .map(|i| {
            let bit = i * bits as usize;
            let lo = packed[bit / 8] as u16;
            let hi = packed.get(bit / 8 + 1).copied().unwrap_or(0) as u16;
            (((lo | (hi << 8)) >> (bit % 8)) & mask) as u8
        })
        .collect()
}

/// Bytes one token's latent of width `r` occupies at `bits`, with an f16 scale and zero per group.
pub fn bytes_per_token(r: usize, n_groups: usize, bits: u8) -> usize {
    if bits >= 16 {
        2 * r
    } else {
        (r * bits as usize).div_ceil(8) + 4 * n_groups
    }
}
