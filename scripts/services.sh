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
# RabbitMQ 3.10 stops opening connections once its queues hold all the file handles its
# open-files limit allows (1024 -> 927 handles); RabbitMQ's docs advise at least 65536.
broker=$(pgrep -u rabbitmq -f beam.smp | head -1 || true)
limit=$(awk '/Max open files/ {print $4}' "/proc/${broker:-0}/limits" 2>/dev/null || true)
if [ -n "$limit" ] && [ "$limit" != unlimited ] && [ "$limit" -lt 65536 ]; then
  echo "services: RabbitMQ may open only $limit files; with many durable queues it stops" \
       "accepting connections. Raise it (systemd LimitNOFILE, or ulimit -n before" \
       "rabbitmq-server) to 65536 for anything beyond tests" >&2
fi
echo "services: PostgreSQL and RabbitMQ are up" >&2
