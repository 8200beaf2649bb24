"""Interop cases: each drives one real client library through Tollgate and prints what the
library observed, one JSON line per case: {"case", "ok", "observed" | "error"}. The Rust side
(tests/tests/interop.rs) checks the observations against what Tollgate recorded.

Every case sends `X-Tollgate-Run: <its run>` (signed by the Rust side, which plays the
orchestrator) so its audit records can be found, and the tenant header. Modes: `base_url` (http://proxy/u/<name>/...), `forward` (HTTP_PROXY to an http://
upstream), `connect` (HTTPS_PROXY, TLS intercepted with the CA in SSL_CERT_FILE).

argv[1]: JSON {"proxy", "standin", "standin_tls", "mcp", "ca", "cases": [...], "runs": {case: run}}.
"""

import asyncio
import json
import os
import sys
import traceback

CFG = json.loads(sys.argv[1])
PROXY = CFG["proxy"]


def hdrs(case):
    return {"X-Tollgate-Tenant": "acme", "X-Tollgate-Run": case}


def url(mode, name, path):
    """The URL an agent uses in each mode for upstream `name`."""
    if mode == "base_url":
        return f"http://{PROXY}/u/{name}{path}"
    if mode == "forward":
        port = CFG["mcp"] if name == "mcp" else CFG["standin"]
        return f"http://127.0.0.1:{port}{path}"
    return f"https://localhost:{CFG['standin_tls']}{path}"


def proxy_env(mode):
    """Environment a user sets for each mode (the libraries read it themselves)."""
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        os.environ.pop(k, None)
    if mode == "forward":
        os.environ["HTTP_PROXY"] = f"http://{PROXY}"
    elif mode == "connect":
        os.environ["HTTPS_PROXY"] = f"http://{PROXY}"
    os.environ["SSL_CERT_FILE"] = CFG["ca"]


# --- OpenAI SDK -------------------------------------------------------------------------

def openai_client(case, mode):
    import openai
    return openai.OpenAI(base_url=url(mode, "openai", "/v1"), api_key="sk-placeholder", default_headers=hdrs(case), max_retries=0, timeout=30)


