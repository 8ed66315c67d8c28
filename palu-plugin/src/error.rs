//! Errors users see: each names the file, tensor or field at fault and says what to do.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PaluError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {msg}")]
    Json { path: PathBuf, msg: String },
    #[error("{path}: invalid TOML: {msg}")]
    Toml { path: PathBuf, msg: String },
    #[error("{path}: tensor `{name}` is missing{hint}")]
    MissingTensor {
        path: PathBuf,
        name: String,
        hint: String,
    },
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}{hint}")]
    TensorShape {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
        hint: String,
    },
    #[error("{path}: tensor `{name}` holds non-finite values (NaN or infinity); the checkpoint is corrupt, re-create it")]
    NonFinite { path: PathBuf, name: String },
    #[error("{field} = {value}: {msg}")]
    InvalidArg {
        field: String,
        value: String,
        msg: String,
    },
    #[error("{path}: unsupported architecture `{arch}`: palu supports the Llama family (llama, mistral, qwen2 and their palu* variants)")]
    UnsupportedArch { path: PathBuf, arch: String },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

impl PaluError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PaluError::Io {
            path: path.into(),
            source,
        }
    }
    pub fn invalid(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        PaluError::Invalid {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn arg(field: &str, value: impl std::fmt::Display, msg: impl Into<String>) -> Self {
        PaluError::InvalidArg {
            field: field.into(),
            value: value.to_string(),
            msg: msg.into(),
        }
    }
}

pub fn read_to_string(path: &std::path::Path) -> Result<String, PaluError> {
    std::fs::read_to_string(path).map_err(|e| PaluError::io(path, e))
}

/// A candle error's message without the backtrace candle appends when `RUST_BACKTRACE` is set.
pub fn candle_msg(e: &candle_core::Error) -> String {
    e.to_string()
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}
