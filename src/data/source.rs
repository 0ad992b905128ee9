//! Reading input files into documents (plain text, JSON lines or Parquet),
//! text and JSON lines optionally compressed (`.gz`, `.zst`, `.bz2`).
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use arrow_array::{Array, LargeStringArray, StringArray, StringViewArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::config::{DataConfig, DocumentBoundary, InputFormat, InvalidUtf8};

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

/// How an input file is compressed, from its last extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    /// `.gz` (several concatenated members are read as one stream, as `zcat`).
    Gzip,
    /// `.zst` / `.zstd`.
    Zstd,
    /// `.bz2`.
    Bzip2,
}

impl Compression {
    pub fn of(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("gz") => Self::Gzip,
            Some("zst" | "zstd") => Self::Zstd,
            Some("bz2") => Self::Bzip2,
            _ => Self::None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::None => "plain",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
            Self::Bzip2 => "bzip2",
        }
    }
}

/// The format `path` is read with: `cfg.format`, or from the extension under
/// any compression extension (`wiki.jsonl.gz` is JSON lines).
pub fn resolve_format(path: &Path, format: InputFormat) -> InputFormat {
    let inner = match Compression::of(path) {
        Compression::None => path.to_path_buf(),
        _ => path.with_extension(""),
    };
    match format {
        InputFormat::Auto => match inner.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "json") => InputFormat::Jsonl,
            Some("parquet") => InputFormat::Parquet,
            _ => InputFormat::Text,
        },
        f => f,
    }
}

/// The documents of one file, in order, held in one text buffer: a corpus of
/// short documents (one per line) costs one allocation rather than one per
/// document, and plain text is not copied at all.
#[derive(Clone, Default)]
pub struct Documents {
    text: String,
    /// Byte range of each document in `text`.
    spans: Vec<(usize, usize)>,
}

impl Documents {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Document `i`.
    pub fn get(&self, i: usize) -> &str {
        let (a, b) = self.spans[i];
        &self.text[a..b]
    }

    /// The documents with indices in `range`, in order.
    pub fn range(&self, range: Range<usize>) -> impl ExactSizeIterator<Item = &str> + Clone + '_ {
        self.spans[range].iter().map(|&(a, b)| &self.text[a..b])
    }

    /// All documents, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + Clone + '_ {
        self.range(0..self.len())
    }

    /// Bytes of the documents with indices in `range`.
    pub fn bytes_in(&self, range: Range<usize>) -> usize {
        self.spans[range].iter().map(|(a, b)| b - a).sum()
    }

    fn push(&mut self, doc: &str) {
        self.push_lines(&[doc]);
    }

    /// Appends a document made of `lines` joined by newlines.
    fn push_lines(&mut self, lines: &[&str]) {
        let start = self.text.len();
        for (i, line) in lines.iter().enumerate() {
            if i > 0 {
                self.text.push('\n');
            }
            self.text.push_str(line);
        }
        self.spans.push((start, self.text.len()));
    }
}

impl std::fmt::Debug for Documents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl PartialEq for Documents {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl PartialEq<Vec<&str>> for Documents {
    fn eq(&self, other: &Vec<&str>) -> bool {
        self.iter().eq(other.iter().copied())
    }
}

/// Reads the documents of one file, in file order; whitespace-only documents
/// are skipped. Errors name the file (and line, or byte offset for bad UTF-8).
pub fn read_documents(path: &Path, cfg: &DataConfig) -> Result<Documents> {
    let format = resolve_format(path, cfg.format);
    let compression = Compression::of(path);
    if format == InputFormat::Parquet {
        if compression != Compression::None {
            bail!(
                "{}: a {}-compressed Parquet file; Parquet compresses its own columns: decompress the file",
                path.display(),
                compression.name()
            );
        }
        return parquet_documents(path, &cfg.text_field);
    }
    let bytes = read_bytes(path, compression)?;
    let text = decode(path, bytes, cfg.invalid_utf8, compression)?;
    match format {
        InputFormat::Jsonl => jsonl_documents(path, text.strip_prefix('\u{feff}').unwrap_or(&text), &cfg.text_field),
        _ => Ok(text_documents(text, cfg.document_boundary)),
    }
}

/// The bytes of `path`, decompressed.
fn read_bytes(path: &Path, compression: Compression) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read input file {}", path.display()))?;
    let mut out = Vec::new();
    let read = match compression {
        Compression::None => {
            return std::fs::read(path).with_context(|| format!("cannot read input file {}", path.display()))
        }
        Compression::Gzip => flate2::read::MultiGzDecoder::new(file).read_to_end(&mut out),
        Compression::Zstd => zstd::stream::read::Decoder::new(file).and_then(|mut d| d.read_to_end(&mut out)),
        Compression::Bzip2 => bzip2::read::MultiBzDecoder::new(file).read_to_end(&mut out),
    };
    read.map_err(|e| {
        anyhow::anyhow!("{}: cannot decompress it as {} (from its extension): {e}", path.display(), compression.name())
    })?;
    Ok(out)
}

