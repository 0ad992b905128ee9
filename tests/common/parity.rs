//! What the parity tests against `transformers` share: running the Python
//! scripts of `tests/python` that make the reference models and values,
//! reading their tensors, loading a folder that must hold every weight, and
//! comparing one step's gradients.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use mlm::model::MaskedLm;
use tch::{Device, Tensor};

use super::{python, torch_rng};

/// `tests/python/<name>`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(name)
}

/// Runs `tests/python/<name> args...` with the tests' Python, expecting success.
pub fn run_script(name: &str, args: &[&Path]) {
    let out = Command::new(python()).arg(script(name)).args(args).output().expect("running the Python reference");
    assert!(out.status.success(), "{name} {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Every tensor of a safetensors file, by name.
pub fn read_tensors(path: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tensor `name` of a safetensors file.
pub fn tensor_in(path: &Path, name: &str) -> Tensor {
    read_tensors(path)
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} not in {}", path.display()))
        .1
}

/// Loads `dir` on the CPU (a model is built, drawing from libtorch's
/// generator, before its weights are read), expecting every weight and no other.
pub fn load_clean(dir: &Path) -> MaskedLm {
    let (model, report) = {
        let _rng = torch_rng();
        MaskedLm::load_dir(dir, Device::Cpu).unwrap()
    };
    assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{}: {report:?}", dir.display());
    model
}

/// Our gradients (`vars`, after backward) against `transformers`' (`theirs`,
/// by parameter name): the same parameters, and per parameter
/// ||ours - theirs|| / ||theirs|| and max |ours - theirs| under `tol`.
/// Gradients that are zero in exact arithmetic (the key biases: they add a
/// per-query constant to the scores, which the softmax cancels) come out as
/// rounding noise, ~1e-12; relative errors of noise mean nothing, so norms are
/// floored at 1e-6 of the model's largest gradient norm.
pub fn assert_grads_match(what: &str, vars: &HashMap<String, Tensor>, theirs: &[(String, Tensor)], tol: f64) {
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut their_names: Vec<&String> = theirs.iter().map(|(n, _)| n).collect();
    their_names.sort();
    assert_eq!(names, their_names, "{what}: parameters with gradients");
    let floor = 1e-6 * theirs.iter().map(|(_, g)| g.norm().double_value(&[])).fold(0.0, f64::max);
    let (mut worst_rel, mut worst_abs) = ((0.0, String::new()), (0.0, String::new()));
    for (name, hf) in theirs {
        let ours = vars[name].grad();
        assert!(ours.defined(), "{what}: {name} has no gradient");
        let diff = &ours - hf;
        let rel = diff.norm().double_value(&[]) / hf.norm().double_value(&[]).max(floor);
        let abs = diff.abs().max().double_value(&[]);
        if rel > worst_rel.0 {
            worst_rel = (rel, name.clone());
        }
        if abs > worst_abs.0 {
            worst_abs = (abs, name.clone());
        }
    }
    println!(
        "{what}: gradients vs transformers: max relative {:.3e} ({}), max abs {:.3e} ({}), {} parameters",
        worst_rel.0,
        worst_rel.1,
        worst_abs.0,
        worst_abs.1,
        theirs.len()
    );
    assert!(worst_rel.0 < tol && worst_abs.0 < tol, "{what}: {worst_rel:?} {worst_abs:?}");
}
