"""psycopg 3 and asyncpg through wicket-pg.

Usage: python drivers.py HOST PORT DBNAME TOKEN
Exits non-zero with a message on the first surprise.
"""
import asyncio
import sys

import asyncpg
import psycopg
from psycopg import errors

host, port, dbname, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]


def check_psycopg():
    conninfo = dict(host=host, port=port, dbname=dbname, user="bot", password=token,
                    sslmode="disable", options="-c wicket.reasoning=driver\\ test")
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        # Server-side parameters: the extended protocol.
        row = conn.execute("SELECT name FROM customers WHERE id = %s", (1,)).fetchone()
        assert row == ("Ada",), row
        # Binary results.
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT id, email FROM customers ORDER BY id")
            assert [r[0] for r in cur.fetchall()] == [1, 2]
        # A refused statement raises 42501 and the connection stays usable.
        try:
            conn.execute("DROP TABLE customers")
            raise AssertionError("DROP was not refused")
        except errors.InsufficientPrivilege as e:
            assert "no-ddl" in str(e), str(e)
        # Pipelined inserts (extended protocol, no Sync between them).
        with conn.pipeline():
            for i in range(10, 15):
                conn.execute("INSERT INTO customers VALUES (%s, %s, %s)", (i, f"n{i}", f"e{i}@x"))
        assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] == 7
        # A refused statement inside a pipeline fails there, and the pipeline recovers.
        try:
            with conn.pipeline():
                conn.execute("SELECT 1")
                conn.execute("TRUNCATE customers")
                conn.execute("SELECT 2")
            raise AssertionError("TRUNCATE was not refused")
        except errors.InsufficientPrivilege:
            pass
        assert conn.execute("SELECT 3").fetchone() == (3,)
    print("psycopg ok")


async def check_asyncpg():
    conn = await asyncpg.connect(host=host, port=port, database=dbname, user="bot", password=token,
                                 ssl=False, server_settings={"wicket.reasoning": "asyncpg test"})
    try:
        assert await conn.fetchval("SELECT email FROM customers WHERE id = $1", 2) == "bob@example.com"
        rows = await conn.fetch("SELECT id FROM customers WHERE id < $1 ORDER BY id", 3)
        assert [r["id"] for r in rows] == [1, 2], rows
        try:
            await conn.execute("DROP TABLE customers")
            raise AssertionError("DROP was not refused")
        except asyncpg.exceptions.InsufficientPrivilegeError as e:
            assert "no-ddl" in str(e), str(e)
        assert await conn.fetchval("SELECT 40 + $1::int", 2) == 42
    finally:
        await conn.close()
    print("asyncpg ok")


check_psycopg()
asyncio.run(check_asyncpg())
