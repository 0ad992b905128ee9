//! Reading input files into documents (plain text, JSON lines, Parquet or
//! Arrow IPC), text and JSON lines optionally compressed (`.gz`, `.zst`,
//! `.bz2`); Hugging Face `datasets` folders (`save_to_disk`) read as their
//! Arrow files.
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use arrow_array::{Array, LargeStringArray, RecordBatch, StringArray, StringViewArray};
use arrow_schema::ArrowError;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::config::{DataConfig, DocumentBoundary, InputFormat, InvalidUtf8};

/// Expands the paths or glob patterns of the config key `key` (`data.files`,
/// `data.eval_files`) into a sorted, deduplicated list of files. A pattern that
/// matches no file, or a missing file, is an error naming the key and it.
pub fn expand_files(key: &str, patterns: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for pat in patterns {
        if pat.contains(['*', '?', '[']) {
            let paths = glob::glob(pat).with_context(|| format!("{key}: bad glob pattern {pat:?}"))?;
            let before = out.len();
            for p in paths {
                let p = p.with_context(|| format!("{key}: cannot read a match of {pat:?}"))?;
                if p.is_file() {
                    out.push(p);
                }
            }
            if out.len() == before {
                bail!("{key}: pattern {pat:?} matches no file");
            }
        } else {
            let p = PathBuf::from(pat);
            if p.is_dir() {
                out.extend(dataset_folder_files(key, &p)?);
                continue;
            }
            if !p.is_file() {
                bail!("{key}: input file {} does not exist (or is not a file)", p.display());
            }
            out.push(p);
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The Arrow files of a Hugging Face `datasets` folder (for the config key
/// `key`), as its `state.json` lists them: a `save_to_disk` folder of one
/// split (`data-0000i-of-0000n.arrow` shards, whose names sort in the
/// dataset's order, the order [`expand_files`] reads them in), or a
/// `DatasetDict` folder (`dataset_dict.json`), whose `train` split is read
/// (name another split's folder, e.g. `wiki/validation`, to read that one).
/// Any other folder is an error naming it.
pub fn dataset_folder_files(key: &str, dir: &Path) -> Result<Vec<PathBuf>> {
    let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| anyhow::anyhow!("{}: not a datasets {name} ({e})", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(format!("cannot read {}", path.display()))),
        }
    };
    if let Some(state) = read_json("state.json")? {
        let files = state.get("_data_files").and_then(|f| f.as_array()).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no \"_data_files\" list (not a datasets save_to_disk folder?)",
                dir.join("state.json").display()
            )
        })?;
        let mut out = Vec::with_capacity(files.len());
        for f in files {
            let Some(name) = f.get("filename").and_then(|n| n.as_str()) else {
                bail!("{}: a \"_data_files\" entry without a \"filename\"", dir.join("state.json").display());
            };
            // A shard name is a file of this folder, never a path out of it.
            if name.is_empty() || Path::new(name).components().count() != 1 || name == ".." {
                bail!("{}: shard name {name:?} is not a file name", dir.join("state.json").display());
            }
            let shard = dir.join(name);
            if !shard.is_file() {
                bail!("{key}: {} lists shard {name}, which is missing", dir.join("state.json").display());
            }
            out.push(shard);
        }
        if out.is_empty() {
            bail!("{key}: the datasets folder {} holds no data files", dir.display());
        }
        return Ok(out);
    }
    if let Some(dict) = read_json("dataset_dict.json")? {
        let splits: Vec<&str> = dict
            .get("splits")
            .and_then(|s| s.as_array())
            .map_or(Vec::new(), |s| s.iter().filter_map(|v| v.as_str()).collect());
        if !splits.contains(&"train") {
            bail!(
                "{key}: {} is a datasets DatasetDict without a \"train\" split (splits: {}); name a split's folder, \
                 e.g. {}",
                dir.display(),
                splits.join(", "),
                dir.join(splits.first().copied().unwrap_or("<split>")).display()
            );
        }
        return dataset_folder_files(key, &dir.join("train"));
    }
    bail!(
        "{key}: {} is a folder, not an input file nor a datasets save_to_disk folder (no state.json or \
         dataset_dict.json); name its files or a glob pattern such as {}/*.txt",
        dir.display(),
        dir.display()
    )
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
            Some("arrow") => InputFormat::Arrow,
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
    if format == InputFormat::Arrow {
        if compression != Compression::None {
            bail!("{}: a {}-compressed Arrow file: decompress the file", path.display(), compression.name());
        }
        return arrow_documents(path, &cfg.text_field, window, f);
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
        let keep_breaks = format == InputFormat::Jsonl;
        let text = decode(path, piece, cfg.invalid_utf8, compression, here, keep_breaks, &mut bad)?;
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
/// number replaced or left out is added to `bad`, logged after the file. A
/// line left out goes with its line break, so that its paragraph goes on
/// without it (a blank line in its place would split the document); with
/// `keep_breaks` (JSON lines, whose error messages count lines) the break stays.
#[allow(clippy::too_many_arguments)]
fn decode(
    path: &Path,
    bytes: Vec<u8>,
    policy: InvalidUtf8,
    compression: Compression,
    at: Place,
    keep_breaks: bool,
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
                        if keep_breaks && l.ends_with(b"\n") {
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
fn parquet_documents(path: &Path, column: &str, window: usize, f: impl FnMut(Documents) -> Result<()>) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read input file {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| anyhow::anyhow!("{}: not a readable Parquet file ({e})", path.display()))?;
    let idx = text_column(path, builder.schema().fields(), column)?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [idx]);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| anyhow::anyhow!("{}: cannot read column {column:?}: {e}", path.display()))?;
    column_windows(path, column, reader, window, f)
}

