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
    let p =
        write(d.path(), "a.jsonl", b"{\"text\": \"hello\", \"id\": 1}\n\n{\"text\": \"  \"}\n{\"text\": \"bye\"}\n");
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

    let e = format!("{:#}", read_documents(&p, &DataConfig { text_field: "body".into(), ..c.clone() }).unwrap_err());
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
    // A skipped line leaves its paragraph whole (no blank line in its place),
    // and blank-line documents stay apart.
    let p = write(d.path(), "paras.txt", b"a\n\xff\n\nb1\nb\xe92\r\nb3\n\n\xff\nc\n");
    let skip = DataConfig { invalid_utf8: InvalidUtf8::Skip, ..cfg(DocumentBoundary::BlankLine) };
    assert_eq!(read_documents(&p, &skip).unwrap(), vec!["a", "b1\nb3", "c"]);
    // JSON lines keep the count of lines (for error messages) when one is skipped.
    let p = write(d.path(), "bad.jsonl", b"{\"text\": \"x\"}\n\xff\n{\"text\": 3}\n");
    let jsonl =
        DataConfig { invalid_utf8: InvalidUtf8::Skip, format: InputFormat::Jsonl, ..cfg(DocumentBoundary::Line) };
    let e = format!("{:#}", read_documents(&p, &jsonl).unwrap_err());
    assert!(e.contains("bad.jsonl:3:"), "{e}");
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
    let files = expand_files("data.files", &[pat.clone(), b.to_string_lossy().into_owned()]).unwrap();
    assert_eq!(files, vec![a, b]);
    let none = d.path().join("*.md").to_string_lossy().into_owned();
    let e = expand_files("data.files", &[none]).unwrap_err().to_string();
    assert!(e.contains("*.md") && e.contains("matches no file"), "{e}");
    let e = expand_files("data.files", &[d.path().join("gone.txt").to_string_lossy().into_owned()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("gone.txt") && e.contains("does not exist"), "{e}");
}

/// Arrow IPC in both formats (the stream `datasets` writes, and the file with
/// its `ARROW1` magic), several record batches, nulls and blank rows skipped,
/// windows of about the asked size; a `save_to_disk` folder lists its shards
/// in `state.json` order and never a path out of the folder.
#[test]
fn arrow_streams_files_and_datasets_folders() {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Int64Array, RecordBatch};
    let d = tempfile::tempdir().unwrap();
    let batch = |docs: &[Option<&str>]| {
        let ids: ArrayRef = Arc::new(Int64Array::from((0..docs.len() as i64).collect::<Vec<_>>()));
        let text: ArrayRef = Arc::new(StringArray::from(docs.to_vec()));
        RecordBatch::try_from_iter([("id", ids), ("text", text)]).unwrap()
    };
    let batches = [batch(&[Some("first doc"), None, Some("  ")]), batch(&[Some("second doc"), Some("third doc")])];
    let schema = batches[0].schema();
    let stream = d.path().join("data-00001-of-00002.arrow");
    let mut w = arrow_ipc::writer::StreamWriter::try_new(std::fs::File::create(&stream).unwrap(), &schema).unwrap();
    batches.iter().for_each(|b| w.write(b).unwrap());
    w.finish().unwrap();
    let file = d.path().join("data-00000-of-00002.arrow");
    let mut w = arrow_ipc::writer::FileWriter::try_new(std::fs::File::create(&file).unwrap(), &schema).unwrap();
    batches.iter().for_each(|b| w.write(b).unwrap());
    w.finish().unwrap();
    let c = DataConfig::default();
    for p in [&stream, &file] {
        assert_eq!(resolve_format(p, c.format), InputFormat::Arrow);
        assert_eq!(read_documents(p, &c).unwrap(), vec!["first doc", "second doc", "third doc"], "{}", p.display());
        let mut windows = Vec::new();
        for_each_window(p, &c, 1, |w| {
            windows.push(w.len());
            Ok(())
        })
        .unwrap();
        assert_eq!(windows, [1, 2], "one window per record batch at a 1-byte window");
        let e = read_documents(p, &DataConfig { text_field: "id".into(), ..c.clone() }).unwrap_err().to_string();
        assert!(e.contains("column \"id\" is Int64, expected a string column"), "{e}");
    }
    // The folder: the shards state.json lists.
    let state =
        r#"{"_data_files": [{"filename": "data-00001-of-00002.arrow"}, {"filename": "data-00000-of-00002.arrow"}]}"#;
    std::fs::write(d.path().join("state.json"), state).unwrap();
    assert_eq!(dataset_folder_files("data.files", d.path()).unwrap(), [stream.clone(), file.clone()]);
    std::fs::write(d.path().join("state.json"), r#"{"_data_files": [{"filename": "../x.arrow"}]}"#).unwrap();
    let e = dataset_folder_files("data.files", d.path()).unwrap_err().to_string();
    assert!(e.contains("shard name \"../x.arrow\" is not a file name"), "{e}");
    std::fs::write(d.path().join("state.json"), r#"{"_data_files": [{"filename": "gone.arrow"}]}"#).unwrap();
    assert!(dataset_folder_files("data.files", d.path())
        .unwrap_err()
        .to_string()
        .contains("lists shard gone.arrow, which is missing"));
    let dict = tempfile::tempdir().unwrap();
    std::fs::write(dict.path().join("dataset_dict.json"), r#"{"splits": ["test"]}"#).unwrap();
    let e = dataset_folder_files("data.files", dict.path()).unwrap_err().to_string();
    assert!(e.contains("without a \"train\" split (splits: test)"), "{e}");
}
