//! What a training job holds in memory, predicted from its config and the
//! model's `config.json` before anything is allocated (`mlm estimate-memory`,
//! `docs/memory.md`).
//!
//! The prediction counts, tensor by tensor, what this implementation allocates:
//!
//! - the training state (`optimizer.rs`): fp32 master weights, the bf16/fp16 compute
//!   copy when `precision = "bf16"` or `"fp16"`, the flat fp32 gradient, AdamW's two fp32
//!   moments;
//! - per forward and backward pass of `rows` sequences, what autograd saves for
//!   backward in our model files (linear inputs, GELU inputs, LayerNorm inputs
//!   and statistics, dropout masks, attention as the chosen kernel keeps it,
//!   DeBERTa's relative-position terms, the head's fp32 log-probabilities at the
//!   projected positions; GPT-2's pre-LN blocks and `ln_f` head as
//!   [`Layout::Decoder`] says), or with activation checkpointing (`recompute.rs`)
//!   each layer's input and one layer's saved tensors at a time;
//! - the transient peak on top: the two fp32 `[positions, vocab]` gradients at
//!   the start of backward, a layer's backward temporaries, the parameter
//!   gradients a pass returns, the bf16 copy being built at start-up, an
//!   evaluation pass (AdamW's fused step, on either device, adds nothing).
//!
//! Which kernels run on the target is asked of the models' policy
//! (`src/model/policy.rs`), never decided here: the GEMM route, the attention
//! path (the scores written out keep the probabilities, as libtorch's math
//! kernel does; SDPA's flash / memory-efficient kernels on CUDA keep the output
//! and log-sum-exp), whose dropout runs (ours on the CPU keeps its mask in the
//! activations' dtype, CUDA's fused one a bool mask). Measured against peak RSS
//! on the CPU by `tests/estimate_memory.rs`.
use serde::Serialize;

use crate::config::{Config, MicroBatchSize, Precision};
use crate::model::policy::{self, AttentionPath, DropoutRoute};
use crate::model::shape::{Layout, ModelShape};
use crate::model::Objective;
use crate::train::loss::HEAD_CHUNK_LOGITS;

pub const GIB: f64 = (1u64 << 30) as f64;

/// The device whose kernels and allocator the estimate describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Cpu,
    Cuda,
}

impl Target {
    /// The device the policy is asked about.
    fn device(self) -> tch::Device {
        match self {
            Target::Cpu => tch::Device::Cpu,
            Target::Cuda => tch::Device::Cuda(0),
        }
    }
}

/// The parts of a job that decide its memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub target: Target,
    pub precision: Precision,
    pub block: u64,
    /// Sequences per loader batch (`training.batch_size`).
    pub batch: u64,
    pub micro_batch_size: MicroBatchSize,
    pub activation_checkpointing: bool,
    pub sparse_head: bool,
    pub mlm_probability: f64,
    /// A causal LM: every position but each block's last is predicted.
    pub causal: bool,
    /// Sequences per evaluation pass (`eval.batch_size`, never split).
    pub eval_batch: u64,
    /// bf16 on a CPU without bf16 instructions: every GEMM runs as an fp32 GEMM
    /// ([`policy::gemm_via_f32`]). The written-out attention keeps fp32
    /// copies; a projection holds fp32 copies of its operands and result while
    /// it runs (saved: the bf16 ones).
    pub gemm_in_fp32: bool,
}

impl Job {
    /// The job of `cfg` with `batch` sequences per loader batch on each worker
    /// (`training.batch_size`, or what `global_batch_size` gives it).
    pub fn from_config(cfg: &Config, batch: usize, target: Target, objective: Objective) -> Self {
        let t = &cfg.training;
        Self {
            target,
            precision: t.precision,
            block: cfg.data.block_size as u64,
            batch: batch as u64,
            micro_batch_size: t.micro_batch_size,
            activation_checkpointing: t.activation_checkpointing,
            sparse_head: t.sparse_head,
            mlm_probability: cfg.data.mlm_probability,
            causal: objective == Objective::Clm,
            eval_batch: cfg.eval.batch_size as u64,
            gemm_in_fp32: policy::gemm_via_f32(target.device(), t.precision.compute_kind()),
        }
    }
}