/// The text of `bytes`, with `policy` for invalid UTF-8: an error naming the
/// file and offset, or the text with each invalid sequence replaced (U+FFFD) or
/// each line holding one left out; the number replaced or left out is logged.
fn decode(path: &Path, bytes: Vec<u8>, policy: InvalidUtf8, compression: Compression) -> Result<String> {
    let e = match String::from_utf8(bytes) {
        Ok(text) => return Ok(text),
        Err(e) => e,
    };
    let at = e.utf8_error().valid_up_to();
    let bytes = e.into_bytes();
    let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
    let place = match compression {
        Compression::None => format!("byte offset {at}, line {line}"),
        c => format!("byte offset {at} of the {} text, line {line}", c.name()),
    };
    match policy {
        InvalidUtf8::Error => bail!(
            "{}: not valid UTF-8 (first invalid byte at {place}); convert it (e.g. iconv -f latin1 -t utf-8), or \
             set data.invalid_utf8 = \"replace\" or \"skip\"",
            path.display()
        ),
        InvalidUtf8::Replace => {
            let n = bytes.utf8_chunks().filter(|c| !c.invalid().is_empty()).count();
            tracing::warn!(
                "{}: {n} invalid UTF-8 sequence(s) replaced with U+FFFD (data.invalid_utf8 = \"replace\"; first at \
                 {place})",
                path.display()
            );
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
        InvalidUtf8::Skip => {
            let mut text = String::with_capacity(bytes.len());
            let mut skipped = 0usize;
            for l in bytes.split_inclusive(|&b| b == b'\n') {
                match std::str::from_utf8(l) {
                    Ok(l) => text.push_str(l),
                    Err(_) => {
                        skipped += 1;
                        // Keep the line break, so blank-line boundaries stay.
                        if l.ends_with(b"\n") {
                            text.push('\n');
                        }
                    }
                }
            }
            tracing::warn!(
                "{}: {skipped} line(s) with invalid UTF-8 left out (data.invalid_utf8 = \"skip\"; first at {place})",
                path.display()
            );
            Ok(text)
        }
    }
}

/// Splits plain text into documents; a leading byte-order mark is dropped.
/// Lines end at LF or CRLF, as `str::lines`.
pub fn text_documents(text: String, boundary: DocumentBoundary) -> Documents {
    let bom = if text.starts_with('\u{feff}') { '\u{feff}'.len_utf8() } else { 0 };
    let body = &text[bom..];
    let mut spans = Vec::new();
    match boundary {
        DocumentBoundary::File => {
            let lead = body.len() - body.trim_start().len();
            let len = body.trim().len();
            if len > 0 {
                spans.push((bom + lead, bom + lead + len));
            }
        }
        DocumentBoundary::Line => {
            for (at, line) in lines_at(body) {
                if !line.trim().is_empty() {
                    spans.push((bom + at, bom + at + line.len()));
                }
            }
        }
        DocumentBoundary::BlankLine => {
            // Joined with "\n" whatever the line ends were, so copied.
            let mut docs = Documents::default();
            let mut cur: Vec<&str> = Vec::new();
            for (_, line) in lines_at(body).chain(std::iter::once((body.len(), ""))) {
                if line.trim().is_empty() {
                    if !cur.is_empty() {
                        docs.push_lines(&cur);
                        cur.clear();
                    }
                } else {
                    cur.push(line);
                }
            }
            return docs;
        }
    }
    Documents { text, spans }
}

/// `str::lines` with each line's byte offset in `text`.
fn lines_at(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut at = 0;
    text.split_inclusive('\n').map(move |seg| {
        let start = at;
        at += seg.len();
        let line = match seg.strip_suffix('\n') {
            Some(l) => l.strip_suffix('\r').unwrap_or(l),
            None => seg,
        };
        (start, line)
    })
}

fn jsonl_documents(path: &Path, text: &str, field: &str) -> Result<Documents> {
    let mut docs = Documents::default();
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
                    docs.push(s);
                }
            }
            Some(other) => bail!("{}: field {field:?} is {}, expected a string", at(), kind(other)),
        }
    }
    Ok(docs)
}

