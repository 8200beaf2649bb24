// Express echo, mounted as real apps do: method-override (header X-HTTP-Method-Override and a
// `_method` body field), body-parser json + urlencoded (extended, qs) with inflate on, case-
// insensitive routing (Express's default). A field is read from req.body, then req.query.
const express = require('express');
const bodyParser = require('body-parser');
const methodOverride = require('method-override');

const port = Number(process.argv[2]);
const HEADERS = JSON.parse(process.argv[3]);
const app = express();
app.use(bodyParser.json({ inflate: true, type: ['application/json', 'application/*+json'] }));
app.use(bodyParser.urlencoded({ extended: true, inflate: true }));
app.use(methodOverride('X-HTTP-Method-Override'));
app.use(methodOverride('X-HTTP-Method'));
app.use(methodOverride('X-Method-Override'));
app.use(methodOverride((req) => {
  if (req.body && typeof req.body === 'object' && '_method' in req.body) {
    const m = req.body._method;
    delete req.body._method;
    return m;
  }
}));
app.all('*', (req, res) => {
  const fields = {};
  for (const [k, v] of Object.entries(req.query || {})) fields[k] = v;
  if (req.body && typeof req.body === 'object') {
    for (const [k, v] of Object.entries(req.body)) fields[k] = v;
  }
  const headers = {};
  for (const h of HEADERS) if (req.get(h) !== undefined) headers[h] = req.get(h);
  res.json({ stack: 'express', method: req.method, path: req.path, fields, headers });
});
app.use((err, req, res, next) => res.status(400).json({ stack: 'express', error: String(err) }));
app.listen(port, '127.0.0.1');
