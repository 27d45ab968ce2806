"""The demo agent's SELECT * FROM customers through wicket-pg, with psycopg 3
(text and binary) and asyncpg: every row decodes, no original value shows.

Usage: python check_drivers.py POSTGRES_URL   (the demo's WICKET_PG_URL)
"""
import asyncio
import sys

import asyncpg
import psycopg

url = sys.argv[1]
RAW = ["ada@example.com", "078-05-1120", "4111 1111 1111 1111", "219-09-9999", "alan@example.com"]


def check(rows, who):
    text = repr(rows)
    for raw in RAW:
        assert raw not in text, f"{who}: {raw} shown in {text}"
    assert len(rows) == 3, f"{who}: {rows}"
    assert "a***@example.com" in text and "[redacted:ssn]" in text, f"{who}: {text}"


with psycopg.connect(url, options="-c wicket.reasoning=demo\\ check") as conn:
    for binary in (False, True):
        with conn.cursor(binary=binary) as cur:
            cur.execute("SELECT * FROM customers ORDER BY id")
            check(cur.fetchall(), f"psycopg (binary={binary})")


async def main():
    conn = await asyncpg.connect(url, server_settings={"wicket.reasoning": "demo check"})
    try:
        check([tuple(r) for r in await conn.fetch("SELECT * FROM customers ORDER BY id")], "asyncpg")
    finally:
        await conn.close()


asyncio.run(main())
print("drivers see masked rows")
