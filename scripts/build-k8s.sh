#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler and kubectl from the Go
# module proxy. k8s.io/kubernetes replaces its staging modules with local paths, so a
# wrapper module re-points each of them at its published v0.X.Y version.
# Output is cached outside the work tree, keyed by version; a second run is a no-op.
set -euo pipefail
K8S_VERSION=${K8S_VERSION:-v1.33.13}
CACHE=${AFC_CACHE:-$HOME/.cache/afc}
out="$CACHE/k8s/$K8S_VERSION/bin"
bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl)

have_all() { for b in "${bins[@]}"; do [ -x "$out/$b" ] || return 1; done; }
if have_all; then echo "k8s $K8S_VERSION: cached in $out"; exit 0; fi

command -v go >/dev/null || { echo "error: go not found; install Go >= 1.24 (https://go.dev/dl) and retry" >&2; exit 2; }

staging_minor="v0.${K8S_VERSION#v1.}"
work="$CACHE/k8s/$K8S_VERSION/src"
mkdir -p "$work" "$out"
cd "$work"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

# The staging module list comes from the release's own go.mod, not a hand-kept copy.
go mod download -json "k8s.io/kubernetes@$K8S_VERSION" > dl.json
gomod=$(python3 -c 'import json,sys; print(json.load(open("dl.json"))["GoMod"])')
mapfile -t staging < <(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod")
[ "${#staging[@]}" -gt 20 ] || { echo "error: could not read staging modules from $gomod" >&2; exit 1; }

{
  echo "module afc.dev/k8sbuild"
  echo "go 1.24.0"
  echo "require k8s.io/kubernetes $K8S_VERSION"
  for m in "${staging[@]}"; do echo "replace $m => $m $staging_minor"; done
} > go.mod
cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
go mod tidy -e >tidy.log 2>&1 || { cat tidy.log >&2; exit 1; }

major=${K8S_VERSION#v}; major=${major%%.*}
minor=${K8S_VERSION#v*.}; minor=${minor%%.*}
ld="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor"
ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"
echo "building ${bins[*]} $K8S_VERSION into $out (several minutes on 2 cores the first time)"
go build -trimpath -ldflags "$ld" -o "$out/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
have_all
"$out/kube-apiserver" --version
