//! An exact fast path for Unigram (SentencePiece-style, DeBERTa-v3) and BPE
//! (byte-level, RoBERTa) `tokenizer.json` files: a per-word cache around the
//! model.
//!
//! `Tokenizer::encode` normalizes a document, cuts it into words with its
//! pre-tokenizer and hands each word to the model on its own
//! (`Model::tokenize`), so a word's tokens depend on the word alone when the
//! model is deterministic (Unigram's Viterbi path; BPE without dropout). Words
//! repeat enormously in text: [`SubwordFast`] keeps each word's ids in a cache
//! shared by the threads (sharded behind 64 locks; bounded: a shard is cleared
//! when it holds its share of [`CACHE_WORDS`] words) and calls the model only
//! on a miss. The words come from
//! [`pretokenize`](super::pretokenize) for ASCII text of the configurations it
//! re-implements, else from the tokenizer's own normalizer and pre-tokenizer,
//! so any normalizer and pre-tokenizer stays exact. Special tokens of the
//! template go around the document; a document containing an added token's
//! content (`[MASK]`, `<mask>`, ...) is encoded whole by `tokenizers`, since
//! added tokens are matched before normalization.
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use aho_corasick::AhoCorasick;
use rustc_hash::{FxHashMap, FxHasher};
use serde_json::Value;
use tokenizers::{Model, OffsetReferential, OffsetType, PreTokenizer, Tokenizer};

use super::pretokenize::AsciiWords;
use super::wordpiece::{append_encoding, special_tokens};

/// Words the cache holds at most, whatever the thread count: about 100 bytes
/// each, so ~50 MB. Text rarely has more distinct words than this in use.
pub const CACHE_WORDS: usize = 1 << 19;

/// Shards of the cache (each behind its own lock).
const SHARDS: usize = 64;

/// Encodes documents exactly as a Unigram or BPE `tokenizers::Tokenizer`
/// does (padding and truncation off); see the module doc.
pub struct SubwordFast {
    /// `"Unigram"` or `"BPE"`.
    model: String,
    /// Words of ASCII text without `tokenizers`, when the configuration is one
    /// [`AsciiWords`] re-implements.
    ascii: Option<AsciiWords>,
    /// Template tokens before and after the document's.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    /// Contents of all added tokens, searched in the raw text: a document
    /// holding one goes to `Tokenizer::encode` whole.
    added: Option<AhoCorasick>,
    /// Each word's ids.
    cache: WordCache,
}

impl std::fmt::Debug for SubwordFast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubwordFast")
            .field("model", &self.model)
            .field("ascii", &self.ascii.as_ref().map(std::mem::discriminant))
            .field("prefix", &self.prefix)
            .field("suffix", &self.suffix)
            .finish()
    }
}

/// One shard of the cache: words -> ids.
type Shard = Mutex<FxHashMap<Box<str>, Box<[u32]>>>;

/// Words -> ids, shared by the threads: [`SHARDS`] maps, each behind its lock
/// and cleared when it holds `per_shard` words.
struct WordCache {
    shards: Box<[Shard]>,
    per_shard: usize,
}

impl WordCache {
    fn new(words: usize) -> Self {
        Self { shards: (0..SHARDS).map(|_| Mutex::default()).collect(), per_shard: words.div_ceil(SHARDS).max(1) }
    }

    fn shard(&self, word: &str) -> &Shard {
        let mut h = FxHasher::default();
        word.hash(&mut h);
        &self.shards[(h.finish() >> 32) as usize % SHARDS]
    }

    /// Words held now.
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len()).sum()
    }
}

/// Reused buffers of one batch of documents.
#[derive(Default)]
struct Scratch {
    norm: String,
    buf: String,
    words: Vec<Range<usize>>,
}

impl SubwordFast {
    /// The fast path for the `tokenizer.json` bytes `json`, or why there is
    /// none: a `Unigram` model, or `BPE` without dropout; a post-processor
    /// that puts special tokens around one sequence (`TemplateProcessing`,
    /// `RobertaProcessing`, `BertProcessing`) or adds none (GPT-2's
    /// `ByteLevel`, or none at all). Any normalizer and
    /// pre-tokenizer; ASCII text skips `tokenizers` for those of
    /// [`AsciiWords`].
    pub fn from_json(json: &[u8]) -> Result<Self, String> {
        let v: Value = serde_json::from_slice(json).map_err(|e| format!("not valid JSON: {e}"))?;
        let m = &v["model"];
        match m["type"].as_str() {
            Some("Unigram") => {}
            Some("BPE") if m["dropout"].is_null() => {}
            Some("BPE") => return Err("BPE with dropout is not deterministic".into()),
            _ => return Err(format!("model {} is not Unigram or BPE", m["type"])),
        }
        let post = &v["post_processor"];
        let (prefix, suffix) = match post["type"].as_str() {
            // GPT-2's: byte-level offsets only, no token added; or no post-processor.
            Some("ByteLevel") => (Vec::new(), Vec::new()),
            None if post.is_null() => (Vec::new(), Vec::new()),
            _ => special_tokens(post)?,
        };
        let (mut contents, mut normalized) = (Vec::new(), false);
        for t in v["added_tokens"].as_array().map(Vec::as_slice).unwrap_or_default() {
            contents.push(t["content"].as_str().ok_or("an added token has no content")?);
            normalized |= t["normalized"] != false && !v["normalizer"].is_null();
        }
        let added = match contents.is_empty() {
            true => None,
            false => Some(AhoCorasick::new(&contents).map_err(|e| format!("cannot search the added tokens: {e}"))?),
        };
        // Added tokens matched on normalized text are looked for there, which
        // only the `tokenizers` path does.
        let ascii = if normalized { None } else { AsciiWords::from_json(&v).ok() };
        Ok(Self {
            model: m["type"].as_str().unwrap_or_default().to_string(),
            ascii,
            prefix,
            suffix,
            added,
            cache: WordCache::new(CACHE_WORDS),
        })
    }

