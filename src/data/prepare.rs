//! `prepare`: input files -> tokenized, chunked, split token store on disk.
//!
//! Mirrors Hugging Face `run_mlm`'s default path: each document is tokenized with
//! its special tokens (`[CLS] ... [SEP]`), all documents are concatenated in file
//! order, cut into `block_size` chunks and the remainder dropped (`group_texts`).
//! Files are read a window at a time and each chunk is written to train or test
//! as it is cut ([`super::split`]), so memory does not grow with the corpus. Each token's
//! word-start mark (for whole-word masking) is stored beside the tokens, so the
//! same store serves token and whole-word masking.
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::source::{expand_files, for_each_window, Documents};
use super::split::SplitWriter;
use super::store::{Manifest, Prepared, SourceInfo, FORMAT_VERSION, MANIFEST};
use super::tokenizer::{hex, TextTokenizer};
use crate::config::{Config, DataConfig};
use crate::train::metrics::Progress;

/// Prepares the token store in `cfg.prepared_dir()`, or reuses the one there
/// when it was made from the same inputs and settings (same `inputs_key`).
///
/// `resumed_key` is the `inputs_key` of the data a checkpoint about to be
/// resumed was trained on: other data is refused before anything is written
/// (unless `checkpoint.allow_config_change`). The store is read under a shared
/// lock and written under an exclusive one, so a job never rebuilds a store
/// another job is reading or writing.
pub fn prepare(cfg: &Config, tok: &TextTokenizer, show_progress: bool, resumed_key: Option<&str>) -> Result<Prepared> {
    prepare_or_open(cfg, tok, show_progress, resumed_key, Mode::Prepare)
}

/// Opens the store rank 0 has prepared (the other workers of a job): the same
/// checks as [`prepare`], but never writes, so workers on a node that does not
/// see rank 0's files fail saying so instead of preparing a copy each.
pub fn open_prepared(cfg: &Config, tok: &TextTokenizer, resumed_key: Option<&str>) -> Result<Prepared> {
    prepare_or_open(cfg, tok, false, resumed_key, Mode::OpenOnly)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Prepare,
    OpenOnly,
}

fn busy(dir: &Path, b: crate::lock::Busy) -> anyhow::Error {
    anyhow::anyhow!(
        "prepared data {} is in use by another mlm job ({}) that is writing or reading it: wait for it, or set \
         data.prepared_dir to another folder",
        dir.display(),
        b.holder()
    )
}

