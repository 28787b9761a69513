#!/usr/bin/env bash
# Makes sure the local PostgreSQL (127.0.0.1:5432, trust auth) and RabbitMQ (127.0.0.1:5672,
# guest/guest) that the tests and scripts/run-local.sh use are installed and running.
set -euo pipefail

need_install=()
command -v pg_ctlcluster >/dev/null 2>&1 || need_install+=(postgresql)
command -v rabbitmq-server >/dev/null 2>&1 || need_install+=(rabbitmq-server)
if [ ${#need_install[@]} -gt 0 ]; then
  echo "installing ${need_install[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_install[@]}" >/dev/null
  if [[ " ${need_install[*]} " == *" postgresql "* ]]; then
    # A fresh Debian cluster wants a password on TCP; the tests connect as postgres with
    # trust, like the development machines.
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
      sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    done
  fi
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 5432; then
  echo "starting PostgreSQL" >&2
  # shellcheck disable=SC2012 # version directory names are plain numbers
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
if ! port_open 5672; then
  echo "starting RabbitMQ" >&2
  rabbitmq-server -detached
  rabbitmqctl await_startup >/dev/null
fi
for _ in $(seq 1 60); do
  if port_open 5432 && port_open 5672; then
    exit 0
  fi
  sleep 1
done
echo "PostgreSQL or RabbitMQ did not come up on 127.0.0.1:5432 / :5672" >&2
exit 1
