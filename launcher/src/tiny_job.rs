//! The selfcheck's tiny job, written as text files: a BERT `config.json`
//! (hidden 32, 2 layers, no dropout), a BERT-style WordPiece `tokenizer.json`
//! over a toy vocabulary, a deterministic corpus of toy sentences, and one
//! TOML job per run; and the readers of what the runs write (metrics.jsonl,
//! JSON lines). Text only: no tensors, no model code.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::selfcheck::{BATCH, STEPS, TIMEOUT_S};

/// Tokens per training block (the model's positions: 64).
const BLOCK: usize = 32;
const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
const DETERMINERS: &[&str] = &["the", "a", "every", "some", "this", "that"];
const ADJECTIVES: &[&str] =
    &["red", "green", "blue", "small", "large", "quick", "slow", "old", "new", "bright", "quiet", "happy"];
const NOUNS: &[&str] = &[
    "cat", "dog", "bird", "fish", "tree", "house", "river", "road", "book", "lamp", "child", "farmer", "teacher",
    "horse", "garden", "window",
];
const VERBS: &[&str] =
    &["sees", "likes", "finds", "follows", "paints", "moves", "watches", "carries", "builds", "opens"];
const PREPOSITIONS: &[&str] = &["near", "under", "behind", "beside", "over"];

/// The settings that differ between the selfcheck's runs.
#[derive(Debug, Clone)]
pub struct Knobs {
    pub steps: usize,
    /// Blocks per rank per step.
    pub batch: usize,
    pub overlap: bool,
    pub bf16_comm: bool,
    pub seed: u64,
    pub timeout_s: u64,
}

impl Knobs {
    /// A run compared step by step: [`STEPS`] steps of [`BATCH`] blocks.
    pub fn compared() -> Self {
        Self { steps: STEPS, batch: BATCH, overlap: true, bf16_comm: false, seed: 42, timeout_s: TIMEOUT_S }
    }
}

/// The files of the tiny job in `dir`.
pub struct TinyJob {
    pub dir: PathBuf,
    device: &'static str,
}

impl TinyJob {
    /// Writes the model, tokenizer and a corpus big enough for `ranks` ranks
    /// to stay in the first epoch over the compared steps.
    pub fn write(dir: &Path, ranks: usize, device: &'static str) -> Result<Self> {
        let model = dir.join("model");
        std::fs::create_dir_all(&model).with_context(|| format!("cannot create {}", model.display()))?;
        let vocab: Vec<&str> = SPECIALS
            .iter()
            .chain(DETERMINERS)
            .chain(ADJECTIVES)
            .chain(NOUNS)
            .chain(VERBS)
            .chain(PREPOSITIONS)
            .chain(&["."])
            .copied()
            .collect();
        write(&model.join("tokenizer.json"), &serde_json::to_string_pretty(&tokenizer_json(&vocab))?)?;
        write(&model.join("config.json"), &serde_json::to_string_pretty(&bert_config(vocab.len()))?)?;
        write(&dir.join("corpus.txt"), &corpus((5 * STEPS * BATCH * ranks).max(300)))?;
        Ok(Self { dir: dir.to_path_buf(), device })
    }

