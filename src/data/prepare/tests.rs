use super::*;
use crate::data::split::split_chunks;
use crate::data::store::TRAIN_FILE;
use crate::data::{source, testutil, TokenStore};
use std::os::unix::fs::MetadataExt;

fn config(dir: &Path, files: Vec<String>, block_size: usize) -> Config {
    let mut c = Config::default();
    c.data.files = files;
    c.data.block_size = block_size;
    c.data.test_fraction = Some(0.1);
    c.data.prepared_dir = Some(dir.join("data"));
    c
}

fn corpus(k: usize) -> Vec<String> {
    testutil::corpus_files().iter().take(k).map(|p| p.to_string_lossy().into_owned()).collect()
}

fn inode(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

/// The entries of `dir`, less the stores' lock files (which stay, empty of data).
fn siblings(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    v.sort();
    v
}

#[test]
fn prepared_store_holds_concatenated_chunks_split_by_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let cfg = config(tmp.path(), corpus(12), 64);
    let p = prepare(&cfg, tok, false, None).unwrap();
    let mut all = Vec::new();
    for f in source::expand_files("data.files", &cfg.data.files).unwrap() {
        for doc in source::read_documents(&f, &cfg.data).unwrap().iter() {
            all.extend(tok.encode_document(doc).unwrap());
        }
    }
    let m = &p.manifest;
    assert_eq!((m.tokens, m.dropped_tokens, m.sources.len()), (all.len(), all.len() % 64, 12));
    assert_eq!(m.train_chunks + m.test_chunks, all.len() / 64);
    let (train, test) = split_chunks(all.len() / 64, 0.1, cfg.data.test_size, cfg.data.split_seed).unwrap();
    assert_eq!((m.train_chunks, m.test_chunks), (train.len(), test.len()));
    for (k, &id) in train.iter().enumerate() {
        assert_eq!(p.train.chunk(k), &all[id as usize * 64..(id as usize + 1) * 64]);
    }
    for (k, &id) in test.iter().enumerate() {
        assert_eq!(p.test.chunk(k), &all[id as usize * 64..(id as usize + 1) * 64]);
    }
    assert_eq!(siblings(tmp.path()), vec!["data"]);
}

#[test]
fn test_size_keeps_a_sample_of_the_test_fraction_and_trains_on_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let mut cfg = config(tmp.path(), corpus(12), 32);
    (cfg.data.test_fraction, cfg.data.test_size) = (Some(0.5), 3);
    let p = prepare(&cfg, tok, false, None).unwrap();
    let mut all = Vec::new();
    for f in source::expand_files("data.files", &cfg.data.files).unwrap() {
        for doc in source::read_documents(&f, &cfg.data).unwrap().iter() {
            all.extend(tok.encode_document(doc).unwrap());
        }
    }
    let n = all.len() / 32;
    let (uncapped_train, uncapped_test) = split_chunks(n, 0.5, 0, cfg.data.split_seed).unwrap();
    assert!(uncapped_test.len() > 6 && uncapped_train.len() > 6, "{n} chunks");
    let (train, test) = split_chunks(n, 0.5, 3, cfg.data.split_seed).unwrap();
    assert_eq!((p.manifest.train_chunks, p.manifest.test_chunks), (n - 3, 3));
    assert!(test.iter().all(|i| uncapped_test.contains(i)), "the cap samples the fraction's chunks");
    for (store, ids) in [(&p.train, &train), (&p.test, &test)] {
        assert_eq!(store.len(), ids.len());
        for (k, &id) in ids.iter().enumerate() {
            assert_eq!(store.chunk(k), &all[id as usize * 32..(id as usize + 1) * 32], "chunk {id}");
        }
    }
}

#[test]
fn a_checkpoint_of_the_same_inputs_in_an_older_store_format_is_named_so() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let cfg = config(tmp.path(), corpus(2), 32);
    let sources = hash_sources(&expand_files("data.files", &cfg.data.files).unwrap()).unwrap();
    let old = inputs_key_of_format(&cfg.data, tok, &sources, 3);
    let e = format!("{:#}", prepare(&cfg, tok, false, Some(&old)).unwrap_err());
    assert!(e.contains("these same inputs, prepared by an older mlm (store format 3"), "{e}");
    assert!(e.contains("data.test_size caps the test split") && e.contains("allow_config_change"), "{e}");
    let e = format!("{:#}", prepare(&cfg, tok, false, Some("0123")).unwrap_err());
    assert!(e.contains("trained on other data"), "{e}");
    assert!(!cfg.prepared_dir().exists(), "a refused resume prepared data");
}

