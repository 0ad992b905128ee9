#!/usr/bin/env bash
# Starts a one-node Slurm on this machine: a private munged, slurmctld and slurmd,
# all writing under STATE_DIR, and waits until the node is idle. Idempotent:
# daemons of this STATE_DIR that are already running are reused.
#
#   scripts/slurm/start-local.sh STATE_DIR
#   export SLURM_CONF=STATE_DIR/slurm.conf      # then sbatch, srun, sinfo ...
#   scripts/slurm/stop-local.sh STATE_DIR
#
# Needs root (SlurmUser=root) and Debian's slurmctld, slurmd, slurm-client and
# munge (scripts/setup.sh installs them). Ports: MLM_SLURM_CTLD_PORT (16817)
# and MLM_SLURM_SLURMD_PORT (16818), away from a system Slurm's 6817/6818.
# CPUs of the node: MLM_SLURM_CPUS (default: the cores here, at least 2).
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 STATE_DIR" >&2
  exit 2
fi
for bin in munged slurmctld slurmd sinfo; do
  command -v "$bin" >/dev/null || { echo "start-local: $bin not found; install slurmctld slurmd slurm-client munge (scripts/setup.sh)" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "start-local: run as root (the local cluster uses SlurmUser=root)" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
state=$(cd "$1" && pwd)
mkdir -p "$state/munge" "$state/ctld" "$state/slurmd" "$state/log"
chmod 700 "$state/munge"
host=$(hostname -s)
cpus=${MLM_SLURM_CPUS:-$(nproc)}
[ "$cpus" -ge 2 ] || cpus=2
conf=$state/slurm.conf
sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$state|g" -e "s|@CPUS@|$cpus|g" \
    -e "s|@CTLD_PORT@|${MLM_SLURM_CTLD_PORT:-16817}|g" \
    -e "s|@SLURMD_PORT@|${MLM_SLURM_SLURMD_PORT:-16818}|g" \
    "$here/slurm.conf.in" >"$conf.new"
mv "$conf.new" "$conf"
export SLURM_CONF=$conf

# running PIDFILE: true when the daemon of that pid file is alive.
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

key=$state/munge/munge.key
if [ ! -s "$key" ]; then
  (umask 077 && head -c 1024 /dev/urandom >"$key")
fi
if ! running "$state/munge/munged.pid"; then
  setsid munged --foreground --force --socket="$state/munge/munge.socket" --key-file="$key" \
    --pid-file="$state/munge/munged.pid" --log-file="$state/log/munged.log" \
    --seed-file="$state/munge/munged.seed" </dev/null >>"$state/log/munged.out" 2>&1 &
  echo $! >"$state/munge/munged.pid"
fi
for _ in $(seq 50); do [ -S "$state/munge/munge.socket" ] && break; sleep 0.1; done
[ -S "$state/munge/munge.socket" ] || { echo "start-local: munged did not start; see $state/log/munged.*" >&2; tail -5 "$state/log/munged."* >&2; exit 1; }

# slurmctld first (slurmd registers with it); -D keeps each in the foreground of
# its own session, so its pid is the one recorded.
if ! running "$state/slurmctld.pid"; then
  setsid slurmctld -D -i </dev/null >>"$state/log/slurmctld.out" 2>&1 &
  echo $! >"$state/slurmctld.pid"
fi
if ! running "$state/slurmd.pid"; then
  setsid slurmd -D </dev/null >>"$state/log/slurmd.out" 2>&1 &
  echo $! >"$state/slurmd.pid"
fi

node_state=""
for _ in $(seq 300); do
  node_state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
  case "$node_state" in idle|mix|alloc) break ;; esac
  for d in slurmctld slurmd; do
    running "$state/$d.pid" || { echo "start-local: $d exited; last lines of its log:" >&2; tail -20 "$state/log/$d.log" "$state/log/$d.out" >&2 2>/dev/null; exit 1; }
  done
  sleep 0.1
done
case "$node_state" in
  idle|mix|alloc) ;;
  *) echo "start-local: node $host is '${node_state:-unknown}' after 30 s; see $state/log/" >&2; exit 1 ;;
esac
echo "start-local: Slurm is up on $host ($cpus CPUs, partition debug)."
echo "  export SLURM_CONF=$conf"
echo "  stop with: $here/stop-local.sh $state"
