//! Dynamic masking with Hugging Face `DataCollatorForLanguageModeling`
//! semantics: each non-special token is chosen with probability
//! `mlm_probability`; a chosen token is replaced by the mask token with
//! probability `mask_replace_prob`, else by a uniformly random id with
//! probability `random_replace_prob / (1 - mask_replace_prob)`, else kept.
//! Labels are the original ids at chosen positions and -100 elsewhere.
//!
//! With `whole_word_mask`, words are chosen instead of tokens, as the
//! `whole_word_mask` option of the collator (transformers 5) and the older
//! `DataCollatorForWholeWordMask` do: a word is chosen with probability
//! `mlm_probability` (the draw of its first token), all its tokens are
//! predicted, and the replacement is decided per token. Words are the
//! tokenizer's pre-tokenizer words, marked at prepare time (see
//! [`WordStarts`]); a word cut by a chunk boundary is a word of its own in the
//! next chunk.
//!
//! Unlike the collator (which draws from torch's global RNG), every decision is
//! a counter-based hash of `(seed, epoch, chunk id, position)`: the mask of a
//! chunk is the same on 1 or 8 workers, with any number of masker threads, and
//! after a resume.
use super::rng::{hash_words, SplitMix64};
use super::store::WordStarts;
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
    /// Choose whole words (given word-start marks) instead of single tokens.
    pub whole_word_mask: bool,
    /// Causal language modelling: nothing is masked and every position but a
    /// block's last is labelled with the next token ([`label_next_tokens`]).
    pub causal: bool,
}

impl MaskingParams {
    /// Masking settings from `[data]` and the tokenizer's special tokens; a
    /// tokenizer without a mask token is refused naming its file.
    pub fn new(cfg: &DataConfig, tok: &TextTokenizer) -> anyhow::Result<Self> {
        let mask_id = tok.mask_id()?;
        Ok(Self { mask_id, ..Self::settings(cfg, tok) })
    }

    /// The labels of a causal language model: each block's next tokens.
    pub fn causal(cfg: &DataConfig, tok: &TextTokenizer) -> Self {
        Self { causal: true, ..Self::settings(cfg, tok) }
    }

    fn settings(cfg: &DataConfig, tok: &TextTokenizer) -> Self {
        let max_special = tok.special_ids.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
        let mut is_special = vec![false; tok.vocab_size.max(max_special)];
        for &id in &tok.special_ids {
            is_special[id as usize] = true;
        }
        Self {
            mlm_probability: cfg.mlm_probability,
            mask_replace_prob: cfg.mask_replace_prob,
            random_replace_prob: cfg.random_replace_prob,
            mask_id: tok.mask_id.unwrap_or(0),
            vocab_size: tok.vocab_size as u32,
            is_special,
            whole_word_mask: cfg.whole_word_mask,
            causal: false,
        }
    }

    fn special(&self, id: u32) -> bool {
        self.is_special.get(id as usize).copied().unwrap_or(false)
    }

