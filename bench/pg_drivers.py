"""asyncpg against psycopg 3 on the PostgreSQL state store's kind of statements.

    bench/.venv-peers/bin/python -m bench.pg_drivers [--quick] [--json PATH] [--runs N]

(The peers' virtualenv, made by ``bench/setup_peers.sh``, has both drivers: pgqueuer
brings asyncpg, procrastinate psycopg 3. wsq itself depends on asyncpg only.)

On an UNLOGGED table in a fresh schema of :func:`bench.common.postgres_dsn` (so the
drivers show rather than the fsync), each driver in turn, for ``--runs`` alternating
rounds (default 3; quick: 1 with smaller sizes):

* ``insert_1000_ms``: one ``INSERT ... SELECT FROM unnest($1::text[], $2::bigint[],
  $3::bytea[])`` of 1,000 rows, as the store's group commit writes (median of 20);
* ``get_us``: one prepared ``SELECT ... WHERE id = $1`` (median of 2,000).

psycopg runs async, with its binary wheel, prepared statements and autocommit, as
asyncpg does by default.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

from bench.common import arguments, postgres_dsn, write_results

CREATE = (
    "CREATE UNLOGGED TABLE {s}.t (id text PRIMARY KEY, seq bigint NOT NULL, data bytea NOT NULL)"
)
INSERT = (
    "INSERT INTO {s}.t (id, seq, data) SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[])"
)
GET = "SELECT id, seq, data FROM {s}.t WHERE id = $1"


def rows(n: int, round_: int) -> tuple[list[str], list[int], list[bytes]]:
    ids = [f"r{round_}-{i}-{uuid.uuid4().hex[:8]}" for i in range(n)]
    return ids, list(range(n)), [b'{"n": 1}'] * n


async def with_asyncpg(dsn: str, schema: str, n: int, inserts: int, gets: int) -> dict[str, float]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        insert, get = INSERT.format(s=schema), GET.format(s=schema)
        times = []
        for k in range(inserts):
            batch = rows(n, k)
            began = time.perf_counter()
            await conn.execute(insert, *batch)
            times.append(time.perf_counter() - began)
        key = batch[0][0]
        statement = await conn.prepare(get)
        reads = []
        for _ in range(gets):
            began = time.perf_counter()
            await statement.fetchrow(key)
            reads.append(time.perf_counter() - began)
    finally:
        await conn.close()
    return summary(times, reads)


async def with_psycopg(dsn: str, schema: str, n: int, inserts: int, gets: int) -> dict[str, float]:
    import psycopg

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=0)
    try:
        insert = INSERT.format(s=schema).replace("$1", "%s").replace("$2", "%s")
        insert = insert.replace("$3", "%s")
        get = GET.format(s=schema).replace("$1", "%s")
        times = []
        async with conn.cursor(binary=True) as cursor:
            for k in range(inserts):
                batch = rows(n, 1000 + k)
                began = time.perf_counter()
                await cursor.execute(insert, batch)
                times.append(time.perf_counter() - began)
            key = batch[0][0]
            reads = []
            for _ in range(gets):
                began = time.perf_counter()
                await cursor.execute(get, (key,))
                await cursor.fetchone()
                reads.append(time.perf_counter() - began)
    finally:
        await conn.close()
    return summary(times, reads)


def summary(inserts: list[float], gets: list[float]) -> dict[str, float]:
    return {
        "insert_1000_ms": round(statistics.median(inserts) * 1000, 2),
        "get_us": round(statistics.median(gets) * 1e6, 1),
    }


async def main(runs: int, quick: bool) -> dict[str, Any]:
    import asyncpg

    dsn = postgres_dsn()
    schema = f"bench_drivers_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"CREATE SCHEMA {schema}")
    await admin.execute(CREATE.format(s=schema))
    n, inserts, gets = (100, 5, 200) if quick else (1000, 20, 2000)
    results: dict[str, list[dict[str, float]]] = {"asyncpg": [], "psycopg": []}
    try:
        for _ in range(runs):
            results["asyncpg"].append(await with_asyncpg(dsn, schema, n, inserts, gets))
            results["psycopg"].append(await with_psycopg(dsn, schema, n, inserts, gets))
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
    return {"workload": "pg drivers", "rows_per_insert": n, "runs": results}


if __name__ == "__main__":
    parser = arguments(__doc__ or "")
    parser.add_argument("--runs", type=int)
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    write_results(args.json, asyncio.run(main(runs, args.quick)))
