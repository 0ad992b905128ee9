//! The Unigram (DeBERTa-v3-like) and byte-level BPE (RoBERTa-like) fast paths
//! give exactly `tokenizers`' ids and word starts, document by document, as
//! `mlm prepare` asks for them (`encode(text, add_special_tokens = true)`), on
//! every line of the demo corpus, of the licences in /usr/share/common-licenses,
//! of a few man pages and of a messy corpus written here; the tokenizer files
//! are trained by `benches/train_tokenizers.py`.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use mlm::data::tokenizer::FastPath;
use mlm::data::TextTokenizer;

use crate::common;

/// The trained files: trained once per version of the script into the test
/// target's temp dir and kept there for later runs. A lock file keeps test
/// processes that share the target folder apart, and a marker written last
/// tells a finished training from an interrupted one.
fn trained(name: &str) -> PathBuf {
    static TRAINING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/train_tokenizers.py");
    let digest = <sha2::Sha256 as sha2::Digest>::digest(std::fs::read(&script).unwrap());
    let key: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("trained-tokenizers-{key}"));
    let lock = std::fs::File::create(dir.with_extension("lock")).unwrap();
    // SAFETY: flock on a descriptor this function owns; released when it closes.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) }, 0);
    let done = dir.join("trained");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let out = common::run(Command::new(common::python()).arg(script).arg(&dir));
        assert!(out.status.success(), "benches/train_tokenizers.py failed");
        std::fs::write(&done, "").unwrap();
    }
    dir.join(name).join("tokenizer.json")
}

/// Lines of every `*.rst.txt` of the demo corpus (the tutorial and FAQ), the
/// licences and some man pages, and the messy lines; and the demo corpus's
/// blank-line documents (several lines each).
fn corpora() -> Vec<(&'static str, Vec<String>)> {
    let docs = Path::new("/usr/share/doc/python3.11/html/_sources");
    let mut demo = Vec::new();
    for sub in ["tutorial", "faq"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(docs.join(sub)).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            demo.push(std::fs::read_to_string(f).unwrap());
        }
    }
    let demo_lines: Vec<String> = demo.iter().flat_map(|t| t.lines().map(String::from)).collect();
    let paragraphs: Vec<String> = demo.iter().flat_map(|t| t.split("\n\n").map(String::from)).collect();
    let mut licences = Vec::new();
    let mut files: Vec<PathBuf> =
        std::fs::read_dir("/usr/share/common-licenses").unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files.iter().filter(|f| f.is_file()) {
        if let Ok(t) = std::fs::read_to_string(f) {
            licences.extend(t.lines().map(String::from));
        }
    }
    let mut man = Vec::new();
    for page in ["bash.1.gz", "ls.1.gz", "tar.1.gz", "grep.1.gz", "find.1.gz", "ssh.1.gz", "git.1.gz"] {
        let out = Command::new("zcat").arg(Path::new("/usr/share/man/man1").join(page)).output();
        if let Ok(out) = out {
            man.extend(String::from_utf8_lossy(&out.stdout).lines().map(String::from));
        }
    }
    vec![
        ("demo corpus lines", demo_lines),
        ("demo corpus blank-line documents", paragraphs),
        ("licences", licences),
        ("man pages", man),
        ("messy", messy()),
    ]
}

