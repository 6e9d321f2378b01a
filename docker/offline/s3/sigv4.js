'use strict';
// s3rver accepts any AWS Signature Version 4 request whose access key it knows, whatever the
// secret, and lets anonymous and version 2 requests through to its own checks. MinIO accepts
// only requests signed with a secret it holds, and the access key id is no secret, so every
// request is held here to SigV4 as S3 defines it, in one of its two forms: the Authorization
// header or a presigned URL. Anything else is refused: other spellings of the algorithm,
// SigV2, anonymous requests, duplicated or unknown auth parameters, unsigned x-amz-* headers,
// stale or future dates, a scope that does not match the date, the region or the service.
// The payload hash is checked against the body the server receives in payload.js.

const crypto = require('node:crypto');
const S3Error = require('s3rver/lib/models/error');

const ALGORITHM = 'AWS4-HMAC-SHA256';
const SERVICE = 's3';
const MAX_CLOCK_SKEW_MS = 15 * 60 * 1000;
const MAX_PRESIGNED_SECONDS = 7 * 24 * 3600; // S3's limit for X-Amz-Expires
const UNSIGNED_PAYLOAD = 'UNSIGNED-PAYLOAD';
// Signed-chunk and trailer forms (aws-chunked bodies); refused by the caller once signed.
const STREAMING_PAYLOADS = new Set([
  'STREAMING-UNSIGNED-PAYLOAD-TRAILER',
  'STREAMING-AWS4-HMAC-SHA256-PAYLOAD',
  'STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER',
  'STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD',
  'STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER',
]);
const PRESIGN_PARAMS = [
  'X-Amz-Algorithm',
  'X-Amz-Credential',
  'X-Amz-Date',
  'X-Amz-Expires',
  'X-Amz-SignedHeaders',
  'X-Amz-Signature',
];
// Headers Node folds into one value or keeps only the first of: a second copy must not hide.
const SINGLE_HEADERS = ['authorization', 'host', 'x-amz-date', 'x-amz-content-sha256', 'content-length'];

// An S3 error with the status S3 gives it (s3rver's table lacks some codes).
function refuse(code, message, status) {
  const error = new S3Error(code, message);
  if (status) {
    error.status = status;
    error.expose = true;
  }
  return error;
}

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

// "20260102T030405Z" -> Date, or null unless it is exactly that form and a real time.
function parseAmzDate(text) {
  const m = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/.exec(text || '');
  if (!m) return null;
  const date = new Date(Date.UTC(m[1], m[2] - 1, m[3], m[4], m[5], m[6]));
  return date.toISOString().replace(/[-:]|\.\d{3}/g, '') === text ? date : null;
}

function splitQuery(rawQuery) {
  return rawQuery
    .split('&')
    .filter(Boolean)
    .map(pair => {
      const at = pair.indexOf('=');
      return at < 0 ? [uriDecode(pair), ''] : [uriDecode(pair.slice(0, at)), uriDecode(pair.slice(at + 1))];
    });
}

function canonicalQuery(pairs, leaveOut) {
  return pairs
    .filter(([name]) => name !== leaveOut)
    .map(([name, value]) => [uriEncode(name), uriEncode(value)])
    .sort(([n1, v1], [n2, v2]) => (n1 < n2 ? -1 : n1 > n2 ? 1 : v1 < v2 ? -1 : v1 > v2 ? 1 : 0))
    .map(([name, value]) => `${name}=${value}`)
    .join('&');
}

// Clients differ in how much of the path they encode; S3 signs it encoded once. Both the path
// as sent and its canonical encoding are tried: either way the signature needs the secret.
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
      const values = req.headersDistinct[name] || [];
      return `${name}:${values.map(v => v.trim().replace(/\s+/g, ' ')).join(',')}\n`;
    })
    .join('');
}

function checkSignedHeaders(req, text, fail) {
  if (!/^[a-z0-9-]+(;[a-z0-9-]+)*$/.test(text || '')) {
    fail(`SignedHeaders must be lowercase header names joined by ";", got "${text}"`);
  }
  const names = text.split(';');
  for (let i = 1; i < names.length; i += 1) {
    if (names[i - 1] >= names[i]) fail('SignedHeaders must be sorted and name each header once');
  }
  if (!names.includes('host')) fail('the host header must be signed');
  const unsigned = Object.keys(req.headers).filter(n => n.startsWith('x-amz-') && !names.includes(n));
  if (unsigned.length) {
    throw refuse('AccessDenied', `x-amz-* headers must be signed; not signed: ${unsigned.join(', ')}`);
  }
  return names;
}

