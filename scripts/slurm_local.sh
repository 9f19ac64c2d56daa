#!/usr/bin/env bash
# `make slurm-check`: a single-node Slurm on this machine (munged, slurmctld and slurmd from
# Debian's packages, started here in the background with a minimal configuration — no systemd
# — and stopped at the end) runs deploy/slurm/prep.sbatch as a 3-task job array over the sample
# data, and the shards folder it leaves must equal a one-process `edpo prep` of the same data,
# file for file and byte for byte. Given an edpo built with `--features mpi` as well, it also
# runs deploy/slurm/train.sbatch (2 tasks, srun --mpi=pmix) against one process.
#
#   scripts/slurm_local.sh [EDPO_BINARY [EDPO_MPI_BINARY]]   (default: $CARGO_TARGET_DIR/debug/edpo)
#
# Installs slurm-wlm and munge with apt-get when they are missing (needs root). Everything
# else lives in a temporary folder: munge key and socket, Slurm state, logs, the outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
EDPO="$(realpath "${1:-${CARGO_TARGET_DIR:-$HOME/.cache/edpo/target}/debug/edpo}")"
# Optional: an edpo built with `--features mpi`; then deploy/slurm/train.sbatch runs too.
EDPO_MPI="${2:+$(realpath "$2")}"
PY="${EDPO_VENV:-$HOME/.cache/edpo/venv}/bin/python"
[ -x "$EDPO" ] || { echo "error: edpo binary $EDPO not found; run \`make build\` first" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "error: Slurm is not installed; as root: apt-get install slurm-wlm munge" >&2; exit 2; }
  echo "[slurm] installing slurm-wlm and munge (Debian packages)" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
fi

W="$(mktemp -d /tmp/edpo-slurm.XXXXXX)"
PIDS=()
stop() {
  # Our daemons only, by the pids we started.
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "${KEEP:-0}" = 1 ]; then echo "[slurm] kept $W" >&2; else rm -rf "$W"; fi
}
trap stop EXIT

# munge: a key and a socket of our own.
mkdir -p "$W/munge" "$W/state" "$W/spool" "$W/out"
chmod 700 "$W/munge"
dd if=/dev/urandom of="$W/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$W/munge/munge.key"
munged --foreground --force --key-file="$W/munge/munge.key" --socket="$W/munge/munge.sock" \
  --pid-file="$W/munge/munged.pid" --log-file="$W/munge/munged.log" \
  --seed-file="$W/munge/munged.seed" 2>>"$W/munge/munged.log" &
PIDS+=($!)

HOST="$(hostname -s)"
CPUS="$(nproc)"
PORT=$((20000 + RANDOM % 20000))
export SLURM_CONF="$W/slurm.conf"
cat >"$SLURM_CONF" <<EOF
ClusterName=edpo-check
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$W/munge/munge.sock
CredType=cred/munge
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.pid
SlurmctldLogFile=$W/slurmctld.log
SlurmdLogFile=$W/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=2048 State=UNKNOWN
PartitionName=check Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

for _ in $(seq 50); do [ -S "$W/munge/munge.sock" ] && break; sleep 0.1; done
slurmctld -D -i -f "$SLURM_CONF" 2>>"$W/slurmctld.log" &
PIDS+=($!)
slurmd -D -f "$SLURM_CONF" -N "$HOST" 2>>"$W/slurmd.log" &
PIDS+=($!)

echo "[slurm] waiting for node $HOST" >&2
state=""
for _ in $(seq 120); do
  state="$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)"
  [ "$state" = idle ] && break
  sleep 0.5
