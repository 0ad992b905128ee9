//! Batches for training and evaluation: per-epoch chunk order, sharding across
//! ranks, and masking in background threads a few batches ahead of the model.
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};

use super::masking::{label_next_tokens, mask_chunk_words, MaskingParams};
use super::rng::{hash_words, SplitMix64};
use super::store::TokenStore;

/// Stream id separating the epoch shuffle from the masks.
const ORDER_STREAM: u64 = 0x004F_5244_4552; // "ORDER"

/// One batch of masked chunks, row-major `[rows, block_size]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<i64>,
    /// Original ids at masked positions, -100 elsewhere.
    pub labels: Vec<i64>,
    pub rows: usize,
    pub block_size: usize,
    /// Store index of each row's chunk.
    pub chunk_ids: Vec<u64>,
    /// Positions with a label (the loss is averaged over these).
    pub n_masked: usize,
    /// The largest token id of the batch's chunks, found while masking (in the
    /// masker threads), so the training step checks the vocabulary in O(1).
    pub max_token: u32,
}

impl Batch {
    /// Refuses token ids outside `[0, vocab)`: a store damaged on disk, or made
    /// with another tokenizer, would otherwise index past the embedding table.
    pub fn check_ids(&self, vocab: i64, store: &std::path::Path) -> anyhow::Result<()> {
        if i64::from(self.max_token) < vocab {
            return Ok(()); // the masker's inputs and labels are store tokens, the mask or a random id below vocab
        }
        let row = self.labels.iter().zip(&self.input_ids).position(|(&l, &x)| l.max(x) >= vocab).unwrap_or(0);
        anyhow::bail!(
            "prepared data {}: token id {} (chunk {}) is outside the model's vocabulary of {vocab}: the store is \
             damaged or was made with another tokenizer; delete it to prepare it again",
            store.display(),
            self.max_token,
            self.chunk_ids.get(row / self.block_size.max(1)).copied().unwrap_or(0)
        )
    }
}

/// Masks the chunks `ids` of `store` into one batch (by whole words when
/// `p.whole_word_mask` and the store has word-start marks), or labels each
/// with its next tokens when `p.causal`.
pub fn make_batch(store: &TokenStore, p: &MaskingParams, ids: &[u32], seed: u64, epoch: u64) -> Batch {
    let bs = store.block_size();
    let (mut input_ids, mut labels) = (vec![0i64; ids.len() * bs], vec![0i64; ids.len() * bs]);
    let (mut n_masked, mut max_token) = (0, 0);
    for (r, &id) in ids.iter().enumerate() {
        let span = r * bs..(r + 1) * bs;
        let (chunk, words) = (store.chunk(id as usize), store.word_starts(id as usize));
        max_token = chunk.iter().copied().fold(max_token, u32::max);
        let (ids_out, labels_out) = (&mut input_ids[span.clone()], &mut labels[span]);
        n_masked += if p.causal {
            label_next_tokens(chunk, ids_out, labels_out)
        } else {
            mask_chunk_words(chunk, words, p, seed, epoch, id as u64, ids_out, labels_out)
        };
    }
    Batch {
        input_ids,
        labels,
        rows: ids.len(),
        block_size: bs,
        chunk_ids: ids.iter().map(|&i| i as u64).collect(),
        n_masked,
        max_token,
    }
}

/// Where a run stands in its data: the epoch in progress (0-based) and the
/// optimizer steps of it already taken. Saved in every checkpoint, so a resume
/// continues from here by arithmetic, never by replaying batches. It does not
/// depend on how a step is split: step `s` of an epoch takes the chunks
/// `order[s*G..(s+1)*G]` of the epoch's order (global batch `G`) on any number
/// of workers ([`index_in_step`]), so a job resumes on another world size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub epoch: usize,
    pub step_in_epoch: usize,
}

impl Position {
    /// After an optimizer step.
    pub fn advance(&mut self) {
        self.step_in_epoch += 1;
    }

