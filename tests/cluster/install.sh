#!/usr/bin/env bash
# Install the packages tests/cluster/slurm_cluster.sh needs (Debian/Ubuntu):
# Slurm's daemons and client commands, and munge for its authentication.
# Starts nothing: the packages' own services stay down without systemd, and
# slurm_cluster.sh runs private daemons from a state directory.
set -euo pipefail

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: apt-get not found; install slurm-wlm and munge by hand" >&2
    exit 3
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y slurm-wlm munge
