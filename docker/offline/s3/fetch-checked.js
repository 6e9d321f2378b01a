'use strict';
// node fetch-checked.js URL sha512-INTEGRITY DEST
// Downloads URL to DEST only if its content matches the pinned Subresource Integrity hash,
// so the build needs neither curl nor npm to fetch npm itself.
const crypto = require('node:crypto');
const fs = require('node:fs');

const [url, integrity, dest] = process.argv.slice(2);

async function main() {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  const body = Buffer.from(await response.arrayBuffer());
  const actual = `sha512-${crypto.createHash('sha512').update(body).digest('base64')}`;
  if (actual !== integrity) throw new Error(`${url}: expected ${integrity}, got ${actual}`);
  fs.writeFileSync(dest, body);
}

main().catch(err => {
  console.error(`fetch-checked: ${err.cause ? `${err.message} (${err.cause.message})` : err.message}`);
  process.exit(1);
});