/// Bytes of the training state, held for the whole job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct States {
    /// fp32 master weights (`FlatAdamW::master`).
    pub weights_bytes: u64,
    /// The bf16/fp16 compute copy (`precision = "bf16"`/`"fp16"`), else 0.
    pub compute_weights_bytes: u64,
    /// The flat fp32 gradient.
    pub gradients_bytes: u64,
    /// AdamW's two fp32 moments.
    pub optimizer_bytes: u64,
}

impl States {
    pub fn total(&self) -> u64 {
        self.weights_bytes + self.compute_weights_bytes + self.gradients_bytes + self.optimizer_bytes
    }
}

/// One forward and backward pass of `rows` sequences.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pass {
    pub rows: u64,
    pub activation_checkpointing: bool,
    /// What autograd keeps for backward at the pass's fullest moment.
    pub activations_bytes: u64,
    /// Bytes allocated at the pass's peak, the training state included.
    pub peak_bytes: u64,
    /// The moment of that peak.
    pub peak_at: &'static str,
}

/// Peaks outside the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OtherPeaks {
    /// AdamW's update: the states alone (its fused kernels have no whole-buffer temporaries).
    pub optimizer_step_bytes: u64,
    /// An evaluation pass of `eval.batch_size` sequences without gradients.
    pub evaluation_bytes: u64,
    /// Start-up: the bf16/fp16 compute copy is built from an fp32 model.
    pub startup_bytes: u64,
}

/// The estimate for one model and job; passes are computed on demand.
pub struct Estimate<'a> {
    pub model: &'a ModelShape,
    pub job: &'a Job,
    /// Bytes per activation element (the compute dtype).
    a: u64,
    /// Bytes per element of the written-out attention's matmul operands (q, k,
    /// v, the probabilities they multiply): the compute dtype, or fp32 where
    /// the CPU emulates bf16 ([`Job::gemm_in_fp32`]).
    x: u64,
}

