// `npm run build`: bundles src/ into exactly three files in ../dist (index.html, app.js,
// app.css), which the dagmesh binary embeds. The output is deterministic — no timestamps, hashes
// or source maps — so rebuilding unchanged sources rewrites identical bytes.
import { build } from "esbuild";
import { mkdirSync, writeFileSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "..", "dist");

const result = await build({
  entryPoints: { app: join(here, "src", "main.tsx") },
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2020",
  jsx: "automatic",
  jsxImportSource: "preact",
  charset: "utf8",
  // Licence notices of the bundled packages go to the end of app.js.
  legalComments: "eof",
  sourcemap: false,
  outdir: "out", // only names the outputs: nothing is written by esbuild itself
  write: false,
  logLevel: "warning",
  define: { "process.env.NODE_ENV": '"production"' },
});

// The server serves index.html at `/` and the assets under `/console/`, so the paths are
// absolute (the page itself may be at `/` with any hash route). The empty icon saves the
// browser a request for /favicon.ico, which the server does not have.
const indexHtml = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dagmesh console</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/console/app.css">
<script type="module" src="/console/app.js"></script>
</head>
<body>
<div id="app"></div>
<noscript>The dagmesh console needs JavaScript.</noscript>
</body>
</html>
`;

const files = new Map([["index.html", Buffer.from(indexHtml)]]);
for (const file of result.outputFiles) {
  files.set(basename(file.path), Buffer.from(file.contents));
}
const names = [...files.keys()].sort();
if (names.join(",") !== "app.css,app.js,index.html") {
  throw new Error(`unexpected build outputs: ${names.join(", ")}`);
}

mkdirSync(dist, { recursive: true });
for (const [name, bytes] of files) {
  writeFileSync(join(dist, name), bytes);
  const kib = (n) => (n / 1024).toFixed(1).padStart(7) + " KiB";
  console.log(`${("dist/" + name).padEnd(16)} ${kib(bytes.length)}  (gzip ${kib(gzipSync(bytes, { level: 9 }).length)})`);
}
