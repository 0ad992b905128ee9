//! The train/test split of a token store, written as the chunks come: each
//! chunk's side is a hash of (`split_seed`, chunk index), so `prepare` needs
//! neither the chunk count nor the tokens of the corpus to place a chunk.
//!
//! `data.test_size` caps the test side: of the chunks the hash puts in test,
//! the `test_size` with the smallest hashes stay there (a uniform sample of
//! them, whatever the corpus order) and the others go to train. The candidates
//! are held in memory until the end (at most `test_size` chunks).
//!
//! With `data.eval_files` the test side is those files instead: after the
//! training files' tokens, [`SplitWriter::hold_out_rest`] ends their last
//! (incomplete) chunk, and every chunk cut from the tokens that follow is a
//! test chunk, cut the same way.
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::rng::hash_words;
use super::store::{pack_word_starts, word_bytes, TEST_FILE, TRAIN_FILE, WORDS_EXT};

/// Stream id separating the split hash from other uses of `split_seed`.
const SPLIT_STREAM: u64 = 0x0053_504C_4954; // "SPLIT"

/// Whether chunk `i` is a test chunk: a hash of (`seed`, `i`) below
/// `test_fraction` of the hash range. Each chunk's side is known as soon as it
/// is cut, without the chunk count, so the store is written as the tokens come;
/// about `n * test_fraction` of `n` chunks are test chunks.
pub fn is_test_chunk(i: u64, test_fraction: f64, seed: u64) -> bool {
    test_fraction > 0.0 && (chunk_hash(i, seed) as f64) < test_fraction * 2f64.powi(64)
}

fn chunk_hash(i: u64, seed: u64) -> u64 {
    hash_words(&[seed, SPLIT_STREAM, i])
}

pub use crate::config::MAX_TEST_TOKENS;

/// The chunk ids `0..n` of (train, test) in the order [`SplitWriter`] writes
/// them: chunk `i` is in test when [`is_test_chunk`], and of those only the
/// `test_size` with the smallest hashes (0: no cap), in ascending order; train
/// holds the others ascending, except that a test chunk pushed out by the cap
/// follows the chunk that pushed it out. With a positive fraction at least one
/// chunk is in test and one in train: when a side is empty, its other side's
/// last chunk moves to it.
pub fn split_chunks(n: usize, test_fraction: f64, test_size: usize, seed: u64) -> Result<(Vec<u32>, Vec<u32>)> {
    check_split(n, test_fraction)?;
    let (mut train, mut test) = (Vec::new(), Vec::new());
    let mut held = BinaryHeap::new();
    for i in 0..n as u32 {
        if !is_test_chunk(i as u64, test_fraction, seed) {
            train.push(i);
        } else if test_size == 0 {
            test.push(i);
        } else {
            held.push((chunk_hash(i as u64, seed), i));
            if held.len() > test_size {
                train.extend(held.pop().map(|(_, i)| i));
            }
        }
    }
    let mut kept: Vec<u32> = held.into_iter().map(|(_, i)| i).collect();
    kept.sort_unstable();
    if train.is_empty() {
        train.extend(kept.pop());
    }
    test.extend(kept);
    if test_fraction > 0.0 {
        if test.is_empty() {
            test.extend(train.pop());
        } else if train.is_empty() {
            train.extend(test.pop());
        }
    }
    Ok((train, test))
}

fn check_split(n: usize, test_fraction: f64) -> Result<()> {
    if n > u32::MAX as usize {
        bail!("corpus makes {n} chunks, more than 2^32: raise data.block_size");
    }
    if test_fraction > 0.0 && n < 2 {
        bail!(
            "corpus makes {n} chunk of data.block_size tokens, but a train/test split (data.test_fraction = {test_fraction}) needs at least 2: add text, lower data.block_size, or evaluate on files of your own (data.eval_files)"
        );
    }
    Ok(())
}

