"""FastAPI/Starlette echo: JSON body when the content type says JSON, else the form body, then
the query (Starlette's QueryParams.get: the last value of a repeated key)."""
import json
import sys

import uvicorn
from fastapi import FastAPI, Request

app = FastAPI()
HEADERS = json.loads(sys.argv[2])


@app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def echo(request: Request, path: str):
    fields = {}
    for k in request.query_params.keys():
        fields[k] = request.query_params.get(k)
    ct = request.headers.get("content-type", "")
    if ct.startswith("application/json"):
        try:
            body = await request.json()
        except Exception:
            body = None
        if isinstance(body, dict):
            fields.update(body)
    elif ct.startswith("application/x-www-form-urlencoded"):
        form = await request.form()
        for k in form.keys():
            fields[k] = form.get(k)
    return {
        "stack": "fastapi",
        "method": request.method,
        "path": request.url.path,
        "fields": fields,
        "headers": {h: request.headers.get(h) for h in HEADERS if request.headers.get(h) is not None},
    }


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
