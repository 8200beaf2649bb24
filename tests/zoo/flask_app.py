"""Flask echo: what a Flask handler reads. JSON via request.get_json(silent=True); otherwise
request.values (query and form merged, query first) -- the accessor many Flask apps use."""
import json
import sys

from flask import Flask, request

app = Flask(__name__)
HEADERS = json.loads(sys.argv[2])


@app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
@app.route("/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def echo(path):
    fields = {}
    for k in request.values.keys():
        fields[k] = request.values.get(k)
    body = request.get_json(silent=True)
    if isinstance(body, dict):
        for k, v in body.items():
            fields[k] = v
    return {
        "stack": "flask",
        "method": request.method,
        "path": request.path,
        "fields": fields,
        "headers": {h: request.headers.get(h) for h in HEADERS if request.headers.get(h) is not None},
    }


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
