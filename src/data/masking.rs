//! Dynamic masking with Hugging Face `DataCollatorForLanguageModeling`
//! semantics: each non-special token is chosen with probability
//! `mlm_probability`; a chosen token is replaced by the mask token with
//! probability `mask_replace_prob`, else by a uniformly random id with
//! probability `random_replace_prob / (1 - mask_replace_prob)`, else kept.
//! Labels are the original ids at chosen positions and -100 elsewhere.
//!
//! Unlike the collator (which draws from torch's global RNG), every decision is
//! a counter-based hash of `(seed, epoch, chunk id, position)`: the mask of a
//! chunk is the same on 1 or 8 workers, with any number of masker threads, and
//! after a resume.
use super::rng::{hash_words, SplitMix64};
use super::tokenizer::TextTokenizer;
use crate::config::DataConfig;

/// Label of positions that are not predicted (PyTorch's cross-entropy ignore index).
pub const IGNORE_INDEX: i64 = -100;

/// Everything the masker needs, shared by all masker threads.
#[derive(Debug, Clone)]
pub struct MaskingParams {
    pub mlm_probability: f64,
    pub mask_replace_prob: f64,
    pub random_replace_prob: f64,
    pub mask_id: u32,
    /// Random replacements are drawn from `[0, vocab_size)`.
    pub vocab_size: u32,
    /// `is_special[id]`: never chosen for prediction. Ids past its end count as
    /// not special.
    pub is_special: Vec<bool>,
}

impl MaskingParams {
    /// Masking settings from `[data]` and the tokenizer's special tokens.
    pub fn new(cfg: &DataConfig, tok: &TextTokenizer) -> Self {
        let max_special = tok.special_ids.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
        let mut is_special = vec![false; tok.vocab_size.max(max_special)];
        for &id in &tok.special_ids {
            is_special[id as usize] = true;
        }
        Self {
            mlm_probability: cfg.mlm_probability,
            mask_replace_prob: cfg.mask_replace_prob,
            random_replace_prob: cfg.random_replace_prob,
            mask_id: tok.mask_id,
            vocab_size: tok.vocab_size as u32,
            is_special,
        }
    }

    fn special(&self, id: u32) -> bool {
        self.is_special.get(id as usize).copied().unwrap_or(false)
    }

    /// Probability of a random replacement among the chosen tokens that are not
    /// replaced by the mask token.
    fn random_given_not_mask(&self) -> f64 {
        let rest = 1.0 - self.mask_replace_prob;
        if rest <= 0.0 { 0.0 } else { (self.random_replace_prob / rest).min(1.0) }
    }
}

/// What the masker does to one position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskAction {
    /// Not chosen for prediction (label -100).
    Skip,
    /// Chosen, replaced by the mask token.
    Mask,
    /// Chosen, replaced by this uniformly drawn id (which may equal the original).
    Random(u32),
    /// Chosen, left as is.
    Keep,
}

/// The random key of one chunk in one epoch.
pub fn chunk_key(seed: u64, epoch: u64, chunk_id: u64) -> u64 {
    hash_words(&[seed, epoch, chunk_id])
}

/// The decision for position `pos` (holding `token`) of the chunk with `key`.
pub fn decide(p: &MaskingParams, key: u64, pos: usize, token: u32) -> MaskAction {
    let mut r = SplitMix64::new(hash_words(&[key, pos as u64]));
    let chosen = r.next_f64() < p.mlm_probability;
    if !chosen || p.special(token) {
        return MaskAction::Skip;
    }
    if r.next_f64() < p.mask_replace_prob {
        MaskAction::Mask
    } else if r.next_f64() < p.random_given_not_mask() {
        MaskAction::Random(r.below(p.vocab_size as u64) as u32)
    } else {
        MaskAction::Keep
    }
}

