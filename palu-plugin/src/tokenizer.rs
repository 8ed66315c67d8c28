//! Tokenizer loading and plain encoding (no special tokens added: protocols add BOS themselves).
use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::PaluError;

pub fn load(model_dir: &Path) -> Result<Tokenizer, PaluError> {
    let p = model_dir.join("tokenizer.json");
    if !p.exists() {
        return Err(PaluError::invalid(
            &p,
            "missing: the model directory needs its tokenizer.json",
        ));
    }
    Tokenizer::from_file(&p)
        .map_err(|e| PaluError::invalid(&p, format!("cannot load tokenizer: {e}")))
}

pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, PaluError> {
    tok.encode_fast(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| PaluError::arg("tokenize", "text", e.to_string()))
}
