//! Perplexity with the conventions of the Palu paper (see `../shared/fixtures/README.md`).
use candle_core::Tensor;
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::error::PaluError;
use crate::model::{token_nll, Model};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Hugging Face `wikitext-2-raw-v1` rows joined by "\n\n", no BOS (GPTQ-style).
    Wikitext,
    /// Stories split on `<|endoftext|>`, each with BOS prepended, concatenated.
    Stories,
    /// The whole file tokenized once, no BOS.
    Plain,
    /// `stories` when the file contains `<|endoftext|>`, else `wikitext`.
    Auto,
}

/// The evaluation token stream of `text` under `protocol`.
pub fn eval_tokens(
    tok: &Tokenizer,
    text: &str,
    protocol: Protocol,
    bos: Option<u32>,
) -> Result<Vec<u32>, PaluError> {
    let protocol = match protocol {
        Protocol::Auto if text.contains("<|endoftext|>") => Protocol::Stories,
        Protocol::Auto => Protocol::Wikitext,
        p => p,
    };
    match protocol {
        Protocol::Wikitext => {
            let mut lines: Vec<&str> = text.split('\n').collect();
            if lines.last() == Some(&"") {
                lines.pop();
            }
            let rows: Vec<String> = lines
                .iter()
                .map(|l| {
                    if l.trim().is_empty() {
                        String::new()
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            crate::tokenizer::encode(tok, &rows.join("\n\n"))
        }
        Protocol::Stories => {
            let bos = bos.ok_or_else(|| {
                PaluError::arg("protocol", "stories", "needs a bos_token_id in config.json")
            })?;
            let mut out = Vec::new();
            for story in text.split("<|endoftext|>") {
                let s = story.trim();
                if s.is_empty() {
                    continue;
                }
                out.push(bos);
                out.extend(crate::tokenizer::encode(tok, s)?);
            }
            Ok(out)
        }
        Protocol::Plain | Protocol::Auto => crate::tokenizer::encode(tok, text),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    pub perplexity: f64,
    pub mean_nll: f64,
    pub windows: usize,
    pub scored_tokens: usize,
    pub total_windows: usize,
}

/// Perplexity over non-overlapping windows of `seq_len` (partial last window dropped), scoring
/// every token of a window but its first.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    seq_len: usize,
    max_windows: Option<usize>,
) -> Result<Perplexity, PaluError> {
    let total = tokens.len() / seq_len.max(1);
    if total == 0 {
        return Err(PaluError::arg(
            "--seq-len",
            seq_len,
            format!(
                "the evaluation text holds only {} tokens: not one full window",
                tokens.len()
            ),
        ));
    }
    let n = max_windows.map_or(total, |m| m.min(total));
    let pb = crate::progress::bar(n as u64, "perplexity");
    let mut sum = 0f64;
    let mut count = 0usize;
    for w in 0..n {
        let ids = &tokens[w * seq_len..(w + 1) * seq_len];
        let nll = window_nll(model, ids)
            .map_err(|e| PaluError::arg("model forward", w, crate::error::candle_msg(&e)))?;
        sum += nll.iter().map(|&x| x as f64).sum::<f64>();
        count += nll.len();
        pb.inc(1);
    }
    pb.finish_and_clear();
    let mean = sum / count as f64;
    Ok(Perplexity {
        perplexity: mean.exp(),
        mean_nll: mean,
        windows: n,
        scored_tokens: count,
        total_windows: total,
    })
}

/// Per-token NLL of one window (tokens 1..).
pub fn window_nll(model: &Model, ids: &[u32]) -> candle_core::Result<Vec<f32>> {
    let t = Tensor::new(ids, &model.device)?;
    let logits = model.forward(&t.unsqueeze(0)?, None, None)?.squeeze(0)?;
    token_nll(&logits, &t)?.to_vec1()
}