#[test]
fn other_workers_open_rank_0s_store_and_never_write_one() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let cfg = config(tmp.path(), corpus(3), 64);
    let e = format!("{:#}", open_prepared(&cfg, tok, None).unwrap_err());
    assert!(e.contains("rank 0 has prepared it") && e.contains("shared by all of them"), "{e}");
    assert!(!cfg.prepared_dir().exists(), "a worker wrote a store");
    let made = prepare(&cfg, tok, false, None).unwrap();
    let opened = open_prepared(&cfg, tok, None).unwrap();
    assert_eq!(opened.manifest.inputs_key, made.manifest.inputs_key);
}

#[test]
fn word_starts_are_stored_beside_each_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let cfg = config(tmp.path(), corpus(4), 50);
    let p = prepare(&cfg, tok, false, None).unwrap();
    let (mut all, mut starts) = (Vec::new(), Vec::new());
    for f in source::expand_files("data.files", &cfg.data.files).unwrap() {
        for doc in source::read_documents(&f, &cfg.data).unwrap().iter() {
            let (i, s) = tok.encode_document_words(doc).unwrap();
            all.extend(i);
            starts.extend(s);
        }
    }
    assert_eq!(p.manifest.words, starts.iter().filter(|&&s| s).count());
    assert!(p.manifest.words < p.manifest.tokens);
    let (train, test) = split_chunks(all.len() / 50, 0.1, cfg.data.test_size, cfg.data.split_seed).unwrap();
    for (store, ids) in [(&p.train, &train), (&p.test, &test)] {
        for (k, &id) in ids.iter().enumerate() {
            let w = store.word_starts(k).unwrap();
            // A chunk starts with a word start, even in the middle of a word.
            let want: Vec<bool> = (0..50).map(|j| j == 0 || starts[id as usize * 50 + j]).collect();
            assert_eq!((0..50).map(|j| w.get(j)).collect::<Vec<_>>(), want, "chunk {id}");
        }
    }
    let words_len = std::fs::metadata(p.dir.join("train.words")).unwrap().len() as usize;
    assert_eq!(words_len, p.manifest.train_chunks * 7);
}

#[test]
fn store_of_an_older_format_is_prepared_again() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let cfg = config(tmp.path(), corpus(2), 32);
    let first = prepare(&cfg, tok, false, None).unwrap();
    let dir = first.dir.clone();
    drop(first);
    // A version-1 store: no word marks, format_version 1.
    let m = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace(&format!("\"format_version\": {FORMAT_VERSION}"), "\"format_version\": 1");
    std::fs::write(&m, text).unwrap();
    std::fs::remove_file(dir.join("train.words")).unwrap();
    assert!(Prepared::open(&dir).unwrap_err().to_string().contains("format_version 1"));
    let again = prepare(&cfg, tok, false, None).unwrap();
    assert_eq!(again.manifest.format_version, FORMAT_VERSION);
    assert!(again.train.has_word_starts() && again.test.has_word_starts());
    // A store whose word marks were lost cannot be opened.
    std::fs::remove_file(dir.join("test.words")).unwrap();
    let e = Prepared::open(&dir).unwrap_err().to_string();
    assert!(e.contains("test.words: missing"), "{e}");
}

