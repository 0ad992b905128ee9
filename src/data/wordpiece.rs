//! An exact fast path for BERT-style WordPiece `tokenizer.json` files.
//!
//! Hugging Face `tokenizers` builds, for every document, a `NormalizedString`
//! with an alignment entry per character, an object per pre-tokenized word and
//! an owned `String` per token; on a corpus of short documents that was nearly
//! all of `mlm prepare`'s time. BERT, DistilBERT and MiniLM files share one
//! configuration (`BertNormalizer`, `BertPreTokenizer`, `WordPiece`, a
//! `[CLS] $A [SEP]` template), which on ASCII text reduces to one byte loop:
//! drop control characters, lower-case, cut words at whitespace and around
//! each punctuation character, and match the longest vocabulary entries.
//! [`WordPieceFast`] exists only for exactly that configuration and runs that
//! loop; what it cannot prove identical goes to `tokenizers`:
//!
//! - a document that contains an added token's content (`[MASK]`, ...)
//!   anywhere: added tokens are matched on the raw text before normalization,
//!   so the whole document goes to `Tokenizer::encode`;
//! - a run of pieces (text between ASCII whitespace) holding non-ASCII bytes
//!   (accents, CJK, Unicode spaces and punctuation, zero-width characters):
//!   `Tokenizer::encode` of that run, without special tokens.
//!
//! Cutting a document at ASCII whitespace (space, tab, LF, CR) and encoding the
//! pieces one by one gives what the whole document gives: every step of
//! `BertNormalizer` maps each character on its own (NFD reorders only runs of
//! combining marks, which a space ends), `clean_text` turns those four bytes
//! into spaces, and `BertPreTokenizer` cuts words at every space, so no word,
//! hence no token, spans a cut; each piece starts a new word. 0x0B, 0x0C and
//! the other ASCII control characters are not cuts: `clean_text` removes them,
//! joining their neighbours into one word.
use aho_corasick::AhoCorasick;
use rustc_hash::FxHashMap;
use serde_json::{json, Value};
use tokenizers::{Encoding, Tokenizer};

/// What `BertNormalizer` (with `clean_text`) and `BertPreTokenizer` make of
/// one byte of the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// An ASCII letter or digit: part of a word.
    Word,
    /// ASCII punctuation: a word of its own.
    Punct,
    /// Space, tab, LF or CR: ends a word and a piece.
    Space,
    /// Another ASCII control character: removed by `clean_text`.
    Removed,
    /// A byte of a non-ASCII character: its piece goes to `tokenizers`.
    NonAscii,
}

fn class_of(b: u8) -> Class {
    match b {
        b' ' | b'\t' | b'\n' | b'\r' => Class::Space,
        0x80..=0xFF => Class::NonAscii,
        _ if b.is_ascii_alphanumeric() => Class::Word,
        _ if b.is_ascii_punctuation() => Class::Punct,
        _ => Class::Removed,
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Vocabulary entries by their bytes, with the longest entry's length, which
/// bounds the longest-match search.
struct Entries {
    ids: FxHashMap<Box<[u8]>, u32>,
    longest: usize,
}

impl Entries {
    fn new<'a>(entries: impl Iterator<Item = (&'a [u8], u32)>) -> Self {
        let ids: FxHashMap<Box<[u8]>, u32> = entries.map(|(k, id)| (Box::from(k), id)).collect();
        let longest = ids.keys().map(|k| k.len()).max().unwrap_or(0);
        Self { ids, longest }
    }
}

/// Encodes documents exactly as a BERT-style WordPiece `tokenizers::Tokenizer`
/// does (padding and truncation off), ASCII text in one pass over its bytes;
/// see the module doc for what it hands to `tokenizers`.
pub struct WordPieceFast {
    /// Entries a word can start with (the whole vocabulary).
    head: Entries,
    /// Entries that continue a word: those with the continuing-subword prefix
    /// (`##`), keyed without it.
    tail: Entries,
    unk_id: u32,
    max_chars: usize,
    class: [Class; 256],
    /// A word byte as normalized: lower-cased when the normalizer lower-cases.
    norm: [u8; 256],
    /// The token of each ASCII punctuation character, alone a word.
    punct: [u32; 128],
    /// Template tokens before and after the document's.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    /// Contents of the added tokens (`None` when there are none).
    added: Option<AhoCorasick>,
}

