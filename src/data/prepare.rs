//! `prepare`: input files -> tokenized, chunked, split token store on disk.
//!
//! Mirrors Hugging Face `run_mlm`'s default path: each document is tokenized with
//! its special tokens (`[CLS] ... [SEP]`), all documents are concatenated in file
//! order, cut into `block_size` chunks and the remainder dropped (`group_texts`).
//! Files are read a window at a time and each chunk is written to train or test
//! as it is cut ([`super::split`]), so memory does not grow with the corpus.
//! With `data.eval_files`, those files follow the training files through the
//! same reading and cutting, and their blocks are the test chunks. Each token's
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
use super::store::{EvalFiles, Manifest, Prepared, SourceInfo, FORMAT_VERSION, MANIFEST, STORE_FILES};
use super::tokenizer::{hex, TextTokenizer};
use crate::config::{Config, DataConfig};
use crate::progress::Progress;

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
    let files = expand_files("data.files", &d.files)?;
    if files.is_empty() {
        bail!("data.files is empty: list the text, JSON-lines or Parquet files to train on");
    }
    let eval_files = expand_files("data.eval_files", &d.eval_files)?;
    let hashing = Instant::now();
    let sources = hash_sources(&files)?;
    let eval_sources = hash_sources(&eval_files)?;
    let times = PrepareTimes { hashing_s: hashing.elapsed().as_secs_f64(), ..Default::default() };
    check_disjoint(&sources, &eval_sources)?;
    let key = inputs_key(d, tok, &sources, &eval_sources);
    if let Some(want) = resumed_key.filter(|w| *w != key) {
        changed_data(want, &key, cfg, tok, &sources, &eval_sources)?;
    }
    let dir = store_dir(cfg)?;
    check_store_dir(&dir)?;
    let lock_path = crate::lock::store_lock_path(&dir);
    let busy = |b: crate::lock::Busy| busy(&dir, b);
    // Readers hold the shared lock for as long as they use the store (it
    // lives in the returned `Prepared`); a rebuild takes it exclusively.
    let shared = || -> Result<crate::lock::Lock> {
        let lock = crate::lock::Lock::shared(&lock_path)?.map_err(busy)?;
        if !lock.is_held() {
            info!(
                "{} is read-only: reading the prepared data {} without its lock {} (nothing can rebuild it there)",
                crate::durable::parent_of(&lock_path).display(),
                dir.display(),
                lock_path.display()
            );
        }
        Ok(lock)
    };
    if mode == Mode::OpenOnly {
        let lock = shared()?;
        return reusable(&dir, &key)?.map(|p| Prepared { lock: Some(lock), ..p }).with_context(|| {
            format!(
                "prepared data {} is missing here or was made from other inputs, though rank 0 has prepared it: every \
                 worker must see the same data.files and data.prepared_dir (with several nodes, on a filesystem \
                 shared by all of them)",
                dir.display()
            )
        });
    }
    {
        let lock = shared()?;
        if let Some(p) = reusable(&dir, &key)? {
            return Ok(Prepared { lock: Some(lock), ..p });
        }
    }
    let exclusive = crate::lock::Lock::exclusive(&lock_path)?.map_err(busy)?;
    if reusable(&dir, &key)?.is_none() {
        build(cfg, tok, show_progress, &dir, key.clone(), files, eval_files, sources, eval_sources, times)?;
    }
    // From writing to reading: another job may rebuild the store in between
    // (for other inputs), which the key then tells.
    drop(exclusive);
    let lock = shared()?;
    let p = Prepared::open(&dir)?;
    if p.manifest.inputs_key != key {
        bail!(
            "prepared data {} was prepared again by another mlm job for other inputs while this one finished \
             preparing it: let one job prepare it at a time, or set data.prepared_dir to another folder",
            dir.display()
        );
    }
    Ok(Prepared { lock: Some(lock), ..p })
}