#[test]
fn parquet_rows_prepare_like_the_same_documents_in_json_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let docs: Vec<String> = std::fs::read_to_string(&corpus(1)[0])
        .unwrap()
        .split("\n\n")
        .filter(|p| !p.trim().is_empty())
        .map(str::to_string)
        .collect();
    let pq = tmp.path().join("docs.parquet");
    let text: Vec<Option<&str>> = docs.iter().map(|d| Some(d.as_str())).collect();
    testutil::write_parquet(&pq, vec![("title", testutil::strings(&text)), ("text", testutil::strings(&text))], 7);
    let jl = tmp.path().join("docs.jsonl");
    let lines: Vec<String> = docs.iter().map(|d| serde_json::json!({ "text": d }).to_string()).collect();
    std::fs::write(&jl, lines.join("\n")).unwrap();
    let mut a = config(tmp.path(), vec![pq.to_string_lossy().into_owned()], 32);
    let mut b = config(tmp.path(), vec![jl.to_string_lossy().into_owned()], 32);
    a.data.prepared_dir = Some(tmp.path().join("a"));
    b.data.prepared_dir = Some(tmp.path().join("b"));
    let (a, b) = (prepare(&a, tok, false, None).unwrap(), prepare(&b, tok, false, None).unwrap());
    assert_eq!(a.manifest.documents, docs.len());
    assert_eq!((a.manifest.tokens, a.manifest.words), (b.manifest.tokens, b.manifest.words));
    let chunks = |s: &TokenStore| (0..s.len()).map(|i| s.chunk(i).to_vec()).collect::<Vec<_>>();
    assert_eq!(chunks(&a.train), chunks(&b.train));
}

#[test]
fn unchanged_inputs_reuse_the_store_and_changed_settings_rebuild_it() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let mut cfg = config(tmp.path(), corpus(3), 32);
    let first = prepare(&cfg, tok, false, None).unwrap();
    let train = first.dir.join(TRAIN_FILE);
    let ino = inode(&train);
    let again = prepare(&cfg, tok, false, None).unwrap();
    assert_eq!(inode(&train), ino);
    assert_eq!(again.manifest, first.manifest);
    cfg.data.block_size = 48;
    // Not while a job reads it (each holds the store's shared lock).
    let e = prepare(&cfg, tok, false, None).unwrap_err().to_string();
    assert!(e.contains("is in use by another mlm job"), "{e}");
    assert_eq!(inode(&train), ino);
    let first_key = first.manifest.inputs_key.clone();
    drop((first, again));
    let rebuilt = prepare(&cfg, tok, false, None).unwrap();
    assert_ne!(rebuilt.manifest.inputs_key, first_key);
    assert_eq!(rebuilt.manifest.block_size, 48);
    assert_eq!(siblings(tmp.path()), vec!["data"]);
}

#[test]
fn failed_prepare_leaves_existing_store_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let mut cfg = config(tmp.path(), corpus(2), 32);
    let before = prepare(&cfg, tok, false, None).unwrap().manifest;
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, b"fine text\n\xc3\x28 broken").unwrap();
    cfg.data.files.push(bad.to_string_lossy().into_owned());
    let e = format!("{:#}", prepare(&cfg, tok, false, None).unwrap_err());
    assert!(e.contains("bad.txt") && e.contains("offset 10"), "{e}");
    assert_eq!(Prepared::open(&tmp.path().join("data")).unwrap().manifest, before);
    assert_eq!(siblings(tmp.path()), vec!["bad.txt", "data"]);
}

#[test]
fn too_little_text_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let f = tmp.path().join("a.txt");
    let files = vec![f.to_string_lossy().into_owned()];
    std::fs::write(&f, "\n  \n").unwrap();
    let e = prepare(&config(tmp.path(), files.clone(), 16), tok, false, None).unwrap_err().to_string();
    assert!(e.starts_with("no text found in") && e.contains("a.txt"), "{e}");
    std::fs::write(&f, "just a few words").unwrap();
    let e = prepare(&config(tmp.path(), files.clone(), 16), tok, false, None).unwrap_err().to_string();
    assert!(e.contains("corpus has 6 tokens, fewer than data.block_size = 16"), "{e}");
    std::fs::write(&f, "one two three four five six seven eight nine ten eleven twelve").unwrap();
    let e = prepare(&config(tmp.path(), files, 8), tok, false, None).unwrap_err().to_string();
    assert!(e.contains("needs at least 2"), "{e}");
    assert_eq!(siblings(tmp.path()), vec!["a.txt"]);
}