impl std::fmt::Debug for WordPieceFast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WordPieceFast")
            .field("vocab", &self.head.ids.len())
            .field("unk_id", &self.unk_id)
            .field("max_chars", &self.max_chars)
            .field("lowercase", &(self.norm[b'A' as usize] == b'a'))
            .field("prefix", &self.prefix)
            .field("suffix", &self.suffix)
            .finish()
    }
}

impl WordPieceFast {
    /// The fast path for the `tokenizer.json` bytes `json`, or why there is
    /// none: only `BertNormalizer` with `clean_text` (either `lowercase`, any
    /// `strip_accents` and `handle_chinese_chars`, which touch only non-ASCII
    /// text), `BertPreTokenizer`, `WordPiece`, a `TemplateProcessing` whose
    /// single template is one sequence `A` between special tokens (or
    /// `BertProcessing`), and added tokens all matched on raw text
    /// (`normalized: false`) get one.
    pub fn from_json(json: &[u8]) -> Result<Self, String> {
        let v: Value = serde_json::from_slice(json).map_err(|e| format!("not valid JSON: {e}"))?;
        let n = &v["normalizer"];
        if n["type"] != "BertNormalizer" {
            return Err(format!("normalizer {} is not BertNormalizer", n["type"]));
        }
        if n["clean_text"] != true {
            return Err("BertNormalizer.clean_text is not true".into());
        }
        let lowercase = n["lowercase"].as_bool().ok_or("BertNormalizer.lowercase is not a boolean")?;
        if !(n["strip_accents"].is_null() || n["strip_accents"].is_boolean()) || !n["handle_chinese_chars"].is_boolean()
        {
            return Err("BertNormalizer.strip_accents or handle_chinese_chars is not a boolean".into());
        }
        if v["pre_tokenizer"] != json!({ "type": "BertPreTokenizer" }) {
            return Err(format!("pre_tokenizer {} is not BertPreTokenizer", v["pre_tokenizer"]["type"]));
        }
        let m = &v["model"];
        if m["type"] != "WordPiece" {
            return Err(format!("model {} is not WordPiece", m["type"]));
        }
        let (Some(unk), Some(prefix), Some(max_chars), Some(vocab)) = (
            m["unk_token"].as_str(),
            m["continuing_subword_prefix"].as_str(),
            m["max_input_chars_per_word"].as_u64(),
            m["vocab"].as_object(),
        ) else {
            return Err("WordPiece model lacks one of unk_token, continuing_subword_prefix, \
                        max_input_chars_per_word, vocab"
                .into());
        };
        let mut entries = Vec::with_capacity(vocab.len());
        for (k, id) in vocab {
            let id = as_u32(id).ok_or_else(|| format!("vocabulary id of {k:?} is not a u32"))?;
            entries.push((k.as_bytes(), id));
        }
        let head = Entries::new(entries.iter().copied());
        let tail = Entries::new(entries.iter().filter_map(|&(k, id)| Some((k.strip_prefix(prefix.as_bytes())?, id))));
        let unk_id = head.ids.get(unk.as_bytes()).copied();
        let unk_id = unk_id.ok_or_else(|| format!("unk_token {unk:?} is not in the vocabulary"))?;
        let (prefix, suffix) = special_tokens(&v["post_processor"])?;
        let mut contents = Vec::new();
        for t in v["added_tokens"].as_array().map(Vec::as_slice).unwrap_or_default() {
            if t["normalized"] != false {
                return Err(format!("added token {} is matched on normalized text", t["content"]));
            }
            contents.push(t["content"].as_str().ok_or("an added token has no content")?);
        }
        let added = match contents.is_empty() {
            true => None,
            false => Some(AhoCorasick::new(&contents).map_err(|e| format!("cannot search the added tokens: {e}"))?),
        };
        let mut fast = Self {
            head,
            tail,
            unk_id,
            max_chars: usize::try_from(max_chars).unwrap_or(usize::MAX),
            class: std::array::from_fn(|b| class_of(b as u8)),
            norm: std::array::from_fn(|b| if lowercase { (b as u8).to_ascii_lowercase() } else { b as u8 }),
            punct: [0; 128],
            prefix,
            suffix,
            added,
        };
        let (mut ids, mut starts) = (Vec::new(), Vec::new());
        for b in (0..128u8).filter(|&b| fast.class[b as usize] == Class::Punct) {
            ids.clear();
            fast.word_pieces(&[b], &mut ids, &mut starts);
            fast.punct[b as usize] = ids[0];
        }
        Ok(fast)
    }

