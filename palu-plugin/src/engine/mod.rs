//! Palu inside mistral.rs 0.8.1 (feature `engine`): a text model whose KV cache holds the
//! pre-RoPE latents, and the loader that hands it to the engine through the patched
//! `NormalLoaderBuilder::build_with_loader` (see `patches/README.md`).
//!
//! The attention math is `palu::model`'s (`rebuild_kv`, `grouped_attention`): this module is
//! glue between it and the engine's cache, weight loading, ISQ and device mapping.
mod loader;
mod model;
pub mod server;
pub mod server_config;
pub mod stats;

pub use loader::PaluLoader;
pub use model::{PaluGeometry, PaluTextModel};
pub use stats::{KvReading, KvStats};