#[test]
fn tokenize_to_chunks_matches_the_prepared_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let cfg = config(tmp.path(), corpus(2), 64);
    let tokens = tokenize_to_chunks(&cfg.data, tok).unwrap();
    let m = prepare(&cfg, tok, false, None).unwrap().manifest;
    assert_eq!(tokens.len(), m.tokens - m.dropped_tokens);
    assert_eq!(tokens.len() % 64, 0);
    assert_eq!(tokens[0], 101);
}

#[test]
fn batches_cover_every_document_once_in_order() {
    let text: String = (0..1000).map(|i| format!("document {i}\n")).collect();
    let docs = source::text_documents(text, crate::config::DocumentBoundary::Line);
    let b = batches(&docs, 100);
    assert!(b.len() > 100 && b.iter().all(|r| !r.is_empty()), "{b:?}");
    assert_eq!(b.iter().flat_map(|r| r.clone()).collect::<Vec<_>>(), (0..1000).collect::<Vec<_>>());
    assert_eq!(batches(&docs, 1 << 30), vec![0..1000]);
    assert!(batches(&Documents::default(), 100).is_empty());
}

#[test]
fn prepared_store_moves_the_last_chunk_when_no_chunk_drew_test() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let mut cfg = config(tmp.path(), corpus(2), 64);
    cfg.data.test_fraction = Some(1e-9);
    let p = prepare(&cfg, tok, false, None).unwrap();
    let all = tokenize_to_chunks(&cfg.data, tok).unwrap();
    let n = all.len() / 64;
    assert_eq!((p.manifest.train_chunks, p.manifest.test_chunks), (n - 1, 1));
    assert_eq!(p.test.chunk(0), &all[(n - 1) * 64..]);
    assert_eq!(p.train.chunk(n - 2), &all[(n - 2) * 64..(n - 1) * 64]);
    assert!(p.test.word_starts(0).unwrap().get(0));
}

#[test]
fn serial_fraction_is_amdahls() {
    // 2 s serial, 4 s of tokenizing on 2 threads (8 s of work): s = 0.2.
    let t = PrepareTimes { hashing_s: 1.0, tokenizing_s: 4.0, waiting_for_input_s: 0.5, writing_s: 0.5 };
    assert!((t.serial_fraction(2) - 0.2).abs() < 1e-12);
    assert!((t.speedup(2, 16) - 4.0).abs() < 1e-9, "{}", t.speedup(2, 16));
    assert!((t.speedup(2, 1) - 1.0).abs() < 1e-12);
}

/// The tokens of `files`' documents, in order, as prepare concatenates them.
fn tokens_of(files: &[PathBuf], d: &DataConfig) -> Vec<u32> {
    let tok = testutil::tokenizer();
    let mut all = Vec::new();
    for f in files {
        for doc in source::read_documents(f, d).unwrap().iter() {
            all.extend(tok.encode_document(doc).unwrap());
        }
    }
    all
}

fn paragraphs(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    text.split("\n\n").filter(|p| !p.trim().is_empty()).map(str::to_string).collect()
}

fn chunks(s: &TokenStore) -> Vec<Vec<u32>> {
    (0..s.len()).map(|i| s.chunk(i).to_vec()).collect()
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn eval_files_are_the_test_chunks_and_every_training_block_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let all = corpus(7);
    let mut cfg = config(tmp.path(), all[..4].to_vec(), 32);
    cfg.data.test_fraction = None;
    // Two eval files in two formats: a text file, and JSON lines of another
    // file's paragraphs (in sorted order, as data.eval_files are read).
    let jl = tmp.path().join("b-valid.jsonl");
    let lines: Vec<String> =
        paragraphs(Path::new(&all[5])).iter().map(|p| serde_json::json!({ "text": p }).to_string()).collect();
    std::fs::write(&jl, lines.join("\n")).unwrap();
    let text = tmp.path().join("a-valid.txt");
    std::fs::copy(&all[6], &text).unwrap();
    cfg.data.eval_files = vec![path_string(&jl), path_string(&text)];
    let p = prepare(&cfg, tok, false, None).unwrap();

    let train = tokens_of(&all[..4].iter().map(PathBuf::from).collect::<Vec<_>>(), &cfg.data);
    let eval = tokens_of(&[text.clone(), jl.clone()], &cfg.data);
    let m = &p.manifest;
    // Every block of data.files trains: nothing of them is held out.
    assert_eq!((m.train_chunks, m.tokens, m.dropped_tokens), (train.len() / 32, train.len(), train.len() % 32));
    assert_eq!(chunks(&p.train), train.chunks_exact(32).map(<[u32]>::to_vec).collect::<Vec<_>>());
    // The test chunks are exactly the eval files' tokens, cut the same way.
    let e = m.eval.as_ref().expect("eval files in the manifest");
    assert_eq!((m.test_chunks, e.tokens, e.dropped_tokens), (eval.len() / 32, eval.len(), eval.len() % 32));
    assert_eq!(chunks(&p.test), eval.chunks_exact(32).map(<[u32]>::to_vec).collect::<Vec<_>>());
    assert_eq!(
        e.sources.iter().map(|s| s.path.file_name().unwrap()).collect::<Vec<_>>(),
        ["a-valid.txt", "b-valid.jsonl"]
    );
    assert_eq!(e.documents, paragraphs(&text).len() + lines.len());
    assert!(p.test.word_starts(0).unwrap().get(0));
    assert!(m.sources.len() == 4 && !m.sources.iter().any(|s| s.path.ends_with("a-valid.txt")));
}

