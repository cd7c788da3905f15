#!/usr/bin/env bash
# Install what the machine needs beyond Python packages: the shared libpython 3.11 that
# Triton's Python-backend stub links to. Idempotent; needs root (or sudo) only when
# something is missing.
set -euo pipefail

python=${1:-python3.11}
libdir=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
soname=libpython3.11.so.1.0
if [[ -e "$libdir/$soname" ]] || ldconfig -p | grep -q "$soname"; then
    exit 0
fi
echo "installing Debian's libpython3.11 (the Triton Python-backend stub links to $soname)"
sudo_cmd=()
[[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq libpython3.11
