//! `[data]`: the inputs, how they are read and split, and the masking.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where text documents end inside a plain-text file.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DocumentBoundary {
    /// One or more blank lines end a document (paragraphs).
    #[default]
    BlankLine,
    /// Every non-empty line is a document (as `datasets`' "text" loader).
    Line,
    /// A whole file is one document.
    File,
}

/// Input file format.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    /// From the extension: `.jsonl`/`.json` -> jsonl, `.parquet` -> parquet,
    /// `.arrow` -> arrow, anything else -> text.
    #[default]
    Auto,
    Text,
    Jsonl,
    /// Apache Parquet; the text is in the string column `text_field`.
    Parquet,
    /// Arrow IPC, as Hugging Face `datasets` writes it (`save_to_disk`
    /// folders, its cache): the stream format, or the file format; the text
    /// is in the string column `text_field`.
    Arrow,
}

/// What to do with bytes that are not UTF-8 in text and JSON-lines inputs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InvalidUtf8 {
    /// Stop with an error naming the file and the byte offset.
    #[default]
    Error,
    /// Replace each invalid sequence with U+FFFD (as Python's
    /// `errors="replace"`), counting them.
    Replace,
    /// Leave out every line that holds invalid bytes, counting them.
    Skip,
}

/// `data.test_size` unless set: 10,000 blocks (1.28M tokens at block 128) give
/// a perplexity precise to well under 1% in minutes on a CPU, seconds on a GPU,
/// whatever the corpus size.
pub const DEFAULT_TEST_SIZE: usize = 10_000;

/// `data.test_fraction` unless set (and `data.eval_files` is not).
pub const DEFAULT_TEST_FRACTION: f64 = 0.05;

/// `[data]`: inputs, preparation and masking.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Input files or glob patterns, relative to the config file's folder.
    pub files: Vec<String>,
    /// Files (or glob patterns) to evaluate on: when set, the held-out blocks
    /// are these files' (read and cut like `files`) and `test_fraction` holds
    /// nothing out of `files`. (Not written when empty: the hash of a job's
    /// settings stays what it was before the key existed.)
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub eval_files: Vec<String>,
    pub format: InputFormat,
    /// Field (JSON lines) or column (Parquet) holding the text.
    pub text_field: String,
    pub document_boundary: DocumentBoundary,
    /// Bytes that are not UTF-8: error, replace or skip (their lines).
    pub invalid_utf8: InvalidUtf8,
    /// Tokens per training example (chunk).
    pub block_size: usize,
    /// Fraction of chunks held out for evaluation; unset: 0.05, or none with
    /// `eval_files` ([`DataConfig::held_out_fraction`]). (Written as 0.05 when
    /// unset, so the hash of a job's settings is what it was when the key was
    /// a plain number.)
    #[serde(serialize_with = "fraction_or_default")]
    pub test_fraction: Option<f64>,
    /// At most this many chunks held out (0: `test_fraction` alone): a sample
    /// of the `test_fraction` ones, the others train.
    pub test_size: usize,
    /// Seed of the train/test split.
    pub split_seed: u64,
    /// Where the prepared token store is written; default `<output_dir>/data`.
    pub prepared_dir: Option<PathBuf>,
    /// Probability that a (non-special) token is chosen for prediction.
    pub mlm_probability: f64,
    /// Of the chosen tokens: fraction replaced by the mask token.
    pub mask_replace_prob: f64,
    /// Of the chosen tokens: fraction replaced by a random token.
    pub random_replace_prob: f64,
    /// Choose whole words (all tokens of a word together) instead of tokens.
    pub whole_word_mask: bool,
    /// A token appended to every document before the documents are joined
    /// and cut into blocks (e.g. `"<|endoftext|>"` for a causal LM); none by
    /// default, as `run_clm` joins GPT-2's tokens with nothing between them.
    /// (Not written when unset: the hash of a job's settings stays what it was.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub separator: Option<String>,
    /// Threads that mask batches ahead of the model.
    pub masker_threads: usize,
    /// Batches kept ready ahead of the model.
    pub prefetch_batches: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            files: Vec::new(),
            eval_files: Vec::new(),
            format: InputFormat::Auto,
            text_field: "text".into(),
            document_boundary: DocumentBoundary::BlankLine,
            invalid_utf8: InvalidUtf8::Error,
            block_size: 128,
            test_fraction: None,
            test_size: DEFAULT_TEST_SIZE,
            split_seed: 42,
            prepared_dir: None,
            mlm_probability: 0.15,
            mask_replace_prob: 0.8,
            random_replace_prob: 0.1,
            whole_word_mask: false,
            separator: None,
            masker_threads: 2,
            prefetch_batches: 4,
        }
    }
}

impl DataConfig {
    /// The fraction of `files`' blocks held out: none when `eval_files` are
    /// the held-out set, else `test_fraction` (0.05 unless set).
    pub fn held_out_fraction(&self) -> f64 {
        if self.eval_files.is_empty() {
            self.test_fraction.unwrap_or(DEFAULT_TEST_FRACTION)
        } else {
            0.0
        }
    }
}

fn fraction_or_default<S: serde::Serializer>(f: &Option<f64>, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(f.unwrap_or(DEFAULT_TEST_FRACTION))
}
