//! KV-cache bytes measured on the live cache tensors (not computed from the configuration).
//!
//! The Palu model updates this after every forward pass from the tensors its layers just
//! attended over; the server exposes it at `GET /v1/palu/kv_cache`.
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::Tensor;

#[derive(Debug, Default)]
pub struct KvStats {
    /// Bytes of all layers' K and V cache tensors of the last batch.
    bytes: AtomicU64,
    /// Bytes allocated for them (the engine grows caches in steps, so this is ≥ `bytes`).
    allocated: AtomicU64,
    /// Tokens those tensors hold (batch × positions).
    tokens: AtomicU64,
    /// Forward passes seen.
    steps: AtomicU64,
    /// Tokens fed through the model so far (prefix-cache hits feed fewer).
    fed: AtomicU64,
}

/// One reading of [`KvStats`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct KvReading {
    pub bytes: u64,
    pub allocated_bytes: u64,
    pub tokens: u64,
    pub bytes_per_token: f64,
    pub steps: u64,
    pub tokens_fed: u64,
}

pub(crate) fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

impl KvStats {
    pub(crate) fn record_fed(&self, tokens: u64) {
        self.fed.fetch_add(tokens, Ordering::Relaxed);
    }

    pub(crate) fn record(&self, bytes: u64, allocated: u64, tokens: u64) {
        self.bytes.store(bytes, Ordering::Relaxed);
        self.allocated.store(allocated, Ordering::Relaxed);
        self.tokens.store(tokens, Ordering::Relaxed);
        self.steps.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reading(&self) -> KvReading {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let tokens = self.tokens.load(Ordering::Relaxed);
        KvReading {
            bytes,
            allocated_bytes: self.allocated.load(Ordering::Relaxed),
            tokens,
            bytes_per_token: if tokens == 0 {
                0.0
            } else {
                bytes as f64 / tokens as f64
            },
            steps: self.steps.load(Ordering::Relaxed),
            tokens_fed: self.fed.load(Ordering::Relaxed),
        }
    }
}