/// The string column `column` of an Arrow IPC file, one document per row, in
/// file order; null and whitespace-only rows are skipped. `datasets` writes
/// the IPC *stream* format (`data-00000-of-00001.arrow`); the IPC *file*
/// format (`ARROW1` magic) is read too. Only that column is decoded, a record
/// batch at a time, and `f` gets about `window` bytes of documents at a time.
fn arrow_documents(path: &Path, column: &str, window: usize, f: impl FnMut(Documents) -> Result<()>) -> Result<()> {
    use arrow_ipc::reader::{FileReader, StreamReader};
    let open = || std::fs::File::open(path).with_context(|| format!("cannot read input file {}", path.display()));
    let mut magic = [0u8; 6];
    let is_file_format = {
        let mut file = open()?;
        let n = file.read(&mut magic).with_context(|| format!("cannot read input file {}", path.display()))?;
        n == 6 && &magic == b"ARROW1"
    };
    let bad = |e: ArrowError| anyhow::anyhow!("{}: not a readable Arrow IPC file ({e})", path.display());
    let schema = if is_file_format {
        FileReader::try_new_buffered(open()?, None).map_err(bad)?.schema()
    } else {
        StreamReader::try_new_buffered(open()?, None).map_err(bad)?.schema()
    };
    let idx = text_column(path, schema.fields(), column)?;
    let projection = Some(vec![idx]);
    if is_file_format {
        column_windows(path, column, FileReader::try_new_buffered(open()?, projection).map_err(bad)?, window, f)
    } else {
        column_windows(path, column, StreamReader::try_new_buffered(open()?, projection).map_err(bad)?, window, f)
    }
}

/// The index of the string column `column` among a table's `fields`; an
/// error naming the file otherwise (with the columns there are).
fn text_column(path: &Path, fields: &arrow_schema::Fields, column: &str) -> Result<usize> {
    let Some(idx) = fields.iter().position(|f| f.name() == column) else {
        let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
        bail!("{}: no column {column:?} (columns: {}); set data.text_field", path.display(), names.join(", "));
    };
    let dtype = fields[idx].data_type();
    if !for_each_str(arrow_array::new_empty_array(dtype).as_ref(), |_| ()) {
        bail!("{}: column {column:?} is {dtype}, expected a string column; set data.text_field", path.display());
    }
    Ok(idx)
}

/// The documents of record `batches` holding only the text column (null and
/// whitespace-only rows skipped), given to `f` about `window` bytes at a time.
fn column_windows(
    path: &Path,
    column: &str,
    batches: impl Iterator<Item = Result<RecordBatch, ArrowError>>,
    window: usize,
    mut f: impl FnMut(Documents) -> Result<()>,
) -> Result<()> {
    let mut docs = Documents::default();
    for batch in batches {
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
mod tests;
