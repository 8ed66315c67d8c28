//! Orthonormal rotations of a latent space, folded offline into the factors:
//! `A ← T·A`, `B ← B·Tᵀ` leaves `B·A` unchanged and spreads the outlier channels SVD creates
//! (the leading singular directions) over all channels, so per-token quantization loses less.
//!
//! `T = (H_K ⊗ H_{n/K}) / √n` from Sylvester (powers of two) and Paley I/II constructions (orders
//! p+1 and 2(p+1) for primes p); sizes with no such construction get a seeded random orthogonal
//! matrix (also incoherent, as QuaRot/SpinQuant use), and the kind used is reported.
use faer::Mat;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RotationKind {
    Hadamard,
    RandomOrthogonal,
}

/// An orthonormal `n × n` rotation.
pub fn rotation(n: usize, seed: u64) -> (Mat<f64>, RotationKind) {
    if let Some(h) = hadamard(n) {
        let s = 1.0 / (n as f64).sqrt();
        (
            Mat::from_fn(n, n, |i, j| h[i * n + j] as f64 * s),
            RotationKind::Hadamard,
        )
    } else {
        (random_orthogonal(n, seed), RotationKind::RandomOrthogonal)
    }
}

/// A ±1 Hadamard matrix of order `n` (row-major), when one of our constructions reaches it.
pub fn hadamard(n: usize) -> Option<Vec<i8>> {
    if n == 0 {
        return None;
    }
    // n = base · 2^m with a base we can build.
    let mut base = n;
    let mut doublings = 0;
    loop {
        if let Some(h) = base_hadamard(base) {
            let mut h = h;
            let mut size = base;
            for _ in 0..doublings {
                h = sylvester_double(&h, size);
                size *= 2;
            }
            debug_assert!(is_hadamard(&h, n));
            return Some(h);
        }
        if !base.is_multiple_of(2) {
            return None;
        }
        base /= 2;
        doublings += 1;
    }
}

fn base_hadamard(n: usize) -> Option<Vec<i8>> {
    if n == 1 {
        return Some(vec![1]);
    }
    if n == 2 {
        return Some(vec![1, 1, 1, -1]);
    }
    if !n.is_multiple_of(4) {
        return None;
    }
    let q = n - 1;
    if is_prime(q) && q % 4 == 3 {
        let h = paley1(q);
        return is_hadamard(&h, n).then_some(h);
    }
    if n.is_multiple_of(2) {
        let q = n / 2 - 1;
        if is_prime(q) && q % 4 == 1 {
            let h = paley2(q);
            return is_hadamard(&h, n).then_some(h);
        }
    }
    None
}

fn is_prime(q: usize) -> bool {
    q >= 2
        && (2..)
            .take_while(|d| d * d <= q)
            .all(|d| !q.is_multiple_of(d))
}

fn chi(a: usize, q: usize) -> i8 {
    let a = a % q;
    if a == 0 {
        return 0;
    }
    if (1..q).any(|x| x * x % q == a) {
        1
    } else {
        -1
    }
}

/// Paley I: order q+1 for a prime q ≡ 3 (mod 4).
fn paley1(q: usize) -> Vec<i8> {
    let n = q + 1;
    let mut h = vec![0i8; n * n];
    for j in 0..n {
        h[j] = 1;
    }
    for i in 1..n {
        h[i * n] = -1;
        for j in 1..n {
            let qij = chi(j + q - i, q);
            h[i * n + j] = qij + if i == j { 1 } else { 0 };
        }
    }
    h
}

/// Paley II: order 2(q+1) for a prime q ≡ 1 (mod 4).
fn paley2(q: usize) -> Vec<i8> {
    let m = q + 1;
    let c = |i: usize, j: usize| -> i8 {
        match (i, j) {
            (0, 0) => 0,
            (0, _) | (_, 0) => 1,
            _ => chi(j + q - i, q),
        }
    };
    let n = 2 * m;
    let mut h = vec![0i8; n * n];
    for i in 0..m {
        for j in 0..m {
            let blk: [[i8; 2]; 2] = match c(i, j) {
                0 => [[1, -1], [-1, -1]],
                s => [[s, s], [s, -s]],
            };
            for a in 0..2 {
                for b in 0..2 {
                    h[(2 * i + a) * n + 2 * j + b] = blk[a][b];
                }
            }
        }
    }
    h
}

fn sylvester_double(h: &[i8], n: usize) -> Vec<i8> {
    let m = 2 * n;
    let mut out = vec![0i8; m * m];
    for i in 0..n {
        for j in 0..n {
            let v = h[i * n + j];
            out[i * m + j] = v;
            out[i * m + j + n] = v;
            out[(i + n) * m + j] = v;
            out[(i + n) * m + j + n] = -v;
        }
    }
    out
}

pub fn is_hadamard(h: &[i8], n: usize) -> bool {
    if h.len() != n * n || h.iter().any(|&v| v != 1 && v != -1) {
        return false;
    }
    (0..n).all(|i| {
        (i + 1..n).all(|j| {
            (0..n)
                .map(|k| h[i * n + k] as i32 * h[j * n + k] as i32)
                .sum::<i32>()
                == 0
        })
    })
}

/// Seeded random orthogonal matrix (QR of a Gaussian matrix, signs fixed).
pub fn random_orthogonal(n: usize, seed: u64) -> Mat<f64> {
    use rand::{Rng, SeedableRng};
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let g = Mat::from_fn(n, n, |_, _| {
        // Box-Muller
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    });
    let qr = g.qr();
    let q = qr.compute_thin_Q();
    let r = qr.thin_R();
    Mat::from_fn(n, n, |i, j| {
        if r[(j, j)] < 0.0 {
            -q[(i, j)]
        } else {
            q[(i, j)]
        }
    })
}