#[test]
fn a_parquet_eval_file_holds_out_its_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let all = corpus(3);
    let mut cfg = config(tmp.path(), all[..2].to_vec(), 32);
    cfg.data.test_fraction = None;
    let docs = paragraphs(Path::new(&all[2]));
    let pq = tmp.path().join("valid.parquet");
    let rows: Vec<Option<&str>> = docs.iter().map(|d| Some(d.as_str())).collect();
    testutil::write_parquet(&pq, vec![("text", testutil::strings(&rows))], 5);
    cfg.data.eval_files = vec![path_string(&pq)];
    let p = prepare(&cfg, tok, false, None).unwrap();
    let eval: Vec<u32> = docs.iter().flat_map(|d| tok.encode_document(d).unwrap()).collect();
    assert_eq!(chunks(&p.test), eval.chunks_exact(32).map(<[u32]>::to_vec).collect::<Vec<_>>());
    assert_eq!(p.manifest.eval.as_ref().unwrap().documents, docs.len());
}

#[test]
fn changing_an_eval_file_prepares_the_store_again() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let all = corpus(3);
    let mut cfg = config(tmp.path(), all[..2].to_vec(), 32);
    let without = prepare(&cfg, tok, false, None).unwrap().manifest;
    assert!(without.eval.is_none());
    let eval = tmp.path().join("valid.txt");
    std::fs::copy(&all[2], &eval).unwrap();
    (cfg.data.test_fraction, cfg.data.eval_files) = (None, vec![path_string(&eval)]);
    let first = prepare(&cfg, tok, false, None).unwrap();
    assert_ne!(first.manifest.inputs_key, without.inputs_key);
    let ino = inode(&first.dir.join(TRAIN_FILE));
    assert_eq!(prepare(&cfg, tok, false, None).unwrap().manifest, first.manifest, "unchanged inputs: reused");
    assert_eq!(inode(&first.dir.join(TRAIN_FILE)), ino);
    // The same name, other contents: a new store, and a checkpoint trained
    // with the old one is told its data changed.
    let mut text = std::fs::read_to_string(&eval).unwrap();
    text.push_str("\n\nOne more paragraph to evaluate on, long enough to change the blocks.\n");
    std::fs::write(&eval, text).unwrap();
    let e = format!("{:#}", prepare(&cfg, tok, false, Some(&first.manifest.inputs_key)).unwrap_err());
    assert!(e.contains("trained on other data") && e.contains("data.eval_files"), "{e}");
    let mut first = first;
    first.lock = None; // no job reads it now
    let again = prepare(&cfg, tok, false, None).unwrap();
    assert_ne!(again.manifest.inputs_key, first.manifest.inputs_key);
    assert!(again.manifest.eval.as_ref().unwrap().tokens > first.manifest.eval.as_ref().unwrap().tokens);
    assert_eq!(chunks(&again.train), chunks(&first.train));
}

