#!/usr/bin/env bash
# Run a command with a throwaway PostgreSQL 15 (+ Q3C) server on 127.0.0.1.
#
#   tests/with_postgres.sh COMMAND [ARGS...]
#
# Starts a cluster in a fresh temporary directory on a free port (owned by the
# `postgres` user when run as root), creates the database `toolkit_test` with the q3c
# extension (when installed), exports TOOLKIT_PG_URL=postgresql+psycopg://postgres@127.0.0.1:PORT/toolkit_test,
# runs the command, then stops the server and removes the directory, also on failure or
# Ctrl-C.  The command's exit status is returned.
#
# If TOOLKIT_PG_URL is already set, the command runs against that server unchanged.
# Without the server binaries (PGBIN, default /usr/lib/postgresql/15/bin) the command runs
# without TOOLKIT_PG_URL (the PostgreSQL tests then start their own server or skip);
# with CI=true that is an error instead (exit 2).
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi
if [ -n "${TOOLKIT_PG_URL:-}" ]; then
  exec "$@"
fi
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
if [ ! -x "$PGBIN/initdb" ] || [ ! -x "$PGBIN/pg_ctl" ]; then
  if [ "${CI:-}" = "true" ]; then
    echo "with_postgres.sh: error: no PostgreSQL server binaries in $PGBIN; install them" >&2
    echo "  (Debian/Ubuntu as root: apt-get install postgresql-15 postgresql-15-q3c, or: make postgres)" >&2
    exit 2
  fi
  echo "with_postgres.sh: no PostgreSQL in $PGBIN; running without TOOLKIT_PG_URL" >&2
  exec "$@"
fi

workdir=$(mktemp -d "${TMPDIR:-/tmp}/toolkit-pg.XXXXXX")
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
  chown postgres: "$workdir"
  as_pg=(runuser -u postgres --)
fi
port=$(python3 - <<'PY' 2>/dev/null || echo $((20000 + RANDOM % 20000))
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
PY
)

# shellcheck disable=SC2329  # invoked by the EXIT trap
cleanup() {
  "${as_pg[@]}" "$PGBIN/pg_ctl" -D "$workdir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"${as_pg[@]}" "$PGBIN/initdb" -D "$workdir/data" --auth=trust -U postgres >"$workdir/initdb.log" 2>&1 || {
  echo "with_postgres.sh: initdb failed:" >&2; cat "$workdir/initdb.log" >&2; exit 1; }
"${as_pg[@]}" "$PGBIN/pg_ctl" -D "$workdir/data" -l "$workdir/server.log" -w \
  -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$workdir" start >/dev/null || {
  echo "with_postgres.sh: the server did not start:" >&2; cat "$workdir/server.log" >&2; exit 1; }
"$PGBIN/createdb" -h 127.0.0.1 -p "$port" -U postgres toolkit_test
if ! "$PGBIN/psql" -q -h 127.0.0.1 -p "$port" -U postgres -d toolkit_test \
     -c "CREATE EXTENSION IF NOT EXISTS q3c" >/dev/null 2>&1; then
  echo "with_postgres.sh: warning: the q3c extension is not installed (apt-get install postgresql-15-q3c)" >&2
fi
export TOOLKIT_PG_URL="postgresql+psycopg://postgres@127.0.0.1:$port/toolkit_test"
echo "with_postgres.sh: PostgreSQL on 127.0.0.1:$port (TOOLKIT_PG_URL=$TOOLKIT_PG_URL)" >&2
set +e
"$@"
status=$?
set -e
exit "$status"
