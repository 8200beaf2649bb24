"""Stand-in LLM upstreams on loopback that answer like the real APIs: OpenAI chat/completions
and responses, Anthropic messages, Gemini generateContent / streamGenerateContent, JSON or SSE,
gzip-compressed when the client accepts it (JSON always; SSE when asked with
`x-standin-compress: gzip`), with usage in each provider's shape and real streams (one event
at a time). Models named `stall-*` stop sending after the first event; `long-*` stream for
many seconds. Like the real APIs it rejects a request with a wrong key, and Anthropic rejects
`stream_options`.

Usage is deterministic so a test can tell real usage from an estimate: prompt tokens are the
characters of the request's last message plus 3, completion tokens are 2 per streamed word
plus 1.

Prints `ready <http port> <https port>` when listening. GET /_seen lists what it received.
"""

import argparse
import asyncio
import json
import ssl
import zlib

from aiohttp import web

SEEN = []
WORDS = ["Tollgate", "checked", "this", "call", "and", "let", "it", "through"]


def gzip_all(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def last_text(body) -> str:
    for key in ("messages", "input", "contents"):
        v = body.get(key)
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v:
            m = v[-1]
            c = m.get("content") if isinstance(m, dict) else m
            if isinstance(c, str):
                return c
            if isinstance(m, dict) and "parts" in m:
                return "".join(p.get("text", "") for p in m["parts"])
            if isinstance(c, list):
                return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return ""


def usage_numbers(body):
    return len(last_text(body)) + 3, 2 * len(WORDS) + 1


async def json_answer(request, payload, status=200):
    data = json.dumps(payload).encode()
    headers = {"content-type": "application/json"}
    if "gzip" in request.headers.get("accept-encoding", ""):
        data = gzip_all(data)
        headers["content-encoding"] = "gzip"
    return web.Response(body=data, status=status, headers=headers)


async def sse_answer(request, events, model):
    """events: list of (event name or None, dict or str)."""
    headers = {"content-type": "text/event-stream", "cache-control": "no-cache"}
    gz = request.headers.get("x-standin-compress") == "gzip"
    if gz:
        headers["content-encoding"] = "gzip"
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(request)
    comp = zlib.compressobj(6, zlib.DEFLATED, 31) if gz else None
    delay = 0.25 if model.startswith("long-") else 0.005
    for i, (name, data) in enumerate(events):
        text = data if isinstance(data, str) else json.dumps(data)
        chunk = (f"event: {name}\n" if name else "") + f"data: {text}\n\n"
        raw = chunk.encode()
        if comp:
            raw = comp.compress(raw) + comp.flush(zlib.Z_SYNC_FLUSH)
        await resp.write(raw)
        if model.startswith("stall-") and i == 1:
            await asyncio.sleep(3600)
        await asyncio.sleep(delay)
    if comp:
        await resp.write(comp.flush())
    await resp.write_eof()
    return resp


def key_ok(request, header, value):
    return request.headers.get(header) == value


async def record(request):
    body = await request.read()
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        parsed = {}
    SEEN.append({"method": request.method, "path": request.path_qs, "headers": dict(request.headers), "body": parsed})
    return parsed


async def openai_chat(request):
    body = await record(request)
    if not key_ok(request, "authorization", "Bearer sk-real-openai"):
        return await json_answer(request, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}}, 401)
    model = body.get("model", "")
    p, c = usage_numbers(body)
    if not body.get("stream"):
        return await json_answer(request, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(WORDS)}, "finish_reason": "stop"}], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})
    events = []
    for w in WORDS:
        events.append((None, {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [{"index": 0, "delta": {"content": w + " "}, "finish_reason": None}]}))
    if model.startswith("long-"):
        events = events * 6
    events.append((None, {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    # Like OpenAI: usage only when asked for.
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append((None, {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}))
    events.append((None, "[DONE]"))
    return await sse_answer(request, events, model)


async def openai_responses(request):
    body = await record(request)
    if not key_ok(request, "authorization", "Bearer sk-real-openai"):
        return await json_answer(request, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}}, 401)
    if "stream_options" in body and "include_usage" in (body.get("stream_options") or {}):
        return await json_answer(request, {"error": {"message": "Unknown parameter: 'stream_options.include_usage'.", "type": "invalid_request_error", "code": "unknown_parameter"}}, 400)
    model = body.get("model", "")
    p, c = usage_numbers(body)
    text = " ".join(WORDS)
    resp = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": model, "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]}], "usage": {"input_tokens": p, "output_tokens": c, "total_tokens": p + c, "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}, "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
    if not body.get("stream"):
        return await json_answer(request, resp)
    item = {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    events = [("response.created", {"type": "response.created", "sequence_number": 0, "response": {**resp, "status": "in_progress", "output": [], "usage": None}}),
              ("response.output_item.added", {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": item}),
              ("response.content_part.added", {"type": "response.content_part.added", "sequence_number": 2, "item_id": "msg_1", "output_index": 0, "content_index": 0, "part": part})]
    for i, w in enumerate(WORDS):
        events.append(("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": i + 3, "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": w + " ", "logprobs": []}))
    done_part = {"type": "output_text", "text": text, "annotations": []}
    events += [("response.output_text.done", {"type": "response.output_text.done", "sequence_number": 50, "item_id": "msg_1", "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
               ("response.content_part.done", {"type": "response.content_part.done", "sequence_number": 51, "item_id": "msg_1", "output_index": 0, "content_index": 0, "part": done_part}),
               ("response.output_item.done", {"type": "response.output_item.done", "sequence_number": 52, "output_index": 0, "item": resp["output"][0]}),
               ("response.completed", {"type": "response.completed", "sequence_number": 53, "response": resp})]
    return await sse_answer(request, events, model)


async def anthropic_messages(request):
    body = await record(request)
    # One key, the real one: as x-api-key (what Tollgate injects) or as the bearer token the
    # current SDK sends, never both.
    keys = [request.headers.get("x-api-key"), request.headers.get("authorization")]
    if [k for k in keys if k] not in (["sk-ant-real"], ["Bearer sk-ant-real"]):
        return await json_answer(request, {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}, 401)
    if "stream_options" in body:
        return await json_answer(request, {"type": "error", "error": {"type": "invalid_request_error", "message": "stream_options: Extra inputs are not permitted"}}, 400)
    model = body.get("model", "")
    p, c = usage_numbers(body)
    text = " ".join(WORDS)
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": p, "output_tokens": c}}
    if not body.get("stream"):
        return await json_answer(request, msg)
    events = [("message_start", {"type": "message_start", "message": {**msg, "content": [], "stop_reason": None, "usage": {"input_tokens": p, "output_tokens": 1}}}),
              ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})]
    words = WORDS * (6 if model.startswith("long-") else 1)
    for w in words:
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w + " "}}))
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": c}}),
               ("message_stop", {"type": "message_stop"})]
    return await sse_answer(request, events, model)


