#!/usr/bin/env bash
# Make sure the local PostgreSQL and RabbitMQ answer; start them if this machine has them
# installed but stopped. Exits non-zero, saying which, if one cannot be reached.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "services: starting PostgreSQL" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
pg_isready -q -h 127.0.0.1 -p 5432 || { echo "services: PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }

if ! port_open 5672; then
  echo "services: starting RabbitMQ" >&2
  rabbitmq-server -detached
  for _ in $(seq 1 60); do port_open 5672 && break; sleep 1; done
  rabbitmqctl await_startup >/dev/null
fi
port_open 5672 || { echo "services: RabbitMQ is not reachable on 127.0.0.1:5672" >&2; exit 1; }
echo "services: PostgreSQL and RabbitMQ are up" >&2
