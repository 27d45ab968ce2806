"""Drives `wicket mcp` with the official MCP Python SDK (PyPI `mcp`), as an
agent would: lists the tools, runs an allowed query, a refused one, one
without reasoning, and a held one that the approver approves while it waits.
Prints what it saw as one JSON object for the Rust test to check.

Environment: WICKET_BIN (the wicket binary), MCP_ARGS (JSON list of
`wicket mcp` arguments), WICKET_TOKEN (the agent's), WICKET_CONTROL,
APPROVER_TOKEN.
"""

import asyncio
import json
import os
import subprocess

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import Implementation


def result(res):
    text = " ".join(getattr(c, "text", "") for c in res.content)
    return {"isError": res.is_error, "structured": res.structured_content, "text": text}


def approve_when_held(env, seen):
    """Waits for the held statement to show up, then approves it."""
    approver = dict(env, WICKET_TOKEN=os.environ["APPROVER_TOKEN"])
    for _ in range(200):
        out = subprocess.run(
            [os.environ["WICKET_BIN"], "approvals", "list", "-o", "json"],
            env=approver, capture_output=True, text=True, check=True,
        ).stdout
        pending = [a for a in json.loads(out) if a.get("state") == "pending"]
        if pending:
            seen["approval"] = pending[0]
            subprocess.run(
                [os.environ["WICKET_BIN"], "approvals", "approve", pending[0]["id"],
                 "--comment", "ok for the test"],
                env=approver, capture_output=True, text=True, check=True,
            )
            return
        import time
        time.sleep(0.1)
    raise RuntimeError("the held statement never appeared in `wicket approvals list`")


async def main():
    env = dict(os.environ)
    params = StdioServerParameters(
        command=os.environ["WICKET_BIN"],
        args=["mcp", *json.loads(os.environ["MCP_ARGS"])],
        env=env,
    )
    out = {}
    async with stdio_client(params) as (read, write):
        async with ClientSession(
            read, write, client_info=Implementation(name="e2e-agent", version="1.2.3")
        ) as session:
            init = await session.initialize()
            out["server"] = init.server_info.name
            tools = await session.list_tools()
            out["tools"] = {t.name: t.input_schema for t in tools.tools}

            out["select"] = result(await session.call_tool("postgres_query", {
                "connection": "demo-db",
                "reasoning": "listing customers to check their e-mail domains",
                "sql": "SELECT id, email, ssn FROM customers ORDER BY id",
                "trace": {
                    "prompt": "Which e-mail domains do our customers use?",
                    "steps": [{"description": "list the customers", "tool": "postgres_query"}],
                    "confidence": 0.9,
                    "sources": ["ticket OPS-42"],
                },
            }))
            out["drop"] = result(await session.call_tool("postgres_query", {
                "connection": "demo-db",
                "reasoning": "cleaning up",
                "sql": "DROP TABLE customers",
            }))
            try:
                res = await session.call_tool("postgres_query", {
                    "connection": "demo-db", "sql": "SELECT 1",
                })
                out["no_reasoning"] = result(res)
            except Exception as e:  # a protocol error: the call was rejected
                out["no_reasoning"] = {"rejected": str(e)}

            progress = []

            async def on_progress(value, total, message):
                progress.append(message)

            seen = {}
            held = asyncio.create_task(session.call_tool("postgres_query", {
                "connection": "demo-db",
                "reasoning": "removing the duplicate customer 3 reported in OPS-43",
                "sql": "DELETE FROM customers WHERE id = 3",
            }, progress_callback=on_progress))
            await asyncio.to_thread(approve_when_held, env, seen)
            out["delete"] = result(await held)
            out["progress"] = progress
            out["approval"] = seen.get("approval")

            out["http"] = result(await session.call_tool("http_request", {
                "connection": "demo-api",
                "reasoning": "weekly report of customer plans",
                "method": "GET",
                "path": "/api/customers",
            }))

            k8s = {"connection": "demo-cluster", "reasoning": "checking the web pods"}
            out["pods"] = result(await session.call_tool("kubernetes_request", dict(
                k8s, method="GET", path="/api/v1/namespaces/default/pods")))
            out["secret"] = result(await session.call_tool("kubernetes_request", dict(
                k8s, method="GET", path="/api/v1/namespaces/default/secrets/db-creds")))
            seen = {}
            held = asyncio.create_task(session.call_tool("kubernetes_request", dict(
                k8s, reasoning="db-0 is wedged; deleting it so it restarts",
                method="DELETE", path="/api/v1/namespaces/default/pods/db-0")))
            await asyncio.to_thread(approve_when_held, env, seen)
            out["delete_pod"] = result(await held)
            out["delete_pod_approval"] = seen.get("approval")
            out["exec"] = result(await session.call_tool("kubernetes_exec", dict(
                k8s, reasoning="checking what web-0 serves", namespace="default", pod="web-0",
                command=["sh", "-c", "echo hello from web-0; echo warn >&2; exit 3"])))
            host = {"connection": "demo-host", "reasoning": "looking at the host"}
            out["ssh"] = result(await session.call_tool("ssh_exec", dict(
                host, command="echo hi from the host; echo err >&2; exit 4")))
            out["ssh_refused"] = result(await session.call_tool("ssh_exec", dict(
                host, command="rm -rf /etc")))
            out["exec_refused"] = result(await session.call_tool("kubernetes_exec", dict(
                k8s, reasoning="clearing space", namespace="default", pod="web-0",
                command=["rm", "-rf", "/data"])))
    print(json.dumps(out))


async def over_http():
    """The streamable HTTP transport: each client brings its own token."""
    from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client

    url = os.environ["MCP_URL"]
    out = {}
    headers = {"Authorization": "Bearer " + os.environ["WICKET_TOKEN"]}
    async with create_mcp_http_client(headers=headers) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(
                read, write, client_info=Implementation(name="e2e-http-agent", version="0.1")
            ) as session:
                await session.initialize()
                out["tools"] = sorted(t.name for t in (await session.list_tools()).tools)
                out["http"] = result(await session.call_tool("http_request", {
                    "connection": "demo-api",
                    "reasoning": "checking plans over streamable HTTP",
                    "method": "GET",
                    "path": "/api/customers",
                }))
    # Without a token: the call is refused.
    async with create_mcp_http_client() as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                try:
                    res = await session.call_tool("http_request", {
                        "connection": "demo-api", "reasoning": "no token",
                        "method": "GET", "path": "/api/customers",
                    })
                    out["anonymous"] = result(res)
                except Exception as e:
                    out["anonymous"] = {"rejected": str(e)}
    print(json.dumps(out))


asyncio.run(over_http() if os.environ.get("MCP_URL") else main())
