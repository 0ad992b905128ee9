//! DeBERTa-v2/v3's SentencePiece tokenizer (`spm.model`) as a `tokenizers`
//! tokenizer, for model folders that ship no `tokenizer.json` (Microsoft's
//! `deberta-v3-*` and `deberta-v2-*` on the Hub): the conversion `transformers`
//! applies when it loads such a folder (`DebertaV2Converter` of
//! `convert_slow_tokenizer.py`), done here so that no Python is needed.
//!
//! - model: Unigram over the pieces of `spm.model` with their scores, its
//!   unknown piece and byte fallback;
//! - normalizer: lower-casing when `tokenizer_config.json` says
//!   `do_lower_case`, strip, SentencePiece's own precompiled character map
//!   (`nmt_nfkc` for DeBERTa), runs of spaces collapsed;
//! - pre-tokenizer: punctuation isolated when `split_by_punct`, then
//!   Metaspace (`▁`, prepended to every word when the model adds a dummy prefix);
//! - post-processor: `[CLS] $A [SEP]`; decoder: Metaspace;
//! - special tokens: the control pieces, the unknown piece, and the mask token
//!   (`[MASK]`), which DeBERTa-v3 adds after the pieces (id 128000).
//!
//! The `spm.model` file is a protobuf `ModelProto`; the few fields read are
//! decoded here ([`ModelProto::parse`]).
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Lowercase, Precompiled, Replace, Sequence, Strip};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::punctuation::Punctuation;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// A piece's type in `ModelProto.SentencePiece.Type`.
const UNKNOWN: u64 = 2;
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// The fields of `spm.model` the conversion reads.
#[derive(Debug, Default, PartialEq)]
struct ModelProto {
    /// (piece, score, type)
    pieces: Vec<(String, f32, u64)>,
    /// `trainer_spec.model_type`: 1 Unigram (the default), 2 BPE, 3 word, 4 char.
    model_type: u64,
    unk_id: u64,
    precompiled_charsmap: Vec<u8>,
}

/// A protobuf field: its number and its value.
enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
    Fixed64,
}

/// Reads a protobuf message's fields one by one.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.buf.split_first().ok_or_else(|| anyhow!("truncated varint"))?;
            self.buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        bail!("varint longer than 10 bytes")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            bail!("a field of {n} bytes where {} remain", self.buf.len());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Fixed64
            }
            2 => {
                let n = usize::try_from(self.varint()?).context("field length")?;
                Field::Bytes(self.take(n)?)
            }
            5 => Field::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"))),
            wire => bail!("unsupported protobuf wire type {wire}"),
        };
        Ok(Some((key >> 3, field)))
    }
}

impl ModelProto {
    fn parse(buf: &[u8]) -> Result<Self> {
        let mut m = Self { model_type: 1, ..Self::default() };
        let mut r = Reader { buf };
        while let Some((number, field)) = r.next()? {
            match (number, field) {
                (1, Field::Bytes(piece)) => m.pieces.push(Self::piece(piece)?),
                (2, Field::Bytes(trainer)) => m.trainer_spec(trainer)?,
                (3, Field::Bytes(normalizer)) => m.normalizer_spec(normalizer)?,
                _ => {}
            }
        }
        Ok(m)
    }

    fn piece(buf: &[u8]) -> Result<(String, f32, u64)> {
        let (mut piece, mut score, mut kind) = (None, 0.0, 1);
        let mut r = Reader { buf };
        while let Some((number, field)) = r.next()? {
            match (number, field) {
                (1, Field::Bytes(b)) => piece = Some(String::from_utf8(b.to_vec()).context("a piece is not UTF-8")?),
                (2, Field::Fixed32(bits)) => score = f32::from_bits(bits),
                (3, Field::Varint(t)) => kind = t,
                _ => {}
            }
        }
        Ok((piece.ok_or_else(|| anyhow!("a piece without its text"))?, score, kind))
    }

    fn trainer_spec(&mut self, buf: &[u8]) -> Result<()> {
        let mut r = Reader { buf };
        while let Some((number, field)) = r.next()? {
            match (number, field) {
                (3, Field::Varint(t)) => self.model_type = t,
                (40, Field::Varint(id)) => self.unk_id = id,
                _ => {}
            }
        }
        Ok(())
    }

