//! The prepared token store: `train.tokens` / `test.tokens` (little-endian
//! `u32`, one fixed-size chunk after another), beside each its word-start marks
//! `train.words` / `test.words` (one bit per token, see [`WordStarts`]), and
//! `manifest.json`.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Version of the on-disk layout; bumped on incompatible changes
/// (2: word-start marks beside the tokens; 3: each chunk's train/test side a
/// hash of (split seed, chunk), so the store is written as the tokens come;
/// 4: `data.test_size` caps the test split).
pub const FORMAT_VERSION: u32 = 4;
/// File names inside the prepared directory.
pub const MANIFEST: &str = "manifest.json";
pub const TRAIN_FILE: &str = "train.tokens";
pub const TEST_FILE: &str = "test.tokens";
/// Extension of the word-start file beside a `.tokens` file.
pub const WORDS_EXT: &str = "words";
/// Every file a store holds: a rebuild replaces these and nothing else.
pub const STORE_FILES: [&str; 5] = [MANIFEST, TRAIN_FILE, TEST_FILE, "train.words", "test.words"];

/// The files of a store that `manifest.json` holds checksums of.
pub const CHECKSUMMED_FILES: [&str; 4] = [TRAIN_FILE, "train.words", TEST_FILE, "test.words"];

/// SHA-256 of each of [`CHECKSUMMED_FILES`] in `dir`.
pub fn checksum_files(dir: &Path) -> Result<BTreeMap<String, String>> {
    CHECKSUMMED_FILES.iter().map(|f| Ok((f.to_string(), crate::durable::sha256_file(&dir.join(f))?))).collect()
}

/// One input file as it was prepared.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceInfo {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub documents: usize,
    /// Tokens of this file's documents, special tokens included.
    pub tokens: usize,
}

/// `manifest.json`: what the store holds and what it was made from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub block_size: usize,
    pub tokenizer_sha256: String,
    pub vocab_size: usize,
    /// SHA-256 over every setting and input that shapes the store: the prepared
    /// data is reused only when this matches.
    pub inputs_key: String,
    /// The training files (`data.files`); the counts below are theirs.
    pub sources: Vec<SourceInfo>,
    pub documents: usize,
    /// Tokens before chunking.
    pub tokens: usize,
    /// Words before chunking (tokens that start a word, special tokens
    /// included): `tokens / words` is the mean word length in tokens.
    pub words: usize,
    /// Tokens of the incomplete last chunk, dropped (as HF `group_texts`).
    pub dropped_tokens: usize,
    pub train_chunks: usize,
    pub test_chunks: usize,
    /// With `data.eval_files`: those files, whose blocks are the test chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalFiles>,
    /// SHA-256 of each file of the store ([`CHECKSUMMED_FILES`]: all but the manifest), taken when it was
    /// prepared and checked whenever it is reused. Absent in stores prepared
    /// before it existed (accepted with a warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksums: Option<BTreeMap<String, String>>,
}

/// `data.eval_files` as prepared: read, tokenized, concatenated and cut like
/// the training files, every block a test chunk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalFiles {
    pub sources: Vec<SourceInfo>,
    pub documents: usize,
    pub tokens: usize,
    pub words: usize,
    pub dropped_tokens: usize,
}

impl Manifest {
    /// Reads `<dir>/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let m: Manifest =
            serde_json::from_str(&text).with_context(|| format!("{} is not a valid manifest", p.display()))?;
        if m.format_version != FORMAT_VERSION {
            bail!(
                "{}: format_version {} (expected {FORMAT_VERSION}); prepare the data again",
                p.display(),
                m.format_version
            );
        }
        Ok(m)
    }
}

enum Backing {
    Map(memmap2::Mmap),
    /// Tokens in memory: from [`TokenStore::from_tokens`], or where the mapping cannot be viewed as `u32` in place (big-endian
    /// hosts, or a misaligned map, which mmap never gives in practice).
    Owned(Vec<u32>),
}

/// Bytes of word-start marks per chunk: one bit per token, each chunk padded
/// to whole bytes so that chunk `i`'s marks start at byte `i * word_bytes`.
pub fn word_bytes(block_size: usize) -> usize {
    block_size.div_ceil(8)
}