    /// Appends the tokens of `text` to `ids` and their word-start marks to
    /// `starts`: exactly `tokenizer.encode(text, true)`'s ids, and its word ids
    /// turned into marks by [`append_encoding`]. `tokenizer` is the one loaded
    /// from the same file, with padding and truncation off; it encodes what
    /// this path does not.
    pub fn encode_into(
        &self,
        text: &str,
        tokenizer: &Tokenizer,
        ids: &mut Vec<u32>,
        starts: &mut Vec<bool>,
    ) -> tokenizers::Result<()> {
        self.encode_with(text, tokenizer, &mut Vec::new(), ids, starts)
    }

    /// [`encode_into`](Self::encode_into) of each of `docs` in order, into the
    /// same buffers.
    pub fn encode_many_into<'a>(
        &self,
        docs: impl IntoIterator<Item = &'a str>,
        tokenizer: &Tokenizer,
        ids: &mut Vec<u32>,
        starts: &mut Vec<bool>,
    ) -> tokenizers::Result<()> {
        let mut word = Vec::new();
        for doc in docs {
            self.encode_with(doc, tokenizer, &mut word, ids, starts)?;
        }
        Ok(())
    }

    /// [`encode_into`](Self::encode_into) with `word` as the buffer of the
    /// normalized word being read.
    fn encode_with(
        &self,
        text: &str,
        tokenizer: &Tokenizer,
        word: &mut Vec<u8>,
        ids: &mut Vec<u32>,
        starts: &mut Vec<bool>,
    ) -> tokenizers::Result<()> {
        if self.added.as_ref().is_some_and(|a| a.is_match(text)) {
            append_encoding(&tokenizer.encode(text, true)?, ids, starts);
            return Ok(());
        }
        ids.extend_from_slice(&self.prefix);
        starts.extend(self.prefix.iter().map(|_| true));
        let bytes = text.as_bytes();
        // The current piece: where it starts in `text` and in `ids`.
        let (mut piece, mut piece_mark) = (0, ids.len());
        word.clear();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.class[b as usize] {
                Class::Word => word.push(self.norm[b as usize]),
                Class::Removed => {}
                Class::Punct => {
                    self.word_pieces(word, ids, starts);
                    word.clear();
                    ids.push(self.punct[b as usize]);
                    starts.push(true);
                }
                Class::Space => {
                    self.word_pieces(word, ids, starts);
                    word.clear();
                    (piece, piece_mark) = (i + 1, ids.len());
                }
                Class::NonAscii => {
                    // Undo this piece's words and encode it, with the non-ASCII
                    // pieces right after it, with `tokenizers`; `end` is at a
                    // space byte or the end, both on character boundaries.
                    ids.truncate(piece_mark);
                    starts.truncate(piece_mark);
                    word.clear();
                    let end = non_ascii_run_end(bytes, i);
                    append_encoding(&tokenizer.encode(&text[piece..end], false)?, ids, starts);
                    (i, piece, piece_mark) = (end, end, ids.len());
                    continue;
                }
            }
            i += 1;
        }
        self.word_pieces(word, ids, starts);
        word.clear();
        ids.extend_from_slice(&self.suffix);
        starts.extend(self.suffix.iter().map(|_| true));
        Ok(())
    }

    /// Appends the WordPiece tokens of one normalized ASCII word, as
    /// `tokenizers`' `WordPiece::tokenize`: the longest vocabulary entry at
    /// each position, continuations looked up with the subword prefix; the
    /// whole word is one unknown token when it has more than
    /// `max_input_chars_per_word` characters or a position matches nothing.
    fn word_pieces(&self, word: &[u8], ids: &mut Vec<u32>, starts: &mut Vec<bool>) {
        if word.is_empty() {
            return;
        }
        if word.len() > self.max_chars {
            ids.push(self.unk_id);
            starts.push(true);
            return;
        }
        let mark = ids.len();
        let mut start = 0;
        while start < word.len() {
            let entries = if start == 0 { &self.head } else { &self.tail };
            let mut end = word.len().min(start + entries.longest);
            loop {
                if end == start {
                    ids.truncate(mark);
                    starts.truncate(mark);
                    ids.push(self.unk_id);
                    starts.push(true);
                    return;
                }
                if let Some(&id) = entries.ids.get(&word[start..end]) {
                    ids.push(id);
                    starts.push(start == 0);
                    start = end;
                    break;
                }
                end -= 1;
            }
        }
    }
}