    fn normalizer_spec(&mut self, buf: &[u8]) -> Result<()> {
        let mut r = Reader { buf };
        while let Some((number, field)) = r.next()? {
            if let (2, Field::Bytes(map)) = (number, field) {
                self.precompiled_charsmap = map.to_vec();
            }
        }
        Ok(())
    }
}

/// What `tokenizer_config.json` (and `added_tokens.json`) beside `spm.model` say.
#[derive(Debug)]
struct Settings {
    do_lower_case: bool,
    split_by_punct: bool,
    cls: String,
    sep: String,
    unk: String,
    pad: String,
    mask: String,
    /// Added tokens with their ids (`added_tokens.json`, `added_tokens_decoder`).
    added: Vec<(String, u32)>,
}

/// `name` in `dir` as JSON; `Null` when there is no such file.
pub(super) fn read_json(dir: &Path, name: &str) -> Result<serde_json::Value> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid JSON", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(serde_json::Value::Null),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// A special token of `tokenizer_config.json`: a string or an `AddedToken`
/// object (`{"content": ...}`), else `default`.
pub(super) fn config_token(config: &serde_json::Value, key: &str, default: &str) -> String {
    let v = &config[key];
    v.as_str().or_else(|| v["content"].as_str()).unwrap_or(default).to_string()
}

/// BERT's post-processor, which both converters use: `cls $A sep` (and
/// `cls $A sep $B sep` for pairs), with the two tokens' ids.
pub(super) fn cls_sep_template(cls: (&str, u32), sep: (&str, u32)) -> Result<TemplateProcessing> {
    let ((c, _), (e, _)) = (cls, sep);
    TemplateProcessing::builder()
        .try_single(format!("{c}:0 $A:0 {e}:0"))
        .and_then(|b| b.try_pair(format!("{c}:0 $A:0 {e}:0 $B:1 {e}:1")))
        .map_err(|e| anyhow!("template: {e}"))?
        .special_tokens(vec![(c.to_string(), cls.1), (e.to_string(), sep.1)])
        .build()
        .map_err(|e| anyhow!("template: {e}"))
}

/// Refuses a `tokenizer_config.json` whose `tokenizer_class` is not one of
/// `accepted` (by prefix, so the `Fast` variants pass), naming the file.
pub(super) fn check_class(dir: &Path, config: &serde_json::Value, accepted: &[&str], what: &str) -> Result<()> {
    if let Some(class) = config["tokenizer_class"].as_str().filter(|c| !accepted.iter().any(|a| c.starts_with(a))) {
        bail!(
            "{} names tokenizer_class {class:?}: only {what} is converted here; write its tokenizer.json with \
             transformers (AutoTokenizer.from_pretrained(folder).save_pretrained(folder)) or set model.tokenizer",
            dir.join("tokenizer_config.json").display()
        );
    }
    Ok(())
}

impl Settings {
    fn read(dir: &Path) -> Result<Self> {
        let config = read_json(dir, "tokenizer_config.json")?;
        let token = |key: &str, default: &str| config_token(&config, key, default);
        let mut added: Vec<(String, u32)> = Vec::new();
        if let Some(map) = read_json(dir, "added_tokens.json")?.as_object() {
            added.extend(map.iter().filter_map(|(t, id)| Some((t.clone(), u32::try_from(id.as_u64()?).ok()?))));
        }
        if let Some(map) = config["added_tokens_decoder"].as_object() {
            for (id, t) in map {
                if let (Ok(id), Some(content)) = (id.parse::<u32>(), t["content"].as_str()) {
                    added.push((content.to_string(), id));
                }
            }
        }
        check_class(dir, &config, &["DebertaV2Tokenizer"], "DeBERTa-v2/v3's SentencePiece model (DebertaV2Tokenizer)")?;
        Ok(Self {
            do_lower_case: config["do_lower_case"].as_bool().unwrap_or(false),
            split_by_punct: config["split_by_punct"].as_bool().unwrap_or(false),
            cls: token("cls_token", "[CLS]"),
            sep: token("sep_token", "[SEP]"),
            unk: token("unk_token", "[UNK]"),
            pad: token("pad_token", "[PAD]"),
            mask: token("mask_token", "[MASK]"),
            added,
        })
    }
}

