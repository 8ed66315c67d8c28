//! Calibration-whitened truncated SVD of one K/V projection group.
//!
//! With `XᵀX = S·Sᵀ` (Cholesky, lower `S`), the SVD `w·S = U Σ Vᵀ` truncated to rank r gives
//! `B = U_r √Σ_r` and `A = √Σ_r V_rᵀ S⁻¹`, which minimise `Σ_x ‖(w − BA)x‖²` over the calibration
//! inputs; the squared error equals the sum of the discarded `σ²`. Plain SVD is `S = I`.
use candle_core::{Device, Tensor};
use faer::{Mat, MatRef, Side};

use crate::error::PaluError;

/// `XᵀX` of one layer's K/V input, accumulated in f64.
#[derive(Debug, Clone)]
pub struct Gram {
    pub xtx: Mat<f64>,
    pub n_tokens: usize,
}

impl Gram {
    pub fn new(d: usize) -> Self {
        Gram {
            xtx: Mat::zeros(d, d),
            n_tokens: 0,
        }
    }

    /// Add `xᵀx` for `x` of shape `[.., d]`.
    pub fn accumulate(&mut self, x: &Tensor) -> candle_core::Result<()> {
        let d = self.xtx.nrows();
        let x2 = x.reshape(((), d))?;
        let m = tensor_to_mat(&x2)?;
        let prod = m.transpose() * &m;
        self.xtx += &prod;
        self.n_tokens += m.nrows();
        Ok(())
    }
}

/// The whitening factor of one layer and its inverse.
#[derive(Debug, Clone)]
pub struct Whitening {
    pub s: Mat<f64>,
    pub s_inv: Mat<f64>,
    /// Diagonal shift added to make `XᵀX` positive definite, if one was needed.
    pub shift: Option<f64>,
}

impl Whitening {
    pub fn identity(d: usize) -> Self {
        Whitening {
            s: Mat::identity(d, d),
            s_inv: Mat::identity(d, d),
            shift: None,
        }
    }

    /// Cholesky of `XᵀX` with the authors' fallbacks: shift by `−λ_min + 1e-3` when it is not
    /// positive definite, and add `1e-3·I` to `S` when `S` is numerically singular.
    pub fn from_gram(g: &Gram, layer: usize) -> Result<Self, PaluError> {
        let d = g.xtx.nrows();
        if (0..d).any(|i| (0..d).any(|j| !g.xtx[(i, j)].is_finite())) {
            return Err(PaluError::arg(
                &format!("calibration statistics of layer {layer}"),
                "XᵀX",
                "hold non-finite values (the model overflowed on the calibration text); check the model weights or calibrate in f32",
            ));
        }
        let mut a = g.xtx.clone();
        let mut shift = None;
        let llt = match a.llt(Side::Lower) {
            Ok(l) => l,
            Err(_) => {
                let ev = a.self_adjoint_eigenvalues(Side::Lower).map_err(|e| {
                    PaluError::arg(
                        &format!("calibration statistics of layer {layer}"),
                        "XᵀX",
                        format!("eigen-decomposition failed: {e:?}"),
                    )
                })?;
                let lmin = ev.iter().cloned().fold(f64::INFINITY, f64::min);
                let sh = -lmin + 1e-3;
                for i in 0..d {
                    a[(i, i)] += sh;
                }
                shift = Some(sh);
                a.llt(Side::Lower).map_err(|e| {
                    PaluError::arg(
                        &format!("calibration statistics of layer {layer}"),
                        "XᵀX",
                        format!("not positive definite even after a diagonal shift ({e:?}); use more calibration samples"),
                    )
                })?
            }
        };
        let mut s = llt.L().to_owned();
        let dmax = (0..d).map(|i| s[(i, i)].abs()).fold(0.0, f64::max);
        let dmin = (0..d)
            .map(|i| s[(i, i)].abs())
            .fold(f64::INFINITY, f64::min);
        if dmin <= dmax * 1e-12 {
            for i in 0..d {
                s[(i, i)] += 1e-3;
            }
        }
        let s_inv = lower_inverse(s.as_ref());
        Ok(Whitening { s, s_inv, shift })
    }
}

fn lower_inverse(l: MatRef<f64>) -> Mat<f64> {
    let d = l.nrows();
    let mut inv = Mat::<f64>::identity(d, d);
    faer::linalg::triangular_solve::solve_lower_triangular_in_place(
        l,
        inv.as_mut(),
        faer::Par::rayon(0),
    );
    inv
}

/// Full thin SVD of one whitened group `w_i·S`, kept so that any rank can be cut from it.
#[derive(Debug, Clone)]
pub struct GroupSvd {
    pub u: Mat<f64>,
    pub sigma: Vec<f64>,
    pub v: Mat<f64>,
}

impl GroupSvd {
    pub fn new(w: MatRef<f64>, wh: &Whitening) -> Result<Self, PaluError> {
        let ws = w * &wh.s;
        let svd = ws
            .thin_svd()
            .map_err(|e| PaluError::arg("svd", "group", format!("did not converge: {e:?}")))?;
        let sigma: Vec<f64> = (0..svd.S().dim()).map(|i| svd.S()[i]).collect();
        Ok(GroupSvd {
            u: svd.U().to_owned(),
            sigma,
            v: svd.V().to_owned(),
        })
    }

    pub fn max_rank(&self) -> usize {
        self.sigma.len()
    }

    /// `Σ_{j ≥ r} σ_j²`: the calibration-weighted squared error of a rank-r cut.
    pub fn discarded_energy(&self, r: usize) -> f64 {
        self.sigma.iter().skip(r).map(|s| s * s).sum()
    }

    /// Factors `(A [r, d], B [g·dh, r])` of a rank-r cut.
    pub fn factors(
        &self,
        r: usize,
        wh: &Whitening,
        module: &str,
    ) -> Result<(Mat<f64>, Mat<f64>), PaluError> {
        if r == 0 || r > self.max_rank() {
            return Err(PaluError::arg(
                &format!("rank of {module}"),
                r,
                format!(
                    "must be between 1 and {} (the group's full rank, min(g·head_dim, hidden))",
                    self.max_rank()
                ),
            ));
        }
        let sq: Vec<f64> = self.sigma[..r].iter().map(|s| s.sqrt()).collect();
        let b = Mat::from_fn(self.u.nrows(), r, |i, j| self.u[(i, j)] * sq[j]);
        // A = √Σ_r V_rᵀ S⁻¹
        let vt = Mat::from_fn(r, self.v.nrows(), |i, j| self.v[(j, i)] * sq[i]);
        let a = &vt * &wh.s_inv;
        Ok((a, b))
    }
}

pub fn tensor_to_mat(t: &Tensor) -> candle_core::Result<Mat<f64>> {
    let (r, c) = t.dims2()?;
    let v: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok(Mat::from_fn(r, c, |i, j| v[i * c + j] as f64))
}

pub fn mat_to_tensor(m: MatRef<f64>, dev: &Device) -> candle_core::Result<Tensor> {
    let (r, c) = (m.nrows(), m.ncols());
    let mut v = Vec::with_capacity(r * c);
    for i in 0..r {
        for j in 0..c {
            v.push(m[(i, j)] as f32);
        }
    }
    Tensor::from_vec(v, (r, c), dev)
}
