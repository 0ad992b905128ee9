//! Tests of [`SubwordFast`] on small Unigram and byte-level BPE files built
//! here (the end-to-end test on trained files is `tests/tokenizer_fast.rs`).
use serde_json::{json, Value};

use super::*;

/// A DeBERTa-v3-shaped Unigram file: Strip, Replace, NFKC, space runs;
/// Metaspace "always"; `[CLS] $A [SEP]`.
fn unigram() -> Value {
    let mut vocab = vec![json!(["[PAD]", 0.0]), json!(["[CLS]", 0.0]), json!(["[SEP]", 0.0]), json!(["[UNK]", 0.0])];
    let pieces = ["▁", "▁the", "▁a", "t", "h", "e", "a", "s", "▁t", "he", "ing", "▁is", "i", "n", "g", "o", "r", "d"];
    for (k, p) in pieces.iter().enumerate() {
        vocab.push(json!([p, -1.0 - k as f64 / 4.0]));
    }
    vocab.push(json!(["[MASK]", 0.0]));
    let mask = vocab.len() - 1;
    let added: Vec<Value> = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"id": if i == 4 { mask } else { i }, "content": c, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Strip", "strip_left": true, "strip_right": true},
            {"type": "Replace", "pattern": {"String": "``"}, "content": "\""},
            {"type": "NFKC"},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]},
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [], "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [1], "tokens": ["[CLS]"]},
                                           "[SEP]": {"id": "[SEP]", "ids": [2], "tokens": ["[SEP]"]}}},
        "decoder": null,
        "model": {"type": "Unigram", "unk_id": 3, "vocab": vocab, "byte_fallback": false}
    })
}

/// A RoBERTa-shaped byte-level BPE file: every byte, a few merges,
/// `<s> $A </s>`.
fn byte_bpe() -> Value {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<s>", "<pad>", "</s>", "<unk>"].iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    for c in crate::data::pretokenize::bytes_char() {
        let n = vocab.len();
        vocab.insert(c.to_string(), json!(n));
    }
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "in g", "Ġ a", "' s", "e r"];
    for m in merges {
        let n = vocab.len();
        vocab.insert(m.replace(' ', ""), json!(n));
    }
    let mask = vocab.len();
    let added: Vec<Value> = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"id": if i == 4 { mask } else { i }, "content": c, "single_word": false, "lstrip": i == 4,
                   "rstrip": false, "normalized": i != 4, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0],
                           "trim_offsets": true, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}

/// A change to a tokenizer.json.
type Edit = Box<dyn Fn(&mut Value)>;

fn load(v: &Value) -> (Tokenizer, Result<SubwordFast, String>) {
    let json = serde_json::to_vec(v).unwrap();
    let mut tok = Tokenizer::from_bytes(&json).unwrap();
    tok.with_padding(None);
    tok.with_truncation(None).unwrap();
    (tok, SubwordFast::from_json(&json))
}

fn reference(tok: &Tokenizer, text: &str) -> (Vec<u32>, Vec<bool>) {
    let enc = tok.encode(text, true).unwrap();
    let w = enc.get_word_ids();
    (enc.get_ids().to_vec(), (0..w.len()).map(|i| w[i].is_none() || i == 0 || w[i] != w[i - 1]).collect())
}

fn fast(f: &SubwordFast, tok: &Tokenizer, text: &str) -> (Vec<u32>, Vec<bool>) {
    let (mut ids, mut starts) = (Vec::new(), Vec::new());
    f.encode_many_into([text], tok, &mut ids, &mut starts).unwrap();
    (ids, starts)
}

