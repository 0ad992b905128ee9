# Sourced by the Makefile and scripts: where the Python environment (libtorch for
# tch, transformers for the reference tests) lives, outside the clone so that
# every clone and CI run reuses it.
export MLM_VENV="${MLM_VENV:-$HOME/.cache/mlm/venv}"
export PATH="$MLM_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export MLM_PYTHON="$MLM_VENV/bin/python"