/// The moment of a pass and the bytes allocated then (training state excluded).
type Moment = (&'static str, u64);

/// Bytes of an attention variant beyond the plain attention: saved for
/// backward, its backward's temporaries, its forward's without autograd.
#[derive(Debug, Default)]
struct Extra {
    saved: u64,
    backward: u64,
    workspace: u64,
}

impl<'a> Estimate<'a> {
    pub fn new(model: &'a ModelShape, job: &'a Job) -> Self {
        let a = job.precision.compute_kind().elt_size_in_bytes() as u64;
        let x = if job.gemm_in_fp32 { 4 } else { a };
        Self { model, job, a, x }
    }

    pub fn states(&self) -> States {
        let p = self.model.parameters;
        States {
            weights_bytes: 4 * p,
            compute_weights_bytes: if self.job.precision == Precision::Fp32 { 0 } else { 2 * p },
            gradients_bytes: 4 * p,
            optimizer_bytes: 8 * p,
        }
    }

    /// The forward and backward pass of `rows` sequences, with or without
    /// activation checkpointing.
    pub fn pass(&self, rows: u64, checkpointing: bool) -> Pass {
        let (activations, moments) = if checkpointing { self.recomputing_pass(rows) } else { self.plain_pass(rows) };
        let (at, bytes) = moments.into_iter().max_by_key(|m| m.1).expect("at least one moment");
        Pass {
            rows,
            activation_checkpointing: checkpointing,
            activations_bytes: activations,
            peak_bytes: self.states().total() + bytes,
            peak_at: at,
        }
    }

    pub fn other_peaks(&self) -> OtherPeaks {
        let (p, states) = (self.model.parameters, self.states().total());
        // `to_kind_copy` builds the copy as an fp32 model, then converts it.
        let startup = if self.job.precision == Precision::Fp32 { 0 } else { 4 * p };
        OtherPeaks {
            optimizer_step_bytes: states,
            evaluation_bytes: states + self.evaluation(self.job.eval_batch),
            startup_bytes: states - self.states().compute_weights_bytes + startup,
        }
    }

    /// Tokens of `rows` sequences.
    fn tokens(&self, rows: u64) -> u64 {
        rows * self.job.block
    }

    /// Positions predicted: the expected masked tokens, or a causal LM's
    /// every position but each block's last.
    fn predicted(&self, rows: u64) -> u64 {
        if self.job.causal {
            self.tokens(rows) - rows
        } else {
            (self.job.mlm_probability * self.tokens(rows) as f64).ceil() as u64
        }
    }

    /// Positions projected to the vocabulary at once: the predicted ones with
    /// the sparse head, at most a chunk of them ([`HEAD_CHUNK_LOGITS`], each
    /// chunk's forward and backward done before the next); every position
    /// with the dense head.
    fn projected(&self, rows: u64) -> u64 {
        if self.job.sparse_head {
            self.predicted(rows).min(((HEAD_CHUNK_LOGITS as u64) / self.model.vocab.max(1)).max(1))
        } else {
            self.tokens(rows)
        }
    }

    /// Bytes of a dropout mask over `elements` of activations (none when `p`
    /// is 0): ours multiplies by a mask tensor of the activations' dtype and
    /// keeps it; libtorch's fused CUDA dropout keeps a bool mask.
    fn dropout(&self, p: f64, elements: u64) -> u64 {
        if p <= 0.0 {
            return 0;
        }
        match policy::dropout_route(self.job.target.device(), self.job.precision.compute_kind(), p) {
            DropoutRoute::CpuMask => elements * self.a,
            DropoutRoute::Libtorch => elements,
        }
    }

    /// All layers saved, then the head's vocabulary gradients, the top layer's
    /// backward, and the end of backward with every parameter's gradient
    /// returned at once (`Tensor::run_backward`).
    fn plain_pass(&self, rows: u64) -> (u64, Vec<Moment>) {
        let m = self.model;
        let saved = self.embeddings_saved(rows) + m.layers * self.layer_saved(rows) + self.head_saved(rows);
        let head_grads = (m.word_embedding_parameters + m.head_parameters()) * self.a;
        let moments = vec![
            ("start of backward (vocabulary gradients)", saved + self.head_backward(rows) + self.head_sums(rows)),
            ("backward of the top layer", saved - self.head_saved(rows) + head_grads + self.layer_backward(rows)),
            // The word embeddings' own gradient and its sum with the tied
            // decoder's, beside every other parameter's gradient.
            (
                "end of backward (every parameter's gradient)",
                self.embeddings_saved(rows) + (m.parameters + 2 * m.word_embedding_parameters) * self.a,
            ),
        ];
        (saved, moments)
    }

    /// `recompute.rs`: every layer's input kept, the head's backward, then each
    /// layer run again and its backward, top first.
    fn recomputing_pass(&self, rows: u64) -> (u64, Vec<Moment>) {
        let m = self.model;
        let x = self.tokens(rows) * m.hidden * self.a;
        let (embeddings, inputs) = (self.embeddings_saved(rows), (m.layers + 1) * x);
        let at_head = embeddings + inputs + self.head_saved(rows);
        // The top layer's input and the gradient flowing into it, beside the
        // inputs still kept below it.
        let at_layer = embeddings + m.layers * x + x + self.layer_saved(rows);
        let head_grads = (m.word_embedding_parameters + m.head_parameters()) * self.a;
        let moments = vec![
            ("forward (a layer without autograd)", embeddings + inputs + self.layer_workspace(rows, true)),
            ("start of backward (vocabulary gradients)", at_head + self.head_backward(rows) + self.head_sums(rows)),
            ("end of the head's backward", embeddings + inputs + x + head_grads),
            (
                "backward of the recomputed top layer",
                at_layer + self.layer_backward(rows) + m.layer_parameters() * self.a,
            ),
        ];
        (at_head.max(at_layer), moments)
    }

    /// The batch on the device: input ids (i64), the head's positions and
    /// targets (no attention mask: blocks have no padding; no labels: the loss
    /// takes the targets at the positions).
    fn batch(&self, rows: u64) -> u64 {
        self.tokens(rows) * 8 + 2 * self.predicted(rows) * 8
    }

    /// The embeddings' saved tensors and the batch. The embeddings' output is
    /// counted as the first layer's input.
    fn embeddings_saved(&self, rows: u64) -> u64 {
        let (m, n) = (self.model, self.tokens(rows));
        let mut saved = match m.layout {
            // The embedding lookups keep their indices; LayerNorm its input and statistics.
            Layout::Encoder => self.batch(rows) + 2 * n * 8 + n * m.hidden * self.a + 2 * n * 4,
            // GPT-2's token lookup keeps its indices (the positions' are one
            // block's); the sum goes to the first block unnormalised.
            Layout::Decoder => self.batch(rows) + n * 8 + self.job.block * 8,
        };
        saved += self.dropout(m.hidden_dropout, n * m.hidden);
        if m.modern.is_some_and(|md| md.windowed) {
            // ModernBERT's band bias of the sliding-window layers, [1, 1, s, s], which every such layer reads.
            saved += self.job.block * self.job.block * self.a;
        }
        if m.embedding != m.hidden {
            // DeBERTa's `embed_proj` keeps its input.
            saved += n * m.embedding * self.a;
        }
        if m.conv {
            // DeBERTa-v2's convolution (its input is the first layer's): the
            // activation's input, the LayerNorm's input and statistics, the dropout.
            saved += 2 * n * m.hidden * self.a + 2 * n * 4 + self.dropout(m.hidden_dropout, n * m.hidden);
        }
        saved
    }

    /// One layer's saved tensors. A post-LN encoder layer and a pre-LN GPT-2
    /// block keep as much: four `[tokens, hidden]` tensors (post-LN: the
    /// input, kept by the q/k/v projections, both LayerNorms' inputs, the
    /// feed-forward's input; pre-LN: `ln_1`'s input and output, kept by the
    /// fused `c_attn`, `ln_2`'s input and output, kept by `c_fc`), two
    /// LayerNorms' statistics, the GELU's input and output, the dropouts'
    /// masks and the attention's tensors.
    fn layer_saved(&self, rows: u64) -> u64 {
        let (m, n) = (self.model, self.tokens(rows));
        let (h, f, a) = (m.hidden, m.intermediate, self.a);
        if let Some(md) = m.modern {
            // ModernBERT (`src/model/modernbert.rs`): the attention norm's input
            // and statistics, Wqkv's input; q and k in fp32 and their rotated
            // halves (the rotary products keep them); the attention output's
            // dropout; the feed-forward norm's input and statistics, Wi's input,
            // the GELU's input and output and the gate, their product (Wo's
            // input) and its dropout.
            let mut saved = 2 * (2 * n * h * a + 2 * n * 4) + 4 * n * h * 4;
            saved += self.dropout(m.attention_dropout, n * h);
            saved += 4 * n * f * a + self.dropout(md.mlp_dropout, n * f);
            return saved + self.attention_saved(rows);
        }
        // The input (kept by the q/k/v projections), both LayerNorms' inputs and
        // statistics, the feed-forward input, the GELU's input and output.
        let mut saved = 4 * n * h * a + 2 * n * 4 * 2 + 2 * n * f * a;
        saved += self.dropout(m.hidden_dropout, n * h);
        if m.attention_output_dropout {
            saved += self.dropout(m.hidden_dropout, n * h);
        }
        saved + self.attention_saved(rows) + self.deberta_attention(rows).saved
    }

    /// Whether training's attention keeps explicit probabilities: the scores
    /// written out (`policy::attention_path`), which keep what libtorch's math
    /// kernel keeps, rather than SDPA's fused kernels (flash or
    /// memory-efficient: output and log-sum-exp only). SDPA here runs fused:
    /// on the CPU without dropout or bias (flash), on CUDA always.
    fn math_attention(&self) -> bool {
        let (m, j) = (self.model, self.job);
        let path =
            policy::attention_path(m.attention, j.target.device(), j.precision.compute_kind(), m.attention_dropout);
        path == AttentionPath::WrittenOut
    }

    /// `scaled_dot_product_attention`'s saved tensors, and the context the
    /// output projection keeps.
    fn attention_saved(&self, rows: u64) -> u64 {
        let (m, n, s) = (self.model, self.tokens(rows), self.job.block);
        let (nh, scores) = (n * m.hidden * self.a, rows * m.heads * s * s);
        if self.math_attention() {
            // q and k scaled and v, each copied by the batched matmuls (in the
            // matmuls' dtype); the fp32 probabilities, with dropout its fp32
            // noise, and the probabilities in the matmuls' dtype (the dropped
            // ones, or a copy); the output copied back to [b, s, h] in the
            // compute dtype for the output projection.
            let x = self.x;
            let probs = match (m.attention_dropout > 0.0, x) {
                (true, _) => scores * (4 + 4 + x),
                (false, 4) => scores * 4,
                (false, _) => scores * (4 + x),
            };
            3 * n * m.hidden * x + probs + nh
        } else {
            // q, k, v as given, the output (laid out as [b, s, h]: the context
            // shares it), the log-sum-exp per query (rounded up to 32 queries).
            4 * nh + rows * m.heads * s.div_ceil(32) * 32 * 4
        }
    }

    /// DeBERTa's disentangled attention beyond the plain attention, as
    /// `src/model/deberta_attention.rs` computes it: c2p and p2c taken at the
    /// `2s - 1` distances of a block and read through views into one score bias
    /// `[b, heads, s, s]`, no padding mask (training chunks have none). Saved,
    /// for each term: the relative rows and their projection `[2s - 1, h]` and
    /// the rows' index; q (k) itself, which the math kernel keeps only as a
    /// copy; a fused kernel keeps the bias it adds; the dropout mask of the
    /// relative embeddings. Backward: the bias's gradient and one term's by
    /// distance `[heads, b, s, 2s - 1]` twice (the views undone), q's (k's).
    /// Without autograd: two quotients `[b, heads, s, s]` and one term's scores
    /// by distance. Change this function with that file.
    fn deberta_attention(&self, rows: u64) -> Extra {
        let m = self.model;
        let Some(r) = m.relative.filter(|r| r.c2p || r.p2c) else { return Extra::default() };
        let (n, s, a, x) = (self.tokens(rows), self.job.block, self.a, self.x);
        let (bias, distances) = (rows * m.heads * s * s * x, 2 * s - 1);
        let by_distance = rows * m.heads * s * distances * x;
        let terms = r.c2p as u64 + r.p2c as u64;
        // The rows (compute dtype) and their projection (the matmuls' dtype).
        let mut saved = terms * (distances * m.hidden * (a + x) + distances * 8);
        saved += if self.math_attention() { terms * n * m.hidden * x } else { bias };
        saved += self.dropout(m.hidden_dropout, 2 * r.span * m.hidden);
        Extra { saved, backward: bias + 2 * by_distance + n * m.hidden * x, workspace: 2 * bias + by_distance }
    }

    /// The head's saved tensors: the rows it projects, the transform's
    /// intermediate values (GPT-2: `ln_f`'s output), a LayerNorm's
    /// statistics, the fp32 log-probabilities over the vocabulary.
    fn head_saved(&self, rows: u64) -> u64 {
        let (m, p) = (self.model, self.projected(rows));
        let transform = match m.layout {
            Layout::Encoder => 3 * p * m.embedding * self.a,
            Layout::Decoder => p * m.hidden * self.a,
        };
        p * m.hidden * self.a + transform + 2 * p * 4 + p * m.vocab * 4
    }

    /// At the start of backward: the fp32 gradients of the log-probabilities and
    /// of the logits, both `[positions, vocab]`; when the projection's GEMMs run
    /// in fp32, then the logits' gradient in the compute dtype beside the
    /// projection's fp32 copies, if that is more.
    fn head_backward(&self, rows: u64) -> u64 {
        let (m, p) = (self.model, self.projected(rows));
        let log_probs = 2 * p * m.vocab * 4;
        if self.job.gemm_in_fp32 {
            log_probs.max(p * m.vocab * self.a + self.gemm_copies(p, m.embedding, m.vocab))
        } else {
            log_probs
        }
    }

    /// A head in several chunks (`loss::head_backward`): the gradients of the
    /// head's parameters and of the top layer's output summed over the chunks,
    /// the sum so far, a chunk's own and their new sum at once; none when the
    /// predicted positions fit one chunk (the head runs whole).
    fn head_sums(&self, rows: u64) -> u64 {
        let m = self.model;
        if !self.job.sparse_head || self.projected(rows) >= self.predicted(rows) {
            return 0;
        }
        let head_grads = (m.word_embedding_parameters + m.head_parameters()) * self.a;
        3 * (head_grads + self.tokens(rows) * m.hidden * self.a)
    }

    /// What a projection of `rows` rows from `input` to `output` features holds
    /// in fp32 during its backward when its GEMMs run in fp32
    /// (`src/shims/linear_f32.cpp`): the output's gradient, and either the
    /// weight and the input's gradient or the input and the weight's gradient.
    fn gemm_copies(&self, rows: u64, input: u64, output: u64) -> u64 {
        if self.job.gemm_in_fp32 {
            4 * (rows * output + input * output + rows * input)
        } else {
            0
        }
    }

    /// Temporaries of one layer's backward beyond its saved tensors: the
    /// feed-forward's `[tokens, intermediate]` gradients, or attention's.
    fn layer_backward(&self, rows: u64) -> u64 {
        let (m, n, s, a) = (self.model, self.tokens(rows), self.job.block, self.a);
        let nh = n * m.hidden * a;
        // A GeGLU's gradients are [tokens, 2 intermediate] and [tokens, intermediate] twice.
        let ff_width = if m.modern.is_some() { 4 * m.intermediate } else { 2 * m.intermediate };
        let feed_forward = nh + n * ff_width * a + self.gemm_copies(n, m.intermediate, m.hidden);
        let attention = if self.math_attention() {
            3 * n * m.hidden * self.x + 2 * rows * m.heads * s * s * self.x
        } else {
            3 * nh + n * m.hidden * 4
        };
        feed_forward.max(attention + self.deberta_attention(rows).backward)
    }

    /// The most one layer holds at once when it runs without autograd (the
    /// recomputing forward, evaluation), besides its input.
    fn layer_workspace(&self, rows: u64, train: bool) -> u64 {
        let (m, n, s, a) = (self.model, self.tokens(rows), self.job.block, self.a);
        let nh = n * m.hidden * a;
        // Rust keeps an expression's temporaries to the end of its statement: the
        // feed-forward's input, both [tokens, intermediate] values, its output and
        // the dropped output.
        // (A GeGLU's: Wi's output [tokens, 2 intermediate], the GELU's and the product.)
        let ff_width = if m.modern.is_some() { 4 * m.intermediate } else { 2 * m.intermediate };
        let feed_forward = 3 * nh + n * ff_width * a + self.dropout(m.hidden_dropout, n * m.hidden);
        let (elements, x) = (rows * m.heads * s * s, self.x);
        let dropout = train && m.attention_dropout > 0.0;
        let core = if self.math_attention() && train {
            // Written out: the scores (matmuls' dtype) beside the fp32
            // probabilities; then with dropout the fp32 noise and dropped
            // probabilities; a copy in the matmuls' dtype when that is not fp32.
            let copy = if x == 4 { 0 } else { x };
            elements * (x + 4).max(if dropout { 12 } else { 4 } + copy)
        } else if self.math_attention() || !train {
            elements * a * 2
        } else {
            rows * m.heads * s * 4
        };
        // The input, the context, and q, k, v (copies in the matmuls' dtype).
        feed_forward.max(2 * nh + 3 * n * m.hidden * x + core + self.deberta_attention(rows).workspace)
    }

    /// An evaluation pass of `rows` sequences: the hidden states beside a
    /// layer's work, or the head's logits (in the compute dtype, in fp32, and
    /// the log-probabilities).
    fn evaluation(&self, rows: u64) -> u64 {
        let m = self.model;
        let hidden = self.tokens(rows) * m.hidden * self.a;
        let p = if self.job.sparse_head { self.projected(rows) } else { self.predicted(rows) };
        let to_fp32 = if self.a == 4 { 0 } else { 4 };
        let mut head = p * m.vocab * (self.a + to_fp32 + 4) + p * (m.hidden + m.embedding) * self.a;
        if self.job.gemm_in_fp32 {
            // The projection's fp32 weight and logits before they are rounded.
            head += 4 * (m.vocab * m.embedding + p * m.vocab);
        }
        self.batch(rows) + hidden + self.layer_workspace(rows, false).max(head)
    }
}

/// What is set aside from a device's memory besides the estimated peak.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Margins {
    /// Memory the estimate does not count: the CUDA context and the cuBLAS /
    /// cuDNN workspaces on a GPU; libtorch's code, the tokenizer and the data
    /// on the CPU.
    pub reserved_bytes: u64,
    /// Allocator fragmentation, as a fraction of the estimated peak.
    pub fragmentation: f64,
}