fn prepare_or_open(
    cfg: &Config,
    tok: &TextTokenizer,
    show_progress: bool,
    resumed_key: Option<&str>,
    mode: Mode,
) -> Result<Prepared> {
    let d = &cfg.data;
    let files = expand_files(&d.files)?;
    if files.is_empty() {
        bail!("data.files is empty: list the text, JSON-lines or Parquet files to train on");
    }
    let mut sources = hash_sources(&files)?;
    let key = inputs_key(d, tok, &sources);
    if let Some(want) = resumed_key.filter(|w| *w != key) {
        let what = "the checkpoint to resume was trained on other data (data.files, their contents, the tokenizer or \
                    the data settings changed since)";
        if !cfg.checkpoint.allow_config_change {
            bail!(
                "{what}: restore the inputs, start a new training.output_dir, or set \
                 checkpoint.allow_config_change = true to resume on the new data (prepared again, another split)"
            );
        }
        warn!("{what}; resuming on the new data (checkpoint.allow_config_change = true; data key {want} -> {key})");
    }
    let dir = cfg.prepared_dir();
    check_store_dir(&dir)?;
    let lock_path = crate::lock::store_lock_path(&dir);
    if mode == Mode::OpenOnly {
        let _shared = crate::lock::Lock::shared(&lock_path)?.map_err(|b| busy(&dir, b))?;
        return reusable(&dir, &key).with_context(|| {
            format!(
                "prepared data {} is missing here or was made from other inputs, though rank 0 has prepared it: every \
                 worker must see the same data.files and data.prepared_dir (with several nodes, on a filesystem \
                 shared by all of them)",
                dir.display()
            )
        });
    }
    let busy = |b: crate::lock::Busy| busy(&dir, b);
    {
        let _shared = crate::lock::Lock::shared(&lock_path)?.map_err(busy)?;
        if let Some(p) = reusable(&dir, &key) {
            return Ok(p);
        }
    }
    let _exclusive = crate::lock::Lock::exclusive(&lock_path)?.map_err(busy)?;
    if let Some(p) = reusable(&dir, &key) {
        return Ok(p);
    }
    // Under the exclusive lock nobody else writes here: leftovers of an
    // interrupted preparation are ours to remove.
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    crate::durable::recover(&crate::durable::parent_of(&dir), |n| n == name)?;

    let t0 = Instant::now();
    let total: u64 = sources.iter().map(|s| s.bytes).sum();
    let pb = if show_progress { Progress::bytes(total, "tokenizing", &cfg.logging) } else { Progress::hidden() };
    let mut manifest = None;
    crate::durable::write_dir_atomically(&dir, |tmp| {
        let mut split = SplitWriter::create(tmp, d.block_size, d.test_fraction, d.split_seed)?;
        let counts = tokenize_files(&files, d, tok, &pb, READ_WINDOW, |ids, starts| split.push(ids, starts))?;
        pb.finish();
        for (s, (docs, toks)) in sources.iter_mut().zip(counts) {
            (s.documents, s.tokens) = (docs, toks);
        }
        let documents: usize = sources.iter().map(|s| s.documents).sum();
        check_corpus(&files, documents, split.tokens, d.block_size)?;
        let written = split.finish()?;
        let m = Manifest {
            format_version: FORMAT_VERSION,
            block_size: d.block_size,
            tokenizer_sha256: tok.hash.clone(),
            vocab_size: tok.vocab_size,
            inputs_key: key,
            sources: std::mem::take(&mut sources),
            documents,
            tokens: written.tokens,
            words: written.words,
            dropped_tokens: written.dropped_tokens,
            train_chunks: written.train_chunks,
            test_chunks: written.test_chunks,
        };
        let p = tmp.join(MANIFEST);
        std::fs::write(&p, serde_json::to_vec_pretty(&m)?).with_context(|| format!("cannot write {}", p.display()))?;
        File::open(&p)?.sync_all().with_context(|| format!("cannot sync {}", p.display()))?;
        manifest = Some(m);
        Ok(())
    })?;
    let manifest = manifest.expect("written with the store");
    let (documents, secs) = (manifest.documents, t0.elapsed().as_secs_f64());
    info!(
        documents,
        tokens = manifest.tokens,
        words = manifest.words,
        train_chunks = manifest.train_chunks,
        test_chunks = manifest.test_chunks,
        dropped_tokens = manifest.dropped_tokens,
        tokens_per_s = (manifest.tokens as f64 / secs.max(1e-9)).round(),
        "prepared data at {}",
        dir.display()
    );
    Prepared::open(&dir)
}

/// The documents of `d.files` tokenized and concatenated, cut to a whole number
/// of `d.block_size` chunks (no store on disk: for one-off evaluation). Fails
/// like [`prepare`] on an empty or too small corpus.
pub fn tokenize_to_chunks(d: &DataConfig, tok: &TextTokenizer) -> Result<Vec<u32>> {
    let files = expand_files(&d.files)?;
    if files.is_empty() {
        bail!("no input files given");
    }
    let mut tokens = Vec::new();
    let counts = tokenize_files(&files, d, tok, &Progress::hidden(), READ_WINDOW, |ids, _| {
        tokens.extend_from_slice(ids);
        Ok(())
    })?;
    check_corpus(&files, counts.iter().map(|c| c.0).sum(), tokens.len(), d.block_size)?;
    tokens.truncate(tokens.len() / d.block_size * d.block_size);
    Ok(tokens)
}

/// (documents, tokens) of one input file.
type FileCounts = (usize, usize);

/// Bytes of text read from a file at a time: the text, its documents and their
/// tokens are held for one window only, so memory does not grow with the corpus.
const READ_WINDOW: usize = 64 << 20;

/// Bytes of text per batch of documents tokenized by one task: large enough
/// that a batch's buffers and its task are cheap, small enough to balance
/// the threads.
const BATCH_BYTES: usize = 1 << 18;