/// The string column `column` of a Parquet file, one document per row (as
/// Hugging Face `datasets` reads it), in file order; null and whitespace-only
/// rows are skipped. Only that column is read, batch by batch.
fn parquet_documents(path: &Path, column: &str) -> Result<Documents> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read input file {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| anyhow::anyhow!("{}: not a readable Parquet file ({e})", path.display()))?;
    let fields = builder.schema().fields();
    let Some(idx) = fields.iter().position(|f| f.name() == column) else {
        let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
        bail!("{}: no column {column:?} (columns: {}); set data.text_field", path.display(), names.join(", "));
    };
    let dtype = fields[idx].data_type();
    if !for_each_str(arrow_array::new_empty_array(dtype).as_ref(), |_| ()) {
        bail!("{}: column {column:?} is {dtype}, expected a string column; set data.text_field", path.display());
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), [idx]);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| anyhow::anyhow!("{}: cannot read column {column:?}: {e}", path.display()))?;
    let mut docs = Documents::default();
    for batch in reader {
        let batch = batch.map_err(|e| anyhow::anyhow!("{}: cannot read column {column:?}: {e}", path.display()))?;
        for_each_str(batch.column(0).as_ref(), |s| {
            if !s.trim().is_empty() {
                docs.push(s);
            }
        });
    }
    Ok(docs)
}