    /// Probability of a random replacement among the chosen tokens that are not
    /// replaced by the mask token.
    fn random_given_not_mask(&self) -> f64 {
        let rest = 1.0 - self.mask_replace_prob;
        if rest <= 0.0 {
            0.0
        } else {
            (self.random_replace_prob / rest).min(1.0)
        }
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

/// The decision for position `pos` (holding `token`) of the chunk with `key`,
/// masking single tokens.
pub fn decide(p: &MaskingParams, key: u64, pos: usize, token: u32) -> MaskAction {
    let mut r = SplitMix64::new(hash_words(&[key, pos as u64]));
    let chosen = r.next_f64() < p.mlm_probability;
    if !chosen || p.special(token) {
        return MaskAction::Skip;
    }
    replacement(p, &mut r)
}

/// The replacement of a chosen token, from the draws of `r` that follow the
/// choice draw.
fn replacement(p: &MaskingParams, r: &mut SplitMix64) -> MaskAction {
    if r.next_f64() < p.mask_replace_prob {
        MaskAction::Mask
    } else if r.next_f64() < p.random_given_not_mask() {
        MaskAction::Random(r.below(p.vocab_size as u64) as u32)
    } else {
        MaskAction::Keep
    }
}

/// A causal LM's labels for one chunk: `input_ids` is the chunk, and
/// `labels[i]` is the token at `i + 1` (-100 at the last position), as
/// `GPT2LMHeadModel(labels=input_ids)` shifts them inside its loss. Returns
/// the positions predicted (`chunk.len() - 1`).
pub fn label_next_tokens(chunk: &[u32], input_ids: &mut [i64], labels: &mut [i64]) -> usize {
    for (i, &t) in chunk.iter().enumerate() {
        input_ids[i] = t as i64;
        labels[i] = chunk.get(i + 1).map_or(IGNORE_INDEX, |&next| next as i64);
    }
    chunk.len().saturating_sub(1)
}

/// Masks one chunk into `input_ids` and `labels` (both `chunk.len()` long),
/// token by token (a chunk without word-start marks: every token is a word).
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
    mask_chunk_words(chunk, None, p, seed, epoch, chunk_id, input_ids, labels)
}

/// [`mask_chunk`] with the chunk's word-start marks: with
/// `p.whole_word_mask`, a word is chosen by the choice draw of its first
/// position and all its tokens are predicted, each drawing its own
/// replacement. Without `whole_word_mask` (or without marks) this is token
/// masking, and the marks are not read. Marking every token a word start gives
/// exactly the token masks.
#[allow(clippy::too_many_arguments)]
pub fn mask_chunk_words(
    chunk: &[u32],
    words: Option<WordStarts<'_>>,
    p: &MaskingParams,
    seed: u64,
    epoch: u64,
    chunk_id: u64,
    input_ids: &mut [i64],
    labels: &mut [i64],
) -> usize {
    assert!(input_ids.len() == chunk.len() && labels.len() == chunk.len(), "mask_chunk: buffer lengths differ");
    let words = words.filter(|_| p.whole_word_mask);
    if let Some(w) = &words {
        assert_eq!(w.len(), chunk.len(), "mask_chunk: word marks and chunk lengths differ");
    }
    let key = chunk_key(seed, epoch, chunk_id);
    let mut n = 0;
    let mut word_chosen = false;
    for (pos, &tok) in chunk.iter().enumerate() {
        let action = match &words {
            None => decide(p, key, pos, tok),
            Some(w) => {
                let mut r = SplitMix64::new(hash_words(&[key, pos as u64]));
                // Every position makes its choice draw, so the replacement
                // draws that follow are the token-level ones.
                let draw = r.next_f64() < p.mlm_probability;
                if w.get(pos) {
                    word_chosen = draw;
                }
                if word_chosen && !p.special(tok) {
                    replacement(p, &mut r)
                } else {
                    MaskAction::Skip
                }
            }
        };
        let (input, label) = match action {
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
        MaskingParams::new(&DataConfig::default(), testutil::tokenizer()).unwrap()
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

    /// Masks 128k real tokens with their word marks (`mask_corpus` with words).
    fn mask_corpus_words(p: &MaskingParams, seed: u64, epoch: u64) -> (Vec<u32>, Vec<bool>, Vec<i64>, Vec<i64>) {
        let (toks, starts) = testutil::corpus_tokens_and_words(1000 * BLOCK);
        let (mut ids, mut labels) = (vec![0i64; toks.len()], vec![0i64; toks.len()]);
        let mut bits = Vec::new();
        for (c, chunk) in toks.chunks(BLOCK).enumerate() {
            let r = c * BLOCK..(c + 1) * BLOCK;
            bits.clear();
            crate::data::store::pack_word_starts(&starts[r.clone()], &mut bits);
            let w = WordStarts::new(&bits, BLOCK);
            mask_chunk_words(chunk, Some(w), p, seed, epoch, c as u64, &mut ids[r.clone()], &mut labels[r]);
        }
        (toks, starts, ids, labels)
    }

    fn wwm_params() -> MaskingParams {
        MaskingParams { whole_word_mask: true, ..params() }
    }

    #[test]
    fn whole_word_masks_cover_complete_words() {
        let p = wwm_params();
        let (toks, starts, _, labels) = mask_corpus_words(&p, 42, 0);
        let masked = |i: usize| labels[i] != IGNORE_INDEX;
        let mut continuations = 0;
        for i in 0..toks.len() {
            // A word start as stored: the marks, and the first token of each chunk.
            let start = starts[i] || i % BLOCK == 0;
            if !start && !p.special(toks[i]) {
                // A continuation is masked exactly when its word's previous token is.
                assert_eq!(masked(i), masked(i - 1), "token {i}");
                continuations += masked(i) as usize;
            }
        }
        assert!(continuations > 1000, "{continuations} masked continuation tokens");
        assert!(toks.iter().zip(&labels).all(|(&t, &l)| !p.special(t) || l == IGNORE_INDEX));
    }

    #[test]
    fn whole_word_masking_predicts_fifteen_percent_of_tokens_split_eighty_ten_ten() {
        let p = wwm_params();
        let (toks, starts, ids, labels) = mask_corpus_words(&p, 7, 1);
        let normal = toks.iter().filter(|&&t| !p.special(t)).count();
        let masked: Vec<usize> = (0..toks.len()).filter(|&i| labels[i] != IGNORE_INDEX).collect();
        let frac = masked.len() as f64 / normal as f64;
        assert!(normal >= 100_000 && (frac - 0.15).abs() < 0.02, "{frac} of {normal}");
        let words = (0..toks.len()).filter(|&i| (starts[i] || i % BLOCK == 0) && !p.special(toks[i])).count();
        let masked_words = masked.iter().filter(|&&i| starts[i] || i % BLOCK == 0).count();
        assert!((masked_words as f64 / words as f64 - 0.15).abs() < 0.02, "{masked_words} of {words} words");
        let f = |n: usize| n as f64 / masked.len() as f64;
        let mask = masked.iter().filter(|&&i| ids[i] == p.mask_id as i64).count();
        let kept = masked.iter().filter(|&&i| ids[i] == toks[i] as i64).count();
        assert!((f(mask) - 0.8).abs() < 0.02 && (f(kept) - 0.1).abs() < 0.02, "mask {} kept {}", f(mask), f(kept));
        assert!(masked.iter().all(|&i| labels[i] == toks[i] as i64));
    }

    #[test]
    fn whole_word_mask_is_a_pure_function_of_seed_epoch_and_chunk() {
        let p = wwm_params();
        let a = mask_corpus_words(&p, 5, 2);
        assert_eq!(a, mask_corpus_words(&p, 5, 2));
        assert_ne!(a.3, mask_corpus_words(&p, 5, 3).3);
        assert_ne!(a.3, mask_corpus_words(&p, 6, 2).3);
    }

    #[test]
    fn token_masking_is_unchanged_by_word_marks() {
        let p = params();
        let (toks, ids, labels) = mask_corpus(&p, 11, 4);
        // whole_word_mask = false: the marks are ignored.
        let (_, _, wids, wlabels) = mask_corpus_words(&p, 11, 4);
        assert_eq!((&ids, &labels), (&wids, &wlabels));
        // Whole-word masking where every token is a word is token masking.
        let wwm = wwm_params();
        let all_starts = vec![0xffu8; BLOCK / 8];
        for (c, chunk) in toks.chunks(BLOCK).take(100).enumerate() {
            let (mut a, mut b) = (vec![0i64; BLOCK], vec![0i64; BLOCK]);
            mask_chunk_words(chunk, Some(WordStarts::new(&all_starts, BLOCK)), &wwm, 11, 4, c as u64, &mut a, &mut b);
            assert_eq!((&a[..], &b[..]), (&ids[c * BLOCK..(c + 1) * BLOCK], &labels[c * BLOCK..(c + 1) * BLOCK]));
            // ... and so is whole-word masking without marks.
            mask_chunk(chunk, &wwm, 11, 4, c as u64, &mut a, &mut b);
            assert_eq!(&b[..], &labels[c * BLOCK..(c + 1) * BLOCK]);
        }
    }

    #[test]
    fn all_mask_setting_never_draws_random_ids() {
        let mut p = params();
        p.mask_replace_prob = 1.0;
        p.random_replace_prob = 0.0;
        let (toks, ids, labels) = mask_corpus(&p, 3, 0);
        assert!(toks
            .iter()
            .zip(ids.iter().zip(&labels))
            .all(|(_, (&i, &l))| l == IGNORE_INDEX || i == p.mask_id as i64));
    }
}