/// Writes the store's chunk files as the tokens come: each `block_size` chunk
/// goes to `train.tokens` or `test.tokens` (its word marks beside it) as
/// [`split_chunks`] says, or, after [`Self::hold_out_rest`], to `test.tokens`.
/// Holds one incomplete chunk at most.
pub struct SplitWriter {
    block_size: usize,
    test_fraction: f64,
    /// At most this many test chunks (0: no cap).
    test_size: usize,
    seed: u64,
    /// With a cap: the test chunks so far, the largest hash on top.
    candidates: BinaryHeap<Candidate>,
    train: ChunkFile,
    test: ChunkFile,
    /// The incomplete chunk.
    ids: Vec<u32>,
    starts: Vec<bool>,
    chunks: u64,
    /// Tokens and word starts seen (since [`Self::hold_out_rest`] when it was
    /// called), the incomplete chunk included.
    tokens: usize,
    words: usize,
    /// The training files' part, once [`Self::hold_out_rest`] ended it: every
    /// chunk since is a test chunk.
    corpus: Option<Part>,
}

/// The tokens of one part of the store: the training files, or the files held
/// out whole (`data.eval_files`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub tokens: usize,
    pub words: usize,
    /// Tokens of the part's incomplete last chunk, dropped (as HF `group_texts`).
    pub dropped_tokens: usize,
}

/// What [`SplitWriter::finish`] wrote.
pub struct Written {
    /// The tokens pushed before [`SplitWriter::hold_out_rest`] (all of them
    /// when it was not called).
    pub corpus: Part,
    /// The tokens pushed after it.
    pub held_out: Option<Part>,
    pub train_chunks: usize,
    pub test_chunks: usize,
}

impl SplitWriter {
    pub fn create(dir: &Path, block_size: usize, test_fraction: f64, test_size: usize, seed: u64) -> Result<Self> {
        Ok(Self {
            block_size,
            test_fraction,
            test_size,
            seed,
            candidates: BinaryHeap::new(),
            train: ChunkFile::create(&dir.join(TRAIN_FILE))?,
            test: ChunkFile::create(&dir.join(TEST_FILE))?,
            ids: Vec::with_capacity(block_size),
            starts: Vec::with_capacity(block_size),
            chunks: 0,
            tokens: 0,
            words: 0,
            corpus: None,
        })
    }

    /// Ends the training files' part (its incomplete chunk is dropped): the
    /// tokens pushed from now on are cut into test chunks, all of them. Once
    /// only; later calls do nothing. Only with a zero `test_fraction`.
    pub fn hold_out_rest(&mut self) {
        assert_eq!(self.test_fraction, 0.0, "held-out files and a test fraction");
        if self.corpus.is_some() {
            return;
        }
        self.corpus = Some(self.part());
        (self.tokens, self.words) = (0, 0);
        self.ids.clear();
        self.starts.clear();
    }

    fn part(&self) -> Part {
        Part { tokens: self.tokens, words: self.words, dropped_tokens: self.ids.len() }
    }

    /// Appends the next tokens of the corpus and their word-start marks.
    pub fn push(&mut self, mut ids: &[u32], mut starts: &[bool]) -> Result<()> {
        let bs = self.block_size;
        self.tokens += ids.len();
        self.words += starts.iter().filter(|&&s| s).count();
        if !self.ids.is_empty() {
            let k = (bs - self.ids.len()).min(ids.len());
            self.ids.extend_from_slice(&ids[..k]);
            self.starts.extend_from_slice(&starts[..k]);
            (ids, starts) = (&ids[k..], &starts[k..]);
            if self.ids.len() < bs {
                return Ok(());
            }
            let (a, b) = (std::mem::take(&mut self.ids), std::mem::take(&mut self.starts));
            self.write_chunk(&a, &b)?;
            (self.ids, self.starts) = (a, b);
            self.ids.clear();
            self.starts.clear();
        }
        while ids.len() >= bs {
            self.write_chunk(&ids[..bs], &starts[..bs])?;
            (ids, starts) = (&ids[bs..], &starts[bs..]);
        }
        self.ids.extend_from_slice(ids);
        self.starts.extend_from_slice(starts);
        Ok(())
    }