    /// Where the run `name` writes its checkpoints and metrics.
    pub fn out(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes `<dir>/<name>.toml`; returns its path.
    pub fn write_job(&self, name: &str, k: &Knobs) -> Result<String> {
        let path = |p: &Path| toml_string(&p.display().to_string());
        let text = format!(
            r#"# mlm-launch --selfcheck: {name}
[model]
config = {config}
tokenizer = {tokenizer}

[data]
files = [{corpus}]
document_boundary = "line"
block_size = {BLOCK}
test_fraction = 0.05
prepared_dir = {data}

[training]
output_dir = {out}
device = "{device}"
precision = "fp32"
tf32 = false
seed = {seed}
max_steps = {steps}
batch_size = {batch}
lr = 5e-3
warmup_steps = 1
log_every = 1
threads = 1

[eval]
at_start = false
batch_size = 8
max_chunks = 8

[checkpoint]
save_best = false

[distributed]
overlap = {overlap}
comm_dtype = "{comm}"
timeout_s = {timeout}

[logging]
progress = "never"
"#,
            config = path(&self.dir.join("model/config.json")),
            tokenizer = path(&self.dir.join("model/tokenizer.json")),
            corpus = path(&self.dir.join("corpus.txt")),
            data = path(&self.dir.join("data")),
            out = path(&self.out(name)),
            device = self.device,
            seed = k.seed,
            steps = k.steps,
            batch = k.batch,
            overlap = k.overlap,
            comm = if k.bf16_comm { "bf16" } else { "fp32" },
            timeout = k.timeout_s,
        );
        let file = self.dir.join(format!("{name}.toml"));
        write(&file, &text)?;
        Ok(file.display().to_string())
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A random-init BERT as Hugging Face's `config.json` describes it.
fn bert_config(vocab_size: usize) -> Value {
    json!({
        "model_type": "bert",
        "architectures": ["BertForMaskedLM"],
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 2 * BLOCK,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "initializer_range": 0.02,
        // Dropout masks are drawn per worker: runs that split a batch
        // differently compare only without dropout.
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0
    })
}

/// A BERT-style `tokenizer.json` (Hugging Face `tokenizers` format):
/// WordPiece over `vocab` (specials first), lower-casing BertNormalizer,
/// BertPreTokenizer, and `[CLS] $A [SEP]` around each document.
fn tokenizer_json(vocab: &[&str]) -> Value {
    let id = |t: &str| vocab.iter().position(|v| *v == t).expect("special token in the vocabulary");
    let added: Vec<Value> = SPECIALS
        .iter()
        .map(|t| {
            json!({"id": id(t), "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let special = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
    let sequence = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let entries: serde_json::Map<String, Value> =
        vocab.iter().enumerate().map(|(i, t)| (t.to_string(), json!(i))).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special("[CLS]"), sequence("A", 0), special("[SEP]")],
            "pair": [special("[CLS]"), sequence("A", 0), special("[SEP]"), sequence("B", 1),
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [id("[CLS]")], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [id("[SEP]")], "tokens": ["[SEP]"]}
            }
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": entries}
    })
}

/// `lines` lines of one or two toy sentences ("the quick cat sees a river
/// near the house."): a fixed function of `lines`, with enough structure
/// that a few steps lower the loss.
fn corpus(lines: usize) -> String {
    let mut state = 0x6d6c_6d2d_6368_6b21u64;
    let mut next = move |n: usize| {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n as u64) as usize
    };
    let mut text = String::new();
    for _ in 0..lines {
        for s in 0..1 + next(2) {
            let mut words = Vec::new();
            for part in 0..2 {
                words.push(DETERMINERS[next(DETERMINERS.len())]);
                if next(2) == 0 {
                    words.push(ADJECTIVES[next(ADJECTIVES.len())]);
                }
                words.push(NOUNS[next(NOUNS.len())]);
                if part == 0 {
                    words.push(VERBS[next(VERBS.len())]);
                }
            }
            if next(3) == 0 {
                words.extend([PREPOSITIONS[next(PREPOSITIONS.len())], "the", NOUNS[next(NOUNS.len())]]);
            }
            if s > 0 {
                text.push(' ');
            }
            text.push_str(&words.join(" "));
            text.push('.');
        }
        text.push('\n');
    }
    text
}

/// The JSON objects among the lines of `text`, each after an optional
/// `[label] ` prefix (the supervision's log).
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| {
            let l = if l.starts_with('[') { l.split_once("] ").map_or(l, |(_, rest)| rest) } else { l };
            l.starts_with('{').then(|| serde_json::from_str(l).ok()).flatten()
        })
        .collect()
}

/// What a training step logged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Logged {
    pub loss: f64,
    /// The global gradient norm before clipping (NaN when not logged).
    pub grad_norm: f64,
}

/// The training steps of a run's `metrics.jsonl` (`kind: "train"`) by step.
pub fn logged(out: &Path) -> BTreeMap<u64, Logged> {
    json_lines(&std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default())
        .iter()
        .filter(|v| v["kind"] == "train")
        .filter_map(|v| {
            let grad_norm = v["grad_norm"].as_f64().unwrap_or(f64::NAN);
            Some((v["step"].as_u64()?, Logged { loss: v["loss"].as_f64()?, grad_norm }))
        })
        .collect()
}

/// The last step the run writing `out` has logged (0: none yet).
pub fn last_step(out: &Path) -> u64 {
    logged(out).keys().max().copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_corpus_is_deterministic_and_uses_only_the_vocabulary() {
        let text = corpus(50);
        assert_eq!(text, corpus(50));
        assert_eq!(text.lines().count(), 50);
        let known: Vec<&str> =
            DETERMINERS.iter().chain(ADJECTIVES).chain(NOUNS).chain(VERBS).chain(PREPOSITIONS).copied().collect();
        for word in text.split(|c: char| c.is_whitespace() || c == '.').filter(|w| !w.is_empty()) {
            assert!(known.contains(&word), "{word:?}");
        }
    }

    #[test]
    fn paths_are_quoted_for_toml() {
        assert_eq!(toml_string(r#"/tmp/a "b"\c"#), r#""/tmp/a \"b\"\\c""#);
    }

    #[test]
    fn json_lines_skip_prefixes_and_other_lines() {
        let v = json_lines("[rank 0] {\"ok\": true}\n[rank 1] INFO hello\n{\"kind\": \"train\"}\nnot json {\n");
        assert_eq!(v.len(), 2);
        assert_eq!(v[0]["ok"], true);
    }
}
