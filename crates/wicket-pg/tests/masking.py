"""psycopg 3 (text and binary) and asyncpg (binary) read masked rows through wicket-pg.

Usage: python masking.py HOST PORT DBNAME TOKEN
Prints "masking ok" or fails with a message.
"""
import asyncio
import sys

import asyncpg
import psycopg

host, port, dbname, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
SECRETS = ["123-45-6789", "4111111111111111", "ann@example.com", "bob@example.org", "78000", "s3cret"]


def clean(rows):
    text = repr(rows)
    for s in SECRETS:
        assert s not in text, f"{s} leaked in {text}"


def check_psycopg():
    conninfo = dict(host=host, port=port, dbname=dbname, user="bot", password=token,
                    sslmode="disable", options="-c wicket.reasoning=masking\\ test")
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        for binary in (False, True):
            with conn.cursor(binary=binary) as cur:
                cur.execute("SELECT id, name, email, ssn, card, salary, doc FROM people WHERE id = %s", (1,))
                row = cur.fetchone()
                clean(row)
                assert row[0] == 1 and row[1] == "Ann", row
                assert row[2] == "[redacted:email]", row
                assert row[3] == "[redacted:ssn]", row
                assert row[4] == "****1111", row
                assert row[5] is None, row  # an int column masked: NULL
                assert row[6] == "[redacted:doc]", row  # jsonb masked: a JSON string
        # Detectors on expressions, in both formats.
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT 'write to ' || email FROM people ORDER BY id")
            rows = cur.fetchall()
            clean(rows)
            assert rows[0][0] == "write to [redacted:email]", rows
    print("psycopg text and binary ok")


async def check_asyncpg():
    conn = await asyncpg.connect(host=host, port=port, database=dbname, user="bot", password=token,
                                 ssl=False, server_settings={"wicket.reasoning": "masking test"})
    try:
        rows = await conn.fetch("SELECT id, email, ssn, card, salary, doc, ARRAY[email] AS emails "
                                "FROM people WHERE id < $1 ORDER BY id", 10)
        clean([tuple(r) for r in rows])
        assert rows[0]["ssn"] == "[redacted:ssn]", rows
        assert rows[0]["salary"] is None, rows
        assert rows[0]["doc"] == '"[redacted:doc]"', rows
        assert len(rows) == 2, rows
        # Prepared statements executed again and again, with a row limit (portal suspended).
        stmt = await conn.prepare("SELECT card FROM people WHERE id = $1")
        for _ in range(3):
            assert await stmt.fetchval(1) == "****1111"
        async with conn.transaction():
            cur = await conn.cursor("SELECT email FROM people ORDER BY id")
            first = await cur.fetch(1)
            rest = await cur.fetch(5)
            clean([tuple(r) for r in first + rest])
            assert len(first) == 1 and len(rest) == 1
    finally:
        await conn.close()
    print("asyncpg ok")


check_psycopg()
asyncio.run(check_asyncpg())
print("masking ok")