/// The word-start marks of one chunk: bit `p % 8` (least significant first) of
/// byte `p / 8` is set when token `p` starts a word. The first token of a chunk
/// always counts as a word start, also when it continues a word of the
/// previous chunk, so a chunk's words are complete within it.
#[derive(Debug, Clone, Copy)]
pub struct WordStarts<'a> {
    bits: &'a [u8],
    len: usize,
}

impl<'a> WordStarts<'a> {
    /// Marks over packed `bits` for `len` tokens.
    pub fn new(bits: &'a [u8], len: usize) -> Self {
        assert!(bits.len() >= len.div_ceil(8), "WordStarts: {} bytes for {len} tokens", bits.len());
        Self { bits, len }
    }

    /// Whether token `pos` starts a word (panics when out of range).
    pub fn get(&self, pos: usize) -> bool {
        assert!(pos < self.len, "WordStarts: position {pos} of {}", self.len);
        (self.bits[pos / 8] >> (pos % 8)) & 1 == 1
    }

    /// Tokens covered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is covered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Packs one chunk's marks (`starts[0]` is stored as set, see [`WordStarts`]).
pub fn pack_word_starts(starts: &[bool], out: &mut Vec<u8>) {
    let base = out.len();
    out.resize(base + word_bytes(starts.len()), 0);
    for (p, &s) in starts.iter().enumerate() {
        if s || p == 0 {
            out[base + p / 8] |= 1 << (p % 8);
        }
    }
}

/// One memory-mapped `.tokens` file, viewed as chunks of `block_size` ids,
/// with the word-start marks of its `.words` file when there is one.
pub struct TokenStore {
    backing: Backing,
    /// The packed marks of every chunk, `word_bytes(block_size)` per chunk.
    words: Option<WordBacking>,
    block_size: usize,
    path: PathBuf,
}

enum WordBacking {
    Map(memmap2::Mmap),
    /// An empty file cannot be mapped.
    Empty,
}

impl WordBacking {
    fn bytes(&self) -> &[u8] {
        match self {
            WordBacking::Map(m) => &m[..],
            WordBacking::Empty => &[],
        }
    }
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenStore({}, {} chunks of {})", self.path.display(), self.len(), self.block_size)
    }
}

impl TokenStore {
    /// Maps `path`; its length must be a whole number of chunks. The word-start
    /// marks are mapped from the file beside it with the extension `.words`
    /// when it exists; it must hold as many chunks.
    pub fn open(path: &Path, block_size: usize) -> Result<Self> {
        assert!(block_size > 0, "block_size must be positive");
        let file = File::open(path).with_context(|| format!("cannot open token file {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len() as usize;
        if !len.is_multiple_of(block_size * 4) {
            bail!(
                "{}: {len} bytes is not a whole number of {block_size}-token chunks (truncated or wrong block_size); prepare the data again",
                path.display()
            );
        }
        // SAFETY: the store is written once into a fresh directory and then only
        // read; replacing it renames directories, which leaves this inode intact.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let aligned = (map.as_ptr() as usize).is_multiple_of(std::mem::align_of::<u32>());
        let backing = if cfg!(target_endian = "little") && aligned {
            Backing::Map(map)
        } else {
            Backing::Owned(map.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect())
        };
        let chunks = len / (block_size * 4);
        let words = Self::open_words(&path.with_extension(WORDS_EXT), chunks * word_bytes(block_size))?;
        Ok(Self { backing, words, block_size, path: path.to_path_buf() })
    }

    fn open_words(path: &Path, expected: usize) -> Result<Option<WordBacking>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open word-start file {}", path.display())),
        };
        let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len() as usize;
        if len != expected {
            bail!(
                "{}: {len} bytes of word-start marks where its tokens need {expected} (truncated?); prepare the data again",
                path.display()
            );
        }
        if len == 0 {
            return Ok(Some(WordBacking::Empty));
        }
        // SAFETY: as for the token file.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        Ok(Some(WordBacking::Map(map)))
    }

    /// An in-memory store over `tokens` (the incomplete last chunk is dropped),
    /// for one-off evaluation without a prepared directory. It has no word-start
    /// marks: whole-word masking over it masks single tokens.
    pub fn from_tokens(mut tokens: Vec<u32>, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        tokens.truncate(tokens.len() / block_size * block_size);
        Self { backing: Backing::Owned(tokens), words: None, block_size, path: PathBuf::from("<memory>") }
    }