    /// Whether the epoch of `steps_per_epoch` steps has no step left.
    pub fn epoch_done(&self, steps_per_epoch: usize) -> bool {
        self.step_in_epoch >= steps_per_epoch
    }

    /// The start of the next epoch.
    pub fn next_epoch(&mut self) {
        self.epoch += 1;
        self.step_in_epoch = 0;
    }

    /// The first loader batch of a worker that takes `grad_accum_steps`
    /// batches per step.
    pub fn start_batch(&self, grad_accum_steps: usize) -> usize {
        self.step_in_epoch * grad_accum_steps
    }
}

/// Full optimizer steps in an epoch of `n_chunks` chunks at a global batch of
/// `global` sequences: the same for every split of it, since
/// `floor(floor(n / world) / batch_size) / grad_accum_steps = floor(n / global)`.
pub fn steps_per_epoch(n_chunks: usize, global: usize) -> usize {
    n_chunks / global
}

/// The chunks of this worker in epoch order: its [`rank_shard`], cut to the
/// length every worker has (`n_chunks / world`). Loader batch `i` of `rank`
/// then holds `order[rank + world * (i * batch_size + j)]`, `j < batch_size`.
pub fn worker_chunks(order: &[u32], rank: usize, world: usize) -> Vec<u32> {
    let mut ids = rank_shard(order, rank, world);
    ids.truncate(order.len() / world);
    ids
}

/// Where a row of a step lies in the step's slice of the epoch order: row `row`
/// of loader batch `micro` (of the step's `grad_accum_steps`) on `rank` of
/// `world`, with `batch_size` rows per loader batch, is `order[s*G + index]`
/// for step `s` of the epoch. Every `index` below `G` is taken exactly once.
pub fn index_in_step(micro: usize, rank: usize, row: usize, world: usize, batch_size: usize) -> usize {
    rank + world * (micro * batch_size + row)
}

/// The order of chunk ids `0..n_chunks` in `epoch`: a Fisher-Yates shuffle
/// seeded by `(seed, epoch)`, identical on every rank.
pub fn epoch_order(n_chunks: usize, seed: u64, epoch: u64) -> Vec<u32> {
    assert!(n_chunks <= u32::MAX as usize, "more than 2^32 chunks");
    let mut v: Vec<u32> = (0..n_chunks as u32).collect();
    SplitMix64::new(hash_words(&[seed, epoch, u64::MAX, ORDER_STREAM])).shuffle(&mut v);
    v
}

/// The ids of rank `rank` out of `world`: every `world`-th id from `rank`.
pub fn rank_shard(order: &[u32], rank: usize, world: usize) -> Vec<u32> {
    assert!(world > 0 && rank < world, "rank {rank} out of world size {world}");
    order.iter().skip(rank).step_by(world).copied().collect()
}

/// The batches of one epoch on one rank, masked by background threads and
/// delivered in order. Batch `i` holds `ids[i*batch_size..(i+1)*batch_size]`;
/// the incomplete last batch is dropped, so there are `ids.len() / batch_size`
/// batches. Dropping the stream stops and joins its threads.
pub struct BatchStream {
    receivers: Vec<Receiver<Batch>>,
    workers: Vec<JoinHandle<()>>,
    start: usize,
    next: usize,
    n_batches: usize,
}

