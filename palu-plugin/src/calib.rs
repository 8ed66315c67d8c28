//! Calibration data: windows of tokens from a text or JSONL (`{"text": ...}` per line) file.
//!
//! Documents are tokenized one by one and concatenated into one stream, which is cut into
//! non-overlapping windows of `seq_len`; `n` of them are drawn with a seeded shuffle. (The
//! authors draw random windows from documents longer than `seq_len`; the C4 sample here holds
//! too few such documents for 1024-token windows, and concatenation uses every token.)
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::error::{read_to_string, PaluError};

pub fn load_documents(path: &Path) -> Result<Vec<String>, PaluError> {
    let text = read_to_string(path)?;
    if path.extension().and_then(|e| e.to_str()) == Some("jsonl") {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let v: serde_json::Value =
                    serde_json::from_str(l).map_err(|e| PaluError::Json {
                        path: path.into(),
                        msg: format!("line {}: {e}", i + 1),
                    })?;
                v.get("text")
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        PaluError::invalid(path, format!("line {}: no string field `text`", i + 1))
                    })
            })
            .collect()
    } else {
        Ok(vec![text])
    }
}

pub fn file_sha256(path: &Path) -> Result<(String, u64), PaluError> {
    let bytes = std::fs::read(path).map_err(|e| PaluError::io(path, e))?;
    Ok((format!("{:x}", Sha256::digest(&bytes)), bytes.len() as u64))
}

pub fn windows(
    tok: &Tokenizer,
    path: &Path,
    n: usize,
    seq_len: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>, PaluError> {
    let docs = load_documents(path)?;
    let mut stream = Vec::new();
    for d in &docs {
        stream.extend(crate::tokenizer::encode(tok, d)?);
    }
    let slots = stream.len() / seq_len.max(1);
    if slots < n {
        return Err(PaluError::invalid(
            path,
            format!(
                "too short for {n} calibration samples of {seq_len} tokens: it holds {} tokens ({slots} windows); lower --calib-samples or --calib-seq-len, or use a longer file",
                stream.len()
            ),
        ));
    }
    let mut order: Vec<usize> = (0..slots).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    Ok(order[..n]
        .iter()
        .map(|&s| stream[s * seq_len..(s + 1) * seq_len].to_vec())
        .collect())
}
