#!/usr/bin/env bash
# Installs the real client libraries the interop suite (tests/tests/interop.rs) drives, at
# pinned versions, into their own virtualenv and npm prefix. Idempotent: skipped when the
# pinned versions are already there.
#   openai, anthropic, mcp  the official Python SDKs
#   requests, httpx, aiohttp  the HTTP clients agent frameworks use
#   uvicorn, starlette      serve the stand-in MCP server built with the mcp SDK itself
#   undici                  Node's fetch with a ProxyAgent (6.x: the CI machine runs Node 20)
set -euo pipefail

prefix=${TOLLGATE_CLIENTS:-/opt/tollgate-clients}
pins=(openai==3.57.0 anthropic==2.14.0 mcp==2.3.0 requests==2.34.2 httpx==0.28.1
  aiohttp==3.14.5 uvicorn==0.54.0 starlette==1.10.0)
undici=6.29.1

if [ ! -x "$prefix/venv/bin/python" ]; then
  python3 -m venv "$prefix/venv"
fi
want=$(printf '%s\n' "${pins[@]}" | sort)
have=$("$prefix/venv/bin/pip" freeze 2>/dev/null | tr 'A-Z_' 'a-z-' | sort || true)
missing=$(comm -23 <(echo "$want" | tr 'A-Z_' 'a-z-') <(echo "$have"))
if [ -n "$missing" ]; then
  "$prefix/venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}"
fi

if [ "$(cd "$prefix/node" 2>/dev/null && node -p 'require("undici/package.json").version' 2>/dev/null)" != "$undici" ]; then
  mkdir -p "$prefix/node"
  (cd "$prefix/node" && npm install --silent --no-audit --no-fund "undici@$undici" >/dev/null)
fi

"$prefix/venv/bin/python" -c 'import openai, anthropic, mcp, requests, httpx, aiohttp; print("clients: openai", openai.__version__, "anthropic", anthropic.__version__)'