    fn write_chunk(&mut self, ids: &[u32], starts: &[bool]) -> Result<()> {
        let i = self.chunks;
        self.chunks += 1;
        if self.corpus.is_some() {
            return self.test.write(ids.iter().flat_map(|t| t.to_le_bytes()), starts);
        }
        if !is_test_chunk(i, self.test_fraction, self.seed) {
            return self.train.write(ids.iter().flat_map(|t| t.to_le_bytes()), starts);
        }
        if self.test_size == 0 {
            return self.test.write(ids.iter().flat_map(|t| t.to_le_bytes()), starts);
        }
        self.candidates.push(Candidate {
            hash: chunk_hash(i, self.seed),
            index: i,
            ids: ids.to_vec(),
            starts: starts.to_vec(),
        });
        if self.candidates.len() > self.test_size {
            let out = self.candidates.pop().expect("more candidates than the cap");
            self.train.write(out.ids.iter().flat_map(|t| t.to_le_bytes()), &out.starts)?;
        }
        Ok(())
    }

    /// Drops the incomplete chunk, gives an empty side the last chunk (see
    /// [`split_chunks`]) and syncs the files.
    pub fn finish(mut self) -> Result<Written> {
        check_split(self.chunks as usize, self.test_fraction)?;
        let mut kept = std::mem::take(&mut self.candidates).into_vec();
        kept.sort_unstable_by_key(|c| c.index);
        if self.train.chunks == 0 && !kept.is_empty() {
            let last = kept.pop().expect("not empty");
            self.train.write(last.ids.iter().flat_map(|t| t.to_le_bytes()), &last.starts)?;
        }
        for c in kept {
            self.test.write(c.ids.iter().flat_map(|t| t.to_le_bytes()), &c.starts)?;
        }
        if self.test_fraction > 0.0 {
            if self.test.chunks == 0 {
                self.train.move_last_to(&mut self.test, self.block_size)?;
            } else if self.train.chunks == 0 {
                self.test.move_last_to(&mut self.train, self.block_size)?;
            }
        }
        let (corpus, held_out) = match self.corpus {
            Some(corpus) => (corpus, Some(self.part())),
            None => (self.part(), None),
        };
        let written = Written { corpus, held_out, train_chunks: self.train.chunks, test_chunks: self.test.chunks };
        self.train.close()?;
        self.test.close()?;
        Ok(written)
    }
}

/// A test chunk held while a cap may still send it to train.
struct Candidate {
    hash: u64,
    index: u64,
    ids: Vec<u32>,
    starts: Vec<bool>,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        (self.hash, self.index) == (other.hash, other.index)
    }
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.hash, self.index).cmp(&(other.hash, other.index))
    }
}

/// One `.tokens` file and its `.words` file, being written.
struct ChunkFile {
    path: PathBuf,
    tokens: BufWriter<File>,
    words: BufWriter<File>,
    chunks: usize,
    buf: Vec<u8>,
}

impl ChunkFile {
    fn create(path: &Path) -> Result<Self> {
        let open = |p: &Path| {
            let f =
                crate::durable::open_run_file(p, File::options().read(true).write(true).create(true).truncate(true));
            Ok::<_, anyhow::Error>(BufWriter::with_capacity(1 << 20, f?))
        };
        let words = path.with_extension(WORDS_EXT);
        Ok(Self { path: path.to_path_buf(), tokens: open(path)?, words: open(&words)?, chunks: 0, buf: Vec::new() })
    }

    fn context(&self) -> String {
        format!("cannot write {}", self.path.display())
    }

    /// Appends one chunk: its token bytes and its word-start marks.
    fn write(&mut self, bytes: impl Iterator<Item = u8>, starts: &[bool]) -> Result<()> {
        self.buf.clear();
        self.buf.extend(bytes);
        self.tokens.write_all(&self.buf).with_context(|| self.context())?;
        self.buf.clear();
        pack_word_starts(starts, &mut self.buf);
        self.words.write_all(&self.buf).with_context(|| self.context())?;
        self.chunks += 1;
        Ok(())
    }

    /// Moves this file's last chunk to the end of `to`.
    fn move_last_to(&mut self, to: &mut ChunkFile, block_size: usize) -> Result<()> {
        let k = self.chunks as u64 - 1;
        let mut moved = Vec::new();
        for (w, size) in [(&mut self.tokens, block_size as u64 * 4), (&mut self.words, word_bytes(block_size) as u64)] {
            w.flush()?;
            let mut bytes = vec![0; size as usize];
            w.get_ref().read_exact_at(&mut bytes, k * size)?;
            w.get_ref().set_len(k * size)?;
            w.seek(SeekFrom::End(0))?;
            moved.push(bytes);
        }
        self.chunks -= 1;
        to.tokens.write_all(&moved[0]).with_context(|| to.context())?;
        to.words.write_all(&moved[1]).with_context(|| to.context())?;
        to.chunks += 1;
        Ok(())
    }

