#!/usr/bin/env bash
# The local PostgreSQL that the fleet server's storage tests use (idempotent): start the
# cluster when it is not running, and make a test role and database for loopback use only.
set -euo pipefail
command -v pg_lsclusters >/dev/null || { echo "postgres: not installed, tests will skip it"; exit 0; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  read -r version cluster _ < <(pg_lsclusters -h | head -n 1)
  echo "postgres: starting cluster $version/$cluster"
  $SUDO pg_ctlcluster "$version" "$cluster" start
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
psql_admin() { $SUDO runuser -u postgres -- psql -v ON_ERROR_STOP=1 -tAq "$@"; }
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = 'edgecam_test'")" != "1" ]; then
  echo "postgres: creating role edgecam_test"
  psql_admin -c "CREATE ROLE edgecam_test LOGIN CREATEDB PASSWORD 'edgecam_test'"
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = 'edgecam_test'")" != "1" ]; then
  psql_admin -c "CREATE DATABASE edgecam_test OWNER edgecam_test"
fi