impl BatchStream {
    /// Starts masking at batch `start_batch` (a resume skips the earlier batches
    /// without masking them). Worker `w` of `threads` masks the batches `i` with
    /// `(i - start_batch) % threads == w`; about `prefetch` batches (at least one
    /// per thread) wait ready ahead of the consumer.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<TokenStore>,
        params: Arc<MaskingParams>,
        ids: Vec<u32>,
        batch_size: usize,
        start_batch: usize,
        seed: u64,
        epoch: u64,
        threads: usize,
        prefetch: usize,
    ) -> anyhow::Result<Self> {
        assert!(batch_size > 0, "batch_size must be positive");
        let threads = threads.max(1);
        let n_batches = ids.len() / batch_size;
        let cap = prefetch.div_ceil(threads).max(1);
        let ids = Arc::new(ids);
        let (mut receivers, mut workers) = (Vec::new(), Vec::new());
        for w in 0..threads {
            let (tx, rx) = bounded(cap);
            let (store, params, ids) = (store.clone(), params.clone(), ids.clone());
            let handle = std::thread::Builder::new()
                .name(format!("mlm-masker-{w}"))
                .spawn(move || {
                    let mut i = start_batch + w;
                    while i < n_batches {
                        let b = make_batch(&store, &params, &ids[i * batch_size..(i + 1) * batch_size], seed, epoch);
                        if tx.send(b).is_err() {
                            return; // the stream was dropped
                        }
                        i += threads;
                    }
                })
                .map_err(|e| anyhow::anyhow!("cannot start a masker thread (data.masker_threads = {threads}): {e}"))?;
            receivers.push(rx);
            workers.push(handle);
        }
        Ok(Self { receivers, workers, start: start_batch, next: start_batch, n_batches })
    }

    /// Batches in the whole epoch (including those skipped by `start_batch`).
    pub fn n_batches(&self) -> usize {
        self.n_batches
    }

    /// Index of the batch the next call to `next` returns.
    pub fn position(&self) -> usize {
        self.next
    }
}

impl Iterator for BatchStream {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.n_batches {
            return None;
        }
        let w = (self.next - self.start) % self.receivers.len();
        let batch = self.receivers[w]
            .recv()
            .unwrap_or_else(|_| panic!("masker thread {w} stopped before batch {} (it panicked)", self.next));
        self.next += 1;
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.n_batches.saturating_sub(self.next);
        (left, Some(left))
    }
}

impl ExactSizeIterator for BatchStream {}

