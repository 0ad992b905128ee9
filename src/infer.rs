//! Fill-mask predictions, as Hugging Face's `fill-mask` pipeline gives them.
use anyhow::{bail, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::data::tokenizer::TextTokenizer;
use crate::model::MaskedLm;

/// One candidate for one mask, with the pipeline's field names.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub score: f64,
    pub token: i64,
    pub token_str: String,
    pub sequence: String,
    /// Which mask of the text (0-based); only written when the text has several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_index: Option<usize>,
}

/// The `top_k` most likely tokens at each mask token of `text`.
pub fn fill_mask(model: &MaskedLm, tok: &TextTokenizer, text: &str, top_k: usize) -> Result<Vec<Prediction>> {
    let ids = tok.encode_document(text)?;
    let mask_positions: Vec<usize> =
        ids.iter().enumerate().filter(|(_, &t)| t == tok.mask_id).map(|(i, _)| i).collect();
    if mask_positions.is_empty() {
        bail!("no mask token {} in {}", tok.token_str(tok.mask_id), crate::logging::excerpt(text));
    }
    if ids.len() as i64 > model.max_positions() {
        bail!(
            "{} is {} tokens long, more than the model's {} positions",
            crate::logging::excerpt(text),
            ids.len(),
            model.max_positions()
        );
    }
    let device = model.vs.device();
    let input: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let input_t = Tensor::from_slice(&input).view([1, -1]).to_device(device);
    let mask_t = Tensor::ones_like(&input_t);
    let probs = tch::no_grad(|| {
        let hidden = model.forward_hidden(&input_t, Some(&mask_t), false);
        let pos: Vec<i64> = mask_positions.iter().map(|&p| p as i64).collect();
        let picked = hidden.select(0, 0).index_select(0, &Tensor::from_slice(&pos).to_device(device));
        model.mlm_head(&picked).to_kind(Kind::Float).softmax(-1, Kind::Float).to_device(Device::Cpu)
    });
    let k = top_k.min(model.vocab_size() as usize).max(1) as i64;
    let (scores, tokens) = probs.topk(k, -1, true, true);
    let several = mask_positions.len() > 1;
    let mut out = Vec::new();
    for (m, &pos) in mask_positions.iter().enumerate() {
        let scores: Vec<f32> = Vec::try_from(scores.get(m as i64))?;
        let tokens: Vec<i64> = Vec::try_from(tokens.get(m as i64))?;
        for (s, t) in scores.into_iter().zip(tokens) {
            let mut filled = ids.clone();
            filled[pos] = t as u32;
            out.push(Prediction {
                score: s as f64,
                token: t,
                token_str: tok.decode(&[t as u32]),
                // As the pipeline: special tokens dropped when the text has one mask.
                sequence: tok.decode_with(&filled, !several),
                mask_index: several.then_some(m),
            });
        }
    }
    Ok(out)
}