    fn tokens(&self) -> &[u32] {
        match &self.backing {
            // SAFETY: little-endian host, 4-byte aligned pointer, length in bytes
            // a multiple of 4 (checked in `open`), and every bit pattern is a u32.
            Backing::Map(m) => unsafe { std::slice::from_raw_parts(m.as_ptr() as *const u32, m.len() / 4) },
            Backing::Owned(v) => v,
        }
    }

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.tokens().len() / self.block_size
    }

    /// Whether the store holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens per chunk.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The file this store maps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Chunk `i` (panics when out of range).
    pub fn chunk(&self, i: usize) -> &[u32] {
        &self.tokens()[i * self.block_size..(i + 1) * self.block_size]
    }

    /// Whether the store has word-start marks.
    pub fn has_word_starts(&self) -> bool {
        self.words.is_some()
    }

    /// The word-start marks of chunk `i`, when the store has them (panics when
    /// out of range).
    pub fn word_starts(&self, i: usize) -> Option<WordStarts<'_>> {
        assert!(i < self.len(), "chunk {i} of {}", self.len());
        let w = word_bytes(self.block_size);
        self.words.as_ref().map(|b| WordStarts::new(&b.bytes()[i * w..(i + 1) * w], self.block_size))
    }
}

/// Writes `chunks` (each `block_size` long) to `path` as little-endian `u32`
/// and fsyncs the file.
pub fn write_tokens<'a>(path: &Path, chunks: impl IntoIterator<Item = &'a [u32]>) -> Result<()> {
    let file = crate::durable::create_run_file(path)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    for c in chunks {
        buf.clear();
        buf.extend(c.iter().flat_map(|t| t.to_le_bytes()));
        w.write_all(&buf).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let file =
        w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all().with_context(|| format!("cannot sync {}", path.display()))
}

/// Writes the word-start marks of `chunks` (each `block_size` long) to `path`
/// (see [`WordStarts`]) and fsyncs the file.
pub fn write_word_starts<'a>(path: &Path, chunks: impl IntoIterator<Item = &'a [bool]>) -> Result<()> {
    let file = crate::durable::create_run_file(path)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    for c in chunks {
        buf.clear();
        pack_word_starts(c, &mut buf);
        w.write_all(&buf).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let file =
        w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all().with_context(|| format!("cannot sync {}", path.display()))
}

/// A prepared directory, opened. The stores are shared (`Arc`) so masker
/// threads can hold them.
#[derive(Debug)]
pub struct Prepared {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub train: Arc<TokenStore>,
    pub test: Arc<TokenStore>,
    /// The store's shared lock, held while this job reads it (from
    /// [`crate::data::prepare`]): no other job rebuilds the store meanwhile.
    pub lock: Option<crate::lock::Lock>,
}

impl Prepared {
    /// Opens `<dir>/manifest.json`, both token files and their word-start
    /// marks, checking their chunk counts against the manifest.
    pub fn open(dir: &Path) -> Result<Prepared> {
        let manifest = Manifest::read(dir)?;
        let train = TokenStore::open(&dir.join(TRAIN_FILE), manifest.block_size)?;
        let test = TokenStore::open(&dir.join(TEST_FILE), manifest.block_size)?;
        for s in [&train, &test] {
            if !s.has_word_starts() {
                let p = s.path().with_extension(WORDS_EXT);
                bail!("{}: missing (word-start marks of {}); prepare the data again", p.display(), s.path().display());
            }
        }
        if train.len() != manifest.train_chunks || test.len() != manifest.test_chunks {
            bail!(
                "{}: token files hold {}/{} train/test chunks, the manifest says {}/{}; prepare the data again",
                dir.display(),
                train.len(),
                test.len(),
                manifest.train_chunks,
                manifest.test_chunks
            );
        }
        Ok(Prepared { dir: dir.to_path_buf(), manifest, train: Arc::new(train), test: Arc::new(test), lock: None })
    }

    /// Checks the token and word-start files against the checksums the
    /// manifest took at preparation: a file changed since (a flipped token
    /// would give another loss and perplexity, silently) is refused, naming it.
    /// A store prepared before checksums is accepted with a warning. Reads the
    /// whole store once (SHA-256 runs at about 1-2 GB/s with SHA extensions).
    pub fn verify(&self) -> Result<()> {
        let Some(sums) = &self.manifest.checksums else {
            tracing::warn!(
                "prepared data at {} has no checksums (prepared by an older mlm): its token files cannot be \
                 verified; delete it to prepare it again with them",
                self.dir.display()
            );
            return Ok(());
        };
        let t0 = std::time::Instant::now();
        let mut bytes = 0u64;
        for f in CHECKSUMMED_FILES {
            let p = self.dir.join(f);
            let Some(want) = sums.get(f) else {
                bail!(
                    "{}: no checksum of {f}; delete {} and prepare the data again",
                    self.dir.join(MANIFEST).display(),
                    self.dir.display()
                );
            };
            if crate::durable::sha256_file(&p)? != *want {
                bail!(
                    "{}: does not match its checksum in {} (changed after it was prepared): delete {} and prepare the \
                     data again (mlm prepare, or start the job)",
                    p.display(),
                    MANIFEST,
                    self.dir.display()
                );
            }
            bytes += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        }
        let secs = t0.elapsed().as_secs_f64();
        tracing::info!(
            "verified the checksums of {} ({:.1} MB in {secs:.2} s, {:.0} MB/s)",
            self.dir.display(),
            bytes as f64 / 1e6,
            bytes as f64 / 1e6 / secs.max(1e-9)
        );
        Ok(())
    }

    /// A shared handle on the training split.
    pub fn train_arc(&self) -> Arc<TokenStore> {
        self.train.clone()
    }

    /// A shared handle on the test split.
    pub fn test_arc(&self) -> Arc<TokenStore> {
        self.test.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_through_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.tokens");
        let data: Vec<u32> = (0..40).map(|i| i * 1_000_003).collect();
        write_tokens(&p, data.chunks(8)).unwrap();
        let s = TokenStore::open(&p, 8).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s.chunk(3), &data[24..32]);
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[4..8], &1_000_003u32.to_le_bytes());
        fn send_sync<T: Send + Sync>() {}
        send_sync::<TokenStore>();
    }

    #[test]
    fn word_starts_round_trip_one_bit_per_token() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.tokens");
        // 3 chunks of 10 tokens: 2 bytes of marks each.
        write_tokens(&p, (0..30u32).collect::<Vec<_>>().chunks(10)).unwrap();
        let starts: Vec<bool> = (0..30).map(|i| i % 3 == 1).collect();
        write_word_starts(&p.with_extension(WORDS_EXT), starts.chunks(10)).unwrap();
        assert_eq!(std::fs::metadata(d.path().join("x.words")).unwrap().len(), 6);
        let s = TokenStore::open(&p, 10).unwrap();
        assert!(s.has_word_starts());
        for c in 0..3 {
            let w = s.word_starts(c).unwrap();
            assert_eq!(w.len(), 10);
            for pos in 0..10 {
                // The first token of a chunk is always a word start.
                assert_eq!(w.get(pos), pos == 0 || starts[c * 10 + pos], "chunk {c} pos {pos}");
            }
        }
        assert!(TokenStore::from_tokens((0..30).collect(), 10).word_starts(1).is_none());
        std::fs::write(d.path().join("x.words"), [0u8; 5]).unwrap();
        let e = TokenStore::open(&p, 10).unwrap_err().to_string();
        assert!(e.contains("x.words") && e.contains("5 bytes"), "{e}");
    }

    #[test]
    fn in_memory_store_drops_the_incomplete_chunk() {
        let s = TokenStore::from_tokens((0..20).collect(), 8);
        assert_eq!((s.len(), s.chunk(1)), (2, &[8, 9, 10, 11, 12, 13, 14, 15][..]));
    }

    #[test]
    fn empty_file_is_an_empty_store() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("e.tokens");
        write_tokens(&p, std::iter::empty()).unwrap();
        assert!(TokenStore::open(&p, 16).unwrap().is_empty());
    }

    #[test]
    fn truncated_file_is_refused_with_its_name() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.tokens");
        std::fs::write(&p, [0u8; 36]).unwrap();
        let e = TokenStore::open(&p, 8).unwrap_err().to_string();
        assert!(e.contains("t.tokens") && e.contains("whole number"), "{e}");
    }
}