    /// This path with a cache of at most `words` words (tests of the bound).
    #[cfg(test)]
    fn with_cache_words(mut self, words: usize) -> Self {
        self.cache = WordCache::new(words);
        self
    }

    /// Words in the cache now.
    pub fn cached_words(&self) -> usize {
        self.cache.len()
    }

    /// Whether ASCII text skips `tokenizers`' normalizer and pre-tokenizer.
    pub fn has_ascii_path(&self) -> bool {
        self.ascii.is_some()
    }

    /// Appends the tokens of each of `docs`, in order, to `ids` and their
    /// word-start marks to `starts`: exactly `tokenizer.encode(doc, true)`'s
    /// ids, and its word ids turned into marks by [`append_encoding`].
    /// `tokenizer` is the one loaded from the same file, with padding and
    /// truncation off.
    pub fn encode_many_into<'a>(
        &self,
        docs: impl IntoIterator<Item = &'a str>,
        tokenizer: &Tokenizer,
        ids: &mut Vec<u32>,
        starts: &mut Vec<bool>,
    ) -> tokenizers::Result<()> {
        let mut scratch = Scratch::default();
        for doc in docs {
            self.encode_one(doc, tokenizer, &mut scratch, ids, starts)?;
        }
        Ok(())
    }

    fn encode_one(
        &self,
        doc: &str,
        tokenizer: &Tokenizer,
        s: &mut Scratch,
        ids: &mut Vec<u32>,
        starts: &mut Vec<bool>,
    ) -> tokenizers::Result<()> {
        if self.added.as_ref().is_some_and(|a| a.is_match(doc)) {
            append_encoding(&tokenizer.encode(doc, true)?, ids, starts);
            return Ok(());
        }
        let model = tokenizer.get_model();
        if self.ascii.as_ref().is_some_and(|a| a.words(doc, &mut s.norm, &mut s.buf, &mut s.words)) {
            push_specials(&self.prefix, ids, starts);
            for r in &s.words {
                push_word(&self.cache, model, &s.buf[r.clone()], ids, starts)?;
            }
            push_specials(&self.suffix, ids, starts);
            return Ok(());
        }
        // `Tokenizer::encode`'s own steps, up to the model.
        let mut words = tokenizer.get_added_vocabulary().extract_and_normalize(tokenizer.get_normalizer(), doc);
        if let Some(p) = tokenizer.get_pre_tokenizer() {
            p.pre_tokenize(&mut words)?;
        }
        let words = words.get_splits(OffsetReferential::Original, OffsetType::None);
        if words.iter().any(|(_, _, tokens)| tokens.is_some()) {
            // An added token matched on the normalized text.
            append_encoding(&tokenizer.encode(doc, true)?, ids, starts);
            return Ok(());
        }
        push_specials(&self.prefix, ids, starts);
        for (word, _, _) in words {
            push_word(&self.cache, model, word, ids, starts)?;
        }
        push_specials(&self.suffix, ids, starts);
        Ok(())
    }
}

fn push_specials(tokens: &[u32], ids: &mut Vec<u32>, starts: &mut Vec<bool>) {
    ids.extend_from_slice(tokens);
    starts.extend(tokens.iter().map(|_| true));
}

/// Appends the model's ids of `word`, from the cache or, on a miss, from
/// `Model::tokenize` (then cached); its first token starts a word.
fn push_word(
    cache: &WordCache,
    model: &impl Model,
    word: &str,
    ids: &mut Vec<u32>,
    starts: &mut Vec<bool>,
) -> tokenizers::Result<()> {
    let push = |found: &[u32], ids: &mut Vec<u32>, starts: &mut Vec<bool>| {
        ids.extend_from_slice(found);
        starts.extend((0..found.len()).map(|k| k == 0));
    };
    let shard = cache.shard(word);
    if let Some(found) = shard.lock().unwrap_or_else(PoisonError::into_inner).get(word) {
        push(found, ids, starts);
        return Ok(());
    }
    let found: Box<[u32]> = model.tokenize(word)?.iter().map(|t| t.id).collect();
    push(&found, ids, starts);
    let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
    if map.len() >= cache.per_shard {
        map.clear();
    }
    map.insert(word.into(), found);
    Ok(())
}

#[cfg(test)]
#[path = "subword_tests.rs"]
mod tests;