done
if [ "$state" != idle ]; then
  echo "error: the Slurm node did not come up (state '$state'); logs:" >&2
  tail -n 20 "$W"/*.log "$W/munge/munged.log" >&2 || true
  exit 1
fi

# One array per input (plain Parquet, chat JSONL). Task ids 1-3, not 0-2: the worker index
# is SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN.
check() {
  local name=$1 data=$2
  local args=(--model "$ROOT/data-samples/bundle" --data "$ROOT/$data" --shard-size 100)
  echo "[slurm] $name: sbatch --array=1-3 deploy/slurm/prep.sbatch over $data" >&2
  if ! EDPO="$EDPO" sbatch --wait --array=1-3 --cpus-per-task=1 --job-name="edpo-$name" \
      --output="$W/$name-%a.out" deploy/slurm/prep.sbatch "${args[@]}" --out "$W/out/$name-array" >/dev/null; then
    echo "error: the array job failed; task outputs:" >&2
    cat "$W/$name"-*.out >&2 || true
    exit 1
  fi
  "$EDPO" --quiet --threads 1 prep "${args[@]}" --out "$W/out/$name-one" >/dev/null
  if ! diff <(cd "$W/out/$name-one" && sha256sum -- *) <(cd "$W/out/$name-array" && sha256sum -- *) >&2; then
    echo "error: $name: the array's shards differ from one process's" >&2
    exit 1
  fi
  echo "[slurm] $name: $(ls "$W/out/$name-array" | wc -l) files identical to one process's" >&2
}
# deploy/slurm/train.sbatch: 2 tasks, one MPI rank each (srun --mpi=pmix), against one process
# of the same binary: identical k on every pair and β, parameters within 1e-6 relative.
check_mpi() {
  local shards="$W/out/mpi-shards"
  "$EDPO" --quiet --threads 1 prep --model "$ROOT/data-samples/bundle" \
    --data "$ROOT/data-samples/prefs/train.plain.jsonl" --out "$shards" >/dev/null
  local args=(--lr 1e-3 --beta 0.1 --epsilon 0.05 --batch-size 16 --micro-batch 4 --max-steps 6
              --model "$ROOT/data-samples/bundle" --shards "$shards")
  echo "[slurm] mpi: sbatch --ntasks=2 deploy/slurm/train.sbatch (srun, 2 ranks) against one process" >&2
  if ! EDPO="$EDPO_MPI" sbatch --wait --ntasks=2 --cpus-per-task=1 --job-name=edpo-train \
      --output="$W/mpi.out" deploy/slurm/train.sbatch "${args[@]}" --out "$W/out/mpi-two" >/dev/null; then
    echo "error: the MPI training job failed; its output:" >&2
    cat "$W/mpi.out" >&2 || true
    exit 1
  fi
  "$EDPO_MPI" --quiet --threads 1 train "${args[@]}" --out "$W/out/mpi-one" >/dev/null
  "$PY" - "$W/out/mpi-one" "$W/out/mpi-two" <<'PYEOF' >&2 || exit 1
import sys
import numpy as np
import pyarrow.parquet as pq
from safetensors.numpy import load_file

one, two = sys.argv[1:]
k1 = pq.read_table(f"{one}/pairs.parquet", columns=["pair_id", "step", "k"]).to_pylist()
k2 = pq.read_table(f"{two}/pairs.parquet", columns=["pair_id", "step", "k"]).to_pylist()
b1 = pq.read_table(f"{one}/metrics.parquet", columns=["kl/beta_next"]).column(0).to_pylist()
b2 = pq.read_table(f"{two}/metrics.parquet", columns=["kl/beta_next"]).column(0).to_pylist()
p1, p2 = load_file(f"{one}/final/model.safetensors"), load_file(f"{two}/final/model.safetensors")
rel = max(float(np.abs(p1[n] - p2[n]).max() / max(np.abs(p1[n]).max(), 1e-30)) for n in p1)
ok = k1 == k2 and b1 == b2 and rel <= 1e-6
print(f"[slurm] mpi: {len(k1)} pair records, k identical {k1 == k2}, beta identical {b1 == b2}, "
      f"parameters max rel diff {rel:.1e}")
sys.exit(0 if ok else 1)
PYEOF
}

check plain data-samples/prefs/train.plain.parquet
check chat data-samples/prefs/train.chat.jsonl
if [ -n "$EDPO_MPI" ]; then
  check_mpi
  echo "slurm-check: 3 passed, 0 failed"
else
  echo "slurm-check: 2 passed, 0 failed"
fi
