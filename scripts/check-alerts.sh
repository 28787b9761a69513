#!/usr/bin/env bash
# Checks the Prometheus alert rules (deploy/prometheus/alerts.yml) and runs their unit
# tests (deploy/prometheus/alerts_test.yml) with promtool. Installs Debian's `prometheus`
# package (which has promtool) when promtool is missing and apt-get is available.
set -euo pipefail
cd "$(dirname "$0")/../deploy/prometheus"

if ! command -v promtool >/dev/null; then
    if command -v apt-get >/dev/null; then
        echo "[check-alerts] installing promtool (apt-get install prometheus)" >&2
        sudo=""
        [[ "$(id -u)" == 0 ]] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    else
        echo "[check-alerts] promtool not found: install Prometheus's promtool" >&2
        exit 2
    fi
fi

promtool check rules alerts.yml
promtool test rules alerts_test.yml
