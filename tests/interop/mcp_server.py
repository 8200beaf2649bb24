"""A stand-in MCP server built with the `mcp` SDK itself (MCPServer over streamable HTTP),
speaking the current revision (server/discover) and the handshake revisions, with responses
gzip-compressed when the client accepts it. Tools: `search` (answers with log notifications
and progress on the stream first), `delete_all` (must never be listed nor run through
Tollgate), `whoami_roots` (asks the client for its roots: a server-initiated request on the
handshake revisions). Prints `ready <port>`.
"""

import socket
import sys

import uvicorn
from starlette.middleware.gzip import GZipMiddleware

from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("standin")
CALLS = []


@server.tool()
async def search(query: str, ctx: Context) -> str:
    """Search the knowledge base."""
    CALLS.append(("search", query))
    await ctx.info(f"searching for {query}")
    await ctx.report_progress(1, 2)
    return f"3 results for {query}"


@server.tool()
async def delete_all(confirm: bool) -> str:
    """Delete everything."""
    CALLS.append(("delete_all", confirm))
    return "deleted everything"


@server.tool()
async def whoami_roots(ctx: Context) -> str:
    """List the client's roots."""
    roots = await ctx.session.list_roots()
    return ",".join(str(r.uri) for r in roots.roots)


def main():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # JSON answers (gzip-compressed) on POSTs; server-initiated requests then travel on the
    # GET stream, as the spec allows.
    app = server.streamable_http_app(json_response=True)
    app.add_middleware(GZipMiddleware, minimum_size=10)
    print("ready", port, flush=True)
    config = uvicorn.Config(app, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