/// Masks one chunk into `input_ids` and `labels` (both `chunk.len()` long).
/// A pure function of its arguments; returns the number of chosen positions.
pub fn mask_chunk(
    chunk: &[u32],
    p: &MaskingParams,
    seed: u64,
    epoch: u64,
    chunk_id: u64,
    input_ids: &mut [i64],
    labels: &mut [i64],
) -> usize {
    assert!(input_ids.len() == chunk.len() && labels.len() == chunk.len(), "mask_chunk: buffer lengths differ");
    let key = chunk_key(seed, epoch, chunk_id);
    let mut n = 0;
    for (pos, &tok) in chunk.iter().enumerate() {
        let (input, label) = match decide(p, key, pos, tok) {
            MaskAction::Skip => (tok, None),
            MaskAction::Mask => (p.mask_id, Some(tok)),
            MaskAction::Random(r) => (r, Some(tok)),
            MaskAction::Keep => (tok, Some(tok)),
        };
        input_ids[pos] = input as i64;
        labels[pos] = label.map_or(IGNORE_INDEX, |l| l as i64);
        n += label.is_some() as usize;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil;

    const BLOCK: usize = 128;

    fn params() -> MaskingParams {
        MaskingParams::new(&DataConfig::default(), testutil::tokenizer())
    }

    /// Masks 128k real tokens (> 100k of them not special) in 128-token chunks; returns (chunks, inputs, labels).
    fn mask_corpus(p: &MaskingParams, seed: u64, epoch: u64) -> (Vec<u32>, Vec<i64>, Vec<i64>) {
        let toks = testutil::corpus_tokens(1000 * BLOCK);
        let (mut ids, mut labels) = (vec![0i64; toks.len()], vec![0i64; toks.len()]);
        for (c, chunk) in toks.chunks(BLOCK).enumerate() {
            let r = c * BLOCK..(c + 1) * BLOCK;
            mask_chunk(chunk, p, seed, epoch, c as u64, &mut ids[r.clone()], &mut labels[r]);
        }
        (toks, ids, labels)
    }

    #[test]
    fn masked_fraction_is_fifteen_percent() {
        let p = params();
        let (toks, _, labels) = mask_corpus(&p, 42, 0);
        let normal = toks.iter().filter(|&&t| !p.special(t)).count();
        let masked = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        let frac = masked as f64 / normal as f64;
        assert!(normal >= 100_000 && (frac - 0.15).abs() < 0.01, "{frac} of {normal}");
    }

    #[test]
    fn masked_tokens_split_eighty_ten_ten() {
        let p = params();
        let (toks, ids, labels) = mask_corpus(&p, 7, 3);
        let (mut mask, mut random, mut kept, mut total) = (0, 0, 0, 0);
        for i in 0..toks.len() {
            if labels[i] == IGNORE_INDEX {
                assert_eq!(ids[i], toks[i] as i64);
                continue;
            }
            assert_eq!(labels[i], toks[i] as i64);
            total += 1;
            match ids[i] {
                x if x == p.mask_id as i64 => mask += 1,
                x if x == toks[i] as i64 => kept += 1,
                _ => random += 1,
            }
        }
        let f = |n: usize| n as f64 / total as f64;
        assert!((f(mask) - 0.8).abs() < 0.02, "mask {}", f(mask));
        assert!((f(random) - 0.1).abs() < 0.02, "random {}", f(random));
        assert!((f(kept) - 0.1).abs() < 0.02, "kept {}", f(kept));
        // The decision helper agrees with what mask_chunk wrote.
        let key = chunk_key(7, 3, 0);
        for pos in 0..BLOCK {
            match decide(&p, key, pos, toks[pos]) {
                MaskAction::Skip => assert_eq!(labels[pos], IGNORE_INDEX),
                MaskAction::Mask => assert_eq!(ids[pos], p.mask_id as i64),
                MaskAction::Random(r) => assert_eq!(ids[pos], r as i64),
                MaskAction::Keep => assert_eq!(ids[pos], toks[pos] as i64),
            }
        }
    }

    #[test]
    fn special_tokens_are_never_masked() {
        let p = params();
        let (toks, _, labels) = mask_corpus(&p, 1, 0);
        let specials = toks.iter().filter(|&&t| p.special(t)).count();
        assert!(specials > 1000, "{specials}");
        assert!(toks.iter().zip(&labels).all(|(&t, &l)| !p.special(t) || l == IGNORE_INDEX));
        let all_cls = vec![101u32; 4096];
        let (mut ids, mut labels) = (vec![0i64; 4096], vec![0i64; 4096]);
        assert_eq!(mask_chunk(&all_cls, &p, 1, 0, 0, &mut ids, &mut labels), 0);
    }

    #[test]
    fn mask_is_a_pure_function_of_seed_epoch_and_chunk() {
        let p = params();
        let chunk = &testutil::corpus_tokens(BLOCK)[..];
        let run = |seed, epoch, id| {
            let (mut a, mut b) = (vec![0i64; BLOCK], vec![0i64; BLOCK]);
            mask_chunk(chunk, &p, seed, epoch, id, &mut a, &mut b);
            (a, b)
        };
        assert_eq!(run(5, 2, 9), run(5, 2, 9));
        assert_ne!(run(5, 2, 9).1, run(5, 3, 9).1);
        assert_ne!(run(5, 2, 9).1, run(5, 2, 10).1);
        assert_ne!(run(5, 2, 9).1, run(6, 2, 9).1);
    }

    #[test]
    fn all_mask_setting_never_draws_random_ids() {
        let mut p = params();
        p.mask_replace_prob = 1.0;
        p.random_replace_prob = 0.0;
        let (toks, ids, labels) = mask_corpus(&p, 3, 0);
        assert!(toks.iter().zip(ids.iter().zip(&labels)).all(|(_, (&i, &l))| l == IGNORE_INDEX || i == p.mask_id as i64));
    }
}
