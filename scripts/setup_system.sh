#!/usr/bin/env bash
# Installs the Debian packages edpo's own build and tests need beyond Rust and Python:
# OpenMPI (the `mpi` feature: `mpirun -n N edpo train`) and libclang (the MPI bindings are
# generated at build time). Idempotent: does nothing when they are present.
set -euo pipefail
need=()
command -v mpirun >/dev/null || need+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/openmpi/mpi.h ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] \
  || dpkg -s libopenmpi-dev >/dev/null 2>&1 || need+=(libopenmpi-dev)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
[ ${#need[@]} -eq 0 ] && exit 0
echo "[setup] installing ${need[*]} (apt-get)" >&2
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
echo "[setup] system packages ready" >&2
