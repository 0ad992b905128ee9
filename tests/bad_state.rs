//! Bad state, round two of `bad_input.rs`: a refused resume, a corpus or token
//! store changed after preparation, a prepared folder naming a user's file, an
//! interrupted preparation, impossible or contradictory trainer states, NaN
//! weights, token ids outside the vocabulary, running out of memory. Each gets
//! one clear line and a non-zero exit, and what a job wrote stays as it was.
use std::path::Path;

use crate::bad_input::{copy_tree, edit, fails, fails_cmd, fails_resuming, setup};
use crate::common::*;

#[test]
fn a_refused_resume_does_not_rebuild_the_prepared_data() {
    // `fails` checks that out/ (with out/data) is byte for byte unchanged.
    let (dir, cfg) = setup();
    fails_resuming(
        dir.path(),
        &["train"],
        &cfg,
        &["--set", "data.block_size=32"],
        &["config changed", "data.block_size"],
    );
    fails_resuming(
        dir.path(),
        &["prepare"],
        &cfg,
        &["--set", "data.block_size=32"],
        &["config changed", "data.block_size"],
    );
}

#[test]
fn a_corpus_changed_after_the_run_is_refused_before_it_is_prepared_again() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    for f in glob::glob(&corpus_glob()).unwrap().flatten().take(6) {
        std::fs::copy(&f, corpus.join(f.file_name().unwrap())).unwrap();
    }
    let cfg = write_job_on(dir.path(), &[corpus.join("*.txt").to_string_lossy().into_owned()], "");
    assert!(run(mlm().arg("train").arg(&cfg).args(["--set", "training.max_steps=4"])).status.success());
    let extra = corpus.join("zz-new.rst.txt");
    std::fs::copy(corpus.join(std::fs::read_dir(&corpus).unwrap().next().unwrap().unwrap().file_name()), &extra)
        .unwrap();
    fails_resuming(
        dir.path(),
        &["train"],
        &cfg,
        &["--set", "training.max_steps=4"],
        &["trained on other data", "allow_config_change"],
    );
}

#[test]
fn prepared_dir_naming_a_users_file_or_folder_is_refused() {
    let (dir, cfg) = setup();
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "my notes").unwrap();
    fails(
        dir.path(),
        &["prepare"],
        &cfg,
        &["--set", &format!("data.prepared_dir={notes:?}")],
        &["notes.txt", "not a prepared token store"],
    );
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "my notes");
    let folder = dir.path().join("my-corpus");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("a.txt"), "keep me").unwrap();
    fails(
        dir.path(),
        &["prepare"],
        &cfg,
        &["--set", &format!("data.prepared_dir={folder:?}")],
        &["my-corpus", "not a prepared token store"],
    );
    assert_eq!(std::fs::read_to_string(folder.join("a.txt")).unwrap(), "keep me");
}

