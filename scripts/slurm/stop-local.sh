#!/usr/bin/env bash
# Stops the one-node Slurm that start-local.sh STATE_DIR started: cancels its
# jobs, then stops slurmd, slurmctld and munged (SIGTERM, SIGKILL after 10 s).
# Leaves STATE_DIR in place. Safe to run when nothing is running.
#
#   scripts/slurm/stop-local.sh STATE_DIR
set -uo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 STATE_DIR" >&2
  exit 2
fi
[ -d "$1" ] || exit 0
state=$(cd "$1" && pwd)
export SLURM_CONF=$state/slurm.conf

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Running job steps (slurmstepd) outlive slurmd: end the jobs first.
if running "$state/slurmctld.pid"; then
  scancel --full --quiet --user=root 2>/dev/null || true
  for _ in $(seq 100); do
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
    sleep 0.1
  done
fi
stop() {
  local pidfile=$1
  running "$pidfile" || { rm -f "$pidfile"; return 0; }
  local pid
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    sleep 0.1
  done
  echo "stop-local: $pidfile ($pid) ignored SIGTERM; killing it" >&2
  kill -KILL "$pid" 2>/dev/null
  rm -f "$pidfile"
}
stop "$state/slurmd.pid"
stop "$state/slurmctld.pid"
stop "$state/munge/munged.pid"
# A slurmstepd of this cluster that survived (its environment names our config).
for p in $(pgrep -x slurmstepd 2>/dev/null); do
  if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "SLURM_CONF=$state/slurm.conf"; then
    kill -KILL "$p" 2>/dev/null
  fi
done
echo "stop-local: stopped the Slurm of $state"