impl Drop for BatchStream {
    fn drop(&mut self) {
        // Closing the channels makes blocked senders fail, so workers return.
        self.receivers.clear();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Evaluation batches over the first `max_chunks` chunks of `store` (0: all),
/// in store order, the last partial batch kept. Masks are fixed: they depend on
/// `mask_seed` only (epoch `u64::MAX`), so every evaluation sees the same ones.
pub fn eval_batches(
    store: &TokenStore,
    params: &MaskingParams,
    batch_size: usize,
    max_chunks: usize,
    mask_seed: u64,
) -> Vec<Batch> {
    assert!(batch_size > 0, "batch_size must be positive");
    let n = if max_chunks == 0 { store.len() } else { max_chunks.min(store.len()) };
    let ids: Vec<u32> = (0..n as u32).collect();
    ids.chunks(batch_size).map(|c| make_batch(store, params, c, mask_seed, u64::MAX)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DataConfig;
    use crate::data::{store::write_tokens, testutil};

    const BLOCK: usize = 64;

    fn fixture(chunks: usize) -> (tempfile::TempDir, Arc<TokenStore>, Arc<MaskingParams>) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("train.tokens");
        write_tokens(&p, testutil::corpus_tokens(chunks * BLOCK).chunks(BLOCK)).unwrap();
        let store = Arc::new(TokenStore::open(&p, BLOCK).unwrap());
        let params = Arc::new(MaskingParams::new(&DataConfig::default(), testutil::tokenizer()).unwrap());
        (d, store, params)
    }

    #[test]
    fn whole_word_batches_read_the_word_marks_of_the_store() {
        let (_d, store, params) = fixture(20);
        assert!(!store.has_word_starts());
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("train.tokens");
        let (toks, starts) = testutil::corpus_tokens_and_words(20 * BLOCK);
        write_tokens(&p, toks.chunks(BLOCK)).unwrap();
        crate::data::store::write_word_starts(&p.with_extension("words"), starts.chunks(BLOCK)).unwrap();
        let with_words = Arc::new(TokenStore::open(&p, BLOCK).unwrap());
        let wwm = MaskingParams { whole_word_mask: true, ..(*params).clone() };
        let ids: Vec<u32> = (0..20).collect();
        // Token masking: the marks change nothing.
        assert_eq!(make_batch(&with_words, &params, &ids, 9, 1), make_batch(&store, &params, &ids, 9, 1));
        // Whole-word masking: the marks of each chunk are used; without marks it is token masking.
        let b = make_batch(&with_words, &wwm, &ids, 9, 1);
        assert_ne!(b.labels, make_batch(&with_words, &params, &ids, 9, 1).labels);
        assert_eq!(make_batch(&store, &wwm, &ids, 9, 1), make_batch(&store, &params, &ids, 9, 1));
        for (r, &id) in ids.iter().enumerate() {
            let (mut x, mut y) = (vec![0i64; BLOCK], vec![0i64; BLOCK]);
            let w = with_words.word_starts(id as usize);
            mask_chunk_words(with_words.chunk(id as usize), w, &wwm, 9, 1, id as u64, &mut x, &mut y);
            assert_eq!(y, b.labels[r * BLOCK..(r + 1) * BLOCK]);
        }
        let streamed: Vec<Batch> =
            BatchStream::new(with_words.clone(), Arc::new(wwm.clone()), ids, 4, 0, 9, 1, 2, 2).unwrap().collect();
        assert_eq!(streamed[0].labels, b.labels[..4 * BLOCK]);
        assert_eq!(eval_batches(&with_words, &wwm, 20, 0, 9)[0].labels.len(), 20 * BLOCK);
    }

    #[test]
    fn causal_batches_label_each_position_with_the_next_token() {
        let (_d, store, params) = fixture(4);
        let causal = MaskingParams { causal: true, ..(*params).clone() };
        let b = make_batch(&store, &causal, &[2, 0], 7, 3);
        assert_eq!(b.n_masked, 2 * (BLOCK - 1));
        for (r, &id) in [2usize, 0].iter().enumerate() {
            let chunk = store.chunk(id);
            let (ids, labels) = (&b.input_ids[r * BLOCK..(r + 1) * BLOCK], &b.labels[r * BLOCK..(r + 1) * BLOCK]);
            assert!(ids.iter().zip(chunk).all(|(&a, &c)| a == c as i64), "inputs are the block itself");
            assert!(labels[..BLOCK - 1].iter().zip(&chunk[1..]).all(|(&l, &c)| l == c as i64));
            assert_eq!(labels[BLOCK - 1], crate::data::masking::IGNORE_INDEX);
        }
        // Nothing depends on the seed or the epoch.
        assert_eq!(make_batch(&store, &causal, &[2, 0], 8, 9).labels, b.labels);
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(500, 42, 0);
        assert_eq!(a, epoch_order(500, 42, 0));
        assert_ne!(a, epoch_order(500, 42, 1));
        assert_ne!(a, epoch_order(500, 41, 0));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..500).collect::<Vec<_>>());
    }

    #[test]
    fn rank_shards_partition_the_order() {
        let order = epoch_order(103, 1, 0);
        let shards: Vec<Vec<u32>> = (0..4).map(|r| rank_shard(&order, r, 4)).collect();
        assert_eq!(shards[1][..3], [order[1], order[5], order[9]]);
        assert_eq!(shards.iter().map(Vec::len).collect::<Vec<_>>(), vec![26, 26, 26, 25]);
        let mut all: Vec<u32> = shards.concat();
        all.sort();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
    }

    /// The chunk ids of step `step` of an epoch, over all workers of a split.
    fn step_chunks(order: &[u32], step: usize, world: usize, batch_size: usize, accum: usize) -> Vec<u32> {
        let mut all = Vec::new();
        for rank in 0..world {
            let ids = worker_chunks(order, rank, world);
            let batches: Vec<&[u32]> = ids.chunks_exact(batch_size).collect();
            for (a, batch) in batches[step * accum..(step + 1) * accum].iter().enumerate() {
                for (row, &id) in batch.iter().enumerate() {
                    assert_eq!(
                        order[step * world * batch_size * accum + index_in_step(a, rank, row, world, batch_size)],
                        id
                    );
                    all.push(id);
                }
            }
        }
        all.sort();
        all
    }