/// Reads and tokenizes `files` in order, a window of about `window` bytes of a
/// file at a time (batches of documents in parallel, order kept), and hands
/// `sink` the ids and word-start marks of each window in order. `pb` advances
/// by bytes.
fn tokenize_files(
    files: &[PathBuf],
    d: &DataConfig,
    tok: &TextTokenizer,
    pb: &Progress,
    window: usize,
    mut sink: impl FnMut(&[u32], &[bool]) -> Result<()>,
) -> Result<Vec<FileCounts>> {
    let (mut counts, mut done) = (Vec::new(), 0);
    for file in files {
        let (mut n_docs, mut n_tokens) = (0, 0);
        for_each_window(file, d, window, |docs| {
            // Indexed parallel collect keeps batch order.
            let encoded: Vec<(Vec<u32>, Vec<bool>)> = batches(&docs, BATCH_BYTES)
                .into_par_iter()
                .map(|batch| {
                    let (mut ids, mut marks) = (Vec::new(), Vec::new());
                    tok.encode_documents_into(docs.range(batch.clone()), &mut ids, &mut marks)?;
                    pb.inc(docs.bytes_in(batch) as u64);
                    Ok((ids, marks))
                })
                .collect::<Result<_>>()
                .with_context(|| format!("cannot tokenize {}", file.display()))?;
            n_docs += docs.len();
            drop(docs);
            for (ids, s) in &encoded {
                n_tokens += ids.len();
                sink(ids, s)?;
            }
            Ok(())
        })?;
        counts.push((n_docs, n_tokens));
        done += std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        pb.set(done);
    }
    Ok(counts)
}

/// Index ranges cutting `docs` into runs of consecutive documents of about
/// `bytes` bytes each.
fn batches(docs: &Documents, bytes: usize) -> Vec<Range<usize>> {
    let (mut out, mut start, mut size) = (Vec::new(), 0, 0);
    for (i, doc) in docs.iter().enumerate() {
        size += doc.len();
        if size >= bytes {
            out.push(start..i + 1);
            (start, size) = (i + 1, 0);
        }
    }
    if start < docs.len() {
        out.push(start..docs.len());
    }
    out
}

/// The errors of a corpus too small to make one chunk.
fn check_corpus(files: &[PathBuf], documents: usize, tokens: usize, block_size: usize) -> Result<()> {
    if documents == 0 || tokens == 0 {
        bail!("no text found in {}", list_files(files));
    }
    if tokens < block_size {
        bail!(
            "corpus has {tokens} tokens, fewer than data.block_size = {block_size}: add text or lower data.block_size"
        );
    }
    Ok(())
}

/// Hashes every input file (in parallel); counts are filled in later.
fn hash_sources(files: &[PathBuf]) -> Result<Vec<SourceInfo>> {
    files
        .par_iter()
        .map(|f| {
            let path =
                std::fs::canonicalize(f).with_context(|| format!("cannot resolve input file {}", f.display()))?;
            let mut file = File::open(f).with_context(|| format!("cannot read input file {}", f.display()))?;
            let (mut h, mut buf, mut bytes) = (Sha256::new(), vec![0u8; 1 << 20], 0u64);
            loop {
                let k = file.read(&mut buf).with_context(|| format!("cannot read input file {}", f.display()))?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                bytes += k as u64;
            }
            Ok(SourceInfo { path, bytes, sha256: hex(&h.finalize()), documents: 0, tokens: 0 })
        })
        .collect()
}

/// SHA-256 over everything that shapes the store.
fn inputs_key(d: &DataConfig, tok: &TextTokenizer, sources: &[SourceInfo]) -> String {
    let files: Vec<_> = sources.iter().map(|s| (&s.path, s.bytes, &s.sha256)).collect();
    let v = serde_json::json!({
        "format_version": FORMAT_VERSION,
        "files": files,
        "format": d.format,
        "text_field": d.text_field,
        "document_boundary": d.document_boundary,
        "block_size": d.block_size,
        "test_fraction": d.test_fraction,
        "split_seed": d.split_seed,
        "tokenizer_sha256": tok.hash,
    });
    let mut v = v;
    // Only when it can change the text, so stores made before the key existed
    // keep their identity.
    if d.invalid_utf8 != crate::config::InvalidUtf8::Error {
        v["invalid_utf8"] = serde_json::json!(d.invalid_utf8);
    }
    hex(&Sha256::digest(v.to_string().as_bytes()))
}

