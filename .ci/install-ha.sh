#!/usr/bin/env bash
# Tools for the Redis high-availability tests (tests/tests/redis_ha.rs): Debian's
# redis-server (data nodes and cluster nodes) and redis-sentinel. Idempotent.
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-sentinel >/dev/null || need+=(redis-sentinel)
command -v redis-cli >/dev/null || need+=(redis-tools)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
redis-sentinel --version | head -1