fn tricky() -> Vec<String> {
    let mut t: Vec<String> = [
        "",
        " ",
        "   ",
        "\t",
        "\n",
        " \t \n ",
        "the",
        "The thing is here",
        "  leading and trailing  ",
        "a  b   c    d",
        "tabs\tinside\ttext",
        "line\r\nbreak",
        "I'm here's 'sam they're we've I'll he'd",
        "''quoted'' ``fancy`` \"dq\"",
        "x=1.5; y = [a, b]  # comment",
        "UPPER lower MiXeD",
        "café naïve résumé",
        "日本語のテキスト",
        "emoji 😀 mixed 👍🏽 text",
        "zero\u{200B}width",
        "ﬁ ligature ①",
        "nbsp\u{a0}space",
        "[MASK] literal",
        "the <mask> token",
        "<s>start</s>",
        "ctrl\x01char\x0bvt\x0cff",
        "\x7f del",
        "trailing space ",
        "end.",
        "'",
        "' ",
        " '",
        "''",
        "a'",
        "123 4567 89a b12",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    t.push("x".repeat(3000));
    t.push(format!("{} {}", "ab".repeat(500), "é".repeat(300)));
    t
}

#[test]
fn both_shapes_get_a_fast_path_with_an_ascii_path() {
    for v in [unigram(), byte_bpe()] {
        let f = load(&v).1.unwrap();
        assert!(f.has_ascii_path(), "{f:?}");
    }
}

/// GPT-2's shape: the byte-level BPE with a `ByteLevel` post-processor (or
/// none), which adds no token around a document.
fn gpt2_bpe(post_processor: Value) -> Value {
    let mut v = byte_bpe();
    v["post_processor"] = post_processor;
    v
}

#[test]
fn matches_tokenizers_on_tricky_text() {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
    for v in [unigram(), byte_bpe(), gpt2_bpe(byte_level), gpt2_bpe(Value::Null)] {
        let (tok, f) = load(&v);
        let f = f.unwrap();
        for text in tricky() {
            // Twice: the second time from the cache.
            assert_eq!(fast(&f, &tok, &text), reference(&tok, &text), "{text:?}");
            assert_eq!(fast(&f, &tok, &text), reference(&tok, &text), "{text:?} (cached)");
        }
    }
}

#[test]
fn other_settings_stay_exact_ascii_path_or_not() {
    let edits: Vec<(Value, Edit, bool)> = vec![
        (unigram(), Box::new(|v| v["pre_tokenizer"]["prepend_scheme"] = "never".into()), true),
        (unigram(), Box::new(|v| v["pre_tokenizer"]["prepend_scheme"] = "first".into()), false),
        (unigram(), Box::new(|v| v["normalizer"] = Value::Null), true),
        (unigram(), Box::new(|v| v["normalizer"]["normalizers"][0] = json!({"type": "Lowercase"})), true),
        (unigram(), Box::new(|v| v["normalizer"]["normalizers"][0] = json!({"type": "StripAccents"})), false),
        (unigram(), Box::new(|v| v["added_tokens"][4]["normalized"] = true.into()), false),
        (
            unigram(),
            Box::new(|v| {
                v["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Punctuation", "behavior": "Isolated"}, v["pre_tokenizer"].clone()]})
            }),
            false,
        ),
        (byte_bpe(), Box::new(|v| v["pre_tokenizer"]["add_prefix_space"] = true.into()), true),
        (byte_bpe(), Box::new(|v| v["normalizer"] = json!({"type": "NFC"})), false),
    ];
    for (mut v, edit, ascii) in edits {
        edit(&mut v);
        let (tok, f) = load(&v);
        let f = f.unwrap();
        assert_eq!(f.has_ascii_path(), ascii, "{}", v["pre_tokenizer"]);
        for text in tricky() {
            assert_eq!(fast(&f, &tok, &text), reference(&tok, &text), "{text:?} with {}", v["normalizer"]);
        }
    }
}

#[test]
fn many_documents_append_like_one_at_a_time_and_the_cache_stays_bounded() {
    let (tok, f) = load(&unigram());
    let f = f.unwrap().with_cache_words(640);
    // More distinct words than the cache holds: its shards are cleared and refilled.
    let words: Vec<String> = (0..20_000).map(|i| format!("t{i}")).collect();
    let docs: Vec<String> = words.chunks(1000).map(|c| c.join(" ")).chain(tricky()).collect();
    let (mut ids, mut starts) = (vec![9], vec![false]);
    f.encode_many_into(docs.iter().map(String::as_str), &tok, &mut ids, &mut starts).unwrap();
    let (mut want_ids, mut want_starts) = (vec![9], vec![false]);
    for d in &docs {
        let (i, s) = reference(&tok, d);
        want_ids.extend(i);
        want_starts.extend(s);
    }
    assert_eq!((ids, starts), (want_ids, want_starts));
    assert!(f.cached_words() <= 640, "{}", f.cached_words());
    assert!(f.cached_words() > 0);
}

#[test]
fn other_configurations_get_no_fast_path() {
    let cases: Vec<(Value, Edit, &str)> = vec![
        (byte_bpe(), Box::new(|v| v["model"]["dropout"] = json!(0.1)), "dropout"),
        (unigram(), Box::new(|v| v["post_processor"] = json!({"type": "Sequence"})), "post_processor"),
        (
            byte_bpe(),
            Box::new(|v| {
                v["post_processor"] = json!({"type": "Sequence", "processors": [{"type": "ByteLevel",
                "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]})
            }),
            "is not TemplateProcessing",
        ),
        (unigram(), Box::new(|v| v["model"]["type"] = "WordLevel".into()), "is not Unigram or BPE"),
    ];
    for (mut v, edit, why) in cases {
        edit(&mut v);
        let e = SubwordFast::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(e.contains(why), "{e}");
    }
}