    #[test]
    fn a_step_takes_the_same_chunks_however_the_global_batch_is_split() {
        let order = epoch_order(101, 7, 3);
        let splits = [(1, 8, 1), (2, 4, 1), (4, 1, 2), (2, 2, 2), (8, 1, 1)];
        for (w, bs, a) in splits {
            let ids = worker_chunks(&order, 0, w);
            assert_eq!(ids.len() / bs / a, steps_per_epoch(order.len(), 8), "split {w}x{bs}x{a}");
        }
        for step in 0..steps_per_epoch(order.len(), 8) {
            let mut want = order[step * 8..(step + 1) * 8].to_vec();
            want.sort();
            for (w, bs, a) in splits {
                assert_eq!(step_chunks(&order, step, w, bs, a), want, "step {step}, split {w}x{bs}x{a}");
            }
        }
    }

    #[test]
    fn stream_resumed_at_batch_k_yields_the_rest_of_the_full_stream() {
        let (_d, store, params) = fixture(90);
        let ids = rank_shard(&epoch_order(store.len(), 42, 2), 1, 2);
        let full: Vec<Batch> =
            BatchStream::new(store.clone(), params.clone(), ids.clone(), 4, 0, 42, 2, 2, 3).unwrap().collect();
        assert_eq!(full.len(), 45 / 4);
        assert_eq!(full[2].chunk_ids, ids[8..12].iter().map(|&i| i as u64).collect::<Vec<_>>());
        assert!(full.iter().all(|b| b.rows == 4 && b.input_ids.len() == 4 * BLOCK && b.n_masked > 0));
        let resumed = BatchStream::new(store, params, ids, 4, 7, 42, 2, 3, 2).unwrap();
        assert_eq!((resumed.len(), resumed.position()), (4, 7));
        assert_eq!(resumed.collect::<Vec<_>>(), full[7..]);
    }

    #[test]
    fn thread_count_does_not_change_the_batches() {
        let (_d, store, params) = fixture(60);
        let ids = epoch_order(store.len(), 3, 0);
        let one: Vec<Batch> =
            BatchStream::new(store.clone(), params.clone(), ids.clone(), 5, 0, 3, 0, 1, 1).unwrap().collect();
        let two: Vec<Batch> =
            BatchStream::new(store.clone(), params.clone(), ids.clone(), 5, 0, 3, 0, 2, 8).unwrap().collect();
        assert_eq!(one, two);
        let other_epoch: Vec<Batch> = BatchStream::new(store, params, ids, 5, 0, 3, 1, 2, 8).unwrap().collect();
        assert_ne!(one[0].labels, other_epoch[0].labels);
    }

    #[test]
    fn dropping_a_stream_mid_epoch_stops_its_threads() {
        let (_d, store, params) = fixture(60);
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let mut s = BatchStream::new(store, params, (0..60).collect(), 1, 0, 0, 0, 3, 1).unwrap();
            s.next().unwrap();
            drop(s);
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(20)).expect("dropping the stream hung");
    }

    #[test]
    fn eval_batches_are_fixed_and_keep_the_last_partial_batch() {
        let (_d, store, params) = fixture(23);
        let a = eval_batches(&store, &params, 5, 0, 1234);
        assert_eq!(a.iter().map(|b| b.rows).collect::<Vec<_>>(), vec![5, 5, 5, 5, 3]);
        assert_eq!(a[4].chunk_ids, vec![20, 21, 22]);
        assert_eq!(a, eval_batches(&store, &params, 5, 0, 1234));
        assert_ne!(a[0].labels, eval_batches(&store, &params, 5, 0, 1).remove(0).labels);
        assert_eq!(eval_batches(&store, &params, 4, 10, 1234).iter().map(|b| b.rows).sum::<usize>(), 10);
    }
}
