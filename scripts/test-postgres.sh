# Sourced by scripts/test: a PostgreSQL for the tests (tests/pg.py). They use
# WSQ_TEST_DATABASE when set, else the server on 127.0.0.1:5432 (user postgres, database
# test) when it answers; else this installs Debian's postgresql if needed, starts a
# throwaway cluster (trust auth, loopback, a free port, a temporary folder) that is
# stopped and deleted when the caller exits, and exports WSQ_TEST_DATABASE for it.
# WSQ_TEST_PG_PROBE replaces the 5432 URL probed first (to try this path on a machine
# that has a server there).

pg_answers() {
  .venv/bin/python - "$1" <<'PY'
import asyncio, sys
import asyncpg

async def main() -> None:
    conn = await asyncpg.connect(sys.argv[1], timeout=3)
    await conn.close()

try:
    asyncio.run(main())
except Exception:
    sys.exit(1)
PY
}

pg_bin() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$found" ]; then echo "$found"; else dirname "$(command -v initdb 2>/dev/null || echo /x/x)"; fi
}

if [ -z "${WSQ_TEST_DATABASE:-}" ] && ! pg_answers "${WSQ_TEST_PG_PROBE:-postgresql://postgres@127.0.0.1:5432/test}"; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  PG_BIN=$(pg_bin)
  if [ ! -x "$PG_BIN/initdb" ] || { [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; }; then
    echo "== installing postgresql (Debian package)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
    PG_BIN=$(pg_bin)
  fi
  PG_DIR=$(mktemp -d /tmp/wsq-test-pg.XXXXXX)
  PG_PORT=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  PG_AS=""
  if [ "$(id -u)" = 0 ]; then  # PostgreSQL refuses to run as root
    chown postgres "$PG_DIR"
    PG_AS="runuser -u postgres --"
  fi
  echo "== starting a throwaway PostgreSQL on 127.0.0.1:$PG_PORT ($PG_DIR)"
  $PG_AS "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 >"$PG_DIR/initdb.log"
  $PG_AS "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR" start >/dev/null
  trap '$PG_AS "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1; rm -rf "$PG_DIR"' EXIT
  $PG_AS "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres test
  export WSQ_TEST_DATABASE="postgresql://postgres@127.0.0.1:$PG_PORT/test"
fi