/// Refuses a character map `Precompiled` would misread: a little-endian u32
/// trie size (a multiple of 4, within the map) before the trie and the
/// normalised strings.
fn check_charsmap(map: &[u8]) -> Result<()> {
    let size = map.get(..4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
    match size {
        Some(size) if size > 0 && size % 4 == 0 && 4 + size <= map.len() => Ok(()),
        _ => bail!("its precompiled_charsmap ({} bytes) is malformed", map.len()),
    }
}

/// The `tokenizer.json` (bytes) of the SentencePiece model `spm`, with the
/// settings of the `tokenizer_config.json` beside it; errors name the file.
pub fn tokenizer_json(spm: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(spm).with_context(|| format!("cannot read {}", spm.display()))?;
    let dir = spm.parent().unwrap_or(Path::new("."));
    convert(&bytes, &Settings::read(dir)?)
        .with_context(|| format!("{} is not a usable SentencePiece model", spm.display()))
}

fn convert(bytes: &[u8], s: &Settings) -> Result<Vec<u8>> {
    let proto = ModelProto::parse(bytes)?;
    if proto.pieces.is_empty() {
        bail!("it holds no pieces");
    }
    if proto.model_type != 1 {
        bail!("its model type is {} (only Unigram, 1, is converted: DeBERTa-v2/v3's)", proto.model_type);
    }
    let vocab: Vec<(String, f64)> = proto.pieces.iter().map(|(p, score, _)| (p.clone(), f64::from(*score))).collect();
    let n = vocab.len();
    let unk_id = usize::try_from(proto.unk_id).ok().filter(|&i| i < n);
    let unk_id = unk_id.ok_or_else(|| anyhow!("its unknown piece id {} is not one of its pieces", proto.unk_id))?;
    // Tokens that are not pieces (DeBERTa-v3's [MASK] at 128000) are added
    // tokens, as transformers adds them: numbered from the pieces' count on,
    // in the order of their ids; the mask token is added when missing.
    let in_pieces = |t: &str| proto.pieces.iter().any(|(p, ..)| p == t);
    let mut extra: Vec<(String, u32)> = s.added.iter().filter(|(t, _)| !in_pieces(t)).cloned().collect();
    extra.sort_by_key(|(_, id)| *id);
    extra.dedup_by(|a, b| a.0 == b.0);
    for (i, (t, id)) in extra.iter().enumerate() {
        if *id as usize != n + i {
            bail!(
                "added token {t:?} has id {id} in added_tokens.json or tokenizer_config.json, but the tokens after \
                 its {n} pieces are numbered from {n} on ({} would be {t:?}'s)",
                n + i
            );
        }
    }
    if !in_pieces(&s.mask) && !extra.iter().any(|(t, _)| *t == s.mask) {
        extra.push((s.mask.clone(), (n + extra.len()) as u32));
    }
    let id_of = |t: &str| {
        let piece = proto.pieces.iter().position(|(p, ..)| p == t).map(|i| i as u32);
        piece.or_else(|| extra.iter().find(|(e, _)| e == t).map(|(_, id)| *id))
    };
    let (cls, sep) = match (id_of(&s.cls), id_of(&s.sep)) {
        (Some(c), Some(e)) => (c, e),
        _ => bail!("it has no class or separator token ({:?}, {:?}): not a DeBERTa-v2/v3 tokenizer", s.cls, s.sep),
    };
    let named = [&s.cls, &s.sep, &s.unk, &s.pad, &s.mask];
    let specials: Vec<String> = proto
        .pieces
        .iter()
        .enumerate()
        .filter(|(i, (p, _, kind))| *kind == CONTROL || *kind == UNKNOWN || *i == unk_id || named.contains(&p))
        .map(|(_, (p, _, _))| p.clone())
        .chain(extra.iter().map(|(t, _)| t.clone()))
        .collect();
    let user_defined: Vec<String> = proto
        .pieces
        .iter()
        .filter(|(p, _, kind)| *kind == USER_DEFINED && !specials.contains(p))
        .map(|(p, ..)| p.clone())
        .collect();

    // As transformers' converter: no byte fallback (DeBERTa's models have none).
    let model = Unigram::from(vocab, Some(unk_id), false).map_err(|e| anyhow!("Unigram model: {e}"))?;
    let mut tokenizer = Tokenizer::new(model);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if s.do_lower_case {
        normalizers.push(Lowercase.into());
    }
    normalizers.push(Strip::new(true, true).into());
    if !proto.precompiled_charsmap.is_empty() {
        check_charsmap(&proto.precompiled_charsmap)?;
        let map = Precompiled::from(&proto.precompiled_charsmap).map_err(|e| anyhow!("precompiled_charsmap: {e}"))?;
        normalizers.push(map.into());
    }
    normalizers.push(
        Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(" {2,}".into()), " ")
            .map_err(|e| anyhow!("{e}"))?
            .into(),
    );
    tokenizer.with_normalizer(Some(Sequence::new(normalizers)));
    // transformers prepends `▁` to every word (DebertaV2Tokenizer has no
    // add_prefix_space: "always"), as SentencePiece's dummy prefix does.
    let scheme = PrependScheme::Always;
    let mut pre: Vec<PreTokenizerWrapper> = Vec::new();
    if s.split_by_punct {
        pre.push(Punctuation::new(SplitDelimiterBehavior::Isolated).into());
    }
    pre.push(Metaspace::new('▁', scheme, true).into());
    tokenizer.with_pre_tokenizer(Some(PreSequence::new(pre)));
    tokenizer.with_decoder(Some(MetaspaceDecoder::new('▁', scheme, true)));
    tokenizer.with_post_processor(Some(cls_sep_template((&s.cls, cls), (&s.sep, sep))?));
    let special: Vec<AddedToken> =
        specials.iter().map(|t| AddedToken::from(t.clone(), true).normalized(false)).collect();
    tokenizer.add_special_tokens(&special);
    for (t, id) in &extra {
        if tokenizer.token_to_id(t) != Some(*id) {
            bail!("added token {t:?} got id {:?}, not {id}", tokenizer.token_to_id(t));
        }
    }
    let plain: Vec<AddedToken> =
        user_defined.iter().map(|t| AddedToken::from(t.clone(), false).normalized(false)).collect();
    tokenizer.add_tokens(&plain);
    Ok(tokenizer.to_string(false).map_err(|e| anyhow!("serialising: {e}"))?.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protobuf varint.
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn bytes_field(number: u64, body: &[u8], out: &mut Vec<u8>) {
        varint(number << 3 | 2, out);
        varint(body.len() as u64, out);
        out.extend_from_slice(body);
    }

    /// A `ModelProto` with `pieces` (text, score, type) and unk id `unk`.
    fn model(pieces: &[(&str, f32, u64)], unk: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for (p, score, kind) in pieces {
            let mut piece = Vec::new();
            bytes_field(1, p.as_bytes(), &mut piece);
            varint(2 << 3 | 5, &mut piece);
            piece.extend_from_slice(&score.to_le_bytes());
            varint(3 << 3, &mut piece);
            varint(*kind, &mut piece);
            bytes_field(1, &piece, &mut out);
        }
        let mut trainer = Vec::new();
        varint(40 << 3, &mut trainer);
        varint(unk, &mut trainer);
        bytes_field(2, &trainer, &mut out);
        out
    }

    fn settings() -> Settings {
        Settings {
            do_lower_case: false,
            split_by_punct: false,
            cls: "[CLS]".into(),
            sep: "[SEP]".into(),
            unk: "[UNK]".into(),
            pad: "[PAD]".into(),
            mask: "[MASK]".into(),
            added: vec![],
        }
    }

    #[test]
    fn pieces_scores_and_types_are_read() {
        let bytes = model(&[("[PAD]", 0.0, 3), ("▁a", -1.5, 1), ("[UNK]", 0.0, 2)], 2);
        let m = ModelProto::parse(&bytes).unwrap();
        assert_eq!(m.pieces, vec![("[PAD]".into(), 0.0, 3), ("▁a".into(), -1.5, 1), ("[UNK]".into(), 0.0, 2)]);
        assert_eq!((m.unk_id, m.model_type), (2, 1));
        assert!(ModelProto::parse(&bytes[..bytes.len() - 3]).is_err(), "a truncated file is an error");
    }

    #[test]
    fn the_mask_token_follows_the_pieces_and_documents_are_wrapped() {
        let pieces = [
            ("[PAD]", 0.0, 3),
            ("[CLS]", 0.0, 3),
            ("[SEP]", 0.0, 3),
            ("[UNK]", 0.0, 2),
            ("▁", -2.0, 1),
            ("▁ab", -1.0, 1),
            ("c", -3.0, 1),
        ];
        let json = convert(&model(&pieces, 3), &settings()).unwrap();
        let t = Tokenizer::from_bytes(&json).unwrap();
        assert_eq!(t.token_to_id("[MASK]"), Some(7));
        let ids = t.encode("ab  c [MASK]", true).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![1, 5, 4, 6, 7, 2]);
        // Tokenizing through the model alone never yields the mask (an added token).
        assert_eq!(tokenizers::Model::token_to_id(t.get_model(), "[MASK]"), None);
        let err = format!("{:#}", convert(&model(&pieces[3..], 0), &settings()).unwrap_err());
        assert!(err.contains("class or separator"), "{err}");
        // An added token declared at an id the pieces do not end at is refused.
        let declared = Settings { added: vec![("[MASK]".into(), 9)], ..settings() };
        let err = format!("{:#}", convert(&model(&pieces, 3), &declared).unwrap_err());
        assert!(err.contains("[MASK]") && err.contains("id 9") && err.contains("numbered from 7"), "{err}");
        let declared = Settings { added: vec![("[MASK]".into(), 7), ("[X]".into(), 8)], ..settings() };
        let t = Tokenizer::from_bytes(convert(&model(&pieces, 3), &declared).unwrap()).unwrap();
        assert_eq!((t.token_to_id("[MASK]"), t.token_to_id("[X]")), (Some(7), Some(8)));
    }

    #[test]
    fn a_mask_among_the_pieces_is_special_and_keeps_its_id() {
        let pieces = [
            ("[PAD]", 0.0, 3),
            ("[CLS]", 0.0, 3),
            ("[SEP]", 0.0, 3),
            ("[UNK]", 0.0, 2),
            ("[MASK]", 0.0, 4),
            ("▁a", -1.0, 1),
        ];
        let t = Tokenizer::from_bytes(convert(&model(&pieces, 3), &settings()).unwrap()).unwrap();
        assert_eq!(t.token_to_id("[MASK]"), Some(4));
        assert!(t.get_added_tokens_decoder()[&4].special);
        assert_eq!(t.get_vocab_size(true), 6);
    }

    #[test]
    fn another_tokenizer_class_is_refused_naming_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let pieces = [("<s>", 0.0, 3), ("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2), ("▁a", -1.0, 1)];
        std::fs::write(dir.path().join("sentencepiece.bpe.model"), model(&pieces, 3)).unwrap();
        let config = dir.path().join("tokenizer_config.json");
        std::fs::write(&config, r#"{"tokenizer_class": "XLMRobertaTokenizer"}"#).unwrap();
        let err = format!("{:#}", tokenizer_json(&dir.path().join("sentencepiece.bpe.model")).unwrap_err());
        assert!(err.contains("tokenizer_config.json") && err.contains("XLMRobertaTokenizer"), "{err}");
        std::fs::write(&config, r#"{"tokenizer_class": "DebertaV2Tokenizer"}"#).unwrap();
        let err = format!("{:#}", tokenizer_json(&dir.path().join("sentencepiece.bpe.model")).unwrap_err());
        assert!(err.contains("sentencepiece.bpe.model") && err.contains("not a DeBERTa-v2/v3 tokenizer"), "{err}");
    }

    #[test]
    fn malformed_character_maps_are_refused() {
        for map in [&[1u8, 0][..], &[0, 0, 0, 0, 1], &[8, 0, 0, 0, 1, 2, 3], &[6, 0, 0, 0, 1, 2, 3, 4, 5, 6]] {
            assert!(check_charsmap(map).is_err(), "{map:?}");
        }
        check_charsmap(&[4, 0, 0, 0, 1, 2, 3, 4, b'a', 0]).unwrap();
    }
}
