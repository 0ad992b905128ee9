//! Reading input files into documents (plain text or JSON lines).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::{DataConfig, DocumentBoundary, InputFormat};

/// Expands `data.files` (paths or glob patterns) into a sorted, deduplicated
/// list of files. A pattern that matches no file, or a missing file, is an error
/// naming it.
pub fn expand_files(patterns: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for pat in patterns {
        if pat.contains(['*', '?', '[']) {
            let paths = glob::glob(pat).with_context(|| format!("data.files: bad glob pattern {pat:?}"))?;
            let before = out.len();
            for p in paths {
                let p = p.with_context(|| format!("data.files: cannot read a match of {pat:?}"))?;
                if p.is_file() {
                    out.push(p);
                }
            }
            if out.len() == before {
                bail!("data.files: pattern {pat:?} matches no file");
            }
        } else {
            let p = PathBuf::from(pat);
            if !p.is_file() {
                bail!("data.files: input file {} does not exist (or is not a file)", p.display());
            }
            out.push(p);
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The format `path` is read with: `cfg.format`, or from the extension.
pub fn resolve_format(path: &Path, format: InputFormat) -> InputFormat {
    match format {
        InputFormat::Auto => match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "json") => InputFormat::Jsonl,
            _ => InputFormat::Text,
        },
        f => f,
    }
}

/// Reads the documents of one file, in file order; whitespace-only documents
/// are skipped. Errors name the file (and line, or byte offset for bad UTF-8).
pub fn read_documents(path: &Path, cfg: &DataConfig) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read input file {}", path.display()))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        anyhow::anyhow!("{}: not valid UTF-8 (first invalid byte at offset {})", path.display(), e.valid_up_to())
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    match resolve_format(path, cfg.format) {
        InputFormat::Jsonl => jsonl_documents(path, text, &cfg.text_field),
        _ => Ok(text_documents(text, cfg.document_boundary)),
    }
}

/// Splits plain text into documents.
pub fn text_documents(text: &str, boundary: DocumentBoundary) -> Vec<String> {
    match boundary {
        DocumentBoundary::File => {
            let t = text.trim();
            if t.is_empty() { vec![] } else { vec![t.to_string()] }
        }
        DocumentBoundary::Line => text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect(),
        DocumentBoundary::BlankLine => {
            let mut docs = Vec::new();
            let mut cur: Vec<&str> = Vec::new();
            for line in text.lines().chain(std::iter::once("")) {
                if line.trim().is_empty() {
                    if !cur.is_empty() {
                        docs.push(cur.join("\n"));
                        cur.clear();
                    }
                } else {
                    cur.push(line);
                }
            }
            docs
        }
    }
}

fn jsonl_documents(path: &Path, text: &str, field: &str) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", at()))?;
        let Some(obj) = v.as_object() else {
            bail!("{}: expected a JSON object, found {}", at(), kind(&v));
        };
        match obj.get(field) {
            None => bail!("{}: no field {field:?} (set data.text_field)", at()),
            Some(serde_json::Value::String(s)) => {
                if !s.trim().is_empty() {
                    docs.push(s.clone());
                }
            }
            Some(other) => bail!("{}: field {field:?} is {}, expected a string", at(), kind(other)),
        }
    }
    Ok(docs)
}

fn kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value::*;
    match v {
        Null => "null",
        Bool(_) => "a boolean",
        Number(_) => "a number",
        String(_) => "a string",
        Array(_) => "an array",
        Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(boundary: DocumentBoundary) -> DataConfig {
        DataConfig { document_boundary: boundary, ..Default::default() }
    }

    fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    #[test]
    fn blank_lines_separate_documents() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.txt", b"one\ntwo\r\n\n  \n\nthree\n   \nfour");
        let docs = read_documents(&p, &cfg(DocumentBoundary::BlankLine)).unwrap();
        assert_eq!(docs, vec!["one\ntwo", "three", "four"]);
        assert_eq!(read_documents(&p, &cfg(DocumentBoundary::Line)).unwrap(), vec!["one", "two", "three", "four"]);
        assert_eq!(read_documents(&p, &cfg(DocumentBoundary::File)).unwrap().len(), 1);
        let empty = write(d.path(), "e.txt", b" \n\n\t\n");
        assert!(read_documents(&empty, &cfg(DocumentBoundary::File)).unwrap().is_empty());
    }

    #[test]
    fn jsonl_takes_the_text_field_and_names_bad_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.jsonl", b"{\"text\": \"hello\", \"id\": 1}\n\n{\"text\": \"  \"}\n{\"text\": \"bye\"}\n");
        assert_eq!(read_documents(&p, &cfg(DocumentBoundary::BlankLine)).unwrap(), vec!["hello", "bye"]);
        for (body, needle) in [
            (&b"{\"text\": \"ok\"}\n{\"text\": oops}\n"[..], "b.jsonl:2: invalid JSON"),
            (b"{\"body\": \"x\"}\n", "b.jsonl:1: no field \"text\""),
            (b"{\"text\": 3}\n", "b.jsonl:1: field \"text\" is a number"),
            (b"[1]\n", "b.jsonl:1: expected a JSON object"),
        ] {
            let p = write(d.path(), "b.jsonl", body);
            let e = format!("{:#}", read_documents(&p, &cfg(DocumentBoundary::BlankLine)).unwrap_err());
            assert!(e.contains(needle), "{e}");
        }
        let forced = DataConfig { format: InputFormat::Jsonl, text_field: "body".into(), ..Default::default() };
        let p = write(d.path(), "c.txt", b"{\"body\": \"x\"}\n");
        assert_eq!(read_documents(&p, &forced).unwrap(), vec!["x"]);
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_offset() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "bad.txt", b"abc\xffdef");
        let e = format!("{:#}", read_documents(&p, &cfg(DocumentBoundary::BlankLine)).unwrap_err());
        assert!(e.contains("bad.txt") && e.contains("offset 3"), "{e}");
    }

    #[test]
    fn expand_files_sorts_dedups_and_names_missing_inputs() {
        let d = tempfile::tempdir().unwrap();
        let b = write(d.path(), "b.txt", b"x");
        let a = write(d.path(), "a.txt", b"x");
        let pat = d.path().join("*.txt").to_string_lossy().into_owned();
        let files = expand_files(&[pat.clone(), b.to_string_lossy().into_owned()]).unwrap();
        assert_eq!(files, vec![a, b]);
        let none = d.path().join("*.md").to_string_lossy().into_owned();
        let e = expand_files(&[none]).unwrap_err().to_string();
        assert!(e.contains("*.md") && e.contains("matches no file"), "{e}");
        let e = expand_files(&[d.path().join("gone.txt").to_string_lossy().into_owned()]).unwrap_err().to_string();
        assert!(e.contains("gone.txt") && e.contains("does not exist"), "{e}");
    }
}