def openai_chat(case, mode):
    r = openai_client(case, mode).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello there"}], max_tokens=50)
    return {"text": r.choices[0].message.content, "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens}


def openai_chat_stream(case, mode):
    chunks, usage = [], None
    for c in openai_client(case, mode).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "stream to me"}], stream=True):
        if c.choices and c.choices[0].delta.content:
            chunks.append(c.choices[0].delta.content)
        if c.usage:
            usage = c.usage
    return {"chunks": len(chunks), "text": "".join(chunks), "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}


def openai_responses_stream(case, mode):
    client = openai_client(case, mode)
    deltas = 0
    with client.responses.stream(model="gpt-4o", input="respond in a stream") as s:
        for ev in s:
            if ev.type == "response.output_text.delta":
                deltas += 1
        final = s.get_final_response()
    return {"chunks": deltas, "text": final.output_text, "prompt_tokens": final.usage.input_tokens, "completion_tokens": final.usage.output_tokens}


def openai_refusal(case, mode):
    import openai
    try:
        openai_client(case, mode).chat.completions.create(model="gpt-forbidden", messages=[{"role": "user", "content": "hi"}])
    except openai.PermissionDeniedError as e:
        return {"exception": type(e).__name__, "text": str(e), "status": e.status_code}
    raise AssertionError("no exception")


def openai_cut(case, mode):
    import openai
    chunks = []
    try:
        for c in openai_client(case, mode).chat.completions.create(model="stall-1", messages=[{"role": "user", "content": "hi"}], stream=True):
            if c.choices and c.choices[0].delta.content:
                chunks.append(c.choices[0].delta.content)
    except openai.APIError as e:
        return {"exception": type(e).__name__, "text": str(e), "chunks": len(chunks), "delivered": "".join(chunks)}
    raise AssertionError(f"the cut stream ended silently after {chunks}")


# --- Anthropic SDK ----------------------------------------------------------------------

def anthropic_client(case, mode):
    import anthropic
    return anthropic.Anthropic(base_url=url(mode, "anthropic", ""), api_key="sk-ant-placeholder", default_headers=hdrs(case), max_retries=0, timeout=30)


def anthropic_messages(case, mode):
    m = anthropic_client(case, mode).messages.create(model="claude-sonnet", max_tokens=100, messages=[{"role": "user", "content": "hello claude"}])
    return {"text": m.content[0].text, "prompt_tokens": m.usage.input_tokens, "completion_tokens": m.usage.output_tokens}


def anthropic_stream(case, mode):
    n = 0
    with anthropic_client(case, mode).messages.stream(model="claude-sonnet", max_tokens=100, messages=[{"role": "user", "content": "stream please"}]) as s:
        for _ in s.text_stream:
            n += 1
        m = s.get_final_message()
    return {"chunks": n, "text": m.content[0].text, "prompt_tokens": m.usage.input_tokens, "completion_tokens": m.usage.output_tokens}


def anthropic_refusal(case, mode):
    import anthropic
    try:
        anthropic_client(case, mode).messages.create(model="claude-forbidden", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    except anthropic.PermissionDeniedError as e:
        return {"exception": type(e).__name__, "text": str(e), "status": e.status_code}
    raise AssertionError("no exception")


def anthropic_cut(case, mode):
    import anthropic
    n = []
    try:
        with anthropic_client(case, mode).messages.stream(model="long-claude", max_tokens=100, messages=[{"role": "user", "content": "a long answer"}]) as s:
            for t in s.text_stream:
                n.append(t)
    except anthropic.APIError as e:
        return {"exception": type(e).__name__, "text": str(e), "chunks": len(n), "delivered": "".join(n)}
    raise AssertionError(f"the cut stream ended silently after {len(n)} chunks")


# --- Plain HTTP clients (Gemini and an OpenAI-compatible server) ------------------------

GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "hello gemini"}]}], "generationConfig": {"maxOutputTokens": 64}}


def gemini_headers(case):
    return {**hdrs(case), "x-goog-api-key": "gm-placeholder", "content-type": "application/json"}


def requests_gemini(case, mode):
    import requests
    r = requests.post(url(mode, "gemini", "/v1beta/models/gemini-flash:generateContent"), json=GEMINI_BODY, headers=gemini_headers(case), timeout=30)
    r.raise_for_status()
    u = r.json()["usageMetadata"]
    return {"encoding": r.headers.get("content-encoding"), "prompt_tokens": u["promptTokenCount"], "completion_tokens": u["candidatesTokenCount"] + u.get("thoughtsTokenCount", 0)}


def httpx_gemini_stream(case, mode):
    import httpx
    events, last = 0, None
    with httpx.Client(timeout=30, verify=CFG["ca"] if mode == "connect" else True) as c:
        with c.stream("POST", url(mode, "gemini", "/v1beta/models/gemini-flash:streamGenerateContent?alt=sse"), json=GEMINI_BODY, headers=gemini_headers(case)) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events += 1
                    last = json.loads(line[5:])
    u = last["usageMetadata"]
    return {"chunks": events, "prompt_tokens": u["promptTokenCount"], "completion_tokens": u["candidatesTokenCount"] + u.get("thoughtsTokenCount", 0)}


def aiohttp_gemini(case, mode):
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(url(mode, "gemini", "/v1beta/models/gemini-flash:generateContent"), json=GEMINI_BODY, headers=gemini_headers(case)) as r:
                r.raise_for_status()
                v = await r.json()
                return r.headers.get("content-encoding"), v
    enc, v = asyncio.run(go())
    u = v["usageMetadata"]
    return {"encoding": enc, "prompt_tokens": u["promptTokenCount"], "completion_tokens": u["candidatesTokenCount"] + u.get("thoughtsTokenCount", 0)}