/// Calls `f` on every non-null value of a string array (UTF-8, large UTF-8 or
/// UTF-8 view); false when `col` is not one.
fn for_each_str(col: &dyn Array, mut f: impl FnMut(&str)) -> bool {
    let any = col.as_any();
    if let Some(a) = any.downcast_ref::<StringArray>() {
        a.iter().flatten().for_each(&mut f);
    } else if let Some(a) = any.downcast_ref::<LargeStringArray>() {
        a.iter().flatten().for_each(&mut f);
    } else if let Some(a) = any.downcast_ref::<StringViewArray>() {
        a.iter().flatten().for_each(&mut f);
    } else {
        return false;
    }
    true
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
    use crate::data::testutil;

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
    fn line_documents_are_cut_as_str_lines_cuts_them() {
        let text = "\u{feff}one\r\ntwo\rstill two\n\n  \t\nthree \r\nlast\r";
        let body = text.strip_prefix('\u{feff}').unwrap();
        let docs = text_documents(text.to_string(), DocumentBoundary::Line);
        assert_eq!(docs, body.lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>());
        assert_eq!(docs, vec!["one", "two\rstill two", "three ", "last\r"]);
        assert_eq!((docs.get(1), docs.bytes_in(0..2)), ("two\rstill two", 16));
        assert_eq!(docs.range(2..4).collect::<Vec<_>>(), ["three ", "last\r"]);
        assert_eq!(text_documents(text.to_string(), DocumentBoundary::File), vec![body.trim()]);
        let blank = text_documents(text.to_string(), DocumentBoundary::BlankLine);
        assert_eq!(blank, vec!["one\ntwo\rstill two", "three \nlast\r"]);
    }

    #[test]
    fn jsonl_takes_the_text_field_and_names_bad_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.jsonl",
            b"{\"text\": \"hello\", \"id\": 1}\n\n{\"text\": \"  \"}\n{\"text\": \"bye\"}\n",
        );
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
    fn parquet_rows_are_documents_of_the_text_column_in_order() {
        use arrow_array::{Int64Array, LargeStringArray};
        use std::sync::Arc;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("wiki.parquet");
        let text = [Some("first doc"), None, Some("  "), Some("second\ndoc"), Some("third"), Some("fourth")];
        let ids: Vec<String> = (0..6).map(|i| i.to_string()).collect();
        let ids: Vec<Option<&str>> = ids.iter().map(|s| Some(s.as_str())).collect();
        testutil::write_parquet(
            &p,
            vec![
                ("id", testutil::strings(&ids)),
                ("url", testutil::strings(&[Some("u"); 6])),
                ("title", testutil::strings(&[Some("t"); 6])),
                ("text", testutil::strings(&text)),
            ],
            // Several row groups, so several record batches, in order.
            2,
        );
        let c = cfg(DocumentBoundary::BlankLine);
        assert_eq!(resolve_format(&p, c.format), InputFormat::Parquet);
        assert_eq!(read_documents(&p, &c).unwrap(), vec!["first doc", "second\ndoc", "third", "fourth"]);
        let by_title = DataConfig { text_field: "title".into(), ..c.clone() };
        assert_eq!(read_documents(&p, &by_title).unwrap().len(), 6);

        // A large-string column, in a file without the .parquet extension.
        let q = d.path().join("data.bin");
        testutil::write_parquet(&q, vec![("text", Arc::new(LargeStringArray::from(vec!["a", "b"])) as _)], 1024);
        let forced = DataConfig { format: InputFormat::Parquet, ..c.clone() };
        assert_eq!(read_documents(&q, &forced).unwrap(), vec!["a", "b"]);

        let e =
            format!("{:#}", read_documents(&p, &DataConfig { text_field: "body".into(), ..c.clone() }).unwrap_err());
        assert!(e.contains("wiki.parquet: no column \"body\" (columns: id, url, title, text)"), "{e}");
        let n = d.path().join("num.parquet");
        testutil::write_parquet(&n, vec![("text", Arc::new(Int64Array::from(vec![1, 2])) as _)], 1024);
        let e = format!("{:#}", read_documents(&n, &c).unwrap_err());
        assert!(e.contains("num.parquet: column \"text\" is Int64, expected a string column"), "{e}");
        let bad = write(d.path(), "fake.parquet", b"id,text\n1,hello\n");
        let e = format!("{:#}", read_documents(&bad, &c).unwrap_err());
        assert!(e.contains("fake.parquet: not a readable Parquet file"), "{e}");
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_offset() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "bad.txt", b"abc\xffdef");
        let e = format!("{:#}", read_documents(&p, &cfg(DocumentBoundary::BlankLine)).unwrap_err());
        assert!(e.contains("bad.txt") && e.contains("offset 3") && e.contains("data.invalid_utf8"), "{e}");
    }

    #[test]
    fn invalid_utf8_is_replaced_or_its_lines_skipped_when_asked() {
        let d = tempfile::tempdir().unwrap();
        // Latin-1 "café" in the second line, a lone continuation byte in the fourth.
        let p = write(d.path(), "latin1.txt", b"one\ncaf\xe9 au lait\n\nthree\nx\x80y\nfour\n");
        let with = |policy| DataConfig { invalid_utf8: policy, ..cfg(DocumentBoundary::Line) };
        assert!(read_documents(&p, &with(InvalidUtf8::Error)).is_err());
        let replaced = read_documents(&p, &with(InvalidUtf8::Replace)).unwrap();
        assert_eq!(replaced, vec!["one", "caf\u{fffd} au lait", "three", "x\u{fffd}y", "four"]);
        let skipped = read_documents(&p, &with(InvalidUtf8::Skip)).unwrap();
        assert_eq!(skipped, vec!["one", "three", "four"]);
        // Skipping a line keeps its line break: blank-line documents stay apart.
        let p = write(d.path(), "paras.txt", b"a\n\xff\n\nb\n");
        let skip = DataConfig { invalid_utf8: InvalidUtf8::Skip, ..cfg(DocumentBoundary::BlankLine) };
        assert_eq!(read_documents(&p, &skip).unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn compressed_inputs_read_as_their_plain_text() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let text = b"first doc\n\nsecond doc\n";
        let jsonl = b"{\"text\": \"a json doc\"}\n{\"text\": \"another\"}\n";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text).unwrap();
        let gz = gz.finish().unwrap();
        // Two gzip members, as `cat a.gz b.gz` makes: both are read.
        let p = write(d.path(), "a.txt.gz", &[gz.clone(), gz].concat());
        let docs = read_documents(&p, &cfg(DocumentBoundary::Line)).unwrap();
        assert_eq!(docs, vec!["first doc", "second doc", "first doc", "second doc"]);
        let p = write(d.path(), "b.jsonl.zst", &zstd::encode_all(&jsonl[..], 3).unwrap());
        assert_eq!(resolve_format(&p, InputFormat::Auto), InputFormat::Jsonl);
        assert_eq!(read_documents(&p, &cfg(DocumentBoundary::BlankLine)).unwrap(), vec!["a json doc", "another"]);
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        bz.write_all(text).unwrap();
        let p = write(d.path(), "c.txt.bz2", &bz.finish().unwrap());
        assert_eq!(read_documents(&p, &cfg(DocumentBoundary::BlankLine)).unwrap(), vec!["first doc", "second doc"]);
        // A file that is not what its extension says: named, with the codec.
        let p = write(d.path(), "fake.txt.gz", b"plain text");
        let e = format!("{:#}", read_documents(&p, &cfg(DocumentBoundary::BlankLine)).unwrap_err());
        assert!(e.contains("fake.txt.gz") && e.contains("gzip"), "{e}");
        let p = write(d.path(), "t.parquet.gz", b"x");
        let e = format!("{:#}", read_documents(&p, &cfg(DocumentBoundary::BlankLine)).unwrap_err());
        assert!(e.contains("decompress the file"), "{e}");
        // Invalid UTF-8 inside a compressed file: the offset is in the text.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"ok\nbad \xff\n").unwrap();
        let p = write(d.path(), "bad.txt.gz", &gz.finish().unwrap());
        let e = format!("{:#}", read_documents(&p, &cfg(DocumentBoundary::BlankLine)).unwrap_err());
        assert!(e.contains("byte offset 7 of the gzip text, line 2"), "{e}");
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