#[test]
fn eval_files_that_overlap_training_or_hold_too_little_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let all = corpus(2);
    let mut cfg = config(tmp.path(), all.clone(), 32);
    cfg.data.test_fraction = None;
    let refused = |eval: Vec<String>| {
        let mut c = cfg.clone();
        c.data.eval_files = eval;
        let e = format!("{:#}", prepare(&c, tok, false, None).unwrap_err());
        assert!(!c.prepared_dir().exists(), "a refused preparation wrote a store: {e}");
        e
    };
    let e = refused(vec![path_string(&tmp.path().join("gone.txt"))]);
    assert!(e.contains("data.eval_files: input file") && e.contains("gone.txt"), "{e}");
    let e = refused(vec![path_string(&tmp.path().join("*.jsonl"))]);
    assert!(e.contains("data.eval_files: pattern") && e.contains("matches no file"), "{e}");
    // A training file, by its name or as a copy: evaluation would leak training text.
    let name = Path::new(&all[1]).file_name().unwrap().to_string_lossy().into_owned();
    let e = refused(vec![all[1].clone()]);
    assert!(e.contains("is also in data.files") && e.contains(&name), "{e}");
    let copy = tmp.path().join("copy.txt");
    std::fs::copy(&all[1], &copy).unwrap();
    let e = refused(vec![path_string(&copy)]);
    assert!(e.contains("copy.txt has the same contents as") && e.contains(&name), "{e}");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n \n").unwrap();
    let e = refused(vec![path_string(&empty)]);
    assert!(e.contains("data.eval_files: no text found in") && e.contains("empty.txt"), "{e}");
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "just a few words").unwrap();
    let e = refused(vec![path_string(&short)]);
    assert!(e.contains("short.txt") && e.contains("6 tokens, fewer than one block of data.block_size = 32"), "{e}");
}

#[test]
fn a_rebuild_never_deletes_files_the_store_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let mut cfg = config(tmp.path(), corpus(2), 32);
    drop(prepare(&cfg, tok, false, None).unwrap());
    let dir = tmp.path().join("data");
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    // Kept beside a store that is reused.
    drop(prepare(&cfg, tok, false, None).unwrap());
    cfg.data.block_size = 48;
    let e = prepare(&cfg, tok, false, None).unwrap_err().to_string();
    assert!(e.contains("(notes.txt)") && e.contains("would delete them") && !e.contains('\n'), "{e}");
    assert_eq!(std::fs::read_to_string(dir.join("notes.txt")).unwrap(), "mine");
    assert_eq!(Prepared::open(&dir).unwrap().manifest.block_size, 32);
    std::fs::remove_file(dir.join("notes.txt")).unwrap();
    assert_eq!(prepare(&cfg, tok, false, None).unwrap().manifest.block_size, 48);
}

#[test]
fn a_store_changed_after_preparation_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = testutil::tokenizer();
    let cfg = config(tmp.path(), corpus(2), 32);
    let first = prepare(&cfg, tok, false, None).unwrap();
    let sums = first.manifest.checksums.clone().expect("checksums in the manifest");
    assert_eq!(sums.keys().count(), 4);
    // One token swapped for another id of the vocabulary: the chunk counts and
    // ids stay plausible, only the checksum tells.
    let train = first.dir.join(TRAIN_FILE);
    let mut bytes = std::fs::read(&train).unwrap();
    let t = u32::from_le_bytes(bytes[40..44].try_into().unwrap());
    bytes[40..44].copy_from_slice(&(if t == 1000 { 1001u32 } else { 1000 }).to_le_bytes());
    std::fs::write(&train, &bytes).unwrap();
    for e in [prepare(&cfg, tok, false, None).unwrap_err(), open_prepared(&cfg, tok, None).unwrap_err()] {
        let e = format!("{e:#}");
        assert!(e.contains("train.tokens") && e.contains("checksum") && e.contains("prepare the data again"), "{e}");
    }
    assert_eq!(std::fs::read(&train).unwrap(), bytes, "the store was rebuilt behind the user's back");
    // A store prepared before checksums is accepted as it is (with a warning).
    let mut m = first.manifest.clone();
    m.checksums = None;
    std::fs::write(first.dir.join(MANIFEST), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    assert_eq!(prepare(&cfg, tok, false, None).unwrap().manifest, m);
}