function parseCredential(credential, fail) {
  const parts = (credential || '').split('/');
  if (parts.length !== 5 || !parts[0] || parts[4] !== 'aws4_request') {
    fail(`malformed credential "${credential}"`);
  }
  const [accessKeyId, date, region, service] = parts;
  return { accessKeyId, date, region, service };
}

// "AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=..." with each of the three
// exactly once and nothing else.
function headerAuth(req, header) {
  const fail = message => {
    throw refuse('AuthorizationHeaderMalformed', message);
  };
  const fields = {};
  header
    .slice(ALGORITHM.length + 1)
    .split(',')
    .forEach((part, index) => {
      const m = /^([A-Za-z]+)=([^\s,=]+=*)$/.exec(index ? part.replace(/^ /, '') : part);
      if (!m) fail(`malformed authorization parameter "${part}"`);
      const [, name, value] = m;
      if (!['Credential', 'SignedHeaders', 'Signature'].includes(name)) {
        fail(`unknown authorization parameter ${name}`);
      }
      if (name in fields) fail(`authorization parameter ${name} is given twice`);
      fields[name] = value;
    });
  if (Object.keys(fields).length !== 3) {
    fail('the authorization header needs Credential, SignedHeaders and Signature');
  }
  const payloadHash = req.headers['x-amz-content-sha256'];
  if (!payloadHash) {
    throw refuse('InvalidRequest', 'x-amz-content-sha256 is required with SigV4');
  }
  if (!/^[0-9a-f]{64}$/.test(payloadHash) && payloadHash !== UNSIGNED_PAYLOAD && !STREAMING_PAYLOADS.has(payloadHash)) {
    throw refuse('InvalidArgument', `x-amz-content-sha256 must be a hex SHA-256 or a known payload form`);
  }
  const timestamp = req.headers['x-amz-date'];
  const time = parseAmzDate(timestamp);
  if (!time) throw refuse('AccessDenied', 'SigV4 requests need an x-amz-date header (YYYYMMDDTHHMMSSZ)');
  if (Math.abs(Date.now() - time) > MAX_CLOCK_SKEW_MS) {
    throw refuse('RequestTimeTooSkewed', 'request time and server time differ by over 15 minutes');
  }
  const signedHeaders = checkSignedHeaders(req, fields.SignedHeaders, fail);
  for (const name of ['x-amz-date', 'x-amz-content-sha256']) {
    if (!signedHeaders.includes(name)) throw refuse('AccessDenied', `the ${name} header must be signed`);
  }
  return {
    credential: parseCredential(fields.Credential, fail),
    signedHeaders,
    signature: fields.Signature,
    timestamp,
    payloadHash,
    leaveOut: null,
  };
}

function presignedAuth(req, pairs) {
  const fail = message => {
    throw refuse('AuthorizationQueryParametersError', message);
  };
  const get = name => {
    const values = pairs.filter(([n]) => n === name);
    if (values.length !== 1) fail(values.length ? `${name} is given twice` : `${name} is missing`);
    return values[0][1];
  };
  if (get('X-Amz-Algorithm') !== ALGORITHM) fail(`X-Amz-Algorithm must be ${ALGORITHM}`);
  const timestamp = get('X-Amz-Date');
  const time = parseAmzDate(timestamp);
  const expiresText = get('X-Amz-Expires');
  const expires = /^\d{1,7}$/.test(expiresText) ? Number(expiresText) : NaN;
  if (!time) fail('X-Amz-Date must be YYYYMMDDTHHMMSSZ');
  if (!(expires >= 1 && expires <= MAX_PRESIGNED_SECONDS)) {
    fail(`X-Amz-Expires must be a number of seconds from 1 to ${MAX_PRESIGNED_SECONDS}`);
  }
  if (time - Date.now() > MAX_CLOCK_SKEW_MS) {
    throw refuse('AccessDenied', 'Request is not valid yet');
  }
  if (Date.now() > time.getTime() + expires * 1000) {
    throw refuse('AccessDenied', 'Request has expired');
  }
  const hashes = pairs.filter(([n]) => n === 'X-Amz-Content-Sha256');
  if (hashes.length > 1) fail('X-Amz-Content-Sha256 is given twice');
  const payloadHash = hashes.length ? hashes[0][1] : UNSIGNED_PAYLOAD;
  if (!/^[0-9a-f]{64}$/.test(payloadHash) && payloadHash !== UNSIGNED_PAYLOAD) {
    fail('X-Amz-Content-Sha256 must be a hex SHA-256 or UNSIGNED-PAYLOAD');
  }
  return {
    credential: parseCredential(get('X-Amz-Credential'), fail),
    signedHeaders: checkSignedHeaders(req, get('X-Amz-SignedHeaders'), fail),
    signature: get('X-Amz-Signature'),
    timestamp,
    payloadHash,
    leaveOut: 'X-Amz-Signature',
  };
}

