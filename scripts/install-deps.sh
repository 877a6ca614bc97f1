#!/usr/bin/env bash
# Install what the test bed and the suite need, skipping what is already there:
# Debian packages, the Python virtualenv, Kafka jars (Maven Central), the Kubernetes
# control-plane binaries (Go module proxy). Safe to run again; a warm run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need redis-server redis-server
need etcd etcd-server
need kcat kcat
need openssl openssl
need java openjdk-17-jre-headless
need mvn maven
need ss iproute2
need curl curl
need unzip unzip
need promtool prometheus  # prometheus + promtool: the monitoring rules' tests (manifests/monitoring)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "error: missing Debian packages: ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
    exit 2
  fi
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts redis, etcd and prometheus as services on their default ports; the test bed
  # and the tests run their own.
  for svc in redis-server etcd prometheus prometheus-node-exporter; do service "$svc" stop >/dev/null 2>&1 || true; done
fi

# Go >= 1.24 builds Kubernetes 1.33. Without one, fetch the official toolchain module
# from the Go module proxy (the same artefact GOTOOLCHAIN=auto would download).
go_ok() { command -v go >/dev/null && go version | awk '{split($3,v,"."); sub("go","",v[1]); exit !(v[1]>1 || v[2]>=24)}'; }
if ! go_ok; then
  GO_TOOLCHAIN=${GO_TOOLCHAIN:-go1.24.9}
  dest="${AFC_CACHE:-$HOME/.cache/afc}/go/$GO_TOOLCHAIN"
  if [ ! -x "$dest/bin/go" ]; then
    echo "fetching Go toolchain $GO_TOOLCHAIN from the Go module proxy"
    tmp=$(mktemp -d)
    curl -fsSL -o "$tmp/go.zip" "https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-$GO_TOOLCHAIN.linux-amd64.zip"
    unzip -q "$tmp/go.zip" -d "$tmp"
    mkdir -p "$(dirname "$dest")"
    mv "$tmp/golang.org/toolchain@v0.0.1-$GO_TOOLCHAIN.linux-amd64" "$dest"
    chmod +x "$dest/bin/"* "$dest/pkg/tool/"*/* 2>/dev/null || true
    rm -rf "$tmp"
  fi
  export PATH="$dest/bin:$PATH"
fi

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: Python >= 3.11 needed ($PY is $("$PY" --version))" >&2; exit 2; }
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
stamp=.venv/.afc-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test,bench,demo]'
  touch "$stamp"
fi

bash scripts/fetch-kafka.sh
bash scripts/build-k8s.sh