/// Appends an encoding's ids to `ids` and their word-start marks to `starts`:
/// a token starts a word when its word id differs from the previous token's;
/// a token without one (a special token) always does.
pub fn append_encoding(enc: &Encoding, ids: &mut Vec<u32>, starts: &mut Vec<bool>) {
    let words = enc.get_word_ids();
    ids.extend_from_slice(enc.get_ids());
    starts.extend((0..words.len()).map(|i| words[i].is_none() || i == 0 || words[i] != words[i - 1]));
}

/// End of the run of pieces handed to `tokenizers` together: from the piece
/// holding the non-ASCII byte at `from` up to (not into) the next piece that
/// is all ASCII. Encoding several pieces at once only saves calls.
fn non_ascii_run_end(bytes: &[u8], from: usize) -> usize {
    let piece_end = |at: usize| bytes[at..].iter().position(|&b| is_space(b)).map_or(bytes.len(), |k| at + k);
    let mut end = piece_end(from);
    loop {
        let Some(next) = bytes[end..].iter().position(|&b| !is_space(b)).map(|k| end + k) else {
            return end;
        };
        let next_end = piece_end(next);
        if bytes[next..next_end].is_ascii() {
            return end;
        }
        end = next_end;
    }
}

/// The template's token ids before and after the sequence, from
/// `TemplateProcessing` (single template: special tokens, `$A`, special
/// tokens), `BertProcessing` or `RobertaProcessing` (`cls`, `$A`, `sep`; the
/// latter's options touch only offsets).
pub(super) fn special_tokens(p: &Value) -> Result<(Vec<u32>, Vec<u32>), String> {
    match p["type"].as_str() {
        Some("BertProcessing" | "RobertaProcessing") => match (as_u32(&p["cls"][1]), as_u32(&p["sep"][1])) {
            (Some(cls), Some(sep)) => Ok((vec![cls], vec![sep])),
            _ => Err(format!("{} without cls and sep ids", p["type"])),
        },
        Some("TemplateProcessing") => {
            let bad = || format!("single template {} is not one sequence A between special tokens", p["single"]);
            let (mut before, mut after, mut seen) = (Vec::new(), Vec::new(), false);
            for piece in p["single"].as_array().ok_or_else(bad)? {
                if let Some(s) = piece.get("Sequence") {
                    if seen || s["id"] != "A" {
                        return Err(bad());
                    }
                    seen = true;
                } else if let Some(name) = piece["SpecialToken"]["id"].as_str() {
                    let ids = p["special_tokens"][name]["ids"]
                        .as_array()
                        .and_then(|a| a.iter().map(as_u32).collect::<Option<Vec<u32>>>())
                        .ok_or_else(|| format!("special token {name:?} of the template has no ids"))?;
                    if seen {
                        after.extend(ids)
                    } else {
                        before.extend(ids)
                    }
                } else {
                    return Err(bad());
                }
            }
            if !seen {
                return Err(bad());
            }
            Ok((before, after))
        }
        // GPT-2's: byte-level offsets only, no token added; or no post-processor.
        Some("ByteLevel") => Ok((Vec::new(), Vec::new())),
        None if p.is_null() => Ok((Vec::new(), Vec::new())),
        _ => Err(format!(
            "post_processor {} is not TemplateProcessing, BertProcessing, RobertaProcessing or ByteLevel",
            p["type"]
        )),
    }
}

