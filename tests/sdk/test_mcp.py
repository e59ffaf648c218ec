"""The MCP server, driven by the reference MCP client (the `mcp` package
from PyPI) over both transports: streamable HTTP at the server's /mcp, and
stdio through `stacyvm mcp` (a separate process that calls the REST API).
Each lists the tools, creates a sandbox, runs `echo`, writes and reads a
file (text and binary), lists it, and destroys the sandbox."""

from __future__ import annotations

import base64
import json
import os

import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

TOOLS = {"create_sandbox", "list_sandboxes", "run_command", "write_file", "read_file", "list_files", "destroy_sandbox"}


def _text(result) -> str:
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def _call(session, name: str, **args):
    result = await session.call_tool(name, args)
    assert not result.is_error, _text(result)
    return json.loads(_text(result))


async def _exercise(session, cfg):
    await session.initialize()
    tools = {t.name for t in (await session.list_tools()).tools}
    assert TOOLS <= tools, tools
    sb = await _call(session, "create_sandbox", image=cfg.image, provider=cfg.provider, ttl="10m")
    sid = sb["id"]
    try:
        ran = await _call(session, "run_command", sandbox_id=sid, command="echo hello-mcp; echo oops >&2; exit 3")
        assert (ran["exit_code"], ran["stdout"], ran["stderr"]) == (3, "hello-mcp\n", "oops\n"), ran
        await _call(session, "write_file", sandbox_id=sid, path="/tmp/mcp/note.txt", content="written by mcp")
        read = await _call(session, "read_file", sandbox_id=sid, path="/tmp/mcp/note.txt")
        assert (read["encoding"], read["content"]) == ("utf-8", "written by mcp"), read
        blob = bytes(range(256))
        await _call(session, "write_file", sandbox_id=sid, path="/tmp/mcp/blob", content=base64.b64encode(blob).decode(), encoding="base64")
        read = await _call(session, "read_file", sandbox_id=sid, path="/tmp/mcp/blob")
        assert read["encoding"] == "base64" and base64.b64decode(read["content"]) == blob
        entries = await _call(session, "list_files", sandbox_id=sid, path="/tmp/mcp")
        assert {e["name"] for e in entries} == {"note.txt", "blob"}, entries
        listed = await _call(session, "list_sandboxes")
        assert sid in [s["id"] for s in listed]
        # A tool error is an answer the agent reads, with the API's code.
        missing = await session.call_tool("run_command", {"sandbox_id": "sb-00000000", "command": "true"})
        assert missing.is_error and _text(missing).startswith("NOT_FOUND"), _text(missing)
    finally:
        gone = await _call(session, "destroy_sandbox", sandbox_id=sid)
    assert gone == {"destroyed": sid}
    again = await session.call_tool("read_file", {"sandbox_id": sid, "path": "/tmp/mcp/note.txt"})
    assert again.is_error and _text(again).startswith("NOT_FOUND"), _text(again)


@pytest.mark.asyncio
async def test_mcp_over_streamable_http(cfg):
    headers = {"X-API-Key": cfg.api_key} if cfg.api_key else {}
    async with create_mcp_http_client(headers=headers) as http:
        async with streamable_http_client(f"{cfg.url}/mcp", http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await _exercise(session, cfg)


@pytest.mark.asyncio
async def test_mcp_over_stdio(cfg):
    binary = os.environ.get("STACYVM_BIN")
    if not binary:
        pytest.skip("STACYVM_BIN (the stacyvm binary) is not set")
    env = {"STACYVM_SERVER": cfg.url, "PATH": os.environ.get("PATH", "")}
    if cfg.api_key:
        env["STACYVM_API_KEY"] = cfg.api_key
    params = StdioServerParameters(command=binary, args=["mcp"], env=env)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await _exercise(session, cfg)


@pytest.mark.asyncio
async def test_mcp_over_http_needs_credentials(cfg):
    if not cfg.api_key:
        pytest.skip("this pass runs without authentication")
    async with create_mcp_http_client(headers={"X-API-Key": "svm_not_a_key"}) as http:
        response = await http.post(
            f"{cfg.url}/mcp",
            json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}},
            headers={"Accept": "application/json, text/event-stream"},
        )
        assert response.status_code == 401, response.text
        assert response.json()["code"] == "UNAUTHORIZED"
