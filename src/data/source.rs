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
    let mut all = Documents::default();
    for_each_window(path, cfg, usize::MAX, |docs| {
        all = docs;
        Ok(())
    })?;
    Ok(all)
}

/// Reads the documents of one file in order, a window of about `window` bytes
/// at a time, and calls `f` with each window's documents: the same documents as
/// [`read_documents`], in the same order, without holding the whole file. A
/// window of text or JSON lines ends at a document boundary (a blank line, or a
/// line end; a document longer than `window` makes its window longer); with
/// `document_boundary = "file"` the file is one window. Compressed files are
/// decompressed as they are read; Parquet is read a record batch at a time.
pub fn for_each_window(
    path: &Path,
    cfg: &DataConfig,
    window: usize,
    mut f: impl FnMut(Documents) -> Result<()>,
) -> Result<()> {
    let window = window.max(1);
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
        return parquet_documents(path, &cfg.text_field, window, f);
    }
    let file = std::fs::File::open(path).with_context(|| format!("cannot read input file {}", path.display()))?;
    let mut reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(file).map_err(|e| decompress_error(path, compression, e))?)
        }
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(file)),
    };
    let window = if format == InputFormat::Text && cfg.document_boundary == DocumentBoundary::File {
        usize::MAX
    } else {
        window
    };
    let cut_at = if format == InputFormat::Text && cfg.document_boundary == DocumentBoundary::BlankLine {
        after_last_blank_line
    } else {
        after_last_line
    };
    let (mut buf, mut target, mut at, mut bad) = (Vec::new(), window, Place { offset: 0, line: 1 }, None);
    loop {
        let eof = fill(&mut reader, &mut buf, target).map_err(|e| match compression {
            Compression::None => anyhow::Error::new(e).context(format!("cannot read input file {}", path.display())),
            c => decompress_error(path, c, e),
        })?;
        let Some(cut) = (if eof { Some(buf.len()) } else { cut_at(&buf) }) else {
            // No boundary yet: one document longer than the window.
            target = buf.len().saturating_add(window);
            continue;
        };
        let rest = buf.split_off(cut);
        let piece = std::mem::replace(&mut buf, rest);
        let here = at;
        at.offset += piece.len();
        at.line += piece.iter().filter(|&&b| b == b'\n').count();
        let text = decode(path, piece, cfg.invalid_utf8, compression, here, &mut bad)?;
        // A byte-order mark counts only at the start of the file.
        let first = here.offset == 0;
        let docs = match format {
            InputFormat::Jsonl => {
                let body = if first { text.strip_prefix('\u{feff}').unwrap_or(&text) } else { &text };
                jsonl_documents(path, body, &cfg.text_field, here.line)?
            }
            _ => split_text(text, cfg.document_boundary, first),
        };
        if !docs.is_empty() {
            f(docs)?;
        }
        target = window;
        if eof {
            break;
        }
    }
    if let Some(b) = bad {
        b.log(path, cfg.invalid_utf8);
    }
    Ok(())
}

/// Where a window starts in a file's (decompressed) text.
#[derive(Debug, Clone, Copy)]
struct Place {
    offset: usize,
    /// 1-based.
    line: usize,
}

/// The invalid UTF-8 of one file so far, logged once when the file is read.
struct BadUtf8 {
    count: usize,
    first: String,
}

impl BadUtf8 {
    fn log(&self, path: &Path, policy: InvalidUtf8) {
        let (n, first) = (self.count, &self.first);
        match policy {
            InvalidUtf8::Replace => tracing::warn!(
                "{}: {n} invalid UTF-8 sequence(s) replaced with U+FFFD (data.invalid_utf8 = \"replace\"; first at \
                 {first})",
                path.display()
            ),
            _ => tracing::warn!(
                "{}: {n} line(s) with invalid UTF-8 left out (data.invalid_utf8 = \"skip\"; first at {first})",
                path.display()
            ),
        }
    }
}

fn decompress_error(path: &Path, compression: Compression, e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!("{}: cannot decompress it as {} (from its extension): {e}", path.display(), compression.name())
}

