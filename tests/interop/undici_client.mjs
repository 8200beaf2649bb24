// Node's fetch through undici's ProxyAgent (the way Node agents reach a proxy): a chat
// completion through the forward proxy or a CONNECT tunnel, the answer gzip-compressed by
// the upstream and decoded by undici. Prints the observed usage as JSON.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(process.env.NODE_PATH ? process.env.NODE_PATH + "/" : import.meta.url);
const { ProxyAgent, fetch } = require("undici");

const cfg = JSON.parse(process.argv[2]);
// Plain http:// targets go as absolute-form requests (no tunnel), https:// through CONNECT.
const dispatcher = new ProxyAgent({ uri: cfg.proxy, proxyTunnel: cfg.url.startsWith("https:"), requestTls: { ca: readFileSync(cfg.ca) } });
const res = await fetch(cfg.url, {
  method: "POST",
  dispatcher,
  headers: { ...cfg.headers, "content-type": "application/json", authorization: "Bearer sk-placeholder", "accept-encoding": "gzip" },
  body: JSON.stringify({ model: "gpt-4o", messages: [{ role: "user", content: "hello from node" }], max_tokens: 20 }),
});
if (!res.ok) {
  console.error(res.status, await res.text());
  process.exit(1);
}
const v = await res.json();
console.log(JSON.stringify({ encoding: res.headers.get("content-encoding"), prompt_tokens: v.usage.prompt_tokens, completion_tokens: v.usage.completion_tokens }));