fn messy() -> Vec<String> {
    let mut lines: Vec<String> = [
        "",
        " ",
        "\t",
        "   \t  ",
        "\r",
        "plain ascii text",
        "  two  spaces   three    four  ",
        "tab\tseparated\tvalues\t",
        "Café, naïve, résumé, Ångström, Zoë, façade",
        "ÀÉÎÕÜ àéîõü ß ẞ ĳ ǅ",
        "日本語の文章です。中文句子。한국어 문장.",
        "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧 end",
        "math ∑∫√∞ ≤ ≥ ≠ ½ ² ①",
        "ﬁnance ﬂow ＦＵＬＬＷＩＤＴＨ ｶﾀｶﾅ",
        "zero\u{200B}width\u{200D}joiner\u{FEFF}bom",
        "nbsp\u{A0}and\u{2003}em space",
        "[MASK] at the start",
        "in the [MASK] middle",
        "end [MASK]",
        "[CLS] [SEP] [PAD] [UNK]",
        "<mask> and <s> </s>",
        "a<mask>b  <mask>",
        "<pad><unk>",
        "[mask] lower case",
        "``quoted'' text",
        "it's they're we've I'll he'd 'sup",
        "ctrl\u{1}chars\u{7}here\u{b}vt\u{c}ff\u{7f}",
        "right-to-left עברית العربية",
        "combining e\u{301} a\u{308}",
        "x = [1, 2.5e-3, 0xFF]; // comment",
        "https://example.com/path?q=1&r=2#frag",
        "$HOME/.cache/~user",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    lines.push("a".repeat(5000));
    lines.push(format!("supercalifragilistic{}", "expialidocious".repeat(100)));
    lines.push("日本".repeat(1000));
    lines.push("word ".repeat(3000));
    lines
}

fn load(path: &Path) -> (TextTokenizer, TextTokenizer) {
    let fast = TextTokenizer::load(path).unwrap();
    let slow = TextTokenizer::load(path).unwrap().without_fast_path();
    (fast, slow)
}

fn assert_exact_on_every_line(name: &str) {
    assert_exact_on_every_line_of(name, &trained(name));
}

fn assert_exact_on_every_line_of(name: &str, path: &Path) {
    let (fast, slow) = load(path);
    assert!(matches!(fast.fast_path(), Some(FastPath::Subword(f)) if f.has_ascii_path()), "{:?}", fast);
    for (corpus, lines) in corpora() {
        let (mut tokens, mut differ) = (0, Vec::new());
        for line in &lines {
            let got = fast.encode_document_words(line).unwrap();
            let want = slow.encode_document_words(line).unwrap();
            tokens += want.0.len();
            if got != want {
                differ.push(line.clone());
            }
        }
        // And as prepare calls it: a batch of documents into one buffer.
        let (mut ids, mut starts) = (Vec::new(), Vec::new());
        fast.encode_documents_into(lines.iter().map(String::as_str), &mut ids, &mut starts).unwrap();
        assert_eq!(ids.len(), tokens, "{name}, {corpus}: batch");
        eprintln!("{name}: {corpus}: {} documents, {tokens} tokens, {} differ", lines.len(), differ.len());
        assert!(
            differ.is_empty(),
            "{name}, {corpus}: {} of {} differ, first {:?}",
            differ.len(),
            lines.len(),
            &differ[..differ.len().min(5)]
        );
    }
}

#[test]
fn unigram_metaspace_fast_path_matches_tokenizers_on_every_line() {
    assert_exact_on_every_line("deberta-v3-like");
}

#[test]
fn byte_level_bpe_fast_path_matches_tokenizers_on_every_line() {
    assert_exact_on_every_line("roberta-like");
}

/// GPT-2's shape: byte-level BPE with nothing added around a document (the
/// causal LM's blocks are the documents' tokens back to back).
#[test]
fn gpt2_byte_level_bpe_fast_path_matches_tokenizers_on_every_line() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tiny/tokenizer.json");
    assert_exact_on_every_line_of("gpt2-tiny", &path);
    let tok = TextTokenizer::load(&path).unwrap();
    let ids = tok.encode_document("Hello world").unwrap();
    assert!(ids.iter().all(|&i| !tok.is_special(i)), "no special token is added: {ids:?}");
    assert_eq!(tok.mask_id, None);
}

#[test]
fn an_unsupported_shape_falls_back_to_tokenizers() {
    let src: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trained("roberta-like")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let edited = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = src.clone();
        edit(&mut v);
        let p = dir.path().join("edited.json");
        std::fs::write(&p, v.to_string()).unwrap();
        TextTokenizer::load(&p).unwrap()
    };
    // A post-processor the fast path does not read (a sequence of them).
    let t = edited(&|v| {
        v["post_processor"] = serde_json::json!({"type": "Sequence", "processors": [{"type": "ByteLevel",
        "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]})
    });
    assert!(t.fast_path().is_none());
    for line in messy() {
        assert_eq!(t.encode_document(&line).unwrap(), t.inner.encode(line.as_str(), true).unwrap().get_ids());
    }
    // A normalizer with no ASCII path keeps the fast path, through `tokenizers`' normalizer.
    let t = edited(&|v| v["normalizer"] = serde_json::json!({"type": "NFKC"}));
    assert!(matches!(t.fast_path(), Some(FastPath::Subword(f)) if !f.has_ascii_path()));
    let slow = t.clone().without_fast_path();
    for line in messy() {
        assert_eq!(t.encode_document_words(&line).unwrap(), slow.encode_document_words(&line).unwrap(), "{line:?}");
    }
}
