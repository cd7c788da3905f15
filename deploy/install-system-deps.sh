#!/usr/bin/env bash
# Install what the machine needs beyond Python packages, from Debian's archive: the shared libpython
# 3.11 that Triton's Python-backend stub links to; redis-server (the cache's L2 in its integration
# tests); prometheus with promtool (the alert rules' checks and the scrape test); PostgreSQL (the
# store's second backend in its tests, started by tests/serving.py from its initdb and postgres).
# Idempotent; needs root (or sudo) only when something is missing.
set -euo pipefail

python=${1:-python3.11}
missing=()

libdir=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
soname=libpython3.11.so.1.0
if [[ ! -e "$libdir/$soname" ]] && ! ldconfig -p | grep -q "$soname"; then
    missing+=(libpython3.11)
fi
command -v redis-server >/dev/null || missing+=(redis-server)
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    missing+=(prometheus)
fi
initdbs=(/usr/lib/postgresql/*/bin/initdb)
[[ -x ${initdbs[0]} ]] || missing+=(postgresql)

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi
echo "installing Debian's ${missing[*]}"
sudo_cmd=()
[[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
