//! palu-rs: Palu low-rank KV-cache compression (arXiv 2407.21118) for mistral.rs.
//!
//! Layout (one concept per module):
//! - [`config`]: the Hugging Face model configuration of the Llama family (Llama, Mistral, Qwen2)
//!   and its Palu variants.
//! - [`model`]: a plain, differentiable candle implementation of that family whose attention can
//!   cache Palu latents and rebuild K/V exactly as the serving path does.
//! - [`lowrank`]: the low-rank K/V projection (down factor A, per-group up factors B).
//! - [`quant`]: asymmetric per-token, per-group quantization of latents (simulated and packed).
//! - [`latent_codec`]: the packed byte rows a low-bit latent cache stores.
//! - [`decode_op`]: one decode step over a latent cache as a candle op (CUDA kernel, CPU twin).
//! - [`planner`]: per layer, latent or full keys and fused or unfused values, from a cost model.
//! - [`hadamard`]: orthonormal rotations folded into the factors.
//! - [`decompose`]: calibration statistics, Cholesky whitening and per-group truncated SVD.
//! - [`fisher`]: Fisher information of `k_proj` / `v_proj` from real gradients.
//! - [`ranks`]: rank allocation under a compression target.
//! - [`alloc_config`]: the rank-allocation TOML users read, edit and version.
//! - [`checkpoint`]: reading and writing Palu checkpoints in the authors' layout.
//! - [`gguf`]: GGUF (llama.cpp) to Hugging Face conversion.
//! - [`calib`], [`eval`]: calibration data and perplexity.
//! - [`synth`]: random-weight checkpoints in the Hugging Face layouts (tests, speed runs).
//! - [`compress`]: the pipeline that ties them together.
pub mod alloc_config;
pub mod calib;
pub mod checkpoint;
pub mod compress;
pub mod config;
pub mod decode_op;
pub mod decompose;
#[cfg(feature = "engine")]
pub mod engine;
pub mod error;
pub mod eval;
pub mod fisher;
pub mod gguf;
pub mod hadamard;
pub mod latent_codec;
pub mod lowrank;
pub mod model;
pub mod paged;
pub mod planner;
pub mod progress;
pub mod quant;
pub mod ranks;
pub mod synth;
pub mod tokenizer;

pub use error::PaluError;
