'use strict';
// s3rver accepts any AWS Signature Version 4 request whose access key it knows, whatever the
// secret (it only verifies version 2 signatures). MinIO rejects a wrong secret, and the stack's
// credentials are meant to be the only way in, so this checks version 4 signatures in both
// forms: the Authorization header and presigned URLs. The payload hash is taken as the client
// declares it, as s3rver does; the signature still proves the client holds the secret.

const crypto = require('node:crypto');
const S3Error = require('s3rver/lib/models/error');

const ALGORITHM = 'AWS4-HMAC-SHA256';
const MAX_CLOCK_SKEW_MS = 15 * 60 * 1000;

function hmac(key, data) {
  return crypto.createHmac('sha256', key).update(data, 'utf8').digest();
}

function sha256Hex(data) {
  return crypto.createHash('sha256').update(data, 'utf8').digest('hex');
}

// RFC 3986 encoding, which SigV4 requires; encodeURIComponent leaves !'()* alone.
function uriEncode(text) {
  return encodeURIComponent(text).replace(
    /[!'()*]/g,
    c => '%' + c.charCodeAt(0).toString(16).toUpperCase(),
  );
}

function uriDecode(text) {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

// "20260102T030405Z" -> Date
function parseAmzDate(text) {
  const m = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/.exec(text || '');
  return m ? new Date(Date.UTC(m[1], m[2] - 1, m[3], m[4], m[5], m[6])) : null;
}

function canonicalQuery(rawQuery, leaveOut) {
  return rawQuery
    .split('&')
    .filter(Boolean)
    .map(pair => {
      const at = pair.indexOf('=');
      const name = at < 0 ? pair : pair.slice(0, at);
      const value = at < 0 ? '' : pair.slice(at + 1);
      return [uriEncode(uriDecode(name)), uriEncode(uriDecode(value))];
    })
    .filter(([name]) => name !== leaveOut)
    .sort(([n1, v1], [n2, v2]) =>
      n1 < n2 ? -1 : n1 > n2 ? 1 : v1 < v2 ? -1 : v1 > v2 ? 1 : 0,
    )
    .map(([name, value]) => `${name}=${value}`)
    .join('&');
}

// Clients differ in how much of the path they encode; S3 signs it encoded once. Both the path
// as sent and its canonical encoding are tried, so neither kind of client is turned away.
function canonicalPaths(rawPath) {
  const once = rawPath
    .split('/')
    .map(segment => uriEncode(uriDecode(segment)))
    .join('/');
  return once === rawPath ? [rawPath] : [rawPath, once];
}

function canonicalHeaders(req, signedHeaders) {
  return signedHeaders
    .map(name => {
      const values = (req.headersDistinct && req.headersDistinct[name]) || [];
      const value = values.map(v => v.trim().replace(/\s+/g, ' ')).join(',');
      return `${name}:${value}\n`;
    })
    .join('');
}

function parseCredential(credential, fail) {
  const parts = (credential || '').split('/');
  if (parts.length !== 5 || parts[4] !== 'aws4_request') {
    fail(`malformed credential "${credential}"`);
  }
  const [accessKeyId, date, region, service] = parts;
  return { accessKeyId, date, region, service };
}

function headerAuth(req) {
  const fail = message => {
    throw new S3Error('AuthorizationHeaderMalformed', message);
  };
  const header = req.headers.authorization;
  const fields = {};
  for (const part of header.slice(ALGORITHM.length).split(',')) {
    const at = part.indexOf('=');
    if (at > 0) fields[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  if (!fields.Credential || !fields.SignedHeaders || !fields.Signature) {
    fail('the authorization header needs Credential, SignedHeaders and Signature');
  }
  const payloadHash = req.headers['x-amz-content-sha256'];
  if (!payloadHash) {
    throw new S3Error('InvalidRequest', 'x-amz-content-sha256 is required with SigV4');
  }
  const timestamp = req.headers['x-amz-date'];
  const time = parseAmzDate(timestamp);
  if (!time) {
    throw new S3Error('AccessDenied', 'SigV4 requests need an x-amz-date header');
  }
  if (Math.abs(Date.now() - time) > MAX_CLOCK_SKEW_MS) {
    throw new S3Error('RequestTimeTooSkewed', 'request time and server time differ by over 15 minutes');
  }
  return {
    credential: parseCredential(fields.Credential, fail),
    signedHeaders: fields.SignedHeaders.split(';'),
    signature: fields.Signature,
    timestamp,
    payloadHash,
    leaveOut: null,
  };
}

function presignedAuth(req, query) {
  const fail = message => {
    throw new S3Error('AuthorizationQueryParametersError', message);
  };
  const get = name => query.get(name) || fail(`${name} is missing`);
  if (get('X-Amz-Algorithm') !== ALGORITHM) fail(`X-Amz-Algorithm must be ${ALGORITHM}`);
  const timestamp = get('X-Amz-Date');
  const time = parseAmzDate(timestamp);
  const expires = Number(get('X-Amz-Expires'));
  if (!time || !Number.isInteger(expires) || expires < 0) fail('bad X-Amz-Date or X-Amz-Expires');
  if (Date.now() > time.getTime() + expires * 1000) {
    throw new S3Error('AccessDenied', 'Request has expired');
  }
  return {
    credential: parseCredential(get('X-Amz-Credential'), fail),
    signedHeaders: get('X-Amz-SignedHeaders').split(';'),
    signature: get('X-Amz-Signature'),
    timestamp,
    payloadHash: query.get('X-Amz-Content-Sha256') || 'UNSIGNED-PAYLOAD',
    leaveOut: 'X-Amz-Signature',
  };
}

/**
 * Throws an S3Error unless the request carries a valid SigV4 signature made with the secret
 * that lookupSecret(accessKeyId) returns. Requests in other forms (SigV2, anonymous) pass
 * through untouched; the caller decides about those.
 */
function verifySigV4(req, lookupSecret) {
  const url = req.url;
  const queryAt = url.indexOf('?');
  const rawPath = queryAt < 0 ? url : url.slice(0, queryAt);
  const rawQuery = queryAt < 0 ? '' : url.slice(queryAt + 1);
  const query = new URLSearchParams(rawQuery);

  let auth;
  if ((req.headers.authorization || '').startsWith(ALGORITHM + ' ')) {
    auth = headerAuth(req);
  } else if (query.has('X-Amz-Algorithm')) {
    auth = presignedAuth(req, query);
  } else {
    return false;
  }

  const secret = lookupSecret(auth.credential.accessKeyId);
  if (secret === undefined) {
    throw new S3Error('InvalidAccessKeyId', 'The access key does not exist.');
  }
  const { date, region, service } = auth.credential;
  const scope = `${date}/${region}/${service}/aws4_request`;
  const signingKey = hmac(hmac(hmac(hmac(`AWS4${secret}`, date), region), service), 'aws4_request');
  const provided = Buffer.from(auth.signature, 'utf8');

  for (const path of canonicalPaths(rawPath)) {
    const canonicalRequest = [
      req.method,
      path,
      canonicalQuery(rawQuery, auth.leaveOut),
      canonicalHeaders(req, auth.signedHeaders),
      auth.signedHeaders.join(';'),
      auth.payloadHash,
    ].join('\n');
    const stringToSign = [ALGORITHM, auth.timestamp, scope, sha256Hex(canonicalRequest)].join('\n');
    const expected = Buffer.from(hmac(signingKey, stringToSign).toString('hex'), 'utf8');
    if (expected.length === provided.length && crypto.timingSafeEqual(expected, provided)) {
      return true;
    }
  }
  throw new S3Error(
    'SignatureDoesNotMatch',
    'The request signature does not match. Check the secret key and signing method.',
  );
}

module.exports = { verifySigV4 };