impl Margins {
    /// GPU: 1 GiB reserved, 10% for the caching allocator's fragmentation.
    /// CPU: 0.5 GiB for the process (0.36 GiB measured before the model is
    /// built), 75% fragmentation: glibc's heap keeps freed blocks, and the
    /// resident memory of CPU jobs was measured 23-34% above the live peak after
    /// the first step and up to 71% after the fifth (docs/memory.md).
    pub fn for_target(target: Target) -> Self {
        match target {
            Target::Cuda => Self { reserved_bytes: 1 << 30, fragmentation: 0.10 },
            Target::Cpu => Self { reserved_bytes: 1 << 29, fragmentation: 0.75 },
        }
    }

    /// The memory a peak of `bytes` needs.
    pub fn needed(&self, bytes: u64) -> u64 {
        (bytes as f64 * (1.0 + self.fragmentation)).ceil() as u64 + self.reserved_bytes
    }
}

/// A pass and whether the job fits with it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fit {
    #[serde(flatten)]
    pub pass: Pass,
    /// The job's peak with this pass: the larger of the pass and the other peaks.
    pub job_peak_bytes: u64,
    /// `job_peak_bytes` with the margins.
    pub needed_bytes: u64,
    pub fits: bool,
}

/// The largest micro-batch size that fits, with and without checkpointing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Largest {
    pub without_checkpointing: Option<u64>,
    pub with_checkpointing: Option<u64>,
}

impl Estimate<'_> {
    /// The pass of `rows` with the job's other peaks, against `memory` bytes.
    pub fn fit(&self, rows: u64, checkpointing: bool, memory: u64) -> Fit {
        let pass = self.pass(rows, checkpointing);
        let o = self.other_peaks();
        let job_peak = pass.peak_bytes.max(o.optimizer_step_bytes).max(o.evaluation_bytes).max(o.startup_bytes);
        let needed = Margins::for_target(self.job.target).needed(job_peak);
        Fit { pass, job_peak_bytes: job_peak, needed_bytes: needed, fits: needed <= memory }
    }

    /// The largest divisor of the batch whose job fits in `memory`.
    pub fn largest_fitting(&self, checkpointing: bool, memory: u64) -> Option<u64> {
        let batch = self.job.batch;
        (1..=batch).rev().filter(|d| batch.is_multiple_of(*d)).find(|&d| self.fit(d, checkpointing, memory).fits)
    }
}

#[cfg(test)]
mod tests;
