#!/usr/bin/env bash
# Make sure the PostgreSQL the tests use (127.0.0.1:5432, database "test") is up.
# Starts the machine's cluster if it is down; never installs or reconfigures it.
set -uo pipefail
host=127.0.0.1
if ! pg_isready -q -h "$host" -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "PostgreSQL is down: starting it"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h "$host" -p 5432 && break; sleep 1; done
  fi
fi
if pg_isready -q -h "$host" -p 5432 2>/dev/null; then
  psql -h "$host" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" \
    | grep -q 1 || createdb -h "$host" -U postgres test || true
else
  echo "warning: no PostgreSQL at $host:5432; the postgres tests will fail" >&2
fi