/// Reads from `r` until `buf` holds `target` bytes; true at the end of the input.
fn fill(r: &mut dyn Read, buf: &mut Vec<u8>, target: usize) -> std::io::Result<bool> {
    while buf.len() < target {
        let want = (target - buf.len()).min(1 << 30) as u64;
        if (&mut *r).take(want).read_to_end(buf)? == 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Just after the last line end of `buf`: lines and JSON lines end there.
fn after_last_line(buf: &[u8]) -> Option<usize> {
    buf.iter().rposition(|&b| b == b'\n').map(|p| p + 1)
}

/// Just after the last whitespace-only line of `buf` (ended by its line end):
/// blank-line documents end there.
fn after_last_blank_line(buf: &[u8]) -> Option<usize> {
    let mut end = buf.iter().rposition(|&b| b == b'\n')?;
    loop {
        let start = buf[..end].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        if std::str::from_utf8(&buf[start..end]).is_ok_and(|l| l.trim().is_empty()) {
            return Some(end + 1);
        }
        if start == 0 {
            return None;
        }
        end = start - 1;
    }
}

/// The text of `bytes` (a window starting at `at` of the file), with `policy`
/// for invalid UTF-8: an error naming the file and offset, or the text with each
/// invalid sequence replaced (U+FFFD) or each line holding one left out; the
/// number replaced or left out is added to `bad`, logged after the file.
fn decode(
    path: &Path,
    bytes: Vec<u8>,
    policy: InvalidUtf8,
    compression: Compression,
    at: Place,
    bad: &mut Option<BadUtf8>,
) -> Result<String> {
    let e = match String::from_utf8(bytes) {
        Ok(text) => return Ok(text),
        Err(e) => e,
    };
    let local = e.utf8_error().valid_up_to();
    let bytes = e.into_bytes();
    let line = at.line + bytes[..local].iter().filter(|&&b| b == b'\n').count();
    let offset = at.offset + local;
    let place = match compression {
        Compression::None => format!("byte offset {offset}, line {line}"),
        c => format!("byte offset {offset} of the {} text, line {line}", c.name()),
    };
    let (text, n) = match policy {
        InvalidUtf8::Error => bail!(
            "{}: not valid UTF-8 (first invalid byte at {place}); convert it (e.g. iconv -f latin1 -t utf-8), or \
             set data.invalid_utf8 = \"replace\" or \"skip\"",
            path.display()
        ),
        InvalidUtf8::Replace => {
            let n = bytes.utf8_chunks().filter(|c| !c.invalid().is_empty()).count();
            (String::from_utf8_lossy(&bytes).into_owned(), n)
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
            (text, skipped)
        }
    };
    bad.get_or_insert_with(|| BadUtf8 { count: 0, first: place }).count += n;
    Ok(text)
}

/// Splits plain text into documents; a leading byte-order mark is dropped.
/// Lines end at LF or CRLF, as `str::lines`.
pub fn text_documents(text: String, boundary: DocumentBoundary) -> Documents {
    split_text(text, boundary, true)
}

/// [`text_documents`] of a window of a file: `first` when it starts the file
/// (only there is a byte-order mark dropped).
fn split_text(text: String, boundary: DocumentBoundary, first: bool) -> Documents {
    let bom = if first && text.starts_with('\u{feff}') { '\u{feff}'.len_utf8() } else { 0 };
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

/// The documents of JSON lines `text`, whose first line is line `first_line` of the file.
fn jsonl_documents(path: &Path, text: &str, field: &str, first_line: usize) -> Result<Documents> {
    let mut docs = Documents::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), first_line + i);
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
/// rows are skipped. Only that column is read, batch by batch, and `f` gets the
/// documents of about `window` bytes at a time.
fn parquet_documents(
    path: &Path,
    column: &str,
    window: usize,
    mut f: impl FnMut(Documents) -> Result<()>,
) -> Result<()> {
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
        if docs.text.len() >= window {
            f(std::mem::take(&mut docs))?;
        }
    }
    if !docs.is_empty() {
        f(docs)?;
    }
    Ok(())
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

    /// The documents `for_each_window` gives with a `window`-byte window, in order.
    fn windowed(p: &Path, c: &DataConfig, window: usize) -> (Vec<String>, usize) {
        let (mut docs, mut windows) = (Vec::new(), 0);
        for_each_window(p, c, window, |d| {
            docs.extend(d.iter().map(str::to_string));
            windows += 1;
            Ok(())
        })
        .unwrap();
        (docs, windows)
    }

    #[test]
    fn windowed_reads_give_the_documents_of_the_whole_file() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        // Real text with CRLF lines, runs of blank lines, whitespace-only lines,
        // a paragraph longer than the window and a byte-order mark (at the start
        // only; one inside the text is text).
        let mut text = String::from("\u{feff}");
        for f in testutil::corpus_files().iter().take(3) {
            text.push_str(&std::fs::read_to_string(f).unwrap());
        }
        text.push_str("crlf line\r\n\r\n  \t \nafter blank\r\n\u{feff}inner mark\n\n\n");
        text.push_str(&"long paragraph ".repeat(500));
        text.push_str("\nend without a newline");
        let p = write(d.path(), "big.txt", text.as_bytes());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(text.as_bytes()).unwrap();
        let pgz = write(d.path(), "big.txt.gz", &gz.finish().unwrap());
        for boundary in [DocumentBoundary::BlankLine, DocumentBoundary::Line, DocumentBoundary::File] {
            let c = cfg(boundary);
            let whole: Vec<String> = read_documents(&p, &c).unwrap().iter().map(str::to_string).collect();
            assert!(!whole.is_empty());
            for window in [1, 100, 4096, 1 << 20] {
                for path in [&p, &pgz] {
                    let (docs, windows) = windowed(path, &c, window);
                    assert_eq!(docs, whole, "{boundary:?}, window {window}, {}", path.display());
                    if window <= 100 && boundary != DocumentBoundary::File {
                        assert!(windows > 10, "{boundary:?}: {windows} windows of {window} bytes");
                    }
                }
            }
        }
        // JSON lines, plain and zstd.
        let lines: Vec<String> = text.lines().map(|l| serde_json::json!({ "text": l }).to_string()).collect();
        let jl = write(d.path(), "big.jsonl", format!("\u{feff}{}", lines.join("\n")).as_bytes());
        let zjl = write(d.path(), "big.jsonl.zst", &zstd::encode_all(&std::fs::read(&jl).unwrap()[..], 1).unwrap());
        let c = cfg(DocumentBoundary::BlankLine);
        let whole: Vec<String> = read_documents(&jl, &c).unwrap().iter().map(str::to_string).collect();
        for window in [1, 1000, 1 << 20] {
            assert_eq!(windowed(&jl, &c, window).0, whole);
            assert_eq!(windowed(&zjl, &c, window).0, whole);
        }
    }

    #[test]
    fn windowed_reads_name_the_place_in_the_whole_file() {
        let d = tempfile::tempdir().unwrap();
        let mut bytes = "good line\n".repeat(100).into_bytes();
        bytes.extend(b"bad \xff line\n");
        let p = write(d.path(), "bad.txt", &bytes);
        let c = cfg(DocumentBoundary::Line);
        let e = format!("{:#}", for_each_window(&p, &c, 64, |_| Ok(())).unwrap_err());
        assert!(e.contains("byte offset 1004, line 101"), "{e}");
        let replace = DataConfig { invalid_utf8: InvalidUtf8::Replace, ..c.clone() };
        assert_eq!(windowed(&p, &replace, 64).0.last().unwrap(), "bad \u{fffd} line");
        let mut lines = vec![r#"{"text": "a"}"#.to_string(); 50];
        lines.push("{not json".into());
        let jl = write(d.path(), "bad.jsonl", lines.join("\n").as_bytes());
        let e = format!("{:#}", for_each_window(&jl, &c, 100, |_| Ok(())).unwrap_err());
        assert!(e.contains("bad.jsonl:51: invalid JSON"), "{e}");
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