#[test]
fn an_interrupted_preparation_leaves_nothing_behind_for_long() {
    let (dir, cfg) = setup();
    let out = dir.path().join("out");
    for leftover in [".data.tmp-4242", "data.tmp-4343"] {
        std::fs::create_dir(out.join(leftover)).unwrap();
        std::fs::write(out.join(leftover).join("train.bin"), vec![0u8; 4096]).unwrap();
    }
    // Another split (allowed explicitly): the store is prepared again, and
    // the leftovers of the interrupted preparations are removed first.
    let o = run(mlm().arg("prepare").arg(&cfg).args([
        "--set",
        "data.split_seed=7",
        "--set",
        "checkpoint.allow_config_change=true",
    ]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(leftovers(&out), Vec::<String>::new());
}

#[test]
fn a_trainer_state_with_an_impossible_step_is_refused() {
    let (dir, cfg) = setup();
    let ck = dir.path().join("out/checkpoint-4");
    edit(&ck.join("trainer_state.json"), "\"step\": 4", "\"step\": 999");
    // Keep the checksums consistent: only the content is impossible.
    let sums = ck.join("checksums.json");
    let text = std::fs::read_to_string(&sums).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["trainer_state.json"] = mlm::checkpoint::sha256_file(&ck.join("trainer_state.json")).unwrap().into();
    std::fs::write(&sums, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    fails(
        dir.path(),
        &["train"],
        &cfg,
        &["--set", "training.max_steps=8", "--set", "checkpoint.allow_config_change=true"],
        &["step 999", "checkpoint-4"],
    );
}

/// Rewrites `<dir>/out/data/train.tokens` with `f`.
fn tamper_store(dir: &Path, f: impl Fn(&mut [u8])) {
    let train_bin = dir.join("out/data/train.tokens");
    let mut bytes = std::fs::read(&train_bin).unwrap();
    f(&mut bytes);
    std::fs::write(&train_bin, &bytes).unwrap();
}

#[test]
fn a_token_store_changed_after_preparation_is_refused_naming_the_file() {
    let (dir, cfg) = setup();
    // One token swapped for another of the vocabulary: nothing but the
    // checksum can tell, and an evaluation would silently change.
    tamper_store(dir.path(), |b| {
        let t = u32::from_le_bytes(b[4..8].try_into().unwrap());
        b[4..8].copy_from_slice(&(if t == 2000 { 2001u32 } else { 2000 }).to_le_bytes());
    });
    let expect = ["train.tokens", "does not match its checksum", "prepare the data again"];
    fails(dir.path(), &["train"], &cfg, &["--set", "training.max_steps=8"], &expect);
    fails(dir.path(), &["prepare"], &cfg, &[], &expect);
}

/// Rewrites `trainer_state.json` of `ck` with `edit` and its checksum to match:
/// only the content is wrong.
fn edit_state(ck: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let path = ck.join("trainer_state.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut state);
    std::fs::write(&path, serde_json::to_string_pretty(&state).unwrap()).unwrap();
    let sums = ck.join("checksums.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sums).unwrap()).unwrap();
    v["trainer_state.json"] = mlm::checkpoint::sha256_file(&path).unwrap().into();
    std::fs::write(&sums, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn a_trainer_state_whose_epoch_contradicts_its_step_is_refused() {
    let (dir, cfg) = setup();
    let ck = dir.path().join("out/checkpoint-4");
    edit_state(&ck, |s| s["epoch"] = (s["epoch"].as_u64().unwrap() + 1).into());
    fails(
        dir.path(),
        &["train"],
        &cfg,
        &["--set", "training.max_steps=8"],
        &["checkpoint-4/trainer_state.json", "epoch", "step_in_epoch", "step 4"],
    );
}

/// Writes NaN into the first value of parameter `name` of `<dir>/model.safetensors`.
fn poison(dir: &Path, name: &str, value: f32) {
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let at = 8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
}

#[test]
fn a_model_with_nan_weights_is_refused_at_load_naming_the_file_and_parameter() {
    let (dir, cfg) = setup();
    let model = dir.path().join("nan-model");
    copy_tree(&dir.path().join("out/best"), &model);
    let param = "bert.encoder.layer.1.output.dense.weight";
    poison(&model, param, f32::NAN);
    let expect = ["nan-model/model.safetensors", param, "NaN or infinite"];
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "the cat sat on the mat and looked at the dog. ".repeat(40)).unwrap();
    let model_arg = model.to_string_lossy().into_owned();
    let text_arg = text.to_string_lossy().into_owned();
    let eval = ["--model", &model_arg, "--data", &text_arg, "--block-size", "32"];
    fails_cmd(mlm().arg("eval").args(eval), &expect);
    fails_cmd(mlm().args(["fill-mask", "--model", &model_arg, "the [MASK] sat."]), &expect);
    // A checkpoint to resume is checked as well.
    poison(&dir.path().join("out/checkpoint-4"), param, f32::INFINITY);
    let sums = dir.path().join("out/checkpoint-4/checksums.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sums).unwrap()).unwrap();
    v["model.safetensors"] =
        mlm::checkpoint::sha256_file(&dir.path().join("out/checkpoint-4/model.safetensors")).unwrap().into();
    std::fs::write(&sums, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    fails(dir.path(), &["train"], &cfg, &["--set", "training.max_steps=8"], &["checkpoint-4/model.safetensors", param]);
}

#[test]
fn token_ids_outside_the_vocabulary_in_a_tampered_store_are_named() {
    let (dir, cfg) = setup();
    // A store without checksums (prepared by an older mlm) is still checked.
    let manifest = dir.path().join("out/data/manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    assert!(m.as_object_mut().unwrap().remove("checksums").is_some());
    std::fs::write(&manifest, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    tamper_store(dir.path(), |b| {
        for w in b.chunks_exact_mut(4).step_by(3) {
            w.copy_from_slice(&4_000_000u32.to_le_bytes());
        }
    });
    fails(
        dir.path(),
        &["train"],
        &cfg,
        &[
            "--set",
            "training.max_steps=8",
            "--set",
            "checkpoint.allow_config_change=true",
            "--set",
            "eval.at_start=false",
        ],
        &["token id 4000000", "outside the model's vocabulary", "data"],
    );
}

#[test]
fn out_of_memory_is_one_clear_error() {
    // A 3 GB address-space limit, and a dense vocabulary projection of
    // 256 x 64 positions x 30522 tokens (2 GB of logits, and as much again for
    // their log-softmax): the first micro-batch cannot allocate. The run stops
    // with one line naming the step and its sizes and saying what to change,
    // and writes no checkpoint.
    let (dir, cfg) = setup();
    let out = dir.path().join("oom");
    let o = run(std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -v 3000000; exec {:?} train {:?} --set training.batch_size=512 --set training.micro_batch_size=256 \
         --set training.sparse_head=false \
         --set training.max_steps=8 --set eval.at_start=false --set logging.progress=never \
         --set training.output_dir={:?}",
            env!("CARGO_BIN_EXE_mlm"),
            cfg,
            out
        ))
        // As a developer's shell often has it: still no panic or C++ frames.
        .env("RUST_BACKTRACE", "1"));
    assert!(!o.status.success());
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("panicked") && !stderr.contains("internal error"), "{stderr}");
    assert!(!stderr.contains("frame #") && !stderr.contains("stack backtrace"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let e = errors[0];
    assert!(e.contains("out of memory at step 1 (batch 512, micro-batch 256, block 64)"), "{e}");
    assert!(e.contains("training.micro_batch_size to 128 or less") && e.contains("\"auto\""), "{e}");
    assert!(e.contains("training.activation_checkpointing = true") && e.contains("data.block_size"), "{e}");
    let written: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("checkpoint") || n == "best")
        .collect();
    assert!(written.is_empty(), "{written:?}");
}