/// Builds the store `dir` from the inputs (under its exclusive lock).
#[allow(clippy::too_many_arguments)]
fn build(
    cfg: &Config,
    tok: &TextTokenizer,
    show_progress: bool,
    dir: &Path,
    key: String,
    files: Vec<PathBuf>,
    eval_files: Vec<PathBuf>,
    mut sources: Vec<SourceInfo>,
    mut eval_sources: Vec<SourceInfo>,
    mut times: PrepareTimes,
) -> Result<()> {
    let d = &cfg.data;
    check_foreign_files(dir)?;
    // Under the exclusive lock nobody else writes here: leftovers of an
    // interrupted preparation are ours to remove.
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    crate::durable::recover(&crate::durable::parent_of(dir), |n| n == name)?;

    let t0 = Instant::now();
    let total: u64 = sources.iter().chain(&eval_sources).map(|s| s.bytes).sum();
    let pb = if show_progress { Progress::bytes(total, "tokenizing", &cfg.logging) } else { Progress::hidden() };
    let mut manifest = None;
    crate::durable::write_dir_atomically(dir, |tmp| {
        let mut split = SplitWriter::create(tmp, d.block_size, d.held_out_fraction(), d.test_size, d.split_seed)?;
        // The eval files follow the training files through one pipeline: the
        // first of their tokens ends the training part.
        let all: Vec<PathBuf> = files.iter().chain(&eval_files).cloned().collect();
        let counts = tokenize_files(&all, d, tok, &pb, READ_WINDOW, &mut times, |file, ids, starts| {
            if file >= files.len() {
                split.hold_out_rest();
            }
            split.push(ids, starts)
        })?;
        pb.finish();
        for (s, (docs, toks)) in sources.iter_mut().chain(eval_sources.iter_mut()).zip(counts) {
            (s.documents, s.tokens) = (docs, toks);
        }
        let documents: usize = sources.iter().map(|s| s.documents).sum();
        check_corpus(&files, documents, sources.iter().map(|s| s.tokens).sum(), d.block_size)?;
        check_eval_files(&eval_sources, d.block_size)?;
        let written = split.finish()?;
        let hashing = Instant::now();
        let checksums = Some(crate::data::store::checksum_files(tmp)?);
        times.hashing_s += hashing.elapsed().as_secs_f64();
        let eval = written.held_out.map(|part| EvalFiles {
            documents: eval_sources.iter().map(|s| s.documents).sum(),
            sources: std::mem::take(&mut eval_sources),
            tokens: part.tokens,
            words: part.words,
            dropped_tokens: part.dropped_tokens,
        });
        let m = Manifest {
            format_version: FORMAT_VERSION,
            block_size: d.block_size,
            tokenizer_sha256: tok.hash.clone(),
            vocab_size: tok.vocab_size,
            inputs_key: key,
            sources: std::mem::take(&mut sources),
            documents,
            tokens: written.corpus.tokens,
            words: written.corpus.words,
            dropped_tokens: written.corpus.dropped_tokens,
            train_chunks: written.train_chunks,
            test_chunks: written.test_chunks,
            eval,
            checksums,
        };
        let p = tmp.join(MANIFEST);
        crate::durable::write_file(&p, &serde_json::to_vec_pretty(&m)?)?;
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
        eval_files = manifest.eval.as_ref().map_or(0, |e| e.sources.len()),
        tokens_per_s = (manifest.tokens as f64 / secs.max(1e-9)).round(),
        "prepared data at {}",
        dir.display()
    );
    let threads = rayon::current_num_threads();
    info!(
        "prepare took {secs:.2} s: hashing {:.2} s, tokenizing {:.2} s on {threads} threads, waiting for input {:.2} s, \
         writing {:.2} s; serial fraction {:.3} (Amdahl: {:.1}x on 16 cores)",
        times.hashing_s,
        times.tokenizing_s,
        times.waiting_for_input_s,
        times.writing_s,
        times.serial_fraction(threads),
        times.speedup(threads, 16)
    );
    Ok(())
}

/// The documents of `d.files` tokenized and concatenated, cut to a whole number
/// of `d.block_size` chunks (no store on disk: for one-off evaluation). Fails
/// like [`prepare`] on an empty or too small corpus.
pub fn tokenize_to_chunks(d: &DataConfig, tok: &TextTokenizer) -> Result<Vec<u32>> {
    let files = expand_files("data.files", &d.files)?;
    if files.is_empty() {
        bail!("no input files given");
    }
    let mut tokens = Vec::new();
    let mut times = PrepareTimes::default();
    let counts = tokenize_files(&files, d, tok, &Progress::hidden(), READ_WINDOW, &mut times, |_, ids, _| {
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

/// Where the time of a preparation went: the parts that more cores do not
/// shorten, for the serial fraction that bounds its speed-up.
#[derive(Debug, Default, Clone, Copy)]
pub struct PrepareTimes {
    /// Hashing the input files (parallel over files, serial within one).
    pub hashing_s: f64,
    /// Tokenizing, in parallel over the cores.
    pub tokenizing_s: f64,
    /// Waiting for the reader thread (reading, decompressing and cutting the
    /// next window took longer than tokenizing this one).
    pub waiting_for_input_s: f64,
    /// Cutting the tokens into blocks and writing them (serial).
    pub writing_s: f64,
}

impl PrepareTimes {
    /// The fraction of the work that stays serial on `threads` cores (Amdahl's
    /// s, with the parallel part's work counted as `threads` x its wall time).
    pub fn serial_fraction(&self, threads: usize) -> f64 {
        let serial = self.hashing_s + self.waiting_for_input_s + self.writing_s;
        serial / (serial + self.tokenizing_s * threads as f64).max(1e-12)
    }

    /// The speed-up over one core that `cores` would give by Amdahl's law.
    pub fn speedup(&self, threads: usize, cores: usize) -> f64 {
        let s = self.serial_fraction(threads);
        1.0 / (s + (1.0 - s) / cores as f64)
    }
}

/// One window of a file's documents, or the end of file `i`.
enum Piece {
    Window(usize, Documents),
    FileDone(usize),
}

/// Tokenizes the documents of `files` in order and hands the tokens and their
/// word-start marks to `sink`, with the index of their file, a window at a
/// time: a reader thread reads (and decompresses, and cuts) the next window
/// while the cores tokenize this one, and a writer thread hands the previous
/// one to `sink`.
/// Returns each file's (documents, tokens).
fn tokenize_files(
    files: &[PathBuf],
    d: &DataConfig,
    tok: &TextTokenizer,
    pb: &Progress,
    window: usize,
    times: &mut PrepareTimes,
    mut sink: impl FnMut(usize, &[u32], &[bool]) -> Result<()> + Send,
) -> Result<Vec<FileCounts>> {
    let mut counts = vec![(0, 0); files.len()];
    let mut done = 0;
    std::thread::scope(|scope| {
        let (tx, rx) = crossbeam_channel::bounded::<Result<Piece>>(1);
        // The writer: cuts and writes one window's tokens while the cores
        // tokenize the next.
        let (wtx, wrx) = crossbeam_channel::bounded::<(usize, Vec<(Vec<u32>, Vec<bool>)>)>(1);
        let writer = scope.spawn(move || {
            for (file, encoded) in wrx {
                for (ids, s) in &encoded {
                    sink(file, ids, s)?;
                }
            }
            Ok::<_, anyhow::Error>(())
        });
        scope.spawn(move || {
            for (i, file) in files.iter().enumerate() {
                let read = for_each_window(file, d, window, |docs| {
                    tx.send(Ok(Piece::Window(i, docs))).map_err(|_| anyhow::anyhow!("preparation stopped"))
                });
                let sent = match read {
                    Ok(()) => tx.send(Ok(Piece::FileDone(i))),
                    Err(e) => tx.send(Err(e)),
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        loop {
            let t = Instant::now();
            let Ok(piece) = rx.recv() else { break };
            times.waiting_for_input_s += t.elapsed().as_secs_f64();
            match piece? {
                Piece::FileDone(i) => {
                    done += std::fs::metadata(&files[i]).map(|m| m.len()).unwrap_or(0);
                    pb.set(done);
                }
                Piece::Window(i, docs) => {
                    let t = Instant::now();
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
                        .with_context(|| format!("cannot tokenize {}", files[i].display()))?;
                    times.tokenizing_s += t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    counts[i].0 += docs.len();
                    drop(docs);
                    counts[i].1 += encoded.iter().map(|(ids, _)| ids.len()).sum::<usize>();
                    // Waiting here is the part of writing that tokenizing did not hide.
                    let sent = wtx.send((i, encoded));
                    times.writing_s += t.elapsed().as_secs_f64();
                    if sent.is_err() {
                        break;
                    }
                }
            }
        }
        drop(wtx);
        let t = Instant::now();
        let written = writer.join().map_err(|_| anyhow::anyhow!("the store writer panicked"))?;
        times.writing_s += t.elapsed().as_secs_f64();
        written
    })?;
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

/// Refuses an eval file that is also a training file, by path or by contents:
/// its perplexity would measure text the model was trained on.
fn check_disjoint(sources: &[SourceInfo], eval_sources: &[SourceInfo]) -> Result<()> {
    for e in eval_sources {
        if let Some(s) = sources.iter().find(|s| s.path == e.path) {
            bail!(
                "data.eval_files: {} is also in data.files: a file evaluated on must not be trained on; remove it from \
                 data.files (or from data.eval_files)",
                s.path.display()
            );
        }
        if let Some(s) = sources.iter().find(|s| s.sha256 == e.sha256 && e.bytes > 0) {
            bail!(
                "data.eval_files: {} has the same contents as {} of data.files: a text evaluated on must not be \
                 trained on; remove one of them",
                e.path.display(),
                s.path.display()
            );
        }
    }
    Ok(())
}

/// The errors of eval files that hold no text, or too little for one block.
fn check_eval_files(eval_sources: &[SourceInfo], block_size: usize) -> Result<()> {
    if let Some(s) = eval_sources.iter().find(|s| s.documents == 0 || s.tokens == 0) {
        bail!("data.eval_files: no text found in {}", s.path.display());
    }
    let tokens: usize = eval_sources.iter().map(|s| s.tokens).sum();
    if !eval_sources.is_empty() && tokens < block_size {
        let paths: Vec<PathBuf> = eval_sources.iter().map(|s| s.path.clone()).collect();
        bail!(
            "data.eval_files ({}) hold {tokens} tokens, fewer than one block of data.block_size = {block_size}: add \
             text to them or lower data.block_size",
            list_files(&paths)
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
fn inputs_key(d: &DataConfig, tok: &TextTokenizer, sources: &[SourceInfo], eval_sources: &[SourceInfo]) -> String {
    let key = inputs_key_of_format(d, tok, sources, FORMAT_VERSION);
    if eval_sources.is_empty() {
        return key;
    }
    // The eval files in place of the split settings, which then shape nothing.
    let eval: Vec<_> = eval_sources.iter().map(|s| (&s.path, s.bytes, &s.sha256)).collect();
    let v = serde_json::json!({ "inputs_key": key, "eval_files": eval });
    hex(&Sha256::digest(v.to_string().as_bytes()))
}

/// The store key that `mlm` of store format `version` gave these inputs: a
/// checkpoint's key from before a format change is recognised as the same
/// inputs (see [`older_format_of`]).
fn inputs_key_of_format(d: &DataConfig, tok: &TextTokenizer, sources: &[SourceInfo], version: u32) -> String {
    let files: Vec<_> = sources.iter().map(|s| (&s.path, s.bytes, &s.sha256)).collect();
    let mut v = serde_json::json!({
        "format_version": version,
        "files": files,
        "format": d.format,
        "text_field": d.text_field,
        "document_boundary": d.document_boundary,
        "block_size": d.block_size,
        "test_fraction": d.held_out_fraction(),
        "split_seed": d.split_seed,
        "tokenizer_sha256": tok.hash,
    });
    // Since format 4 (the cap on the test split).
    if version >= 4 {
        v["test_size"] = serde_json::json!(d.test_size);
    }
    // Only when set, so stores made before the key existed keep their identity.
    if let Some(sep) = &d.separator {
        v["separator"] = serde_json::json!(sep);
    }
    // Only when it can change the text, so stores made before the key existed
    // keep their identity.
    if d.invalid_utf8 != crate::config::InvalidUtf8::Error {
        v["invalid_utf8"] = serde_json::json!(d.invalid_utf8);
    }
    hex(&Sha256::digest(v.to_string().as_bytes()))
}

/// What changed in the store with each format, for the message of a resume
/// from a checkpoint trained on an older one.
const FORMAT_CHANGES: [(u32, &str); 3] = [
    (2, "word starts stored beside the tokens"),
    (3, "the train/test split decided per block, by a hash"),
    (4, "data.test_size caps the test split"),
];

/// The store format whose key for these inputs is `key`, when it is an older
/// one than this `mlm` writes.
fn older_format_of(
    key: &str,
    d: &DataConfig,
    tok: &TextTokenizer,
    sources: &[SourceInfo],
    eval_sources: &[SourceInfo],
) -> Option<u32> {
    // Stores of older formats never held eval files.
    if !eval_sources.is_empty() {
        return None;
    }
    (1..FORMAT_VERSION).rev().find(|&v| inputs_key_of_format(d, tok, sources, v) == key)
}

/// The refusal (or, with `checkpoint.allow_config_change`, the warning) for a
/// checkpoint whose data key `want` is not the inputs' key `key`.
fn changed_data(
    want: &str,
    key: &str,
    cfg: &Config,
    tok: &TextTokenizer,
    sources: &[SourceInfo],
    eval_sources: &[SourceInfo],
) -> Result<()> {
    let what = match older_format_of(want, &cfg.data, tok, sources, eval_sources) {
        Some(v) => {
            let changes: Vec<&str> = FORMAT_CHANGES.iter().filter(|(f, _)| *f > v).map(|(_, c)| *c).collect();
            format!(
                "the checkpoint to resume was trained on these same inputs, prepared by an older mlm (store format \
                 {v}; this one writes format {FORMAT_VERSION}: {}), and the new store splits them otherwise",
                changes.join("; ")
            )
        }
        None => "the checkpoint to resume was trained on other data (data.files or data.eval_files, their \
                 contents, the tokenizer or the data settings changed since)"
            .to_string(),
    };
    if !cfg.checkpoint.allow_config_change {
        bail!(
            "{what}: restore the inputs, start a new training.output_dir, or set checkpoint.allow_config_change = \
             true to resume on the new data (prepared again, another split)"
        );
    }
    warn!("{what}; resuming on the new data (checkpoint.allow_config_change = true; data key {want} -> {key})");
    Ok(())
}

fn list_files(files: &[PathBuf]) -> String {
    let mut s: Vec<String> = files.iter().take(3).map(|f| f.display().to_string()).collect();
    if files.len() > 3 {
        s.push(format!("and {} more files", files.len() - 3));
    }
    s.join(", ")
}

/// The store at `dir` when it was made from `key`, else `None` (with a line
/// saying why it is prepared again). A store made from `key` whose files no
/// longer match their checksums is an error: it was changed after it was
/// prepared, and the user decides what happens to it.
fn reusable(dir: &Path, key: &str) -> Result<Option<Prepared>> {
    if !dir.join(MANIFEST).exists() {
        return Ok(None);
    }
    match Prepared::open(dir) {
        Ok(p) if p.manifest.inputs_key == key => {
            p.verify()?;
            info!("reusing prepared data at {}", dir.display());
            Ok(Some(p))
        }
        Ok(_) => {
            info!("inputs or data settings changed: preparing {} again", dir.display());
            Ok(None)
        }
        Err(e) => {
            warn!("prepared data at {} is unusable ({e:#}): preparing again", dir.display());
            Ok(None)
        }
    }
}

/// Where the token store of `cfg` lives: `data.prepared_dir` (default
/// `<output_dir>/data`), or, when that is a symbolic link to a folder (a
/// cluster's scratch space), the folder it points to: the store is then locked,
/// built and swapped there, beside its real place, and the link stays.
pub fn store_dir(cfg: &Config) -> Result<PathBuf> {
    let dir = cfg.prepared_dir();
    if !crate::durable::is_link(&dir) {
        return Ok(dir);
    }
    match std::fs::canonicalize(&dir) {
        Ok(real) if real.is_dir() => Ok(real),
        _ => bail!(
            "data.prepared_dir {} is a symbolic link to {}, which is not a folder: create that folder, or set \
             data.prepared_dir to a folder",
            dir.display(),
            std::fs::read_link(&dir).unwrap_or_default().display()
        ),
    }
}

/// Refuses to rebuild a store whose folder holds files the store does not
/// write: the rebuild replaces the folder, which would delete them.
fn check_foreign_files(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    let mut foreign: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !STORE_FILES.contains(&n.as_str()))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    bail!(
        "prepared data {} must be prepared again (other inputs or settings, or damaged), but the folder also holds \
         files that are not the store's ({}): preparing replaces the whole folder and would delete them; move them \
         out, or set data.prepared_dir to another folder",
        dir.display(),
        foreign.join(", ")
    )
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
mod tests;
