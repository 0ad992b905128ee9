//! BERT's and DistilBERT's WordPiece `vocab.txt` as a `tokenizers` tokenizer,
//! for model folders that ship no `tokenizer.json` (many older or fine-tuned
//! BERTs): the conversion `transformers` applies when it loads such a folder
//! (`BertConverter` of `convert_slow_tokenizer.py`), done here so that no
//! Python is needed.
//!
//! - model: WordPiece over the lines of `vocab.txt` (a token's id is its line),
//!   `##` continuing prefix, words of more than 100 characters unknown;
//! - normalizer: `BertNormalizer` (control characters removed, CJK characters
//!   spaced, accents stripped and text lower-cased as `tokenizer_config.json`'s
//!   `do_lower_case`, `strip_accents`, `tokenize_chinese_chars` say; lower-casing
//!   by default);
//! - pre-tokenizer: `BertPreTokenizer`; post-processor `[CLS] $A [SEP]`;
//!   decoder WordPiece;
//! - special tokens: unknown, separator, padding, class and mask tokens.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{AddedToken, Tokenizer};

use super::spm::{check_class, cls_sep_template, config_token, read_json};

/// The `tokenizer.json` (bytes) of the WordPiece vocabulary `vocab_txt`, with
/// the settings of the `tokenizer_config.json` beside it; errors name the file.
pub fn tokenizer_json(vocab_txt: &Path) -> Result<Vec<u8>> {
    let text =
        std::fs::read_to_string(vocab_txt).with_context(|| format!("cannot read {} as UTF-8", vocab_txt.display()))?;
    let dir = vocab_txt.parent().unwrap_or(Path::new("."));
    let config = read_json(dir, "tokenizer_config.json")?;
    check_class(dir, &config, &["BertTokenizer", "DistilBertTokenizer"], "a BERT or DistilBERT vocab.txt (WordPiece)")?;
    convert(&text, &config).with_context(|| format!("{} is not a usable WordPiece vocabulary", vocab_txt.display()))
}

fn convert(text: &str, config: &serde_json::Value) -> Result<Vec<u8>> {
    // As transformers' `load_vocab`: one token a line, the line's index its id
    // (a repeated token keeps its last line).
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        vocab.insert(line.to_string(), u32::try_from(i).context("more than 2^32 lines")?);
    }
    if vocab.is_empty() {
        bail!("it holds no tokens");
    }
    let token = |key: &str, default: &str| config_token(config, key, default);
    let (unk, sep, pad, cls, mask) = (
        token("unk_token", "[UNK]"),
        token("sep_token", "[SEP]"),
        token("pad_token", "[PAD]"),
        token("cls_token", "[CLS]"),
        token("mask_token", "[MASK]"),
    );
    let id = |t: &str| vocab.get(t).copied().ok_or_else(|| anyhow!("it has no {t:?} line"));
    let (cls_id, sep_id) = (id(&cls)?, id(&sep)?);
    for t in [&unk, &pad, &mask] {
        id(t)?;
    }
    let lowercase = config["do_lower_case"].as_bool().unwrap_or(true);
    // Through its serialised form: the builder takes only `ahash` maps.
    let model = serde_json::json!({
        "type": "WordPiece", "unk_token": unk, "continuing_subword_prefix": "##",
        "max_input_chars_per_word": 100, "vocab": vocab,
    });
    let model: WordPiece = serde_json::from_str(&model.to_string()).context("WordPiece model")?;
    let mut tokenizer = Tokenizer::new(model);
    let chinese = config["tokenize_chinese_chars"].as_bool().unwrap_or(true);
    tokenizer.with_normalizer(Some(BertNormalizer::new(true, chinese, config["strip_accents"].as_bool(), lowercase)));
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_decoder(Some(WordPieceDecoder::new("##".into(), true)));
    tokenizer.with_post_processor(Some(cls_sep_template((&cls, cls_id), (&sep, sep_id))?));
    // In id order, as transformers lists them.
    let mut specials = [pad, unk, cls, sep, mask];
    specials.sort_by_key(|t| tokenizer.token_to_id(t));
    let added: Vec<AddedToken> = specials.iter().map(|t| AddedToken::from(t.clone(), true)).collect();
    tokenizer.add_special_tokens(&added);
    Ok(tokenizer.to_string(false).map_err(|e| anyhow!("serialising: {e}"))?.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil;
    use crate::data::TextTokenizer;

    /// The demo model's folder holds both vocab.txt and tokenizer.json: the
    /// conversion gives the same ids, word starts and fast path on the demo corpus.
    #[test]
    fn minilm_vocab_txt_converts_to_its_tokenizer_json() {
        let dir = testutil::tokenizer_path().parent().unwrap().to_path_buf();
        let copy = tempfile::tempdir().unwrap();
        for f in ["vocab.txt", "tokenizer_config.json"] {
            std::fs::copy(dir.join(f), copy.path().join(f)).unwrap();
        }
        let ours = TextTokenizer::load(&copy.path().join("tokenizer.json")).unwrap();
        let theirs = testutil::tokenizer();
        assert_eq!((ours.mask_id, ours.pad_id, ours.vocab_size), (theirs.mask_id, theirs.pad_id, theirs.vocab_size));
        assert_eq!(ours.special_ids, theirs.special_ids);
        let wordpiece =
            |t: &TextTokenizer| matches!(t.fast_path(), Some(crate::data::tokenizer::FastPath::WordPiece(_)));
        assert!(wordpiece(&ours) && wordpiece(theirs), "the WordPiece fast path");
        let mut lines = 0;
        for page in std::fs::read_dir("/usr/share/doc/python3.11/html/_sources/tutorial").unwrap() {
            let text = std::fs::read_to_string(page.unwrap().path()).unwrap();
            for line in text.lines().chain(["Café naïve 日本語 [MASK] x\u{0}y"]) {
                assert_eq!(
                    ours.encode_document_words(line).unwrap(),
                    theirs.encode_document_words(line).unwrap(),
                    "{line:?}"
                );
                lines += 1;
            }
        }
        assert!(lines > 3000, "{lines} lines");
    }

    #[test]
    fn cased_vocabularies_and_missing_special_tokens() {
        let vocab = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nHello\nhello\n##s\n";
        let cased = serde_json::json!({"do_lower_case": false});
        let t = Tokenizer::from_bytes(convert(vocab, &cased).unwrap()).unwrap();
        assert_eq!(t.encode("Hello hellos", true).unwrap().get_ids(), [2, 5, 6, 7, 3]);
        let t = Tokenizer::from_bytes(convert(vocab, &serde_json::Value::Null).unwrap()).unwrap();
        assert_eq!(t.encode("Hello", true).unwrap().get_ids(), [2, 6, 3]);
        let err = format!("{:#}", convert("[PAD]\n[UNK]\n[CLS]\n[SEP]\n", &serde_json::Value::Null).unwrap_err());
        assert!(err.contains("[MASK]"), "{err}");
    }
}