fn list_files(files: &[PathBuf]) -> String {
    let mut s: Vec<String> = files.iter().take(3).map(|f| f.display().to_string()).collect();
    if files.len() > 3 {
        s.push(format!("and {} more files", files.len() - 3));
    }
    s.join(", ")
}

/// The store at `dir` when it was made from `key`, else `None` (with a line
/// saying why it is prepared again).
fn reusable(dir: &Path, key: &str) -> Option<Prepared> {
    if !dir.join(MANIFEST).exists() {
        return None;
    }
    match Prepared::open(dir) {
        Ok(p) if p.manifest.inputs_key == key => {
            info!("reusing prepared data at {}", dir.display());
            Some(p)
        }
        Ok(_) => {
            info!("inputs or data settings changed: preparing {} again", dir.display());
            None
        }
        Err(e) => {
            warn!("prepared data at {} is unusable ({e:#}): preparing again", dir.display());
            None
        }
    }
}

/// Refuses a `data.prepared_dir` that holds something other than a token store:
/// replacing it would delete the user's files.
fn check_store_dir(dir: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(dir) else { return Ok(()) };
    let not_a_store = "is not a prepared token store: set data.prepared_dir to a new or empty folder";
    if !meta.is_dir() {
        bail!("data.prepared_dir {} exists and {not_a_store}", dir.display());
    }
    let empty = std::fs::read_dir(dir).map(|mut e| e.next().is_none()).unwrap_or(false);
    if !empty && !dir.join(MANIFEST).exists() {
        bail!("data.prepared_dir {} holds files but no {MANIFEST}: it {not_a_store}", dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::split::split_chunks;
    use crate::data::store::TRAIN_FILE;
    use crate::data::{source, testutil, TokenStore};
    use std::os::unix::fs::MetadataExt;

    fn config(dir: &Path, files: Vec<String>, block_size: usize) -> Config {
        let mut c = Config::default();
        c.data.files = files;
        c.data.block_size = block_size;
        c.data.test_fraction = 0.1;
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
        for f in source::expand_files(&cfg.data.files).unwrap() {
            for doc in source::read_documents(&f, &cfg.data).unwrap().iter() {
                all.extend(tok.encode_document(doc).unwrap());
            }
        }
        let m = &p.manifest;
        assert_eq!((m.tokens, m.dropped_tokens, m.sources.len()), (all.len(), all.len() % 64, 12));
        assert_eq!(m.train_chunks + m.test_chunks, all.len() / 64);
        let (train, test) = split_chunks(all.len() / 64, 0.1, cfg.data.split_seed).unwrap();
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
        for f in source::expand_files(&cfg.data.files).unwrap() {
            for doc in source::read_documents(&f, &cfg.data).unwrap().iter() {
                let (i, s) = tok.encode_document_words(doc).unwrap();
                all.extend(i);
                starts.extend(s);
            }
        }
        assert_eq!(p.manifest.words, starts.iter().filter(|&&s| s).count());
        assert!(p.manifest.words < p.manifest.tokens);
        let (train, test) = split_chunks(all.len() / 50, 0.1, cfg.data.split_seed).unwrap();
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
        let rebuilt = prepare(&cfg, tok, false, None).unwrap();
        assert_ne!(rebuilt.manifest.inputs_key, first.manifest.inputs_key);
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
        cfg.data.test_fraction = 1e-9;
        let p = prepare(&cfg, tok, false, None).unwrap();
        let all = tokenize_to_chunks(&cfg.data, tok).unwrap();
        let n = all.len() / 64;
        assert_eq!((p.manifest.train_chunks, p.manifest.test_chunks), (n - 1, 1));
        assert_eq!(p.test.chunk(0), &all[(n - 1) * 64..]);
        assert_eq!(p.train.chunk(n - 2), &all[(n - 2) * 64..(n - 1) * 64]);
        assert!(p.test.word_starts(0).unwrap().get(0));
    }
}
