#!/usr/bin/env bash
# Installing as on a cluster (docs/cluster.md, "Installing on a cluster"), run
# by .ci/run as root. First, set-up given an environment of one's own with torch
# 2.10 refuses it in one line and installs nothing into it. Then an
# unprivileged user, with no apt-get, dpkg, sudo, mpirun or Slurm on its PATH
# and no write access outside its home,
#   1. runs the set-up of the build: it must pass and install nothing;
#   2. runs the set-up of the tests: it must name mpirun and Slurm as missing,
#      one line each, and still pass (their tests skip);
#   3. `make build`, then `make install PREFIX=~/prefix PROFILE=debug`;
#   4. runs a 2-step job with the installed mlm-launch and mlm, LD_LIBRARY_PATH
#      unset, and checks that ldd finds every library of the installed mlm.
# What a cluster shares, the user sees read-only at its usual path: the CI's
# Python environment (torch 2.11; as MLM_VENV, an environment set-up did not
# make and must use as it is), the Python it was made from, and the Rust
# toolchain (as `module load rust` would put it on PATH). /root is mode 700, so
# the user runs in a private mount namespace where a tmpfs covers /root and
# read-only binds put back just those three folders; nothing changes outside it.
# Cost: its cargo target is seeded with hard links to the CI's compiled dependencies
# ($CARGO_TARGET_DIR/debug), so only the workspace's crates build (a debug
# build, not a release one). Cargo's fingerprints hold the absolute paths of the
# registry's sources and torch-sys's libtorch, so its own cargo home is mounted
# at the CI's path in the namespace, and torch is at the CI's path.
# Usage: scripts/check-install.sh (as root, after `make build` filled $CARGO_TARGET_DIR).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
source scripts/env.sh
say() { echo "check-install: $*"; }
fail() { echo "check-install: FAIL: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || fail "run it as root (it creates a user and a mount namespace)"
seed="${CARGO_TARGET_DIR:-$repo/target}/debug"
[ -d "$seed/deps" ] || fail "no dependencies built in $seed: run \`make build\` first"
t0=$SECONDS

user=mlm-install-check
id -u "$user" >/dev/null 2>&1 || useradd --no-create-home --home-dir /nonexistent --shell /bin/bash "$user"
work="$(mktemp -d /tmp/mlm-install-check.XXXXXX)"
cleanup() {
  rm -rf "$work"
  userdel "$user" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# An environment of one's own with another torch: refused in one line, and
# nothing installed into it.
other="$work/other"
python3 -m venv --without-pip "$other/env"
site="$("$other/env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir "$site/torch-2.10.0+cu126.dist-info"
printf 'Metadata-Version: 2.1\nName: torch\nVersion: 2.10.0+cu126\n' > "$site/torch-2.10.0+cu126.dist-info/METADATA"
before="$(ls "$site")"
if MLM_VENV="$other/env" MLM_PYTHON= bash scripts/setup.sh build > "$other/log" 2>&1; then
  cat "$other/log"; fail "set-up accepted an environment with torch 2.10"
fi
[ "$(grep -c "^setup: missing: torch 2.11 .*has torch 2.10.0+cu126" "$other/log")" -eq 1 ] \
  && [ "$(grep -c "^setup: missing:" "$other/log")" -eq 1 ] || { cat "$other/log"; fail "not one line for torch 2.10"; }
[ "$(ls "$site")" = "$before" ] || fail "set-up installed into an environment it did not make"
say "set-up refuses an environment with torch 2.10 in one line and installs nothing into it"

home="$work/home"
mkdir -p "$home/mlm" "$home/.cargo" "$home/target/debug" "$work/bin"

# The user's clone: the files git tracks or would track, as they are now.
git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$home/mlm"
# Its cargo home and target: hard links to the CI's registry (timestamps kept:
# build scripts that watch files stay fresh) and compiled dependencies, which
# the user reads and cannot change (root's files; it owns only the folders, for
# what it adds), and copies of what cargo rewrites (the registry's index, the
# fingerprints). The workspace's own crates are left out: they build.
registry="${CARGO_HOME:-$HOME/.cargo}/registry"
mkdir "$home/.cargo/registry"
cp -al "$registry/src" "$registry/cache" "$home/.cargo/registry/"
cp -a "$registry/index" "$home/.cargo/registry/"
cp -al "$seed/deps" "$seed/build" "$home/target/debug/"
cp -a "$seed/.fingerprint" "$home/target/debug/"
find "$home/target/debug" -maxdepth 2 \( -name '*mlm*' -o -name 'integration-*' -o -name '*_throughput-*' \
  -o -name 'resume_position-*' \) -exec rm -rf {} +
chown "$user" "$home" "$home/mlm" "$home/.cargo" "$home/target"
find "$home/mlm" "$home/.cargo/registry/index" "$home/target/debug/.fingerprint" -exec chown "$user" {} +
find "$home/.cargo/registry" "$home/target" -type d -exec chown "$user" {} +
chmod 755 "$work"

# Its PATH: /usr/bin without the package managers, sudo, MPI or Slurm; the Rust
# toolchain's bin/; the Python environment's bin/ (scripts/env.sh adds it).
hidden='^(apt|apt-.*|aptitude|dpkg|dpkg-.*|sudo|su|mpirun|mpiexec|orterun|ompi_info|srun|sbatch|salloc|scancel|squeue|scontrol|sinfo|munge|unmunge)$'
for f in /usr/local/bin/* /usr/bin/*; do
  name="$(basename "$f")"
  [[ "$name" =~ $hidden ]] || [ -e "$work/bin/$name" ] || ln -s "$f" "$work/bin/$name"
done
toolchain="$(rustc --print sysroot)"
python_home="$(sed -n 's/^home = //p' "$MLM_VENV/pyvenv.cfg")"
python_home="$(dirname "$python_home")"
say "set up in $((SECONDS - t0)) s; the user's build starts"

# Inside the namespace: /root covered, the shared folders put back read-only,
# then the user's session.
export CHECK_WORK="$work" CHECK_USER="$user" CHECK_SHARED="$MLM_VENV:$toolchain:$python_home"
export CHECK_CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
unshare --mount --propagation private bash -euo pipefail <<'NS'
shared=()
IFS=: read -r -a shared <<< "$CHECK_SHARED"
i=0
for d in "${shared[@]}"; do
  mkdir -p "$CHECK_WORK/ro/$i"
  mount --bind "$d" "$CHECK_WORK/ro/$i"
  i=$((i + 1))
done
mount -t tmpfs -o mode=755 tmpfs /root
i=0
for d in "${shared[@]}"; do
  case "$d" in /root/*) ;; *) i=$((i + 1)); continue ;; esac
  mkdir -p "$d"
  mount --bind "$CHECK_WORK/ro/$i" "$d"
  mount -o remount,bind,ro "$d"
  i=$((i + 1))
done
IFS=: read -r venv toolchain _ <<< "$CHECK_SHARED"
home="$CHECK_WORK/home"
mkdir -p "$CHECK_CARGO_HOME"
mount --bind "$home/.cargo" "$CHECK_CARGO_HOME"
exec runuser -u "$CHECK_USER" -- env -i HOME="$home" USER="$CHECK_USER" LANG=C.UTF-8 \
  PATH="$toolchain/bin:$CHECK_WORK/bin" CARGO_HOME="$CHECK_CARGO_HOME" CARGO_TARGET_DIR="$home/target" \
  CARGO_NET_OFFLINE=true MLM_VENV="$venv" bash -euo pipefail -c '
say() { echo "check-install (as $USER): $*"; }
fail() { echo "check-install (as $USER): FAIL: $*" >&2; exit 1; }
cd ~/mlm
for tool in apt-get dpkg sudo mpirun srun; do
  ! command -v "$tool" >/dev/null || fail "$tool is on the user'"'"'s PATH"
done
[ ! -w /usr/bin ] && [ ! -w "$MLM_VENV" ] || fail "the user can write outside its home"

bash scripts/setup.sh build > ~/setup-build.log 2>&1 || { cat ~/setup-build.log; fail "scripts/setup.sh build failed"; }
! grep -q "^setup: installing" ~/setup-build.log || { cat ~/setup-build.log; fail "the build set-up installed something"; }
bash scripts/setup.sh test > ~/setup-test.log 2>&1 || { cat ~/setup-test.log; fail "scripts/setup.sh test failed"; }
cat ~/setup-test.log
grep -q "^setup: missing: mpirun" ~/setup-test.log || fail "the test set-up did not name mpirun as missing"
grep -q "^setup: missing: a local Slurm" ~/setup-test.log || fail "the test set-up did not name Slurm as missing"
[ "$(grep -c "^setup: missing:" ~/setup-test.log)" -eq 2 ] || fail "the test set-up named more than mpirun and Slurm"

TIMEFORMAT="%R s, CPU %U s user + %S s system"
{ time make build > ~/build.log 2>&1; } 2> ~/build.time || { tail -40 ~/build.log; fail "make build failed"; }
say "make build: $(cat ~/build.time), compiled: $(grep -o "Compiling [^ ]*" ~/build.log | cut -d" " -f2 | tr "\n" " ")"
make install PREFIX="$HOME/prefix" PROFILE=debug > ~/install.log 2>&1 || { cat ~/install.log; fail "make install failed"; }
for b in mlm mlm-launch mlm-comm-check; do [ -x ~/prefix/bin/$b ] || fail "make install did not install $b"; done
! ldd ~/prefix/bin/mlm | grep -q "not found" || { ldd ~/prefix/bin/mlm; fail "the installed mlm needs LD_LIBRARY_PATH"; }

mkdir ~/job
cp tests/fixtures/resume-d53fc4a/{job.toml,config.json,tokenizer.json,corpus.txt} ~/job/
cd ~/job
~/prefix/bin/mlm-launch job.toml --device cpu --nproc 1 --set training.max_steps=2 > ~/job.log 2>&1 \
  || { tail -30 ~/job.log; fail "the 2-step job failed"; }
[ -d out/checkpoint-2 ] || { tail -30 ~/job.log; ls -R out; fail "the 2-step job wrote no checkpoint-2"; }
say "a 2-step job ran with the installed binaries (out/: $(ls out | tr "\n" " "))"
'
NS
say "PASS in $((SECONDS - t0)) s"
