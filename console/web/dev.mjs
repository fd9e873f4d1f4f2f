// `npm run dev -- [PORT] [SERVER]`: serves ../dist as the dagmesh binary does (index.html at
// `/`, assets under `/console/`) and forwards everything else — the gRPC-web calls — to a
// running dagmesh server, so a rebuilt console can be tried without rebuilding the binary
// (which embeds the files at compile time). Defaults: port 8080, server http://127.0.0.1:7070.
import { readFileSync } from "node:fs";
import { createServer, request } from "node:http";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const dist = join(dirname(fileURLToPath(import.meta.url)), "..", "dist");
const port = Number(process.argv[2] ?? 8080);
const backend = new URL(process.argv[3] ?? "http://127.0.0.1:7070");
const assets = {
  "/": ["index.html", "text/html; charset=utf-8"],
  "/console/app.js": ["app.js", "text/javascript; charset=utf-8"],
  "/console/app.css": ["app.css", "text/css; charset=utf-8"],
};

createServer((req, res) => {
  const asset = req.method === "GET" ? assets[req.url.split("?")[0]] : undefined;
  if (asset) {
    // Read on every request: `npm run build` in another terminal shows up on reload.
    res.writeHead(200, {
      "content-type": asset[1],
      "cache-control": "no-cache",
      // The policy the binary sends (console/src/lib.rs), so a violation shows here too.
      "content-security-policy":
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; " +
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    });
    res.end(readFileSync(join(dist, asset[0])));
    return;
  }
  const upstream = request(
    { host: backend.hostname, port: backend.port, method: req.method, path: req.url, headers: { ...req.headers, host: backend.host } },
    (up) => {
      res.writeHead(up.statusCode ?? 502, up.headers);
      up.pipe(res);
    },
  );
  upstream.on("error", (err) => {
    res.writeHead(502, { "content-type": "text/plain" });
    res.end(`dagmesh server ${backend.href} unreachable: ${err.message}\n`);
  });
  req.pipe(upstream);
}).listen(port, "127.0.0.1", () => console.log(`console on http://127.0.0.1:${port}/ -> ${backend.href}`));