    /// Flushes and fsyncs both files.
    fn close(self) -> Result<()> {
        for w in [self.tokens, self.words] {
            let file = w
                .into_inner()
                .map_err(|e| e.into_error())
                .with_context(|| format!("cannot write {}", self.path.display()))?;
            file.sync_all().with_context(|| format!("cannot sync {}", self.path.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_disjoint_and_sorted() {
        let (train, test) = split_chunks(1000, 0.05, 0, 42).unwrap();
        assert_eq!(train.len() + test.len(), 1000);
        assert_eq!(split_chunks(1000, 0.05, 0, 42).unwrap(), (train.clone(), test.clone()));
        assert_ne!(split_chunks(1000, 0.05, 0, 43).unwrap().1, test);
        assert!(train.windows(2).all(|w| w[0] < w[1]) && test.windows(2).all(|w| w[0] < w[1]));
        let mut all: Vec<u32> = train.iter().chain(&test).copied().collect();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        // Each chunk's side depends on its index alone: a longer corpus keeps
        // the split of the chunks it shares with a shorter one.
        let (train2, _) = split_chunks(2000, 0.05, 0, 42).unwrap();
        assert_eq!(train2.iter().take_while(|&&i| i < 1000).copied().collect::<Vec<_>>(), train);
        assert!(split_chunks(5, 0.0, 0, 1).unwrap().1.is_empty());
        assert!(split_chunks(1, 0.1, 0, 1).unwrap_err().to_string().contains("needs at least 2"));
        assert_eq!(split_chunks(1, 0.0, 0, 1).unwrap(), (vec![0], vec![]));
    }

    #[test]
    fn split_fraction_holds_within_tolerance() {
        let n = 100_000;
        for (fraction, seed) in [(0.05, 42), (0.1, 7), (0.01, 1), (0.5, 3)] {
            let test = split_chunks(n, fraction, 0, seed).unwrap().1.len() as f64;
            // Binomial: 5 standard deviations.
            let sd = (n as f64 * fraction * (1.0 - fraction)).sqrt();
            assert!((test - n as f64 * fraction).abs() < 5.0 * sd, "{fraction}: {test} test chunks of {n}");
        }
    }

    #[test]
    fn test_size_caps_the_test_side_with_the_smallest_hashes() {
        let (train, test) = split_chunks(100_000, 0.05, 50, 9).unwrap();
        assert_eq!((train.len(), test.len()), (99_950, 50));
        let (_, uncapped) = split_chunks(100_000, 0.05, 0, 9).unwrap();
        let mut by_hash = uncapped.clone();
        by_hash.sort_by_key(|&i| chunk_hash(i as u64, 9));
        let mut want = by_hash[..50].to_vec();
        want.sort_unstable();
        assert_eq!(test, want);
        // A sample of the whole corpus, not of its start.
        assert!(test.iter().any(|&i| i > 50_000) && test.iter().any(|&i| i < 50_000), "{test:?}");
        // A cap above the fraction's count changes nothing.
        assert_eq!(split_chunks(1000, 0.05, 10_000, 9).unwrap(), split_chunks(1000, 0.05, 0, 9).unwrap());
        // Every chunk test-hashed and under the cap: the last one trains.
        assert_eq!(split_chunks(3, 0.999_999, 5, 1).unwrap(), (vec![2], vec![0, 1]));
    }

    #[test]
    fn split_keeps_a_test_and_a_train_chunk() {
        // A tiny fraction of few chunks draws no test chunk: the last one moves.
        for seed in 0..50 {
            let (train, test) = split_chunks(3, 0.001, 0, seed).unwrap();
            assert_eq!(test.len(), (0..3).filter(|&i| is_test_chunk(i, 0.001, seed)).count().max(1));
            assert!(!train.is_empty());
            let (train, test) = split_chunks(2, 0.999, 0, seed).unwrap();
            assert_eq!((train.len(), test.len()), (1, 1));
        }
        assert_eq!(split_chunks(3, 1e-9, 0, 1).unwrap(), (vec![0, 1], vec![2]));
    }
}
