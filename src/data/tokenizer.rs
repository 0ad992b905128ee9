//! The model's `tokenizer.json`, loaded with Hugging Face `tokenizers`, with
//! the exact fast paths of [`wordpiece`](super::wordpiece) for BERT-style files
//! and of [`subword`](super::subword) for Unigram and BPE files.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use sha2::{Digest, Sha256};
use tracing::debug;

use super::subword::SubwordFast;
use super::wordpiece::{append_encoding, WordPieceFast};
use super::{spm, vocab_txt};

/// An exact fast path for the file's configuration.
#[derive(Clone, Debug)]
pub enum FastPath {
    /// BERT-style WordPiece.
    WordPiece(Arc<WordPieceFast>),
    /// Unigram or BPE, with a per-word cache.
    Subword(Arc<SubwordFast>),
}

/// A loaded tokenizer with the ids the data pipeline needs.
#[derive(Clone)]
pub struct TextTokenizer {
    /// The Hugging Face tokenizer, with padding and truncation disabled.
    pub inner: tokenizers::Tokenizer,
    /// The same encoding, faster, when the file is BERT-style WordPiece, or
    /// Unigram or BPE (`None`: documents go through `inner`).
    fast: Option<FastPath>,
    /// Id of the mask token (`[MASK]` or `<mask>`): every masked-LM job needs
    /// one ([`Self::mask_id`]); a causal LM's tokenizer (GPT-2's) has none.
    pub mask_id: Option<u32>,
    /// Id of the padding token (`[PAD]` or `<pad>`), when there is one.
    pub pad_id: Option<u32>,
    /// Vocabulary size including added tokens.
    pub vocab_size: usize,
    /// Ids of the added tokens marked special, sorted.
    pub special_ids: Vec<u32>,
    /// SHA-256 (hex) of the file's bytes.
    pub hash: String,
    /// The file it was loaded from (`spm.model` when converted from it).
    pub path: PathBuf,
    /// The `tokenizer.json` it was built from, which checkpoints hold.
    pub json: Arc<[u8]>,
    /// A token appended to every document the data pipeline encodes
    /// (`data.separator`, [`Self::with_separator`]).
    separator: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size)
            .field("mask_id", &self.mask_id)
            .field("pad_id", &self.pad_id)
            .field("special_ids", &self.special_ids)
            .field("fast", &self.fast)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; errors name the file. A SentencePiece model
    /// (`*.model`, [`super::spm`]) or a WordPiece `vocab.txt`
    /// ([`super::vocab_txt`]), named or found beside a missing `tokenizer.json`,
    /// is converted as `transformers` converts it.
    pub fn load(path: &Path) -> Result<Self> {
        // A missing tokenizer.json is converted from the slow tokenizer's file
        // beside it, when there is one this module converts.
        let beside = ["spm.model", "vocab.txt"].map(|f| path.with_file_name(f)).into_iter().find(|f| f.is_file());
        let beside = beside.filter(|_| !path.exists() && path.file_name().is_some_and(|n| n == "tokenizer.json"));
        let source = beside.as_deref().unwrap_or(path);
        let (bytes, path) = if source.extension().is_some_and(|e| e == "model") {
            (spm::tokenizer_json(source)?, source.to_path_buf())
        } else if source.file_name().is_some_and(|n| n == "vocab.txt") {
            (vocab_txt::tokenizer_json(source)?, source.to_path_buf())
        } else {
            let bytes = std::fs::read(path).with_context(|| {
                format!(
                    "cannot read tokenizer file {}{}",
                    path.display(),
                    slow_tokenizer_hint(path).unwrap_or_default()
                )
            })?;
            (bytes, path.to_path_buf())
        };
        let path = path.as_path();
        let hash = hex(&Sha256::digest(&bytes));
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow!("{} is not a valid tokenizer.json: {e}", path.display()))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| anyhow!("{}: cannot disable truncation: {e}", path.display()))?;
        let added = inner.get_added_tokens_decoder();
        let mut special: Vec<(u32, String)> =
            added.iter().filter(|(_, t)| t.special).map(|(&id, t)| (id, t.content.clone())).collect();
        special.sort();
        let find = |names: &[&str]| special.iter().find(|(_, c)| names.contains(&c.as_str())).map(|(id, _)| *id);
        let mask_id = find(&["[MASK]", "<mask>"]);
        let pad_id = find(&["[PAD]", "<pad>"]);
        let vocab_size = inner.get_vocab_size(true);
        let fast = match WordPieceFast::from_json(&bytes) {
            Ok(f) => Some(FastPath::WordPiece(Arc::new(f))),
            Err(not_wordpiece) => match SubwordFast::from_json(&bytes) {
                Ok(f) => Some(FastPath::Subword(Arc::new(f))),
                Err(not_subword) => {
                    debug!("{}: tokenizing with `tokenizers` only: {not_wordpiece}; {not_subword}", path.display());
                    None
                }
            },
        };
        Ok(Self {
            inner,
            fast,
            mask_id,
            pad_id,
            vocab_size,
            special_ids: special.into_iter().map(|(id, _)| id).collect(),
            hash,
            path: path.to_path_buf(),
            json: bytes.into(),
            separator: None,
        })
    }

    /// The mask token's id; a tokenizer without one is refused naming its file
    /// (a masked LM needs it).
    pub fn mask_id(&self) -> Result<u32> {
        self.mask_id.ok_or_else(|| {
            anyhow!(
                "{}: no mask token (a special token \"[MASK]\" or \"<mask>\"); a masked-LM tokenizer needs one",
                self.path.display()
            )
        })
    }

    /// The id of `token` (e.g. `data.separator = "<|endoftext|>"`), refused
    /// naming the key when the vocabulary lacks it.
    pub fn token_id(&self, token: &str, key: &str) -> Result<u32> {
        self.inner
            .token_to_id(token)
            .ok_or_else(|| anyhow!("{key} = {token:?}: no such token in the tokenizer {}", self.path.display()))
    }

    /// Token ids of one document with the special tokens the tokenizer adds
    /// (`[CLS] ... [SEP]` for BERT), as Hugging Face `run_mlm` does per text.
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>> {
        if self.fast.is_some() {
            return Ok(self.encode_document_words(text)?.0);
        }
        let enc =
            self.inner.encode(text, true).map_err(|e| anyhow!("tokenizer {} failed: {e}", self.path.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`encode_document`](Self::encode_document), with each token's word-start
    /// mark for whole-word masking, from the tokenizer's word ids (its
    /// pre-tokenizer's words): a token starts a word when its word id differs
    /// from the previous token's; special tokens (no word id) are words of
    /// their own.
    pub fn encode_document_words(&self, text: &str) -> Result<(Vec<u32>, Vec<bool>)> {
        let (mut ids, mut starts) = (Vec::new(), Vec::new());
        self.encode_joined_into([text], &mut ids, &mut starts)?;
        Ok((ids, starts))
    }

    /// [`encode_document_words`](Self::encode_document_words) of each of
    /// `docs` in order, appended to `ids` and `starts`: one pair of buffers
    /// for a whole batch of documents.
    pub fn encode_documents_into<'a>(
        &self,
        docs: impl IntoIterator<Item = &'a str>,
        ids: &mut Vec<u32>,
        starts: &mut Vec<bool>,
    ) -> Result<()> {
        if let Some(sep) = self.separator {
            for doc in docs {
                self.encode_joined_into([doc], ids, starts)?;
                ids.push(sep);
                starts.push(true);
            }
            return Ok(());
        }
        self.encode_joined_into(docs, ids, starts)
    }

    /// The tokenizer of a job: `[model]`'s, with `data.separator`.
    pub fn for_job(cfg: &crate::config::Config) -> Result<Self> {
        Self::load(&cfg.tokenizer_path())?.with_separator(cfg.data.separator.as_deref())
    }

    /// `data.separator`: `token` appended to every document the pipeline
    /// encodes (`None`: nothing between documents but what the tokenizer
    /// adds). A token the vocabulary lacks is refused naming the key.
    pub fn with_separator(mut self, token: Option<&str>) -> Result<Self> {
        self.separator = token.map(|t| self.token_id(t, "data.separator")).transpose()?;
        Ok(self)
    }

    /// [`Self::encode_documents_into`] without the separator.
    fn encode_joined_into<'a>(
        &self,
        docs: impl IntoIterator<Item = &'a str>,
        ids: &mut Vec<u32>,
        starts: &mut Vec<bool>,
    ) -> Result<()> {
        let failed = |e| anyhow!("tokenizer {} failed: {e}", self.path.display());
        match &self.fast {
            Some(FastPath::WordPiece(f)) => return f.encode_many_into(docs, &self.inner, ids, starts).map_err(failed),
            Some(FastPath::Subword(f)) => return f.encode_many_into(docs, &self.inner, ids, starts).map_err(failed),
            None => {}
        }
        for doc in docs {
            append_encoding(&self.inner.encode(doc, true).map_err(failed)?, ids, starts);
        }
        Ok(())
    }

    /// The exact fast path, when the file is one it reproduces.
    pub fn fast_path(&self) -> Option<&FastPath> {
        self.fast.as_ref()
    }

    /// This tokenizer with its fast path switched off: every document through
    /// `inner` (for tests and benchmarks that compare the two).
    pub fn without_fast_path(mut self) -> Self {
        self.fast = None;
        self
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_with(ids, false)
    }

    /// Decodes `ids`, dropping special tokens when `skip_special` (HF's
    /// `skip_special_tokens`).
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> String {
        self.inner
            .decode(ids, skip_special)
            .unwrap_or_else(|_| ids.iter().map(|&i| self.token_str(i)).collect::<Vec<_>>().join(" "))
    }

    /// The vocabulary entry of `id` (`<id N?>` when the id is out of range).
    pub fn token_str(&self, id: u32) -> String {
        self.inner.id_to_token(id).unwrap_or_else(|| format!("<id {id}?>"))
    }

    /// Whether `id` is a special token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.binary_search(&id).is_ok()
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hugging Face model folders often ship only a slow tokenizer's files
/// (RoBERTa: `vocab.json` + `merges.txt`; XLM-R: `sentencepiece.bpe.model`;
/// DeBERTa's `spm.model` and BERT's `vocab.txt` are converted here), which
/// `transformers` converts when it loads them. When `path` is missing and its
/// folder holds such files, says so and how to write the `tokenizer.json`.
fn slow_tokenizer_hint(path: &Path) -> Option<String> {
    if path.exists() {
        return None;
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let slow = ["sentencepiece.bpe.model", "vocab.json"];
    let found = slow.iter().find(|f| dir.join(f).is_file())?;
    let d = dir.display().to_string().replace('\'', "\\'");
    let command = format!(
        "python -c \"from transformers import AutoTokenizer as T; T.from_pretrained('{d}').save_pretrained('{d}')\""
    );
    Some(format!(
        " ({} holds {found}, a slow tokenizer's file, but no tokenizer.json: write one once with {command} \
         (transformers; for a SentencePiece model also sentencepiece and protobuf), or set model.tokenizer)",
        dir.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil;

    #[test]
    fn bert_tokenizer_ids_and_document_wrapping() {
        let t = testutil::tokenizer();
        assert_eq!((t.mask_id, t.pad_id, t.vocab_size), (Some(103), Some(0), 30522));
        assert_eq!(t.special_ids, vec![0, 100, 101, 102, 103]);
        assert_eq!(t.hash.len(), 64);
        let ids = t.encode_document("Hello world").unwrap();
        assert_eq!((ids[0], *ids.last().unwrap()), (101, 102));
        assert_eq!(t.decode(&ids), "[CLS] hello world [SEP]");
        assert_eq!(t.token_str(103), "[MASK]");
    }

    #[test]
    fn word_starts_follow_the_pre_tokenizer_words() {
        let t = testutil::tokenizer();
        let (ids, starts) = t.encode_document_words("Tokenization isn't hard.").unwrap();
        assert_eq!(ids, t.encode_document("Tokenization isn't hard.").unwrap());
        let toks: Vec<String> = ids.iter().map(|&i| t.token_str(i)).collect();
        // [CLS] token ##ization isn ' t hard . [SEP]
        assert_eq!(toks[1..3], ["token", "##ization"]);
        assert_eq!(starts, [true, true, false, true, true, true, true, true, true]);
        // A WordPiece continuation ("##") never starts a word; everything else here does.
        let text = std::fs::read_to_string(&testutil::corpus_files()[0]).unwrap();
        let (ids, starts) = t.encode_document_words(&text).unwrap();
        for (&id, &s) in ids.iter().zip(&starts) {
            assert_eq!(s, !t.token_str(id).starts_with("##"), "{}", t.token_str(id));
        }
    }

    #[test]
    fn batches_of_documents_encode_like_single_documents_with_or_without_the_fast_path() {
        let bert = testutil::tokenizer();
        assert!(bert.fast_path().is_some());
        let src = std::fs::read_to_string(testutil::tokenizer_path()).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&src).unwrap();
        v["pre_tokenizer"] = serde_json::json!({ "type": "Whitespace" });
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("whitespace.json");
        std::fs::write(&p, v.to_string()).unwrap();
        let other = TextTokenizer::load(&p).unwrap();
        assert!(other.fast_path().is_none());
        let docs = ["Tokenization isn't hard.", "", "[MASK] café", "two\nlines"];
        for t in [bert, &other] {
            let (mut ids, mut starts) = (vec![7], vec![false]);
            t.encode_documents_into(docs, &mut ids, &mut starts).unwrap();
            let (mut want_ids, mut want_starts) = (vec![7], vec![false]);
            for d in docs {
                let enc = t.inner.encode(d, true).unwrap();
                let w = enc.get_word_ids();
                want_ids.extend(enc.get_ids());
                want_starts.extend((0..w.len()).map(|i| w[i].is_none() || i == 0 || w[i] != w[i - 1]));
                assert_eq!(t.encode_document(d).unwrap(), enc.get_ids());
            }
            assert_eq!((ids, starts), (want_ids, want_starts));
        }
    }

    #[test]
    fn long_documents_are_not_truncated_or_padded() {
        let t = testutil::tokenizer();
        let text = "word ".repeat(2000);
        assert_eq!(t.encode_document(&text).unwrap().len(), 2002);
        assert_eq!(t.encode_document("a").unwrap().len(), 3);
    }

    #[test]
    fn a_missing_tokenizer_json_beside_a_slow_tokenizer_says_how_to_write_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let e = format!("{:#}", TextTokenizer::load(&path).unwrap_err());
        assert!(e.contains("tokenizer.json") && !e.contains("slow tokenizer"), "{e}");
        std::fs::write(dir.path().join("vocab.json"), b"not read").unwrap();
        let e = format!("{:#}", TextTokenizer::load(&path).unwrap_err());
        assert!(e.contains("holds vocab.json") && e.contains("save_pretrained"), "{e}");
        // vocab.txt is converted: one without the special tokens is named.
        std::fs::write(dir.path().join("vocab.txt"), b"a\nb\n").unwrap();
        let e = format!("{:#}", TextTokenizer::load(&path).unwrap_err());
        assert!(e.contains("vocab.txt") && e.contains("not a usable WordPiece vocabulary"), "{e}");
        std::fs::remove_file(dir.path().join("vocab.txt")).unwrap();
        // spm.model is converted: a broken one is named.
        std::fs::write(dir.path().join("spm.model"), b"\x0a\xff").unwrap();
        let e = format!("{:#}", TextTokenizer::load(&path).unwrap_err());
        assert!(e.contains("spm.model") && e.contains("not a usable SentencePiece model"), "{e}");
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let e = format!("{:#}", TextTokenizer::load(&missing).unwrap_err());
        assert!(e.contains("nope.json"), "{e}");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"not\": \"a tokenizer\"}").unwrap();
        let e = format!("{:#}", TextTokenizer::load(&bad).unwrap_err());
        assert!(e.contains("bad.json") && e.contains("not a valid tokenizer"), "{e}");
    }

    #[test]
    fn tokenizer_without_mask_token_loads_but_has_no_mask_for_mlm() {
        let src = std::fs::read_to_string(testutil::tokenizer_path()).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&src).unwrap();
        for t in v["added_tokens"].as_array_mut().unwrap() {
            if t["content"] == "[MASK]" {
                t["special"] = false.into();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nomask.json");
        std::fs::write(&p, v.to_string()).unwrap();
        let t = TextTokenizer::load(&p).unwrap();
        let e = format!("{:#}", t.mask_id().unwrap_err());
        assert!(e.contains("nomask.json") && e.contains("no mask token"), "{e}");
    }
}
