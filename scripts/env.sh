# Sourced by the Makefile and scripts: the Python environment that holds torch
# 2.11 (libtorch for tch; transformers for the reference tests), outside the
# clone so that every clone and CI run reuses it.
#   MLM_VENV    the environment (default ~/.cache/mlm/venv, which set-up makes)
#   MLM_PYTHON  its Python (default $MLM_VENV/bin/python); given alone, e.g. a
#               conda environment's python, MLM_VENV is the folder above its bin/
# An environment of one's own (on a cluster's shared filesystem, torch built for
# the cluster's CUDA) is used as it is: docs/cluster.md, "Installing on a cluster".
if [ -n "${MLM_PYTHON:-}" ] && [ -z "${MLM_VENV:-}" ]; then
  MLM_VENV="$(dirname "$(dirname "$MLM_PYTHON")")"
fi
export MLM_VENV="${MLM_VENV:-$HOME/.cache/mlm/venv}"
export MLM_PYTHON="${MLM_PYTHON:-$MLM_VENV/bin/python}"
# torch-sys (tch's build) asks the `python3` first on PATH where torch is.
export PATH="$(dirname "$MLM_PYTHON"):$PATH"
export LIBTORCH_USE_PYTORCH=1
