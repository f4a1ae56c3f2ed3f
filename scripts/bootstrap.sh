#!/usr/bin/env bash
# Idempotent set-up for `make test` / `make demo`: Debian packages (when root and missing), a .venv,
# and the package installed editable with its dev extras. Quiet unless something fails.
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc + libc6-dev: the relay's native forwarding loop (src/relaymesh/relay/_fastfwd.c)
APT_PKGS=(iproute2 nftables iperf3 wireguard-go wireguard-tools tcpdump procps postgresql nebula
          gcc libc6-dev)
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.relaymesh-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log=$(mktemp)
  if ! { .venv/bin/python -m pip install -q --upgrade pip && \
         .venv/bin/python -m pip install -q -e '.[dev]'; } >"$log" 2>&1; then
    cat "$log"; rm -f "$log"; echo "bootstrap: pip install failed" >&2; exit 1
  fi
  rm -f "$log"
  touch "$stamp"
fi
# The relay's native loop, next to its source (named by the source's hash, so it is rebuilt when the
# source changes and left alone otherwise; without a compiler the relay forwards with its Python
# loop and says so in its metrics).
.venv/bin/python -m relaymesh.relay.native >/dev/null || echo "bootstrap: native relay loop not built (see above); the relay will use its Python loop" >&2
