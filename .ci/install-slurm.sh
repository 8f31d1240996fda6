#!/usr/bin/env bash
# CI: install a real Slurm (controller, node daemon, client) and munge from Debian's packages, so that the
# `slurm`-marked tests run the batch scripts in cluster/slurm/ against a real single-node cluster
# (tests/slurm_cluster.sh starts it under a temp folder; nothing here starts a daemon).
# Idempotent: does nothing when the daemons are already installed. Needs root (or sudo) and apt-get.
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin # the daemons live in sbin, which a non-root PATH may lack

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
    echo "install-slurm: already installed (slurmd $(dpkg-query -W -f='${Version}' slurmd 2>/dev/null || echo '?'))"
    exit 0
fi

SUDO=
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
fi

# Installing the packages must not start system daemons (there may be no init system at all, and the tests start
# their own): a policy-rc.d exiting 101 tells invoke-rc.d "not allowed". Ours is temporary; one already there
# (Debian's container images ship one) is put aside and restored however we leave.
POLICY=/usr/sbin/policy-rc.d
SAVED=$POLICY.install-slurm-saved
if [ -e "$POLICY" ]; then
    $SUDO mv "$POLICY" "$SAVED"
    trap '$SUDO mv -f "$SAVED" "$POLICY"' EXIT
else
    trap '$SUDO rm -f "$POLICY"' EXIT
fi
printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
$SUDO chmod 0755 "$POLICY"

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
echo "install-slurm: installed slurmd $(dpkg-query -W -f='${Version}' slurmd)"