fn as_u32(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil;
    use crate::data::tokenizer::FastPath;
    use rayon::prelude::*;

    /// `tokenizers`' ids of `text` with special tokens, and word starts by the
    /// rule of `TextTokenizer::encode_document_words`, written out here.
    fn reference(tok: &Tokenizer, text: &str) -> (Vec<u32>, Vec<bool>) {
        let enc = tok.encode(text, true).unwrap();
        let w = enc.get_word_ids();
        (enc.get_ids().to_vec(), (0..w.len()).map(|i| w[i].is_none() || i == 0 || w[i] != w[i - 1]).collect())
    }

    fn fast(f: &WordPieceFast, tok: &Tokenizer, text: &str) -> (Vec<u32>, Vec<bool>) {
        let (mut ids, mut starts) = (Vec::new(), Vec::new());
        f.encode_into(text, tok, &mut ids, &mut starts).unwrap();
        (ids, starts)
    }

    #[track_caller]
    fn assert_exact(f: &WordPieceFast, tok: &Tokenizer, text: &str) {
        assert_eq!(fast(f, tok, text), reference(tok, text), "{text:?}");
    }

    /// A change to a tokenizer.json.
    type Edit = Box<dyn Fn(&mut Value)>;

    /// The test tokenizer.json, edited by `edit`.
    fn edited(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
        let mut v: Value = serde_json::from_slice(&std::fs::read(testutil::tokenizer_path()).unwrap()).unwrap();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    /// `json` loaded by `tokenizers` (padding and truncation off, as
    /// `TextTokenizer` does) and by the fast path.
    fn load(json: &[u8]) -> (Tokenizer, Result<WordPieceFast, String>) {
        let mut tok = Tokenizer::from_bytes(json).unwrap();
        tok.with_padding(None);
        tok.with_truncation(None).unwrap();
        (tok, WordPieceFast::from_json(json))
    }

    /// Strings at the edges of every rule the fast path reproduces, and of what
    /// it hands to `tokenizers`.
    fn tricky_texts() -> Vec<String> {
        let mut v: Vec<String> = [
            "",
            " ",
            " \t\r\n  \n",
            "Hello, World!",
            "Tokenization isn't HARD... (really?!)",
            "!!!...???---",
            "a--b==c__d",
            "(foo)[bar]{baz}<qux>",
            "x[0] = y[1:2]; # comment",
            "[MASK]",
            "a [MASK] b",
            "x[MASK]y",
            "[CLS] text [SEP]",
            "[mask] [Mask]",
            "[UNK] [PAD][PAD]",
            "[MASK",
            "café",
            "naïve-ish",
            "naïve ish and more ascii afterwards",
            "東京タワー is tall",
            "中文字符和ascii混合",
            "emoji 🎉 here",
            "emoji🎉glued",
            "a\u{a0}b",
            "zero\u{200b}width",
            "ideo\u{3000}graphic space",
            "\u{3000}",
            "\u{200b}",
            "a\u{85}b",
            "\u{fffd}bad",
            "Ünïcödé ÀÉÎ",
            "ﬁ ligature",
            "Straße",
            "İstanbul",
            "Σίσυφος ΣΑΣ",
            "em—dash – and “quotes” «guillemets»",
            "a\u{2028}b",
            "\u{feff}bom",
            "x\u{301}",
            " \u{301}x",
            "\u{e000}private",
            "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
            "ascii then ü then ascii then ö ö ö then ascii",
        ]
        .map(String::from)
        .into();
        for b in 0u8..=127 {
            let c = b as char;
            v.push(format!("ab{c}cd"));
            v.push(format!("ab {c} cd"));
            v.push(format!("{c}"));
            v.push(format!("{c}{c}x{c}Y"));
            v.push(format!("é{c}x"));
        }
        // max_input_chars_per_word is 100; a removed control character does not count.
        for n in [99, 100, 101, 150] {
            v.push("a".repeat(n));
            v.push(format!("x {} y", "Ab".repeat(n).chars().take(n).collect::<String>()));
            v.push(format!("{}\u{1}{}", "b".repeat(n / 2), "b".repeat(n - n / 2)));
            v.push(format!("{}é", "c".repeat(n)));
        }
        v.push(v.join(" "));
        v.push(v.join("\n"));
        v
    }

    #[test]
    fn matches_tokenizers_on_every_corpus_document() {
        let t = testutil::tokenizer();
        let f = WordPieceFast::from_json(&std::fs::read(testutil::tokenizer_path()).unwrap()).unwrap();
        let files = testutil::corpus_files();
        let tokens: usize = files
            .par_iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).unwrap();
                let mut n = 0;
                for doc in text.lines().filter(|l| !l.trim().is_empty()).chain([text.as_str()]) {
                    let want = reference(&t.inner, doc);
                    assert_eq!(fast(&f, &t.inner, doc), want, "{}: {doc:?}", p.display());
                    n += want.0.len();
                }
                n
            })
            .sum();
        assert!(tokens > 3_000_000, "{tokens}");
    }

    #[test]
    fn matches_tokenizers_on_tricky_text() {
        let t = testutil::tokenizer();
        let Some(FastPath::WordPiece(f)) = t.fast_path() else { panic!("the MiniLM tokenizer gets the fast path") };
        for text in tricky_texts() {
            assert_exact(f, &t.inner, &text);
        }
    }

    #[test]
    fn many_documents_append_like_one_at_a_time() {
        let t = testutil::tokenizer();
        let Some(FastPath::WordPiece(f)) = t.fast_path() else { panic!("no WordPiece fast path") };
        let docs = tricky_texts();
        let (mut ids, mut starts) = (Vec::new(), Vec::new());
        f.encode_many_into(docs.iter().map(String::as_str), &t.inner, &mut ids, &mut starts).unwrap();
        let (mut want_ids, mut want_starts) = (Vec::new(), Vec::new());
        for d in &docs {
            let (i, s) = reference(&t.inner, d);
            want_ids.extend(i);
            want_starts.extend(s);
        }
        assert_eq!((ids, starts), (want_ids, want_starts));
    }

    #[test]
    fn other_bert_settings_stay_exact() {
        let text = std::fs::read_to_string(&testutil::corpus_files()[3]).unwrap();
        let variants: [(&str, Edit); 6] = [
            ("cased", Box::new(|v| v["normalizer"]["lowercase"] = false.into())),
            (
                "cased, accents stripped",
                Box::new(|v| {
                    v["normalizer"]["lowercase"] = false.into();
                    v["normalizer"]["strip_accents"] = true.into();
                }),
            ),
            ("accents kept", Box::new(|v| v["normalizer"]["strip_accents"] = false.into())),
            ("no chinese handling", Box::new(|v| v["normalizer"]["handle_chinese_chars"] = false.into())),
            ("short words", Box::new(|v| v["model"]["max_input_chars_per_word"] = 5.into())),
            (
                "BertProcessing",
                Box::new(|v| {
                    v["post_processor"] =
                        json!({ "type": "BertProcessing", "sep": ["[SEP]", 102], "cls": ["[CLS]", 101] })
                }),
            ),
        ];
        for (name, edit) in variants {
            let (tok, f) = load(&edited(edit));
            let f = f.unwrap_or_else(|e| panic!("{name}: {e}"));
            for doc in tricky_texts().iter().map(String::as_str).chain(text.lines()).chain([text.as_str()]) {
                assert_eq!(fast(&f, &tok, doc), reference(&tok, doc), "{name}: {doc:?}");
            }
        }
    }

    #[test]
    fn documents_with_an_added_token_go_to_tokenizers_whole() {
        // A plain word as an added token: matched on raw text, so "Qqzz" (not
        // lower-cased yet) is not "qqzz" and stays WordPiece.
        let (tok, f) = load(&edited(|v| {
            let t = json!({ "id": 30522, "content": "qqzz", "single_word": false, "lstrip": false,
                            "rstrip": false, "normalized": false, "special": false });
            v["added_tokens"].as_array_mut().unwrap().push(t);
        }));
        let f = f.unwrap();
        for doc in ["say qqzz", "sayqqzzthere", "Qqzz qqzz QQZZ", "Qqzz", "naïve qqzz", "qqz z"] {
            assert_exact(&f, &tok, doc);
        }
        assert!(fast(&f, &tok, "say qqzz").0.contains(&30522));
        assert!(!fast(&f, &tok, "say Qqzz").0.contains(&30522));
    }

    #[test]
    fn other_configurations_get_no_fast_path() {
        let cases: [(&str, Edit); 8] = [
            ("pre_tokenizer", Box::new(|v| v["pre_tokenizer"] = json!({ "type": "Whitespace" }))),
            ("normalizer", Box::new(|v| v["normalizer"] = json!({ "type": "Lowercase" }))),
            ("clean_text", Box::new(|v| v["normalizer"]["clean_text"] = false.into())),
            ("normalized text", Box::new(|v| v["added_tokens"][2]["normalized"] = true.into())),
            ("post_processor", Box::new(|v| v["post_processor"] = Value::Null)),
            (
                "single template",
                Box::new(|v| {
                    v["post_processor"]["single"] = v["post_processor"]["pair"].clone();
                }),
            ),
            ("model", Box::new(|v| v["model"]["type"] = "BPE".into())),
            (
                "vocabulary",
                Box::new(|v| {
                    v["model"]["vocab"].as_object_mut().unwrap().remove("[UNK]");
                }),
            ),
        ];
        for (needle, edit) in cases {
            let e = WordPieceFast::from_json(&edited(edit)).unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        assert!(WordPieceFast::from_json(b"{").unwrap_err().contains("not valid JSON"));
    }
}