def httpx_compressed_sse(case, mode):
    """An OpenAI-compatible server (vLLM-style) streaming gzip-compressed SSE."""
    import httpx
    body = {"model": "llama-3", "stream": True, "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "compressed stream"}]}
    usage, n = None, 0
    h = {**hdrs(case), "authorization": "Bearer sk-placeholder", "x-standin-compress": "gzip"}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url(mode, "vllm", "/v1/chat/completions"), json=body, headers=h) as r:
            r.raise_for_status()
            enc = r.headers.get("content-encoding")
            for line in r.iter_lines():
                if line.startswith("data:") and "[DONE]" not in line:
                    v = json.loads(line[5:])
                    n += 1
                    usage = v.get("usage") or usage
    return {"encoding": enc, "chunks": n, "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]}


def undici(case, mode):
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(["node", os.path.join(here, "undici_client.mjs"), json.dumps({"url": url(mode, "openai", "/v1/chat/completions"), "proxy": f"http://{PROXY}", "ca": CFG["ca"], "headers": hdrs(case)})],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "NODE_PATH": os.environ.get("TOLLGATE_NODE_PATH", "")})
    if out.returncode != 0:
        raise AssertionError(out.stderr)
    return json.loads(out.stdout)


# --- MCP SDK ----------------------------------------------------------------------------

async def mcp_session(case, mode, connect_mode, through_proxy=True):
    import httpx2
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client
    import mcp.types as types

    async def roots(_ctx):
        return types.ListRootsResult(roots=[types.Root(uri="file:///workspace/tollgate", name="repo")])

    target = url(mode, "mcp", "/mcp") if through_proxy else f"http://127.0.0.1:{CFG['mcp']}/mcp"
    http = httpx2.AsyncClient(headers=hdrs(case), timeout=httpx2.Timeout(30, read=60), trust_env=through_proxy)
    out = {}
    async with http:
        async with Client(streamable_http_client(target, http_client=http), mode=connect_mode, list_roots_callback=roots) as c:
            out["protocol_version"] = c.protocol_version
            if not through_proxy:
                return out
            tools = await c.list_tools()
            out["tools"] = sorted(t.name for t in tools.tools)
            r = await c.call_tool("search", {"query": "refunds"})
            out["search"] = r.content[0].text
            try:
                r = await c.call_tool("delete_all", {"confirm": True})
                out["delete_all"] = {"is_error": r.is_error, "text": r.content[0].text if r.content else ""}
            except Exception as e:  # the SDK raises the JSON-RPC error
                out["delete_all"] = {"exception": type(e).__name__, "text": str(e)}
            if connect_mode == "legacy":
                r = await c.call_tool("whoami_roots", {})
                out["roots"] = r.content[0].text
    return out


def mcp_case(connect_mode):
    def run(case, mode):
        direct = asyncio.run(mcp_session(case, mode, connect_mode, through_proxy=False))
        out = asyncio.run(mcp_session(case, mode, connect_mode))
        out["direct_protocol_version"] = direct["protocol_version"]
        return out
    return run


CASES = {
    "openai.chat": openai_chat,
    "openai.chat_stream": openai_chat_stream,
    "openai.responses_stream": openai_responses_stream,
    "openai.refusal": openai_refusal,
    "openai.stream_cut": openai_cut,
    "anthropic.messages": anthropic_messages,
    "anthropic.stream": anthropic_stream,
    "anthropic.refusal": anthropic_refusal,
    "anthropic.stream_cut": anthropic_cut,
    "requests.gemini": requests_gemini,
    "httpx.gemini_stream": httpx_gemini_stream,
    "aiohttp.gemini": aiohttp_gemini,
    "httpx.compressed_sse": httpx_compressed_sse,
    "undici.chat": undici,
    "mcp.current": mcp_case("auto"),
    "mcp.previous": mcp_case("legacy"),
}


def main():
    for full in CFG["cases"]:
        name, mode = full.rsplit("@", 1)
        proxy_env(mode)
        run_id = CFG["runs"][full]
        try:
            observed = CASES[name](run_id, mode)
            print(json.dumps({"case": full, "ok": True, "observed": observed}), flush=True)
        except Exception as e:
            print(json.dumps({"case": full, "ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}), flush=True)


if __name__ == "__main__":
    main()
