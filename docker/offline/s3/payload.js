'use strict';
// A SigV4 signature covers the body only through x-amz-content-sha256, which the client
// declares. S3 checks the body it receives against that hash before storing anything, so a
// captured request cannot be replayed with another body. s3rver stores whatever arrives;
// here the body is staged in a private temporary file while it is hashed, and s3rver reads
// it from there only once the hash matched. A mismatch leaves nothing stored.

const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { pipeline } = require('node:stream/promises');
const { Transform } = require('node:stream');
const { refuse } = require('./sigv4');

const MAX_BODY_BYTES = 5 * 1024 ** 3; // S3's limit for a single PUT

function hasBody(req) {
  return Number(req.headers['content-length'] || 0) > 0 || 'transfer-encoding' in req.headers;
}

/**
 * Reads the whole body of req, checks it against expectedHash (hex SHA-256) and returns a
 * stream of the same bytes for s3rver to read, plus cleanup() which removes the staged file.
 */
async function verifiedBody(req, expectedHash) {
  if (Number(req.headers['content-length'] || 0) > MAX_BODY_BYTES) {
    throw refuse('EntityTooLarge', 'Your proposed upload exceeds the maximum allowed size');
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 's3-upload-'));
  const file = path.join(dir, 'body');
  const cleanup = () => fs.rmSync(dir, { recursive: true, force: true });
  const hash = crypto.createHash('sha256');
  let size = 0;
  const hashing = new Transform({
    transform(chunk, _encoding, done) {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        done(refuse('EntityTooLarge', 'Your proposed upload exceeds the maximum allowed size'));
        return;
      }
      hash.update(chunk);
      done(null, chunk);
    },
  });
  try {
    await pipeline(req, hashing, fs.createWriteStream(file, { flags: 'wx', mode: 0o600 }));
  } catch (err) {
    cleanup();
    throw err;
  }
  if (hash.digest('hex') !== expectedHash) {
    cleanup();
    throw refuse(
      'XAmzContentSHA256Mismatch',
      "The provided 'x-amz-content-sha256' header does not match what was computed.",
      400,
    );
  }
  const body = fs.createReadStream(file);
  // s3rver reads only the body stream; headers are kept for anything that looks at them.
  body.headers = req.headers;
  body.method = req.method;
  body.url = req.url;
  return { body, cleanup };
}

module.exports = { hasBody, verifiedBody };