async def gemini(request):
    body = await record(request)
    if not key_ok(request, "x-goog-api-key", "gm-real"):
        return await json_answer(request, {"error": {"code": 403, "message": "API key not valid", "status": "PERMISSION_DENIED"}}, 403)
    model, _, method = request.match_info["rest"].partition(":")
    p, c = usage_numbers(body)
    def chunk(text, done):
        cand = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
        if done:
            cand["finishReason"] = "STOP"
        return {"candidates": [cand], "modelVersion": model, "usageMetadata": {"promptTokenCount": p, "candidatesTokenCount": c - 1 if done else 1, "thoughtsTokenCount": 1 if done else 0, "totalTokenCount": p + c}}
    if method == "generateContent":
        return await json_answer(request, chunk(" ".join(WORDS), True))
    events = [(None, chunk(w + " ", i == len(WORDS) - 1)) for i, w in enumerate(WORDS)]
    return await sse_answer(request, events, model)


async def seen(request):
    return web.json_response(SEEN)


def app():
    a = web.Application(client_max_size=64 * 1024 * 1024)
    a.router.add_post("/v1/chat/completions", openai_chat)
    a.router.add_post("/v1/responses", openai_responses)
    a.router.add_post("/v1/messages", anthropic_messages)
    a.router.add_post("/v1beta/models/{rest}", gemini)
    a.router.add_get("/_seen", seen)
    return a


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert")
    ap.add_argument("--key")
    args = ap.parse_args()
    runner = web.AppRunner(app(), access_log=None)
    await runner.setup()
    plain = web.TCPSite(runner, "127.0.0.1", 0)
    await plain.start()
    ports = [plain._server.sockets[0].getsockname()[1]]
    if args.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
        tls = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await tls.start()
        ports.append(tls._server.sockets[0].getsockname()[1])
    print("ready", *ports, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