/**
 * Returns { accessKeyId, payloadHash, presigned } for a request with a valid SigV4 signature
 * made with the secret that lookupSecret(accessKeyId) returns, for `region` and service s3.
 * Throws an S3Error (4xx) for every other request.
 */
function verifySigV4(req, lookupSecret, region) {
  for (const name of SINGLE_HEADERS) {
    if ((req.headersDistinct[name] || []).length > 1) {
      throw refuse('InvalidRequest', `the ${name} header is given more than once`, 400);
    }
  }
  const url = req.url;
  const queryAt = url.indexOf('?');
  const rawPath = queryAt < 0 ? url : url.slice(0, queryAt);
  const pairs = splitQuery(queryAt < 0 ? '' : url.slice(queryAt + 1));
  const header = req.headers.authorization;
  const inQuery = name => pairs.some(([n]) => n === name);
  const presigned = PRESIGN_PARAMS.some(inQuery);

  if (header !== undefined && (presigned || inQuery('Signature') || inQuery('AWSAccessKeyId'))) {
    throw refuse('InvalidArgument', 'give the signature in the Authorization header or in the query, not both');
  }
  let auth;
  if (header !== undefined) {
    if (!header.startsWith(`${ALGORITHM} `)) {
      throw refuse('InvalidRequest', `unsupported authorization type; only ${ALGORITHM} (SigV4) is accepted`, 400);
    }
    auth = headerAuth(req, header);
  } else if (presigned) {
    auth = presignedAuth(req, pairs);
  } else if (inQuery('Signature') || inQuery('AWSAccessKeyId')) {
    throw refuse('InvalidRequest', `SigV2 presigned URLs are not accepted; sign with ${ALGORITHM}`, 400);
  } else {
    throw refuse('AccessDenied', 'Access Denied. Requests must be signed with SigV4.');
  }

  const { accessKeyId, date, region: scopeRegion, service } = auth.credential;
  if (date !== auth.timestamp.slice(0, 8)) {
    throw refuse('AuthorizationHeaderMalformed', `the credential date ${date} is not the request date`, 400);
  }
  if (scopeRegion !== region) {
    throw refuse('AuthorizationHeaderMalformed', `the region "${scopeRegion}" is wrong; expecting "${region}"`);
  }
  if (service !== SERVICE) {
    throw refuse('AuthorizationHeaderMalformed', `the service "${service}" is wrong; expecting "${SERVICE}"`);
  }
  if (!/^[0-9a-f]{64}$/.test(auth.signature)) {
    throw refuse('SignatureDoesNotMatch', 'the signature must be 64 lowercase hex digits');
  }
  const secret = lookupSecret(accessKeyId);
  if (secret === undefined) {
    throw refuse('InvalidAccessKeyId', 'The access key does not exist.');
  }
  const scope = `${date}/${region}/${service}/aws4_request`;
  const signingKey = hmac(hmac(hmac(hmac(`AWS4${secret}`, date), region), service), 'aws4_request');
  const provided = Buffer.from(auth.signature, 'utf8');

  for (const path of canonicalPaths(rawPath)) {
    const canonicalRequest = [
      req.method,
      path,
      canonicalQuery(pairs, auth.leaveOut),
      canonicalHeaders(req, auth.signedHeaders),
      auth.signedHeaders.join(';'),
      auth.payloadHash,
    ].join('\n');
    const stringToSign = [ALGORITHM, auth.timestamp, scope, sha256Hex(canonicalRequest)].join('\n');
    const expected = Buffer.from(hmac(signingKey, stringToSign).toString('hex'), 'utf8');
    if (crypto.timingSafeEqual(expected, provided)) {
      return { accessKeyId, payloadHash: auth.payloadHash, presigned: auth.leaveOut !== null };
    }
  }
  throw refuse(
    'SignatureDoesNotMatch',
    'The request signature does not match. Check the secret key and signing method.',
  );
}

module.exports = { verifySigV4, refuse, UNSIGNED_PAYLOAD, STREAMING_PAYLOADS };
