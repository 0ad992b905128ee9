//! Fill-mask predictions, as Hugging Face's `fill-mask` pipeline gives them,
//! and a causal LM's continuations, as `model.generate` gives them.
use anyhow::{bail, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::data::tokenizer::TextTokenizer;
use crate::model::{KvCache, MaskedLm};

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
    let mask_id = tok.mask_id()?;
    let mask_positions: Vec<usize> = ids.iter().enumerate().filter(|(_, &t)| t == mask_id).map(|(i, _)| i).collect();
    if mask_positions.is_empty() {
        bail!("no mask token {} in {}", tok.token_str(mask_id), crate::logging::excerpt(text));
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

/// How the next token is drawn: `transformers`' sampling processors in their
/// order (temperature, then top-k, then top-p), then a draw from the rest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Logits are divided by it (> 0).
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches
    /// `top_p` (1: all).
    pub top_p: f64,
    /// Seed of the draws (libtorch's CPU generator): one seed, one text.
    pub seed: u64,
}

/// A prompt and what the model added to it.
#[derive(Debug, Clone, Serialize)]
pub struct Generated {
    pub prompt: String,
    /// The new tokens' text.
    pub continuation: String,
    /// The new tokens' ids.
    pub tokens: Vec<u32>,
}

/// Continues `prompt` by up to `max_new_tokens` tokens of a causal LM, greedily
/// (`sampling` `None`, as `generate(do_sample=False)`) or by drawing; stops
/// early at the model's `eos_token_id`. Each new token runs one position
/// through the key/value cache.
pub fn generate(
    model: &MaskedLm,
    tok: &TextTokenizer,
    prompt: &str,
    max_new_tokens: usize,
    sampling: Option<Sampling>,
) -> Result<Generated> {
    let ids = tok.encode_document(prompt)?;
    if ids.is_empty() {
        bail!("the prompt {} has no tokens: give some text to continue", crate::logging::excerpt(prompt));
    }
    let room = model.max_positions() - ids.len() as i64;
    if room < max_new_tokens as i64 {
        bail!(
            "{} is {} tokens long: with {max_new_tokens} new tokens that is more than the model's {} positions",
            crate::logging::excerpt(prompt),
            ids.len(),
            model.max_positions()
        );
    }
    if let Some(s) = sampling {
        check_sampling(&s)?;
        tch::manual_seed(s.seed as i64);
    }
    let eos = model.config_json.get("eos_token_id").and_then(|v| v.as_u64());
    let device = model.vs.device();
    let mut cache = KvCache::default();
    let mut input = Tensor::from_slice(&ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).view([1, -1]);
    let mut new = Vec::with_capacity(max_new_tokens);
    while new.len() < max_new_tokens {
        // The head at the last position only: a long prompt's other
        // positions would cost a [prompt, vocab] projection for nothing.
        let hidden = model.decode_hidden(&input.to_device(device), &mut cache)?;
        let last = tch::no_grad(|| model.mlm_head(&hidden.select(0, 0).select(0, -1)).to_kind(Kind::Float));
        let last = last.to_device(Device::Cpu); // [vocab]
        let next = match sampling {
            None => last.argmax(-1, false).int64_value(&[]),
            Some(s) => draw(&last, &s),
        };
        new.push(next as u32);
        if eos == Some(next as u64) {
            break;
        }
        input = Tensor::from_slice(&[next]).view([1, 1]);
    }
    Ok(Generated { prompt: prompt.to_string(), continuation: tok.decode_with(&new, true), tokens: new })
}

/// Refuses sampling settings `transformers` refuses, naming the flag.
pub fn check_sampling(s: &Sampling) -> Result<()> {
    if !(s.temperature > 0.0 && s.temperature.is_finite()) {
        bail!("--temperature {} must be a finite number above 0", s.temperature);
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        bail!("--top-p {} must be in (0, 1]", s.top_p);
    }
    Ok(())
}

/// One token drawn from `logits` [vocab] (fp32, CPU) as `transformers`'
/// `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper` and
/// `torch.multinomial` draw it.
fn draw(logits: &Tensor, s: &Sampling) -> i64 {
    let scores = filtered(logits, s);
    scores.softmax(-1, Kind::Float).multinomial(1, false).int64_value(&[0])
}

/// The logits `draw` samples from: scaled by the temperature, and those
/// outside the top-k and the top-p nucleus set to -inf.
fn filtered(logits: &Tensor, s: &Sampling) -> Tensor {
    let mut scores = logits / s.temperature;
    let vocab = scores.size()[0];
    if s.top_k > 0 && (s.top_k as i64) < vocab {
        let (top, _) = scores.topk(s.top_k as i64, -1, true, true);
        let kth = top.select(0, s.top_k as i64 - 1);
        scores = scores.masked_fill(&scores.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if s.top_p < 1.0 {
        // As TopPLogitsWarper: ascending sort, drop the tokens whose
        // cumulative probability stays within 1 - top_p, keep at least one.
        let (sorted, order) = scores.sort(-1, false);
        let cumulative = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let remove = cumulative.le(1.0 - s.top_p);
        let _ = remove.narrow(0, vocab - 1, 1).fill_(0);
        let remove = remove.scatter(0, &order, &remove);
        scores = scores.masked_fill(&remove, f64::NEG_INFINITY);
    }
    scores
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(top_k: usize, top_p: f64) -> Sampling {
        Sampling { temperature: 1.0, top_k, top_p, seed: 1 }
    }

    fn kept(logits: &[f32], s: Sampling) -> Vec<bool> {
        let f = filtered(&Tensor::from_slice(logits), &s);
        Vec::<f32>::try_from(f).unwrap().iter().map(|x| x.is_finite()).collect()
    }

    #[test]
    fn top_k_keeps_the_k_most_likely() {
        assert_eq!(kept(&[1.0, 4.0, 3.0, 2.0], sampling(2, 1.0)), [false, true, true, false]);
        assert_eq!(kept(&[1.0, 4.0, 3.0, 2.0], sampling(0, 1.0)), [true; 4]);
    }

    #[test]
    fn top_p_keeps_the_nucleus_and_at_least_one() {
        // Probabilities 0.643, 0.237, 0.087, 0.032.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        assert_eq!(kept(&logits, sampling(0, 0.5)), [true, false, false, false]);
        assert_eq!(kept(&logits, sampling(0, 0.7)), [true, true, false, false]);
        assert_eq!(kept(&logits, sampling(0, 0.95)), [true, true, true, false]);
        assert_eq!(kept(&logits, sampling(0, 1e-9)), [true, false, false, false]);
    }

    #[test]
    fn draws_follow_the_seed_and_stay_in_the_kept_set() {
        let logits = Tensor::from_slice(&[0.0f32, 5.0, 4.9, -1.0, 0.5]);
        let s = Sampling { temperature: 0.7, top_k: 2, top_p: 1.0, seed: 3 };
        let run = || {
            tch::manual_seed(7);
            (0..50).map(|_| draw(&logits, &s)).collect::<Vec<_>>()
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert!(a.iter().all(|&t| t == 1 || t == 2), "{a:?}");
        assert!(a.contains(&1) && a.contains(&2), "{a:?}");
    }

    #[test]
    fn bad_sampling_settings_name_the_flag() {
        let e = check_sampling(&Sampling { temperature: 0.0, ..sampling(0, 1.0) }).unwrap_err().to_string();
        assert!(e.contains("--temperature"), "{e}");
        let e = check_sampling(&Sampling { top_p: 1.5, ..sampling(0, 1.0) }).unwrap_err().to_string();
        assert!(e.contains("--top-p"), "{e}");
    }
}
