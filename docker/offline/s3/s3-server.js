#!/usr/bin/env node
'use strict';
// Stands in for MinIO where no registry can serve its image. It takes MinIO's command line
// (`server DIR --address :9000 --console-address :9001`) and credentials (MINIO_ROOT_USER,
// MINIO_ROOT_PASSWORD, or their *_FILE forms), and serves S3 with s3rver, which keeps each
// object as a plain file under DIR, so data survives restarts on a volume.
//
//   s3-server server DIR [--address HOST:PORT] [--console-address ADDR]
//   s3-server ready [URL]     healthcheck: exit 0 when the server answers

const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const S3rver = require('s3rver');
const AWSAccount = require('s3rver/lib/models/account');
const S3Error = require('s3rver/lib/models/error');
const CheckedFilesystemStore = require('./store');
const { authorizeScoped } = require('./policy');
const { hasBody, verifiedBody } = require('./payload');
const { verifySigV4, refuse, STREAMING_PAYLOADS, UNSIGNED_PAYLOAD } = require('./sigv4');

const SERVICE_USER = 's3';
// MinIO's probe paths, so probes written for MinIO keep working.
const HEALTH_PATHS = new Set(['/minio/health/live', '/minio/health/ready', '/minio/health/cluster']);
const DEFAULT_READY_URL = 'http://127.0.0.1:9000/minio/health/ready';

function log(message) {
  process.stderr.write(`${new Date().toISOString()} s3-server: ${message}\n`);
}

function exitWith(message) {
  log(`error: ${message}`);
  process.exit(1);
}

// NAME or NAME_FILE (a Docker secret), never both.
function setting(name) {
  const direct = process.env[name];
  const file = process.env[`${name}_FILE`];
  if (direct && file) exitWith(`set ${name} or ${name}_FILE, not both`);
  if (file) return fs.readFileSync(file, 'utf8').trim();
  return direct || '';
}

function parseAddress(address, flag) {
  // ":9000", "0.0.0.0:9000", "[::]:9000"
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(address || '');
  if (!m) exitWith(`${flag} wants HOST:PORT or :PORT, got "${address}"`);
  return { host: m[1] || m[2] || '0.0.0.0', port: Number(m[3]) };
}

function parseServerArgs(args) {
  let address = ':9000';
  const dirs = [];
  for (let i = 0; i < args.length; i += 1) {
    const [flag, inline] = args[i].startsWith('--') ? args[i].split(/=(.*)/s) : [args[i]];
    const value = () => (inline !== undefined ? inline : args[(i += 1)]);
    switch (flag) {
      case '--address':
        address = value();
        break;
      case '--console-address':
        value(); // there is no web console; the flag is accepted so MinIO's command works as is
        break;
      case '--quiet':
      case '--anonymous':
      case '--json':
        break;
      default:
        if (flag.startsWith('-')) exitWith(`unsupported option ${flag} (MinIO stand-in)`);
        dirs.push(flag);
    }
  }
  if (dirs.length !== 1) {
    exitWith(`give exactly one data directory, got ${dirs.length} (no erasure sets here)`);
  }
  return { directory: path.resolve(dirs[0]), ...parseAddress(address, '--address') };
}

function readCredentials() {
  const user = setting('MINIO_ROOT_USER');
  const password = setting('MINIO_ROOT_PASSWORD');
  // MinIO falls back to minioadmin/minioadmin; a stand-in should not make that habit easier.
  if (!user || !password) exitWith('MINIO_ROOT_USER and MINIO_ROOT_PASSWORD are required');
  // The same minimum lengths as MinIO, so a setup that works here also works there.
  if (user.length < 3) exitWith('MINIO_ROOT_USER needs at least 3 characters');
  if (password.length < 8) exitWith('MINIO_ROOT_PASSWORD needs at least 8 characters');
  return { user, password };
}

// Volumes and bind mounts often arrive owned by root. As root, hand the data directory to the
// service user, walking it only when its top is not theirs yet; docker-entrypoint.sh then
// starts the server as that user (Node cannot switch users itself, see there).
function ownData(args) {
  if (args[0] !== 'server' || process.getuid() !== 0) return;
  const { directory } = parseServerArgs(args.slice(1));
  const { uid, gid } = fs.statSync(`/home/${SERVICE_USER}`);
  fs.mkdirSync(directory, { recursive: true });
  if (fs.statSync(directory).uid === uid) return;
  const walk = dir => {
    fs.lchownSync(dir, uid, gid);
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) walk(full);
      else fs.lchownSync(full, uid, gid);
    }
  };
  walk(directory);
}

// Keys besides the root user's: each limited to one bucket (see policy.js), standing in for a
// MinIO user with a bucket policy. One for now: the tracking server's.
function readScopedKeys(rootUser) {
  const accessKey = setting('S3_STANDIN_SCOPED_ACCESS_KEY');
  const secret = setting('S3_STANDIN_SCOPED_SECRET_KEY');
  const bucket = setting('S3_STANDIN_SCOPED_BUCKET');
  if (!accessKey && !secret && !bucket) return [];
  if (!accessKey || !secret || !bucket) {
    exitWith('S3_STANDIN_SCOPED_ACCESS_KEY, _SECRET_KEY and _BUCKET go together: set all three or none');
  }
  if (accessKey.length < 3) exitWith('S3_STANDIN_SCOPED_ACCESS_KEY needs at least 3 characters');
  if (secret.length < 8) exitWith('S3_STANDIN_SCOPED_SECRET_KEY needs at least 8 characters');
  if (accessKey === rootUser) exitWith('S3_STANDIN_SCOPED_ACCESS_KEY must differ from MINIO_ROOT_USER');
  return [{ accessKey, secret, bucket }];
}

// A view of the store whose ListBuckets shows only one bucket, for a key limited to it.
function storeShowingOnly(store, bucket) {
  return Object.create(store, {
    listBuckets: { value: async () => (await store.listBuckets()).filter(b => b.name === bucket) },
  });
}

// Runs ahead of s3rver: answers health probes, holds every other request to SigV4 (sigv4.js),
// checks the body against its signed hash (payload.js) and keeps scoped keys to their bucket
// (policy.js). s3rver checks none of this for SigV4 beyond the access key's existence.
function guard({ user, password }, scopedKeys, region) {
  const secrets = new Map([[user, password], ...scopedKeys.map(k => [k.accessKey, k.secret])]);
  const scopes = new Map(scopedKeys.map(k => [k.accessKey, k.bucket]));
  const lookupSecret = key => secrets.get(key);
  return async (ctx, next) => {
    if (HEALTH_PATHS.has(ctx.path) && ['GET', 'HEAD'].includes(ctx.method)) {
      ctx.status = 200;
      return;
    }
    const { req } = ctx;
    const { accessKeyId, payloadHash, presigned } = verifySigV4(req, lookupSecret, region);
    const scope = scopes.get(accessKeyId);
    if (scope !== undefined && authorizeScoped(scope, req)) ctx.store = storeShowingOnly(ctx.store, scope);

    // aws-chunked bodies would be stored with their chunk framing; refuse rather than corrupt.
    if (STREAMING_PAYLOADS.has(payloadHash) || /aws-chunked/.test(req.headers['content-encoding'] || '')) {
      throw new S3Error(
        'NotImplemented',
        'aws-chunked (streaming) uploads are not supported by this S3 stand-in',
      );
    }
    if (!hasBody(req)) return next();
    if (payloadHash === UNSIGNED_PAYLOAD) {
      // Only presigned URLs may leave a body unsigned, as in S3; boto3 over plain http always
      // signs the body's hash, and nothing else would tie the body to the signature.
      if (!presigned) {
        throw refuse(
          'InvalidRequest',
          'a body sent as UNSIGNED-PAYLOAD is accepted in presigned URLs only; sign its SHA-256',
          400,
        );
      }
      return next();
    }
    const { body, cleanup } = await verifiedBody(req, payloadHash);
    ctx.res.once('close', cleanup);
    ctx.req = body;
    return next();
  };
}

async function serve(args) {
  const { directory, host, port } = parseServerArgs(args);
  const credentials = readCredentials();
  const scopedKeys = readScopedKeys(credentials.user);
  // MinIO's setting; clients sign for this region (the stack's S3_REGION).
  const region = setting('MINIO_SITE_REGION') || setting('MINIO_REGION') || 'us-east-1';
  fs.mkdirSync(directory, { recursive: true });
  fs.accessSync(directory, fs.constants.W_OK);

  // s3rver's built-in S3RVER/S3RVER goes away; the guard below knows the real keys, and
  // s3rver's own check, which runs after it, needs them too.
  AWSAccount.DUMMY_ACCOUNT.revokeAccessKey('S3RVER');
  AWSAccount.DUMMY_ACCOUNT.createKeyPair(credentials.user, credentials.password);
  for (const { accessKey, secret } of scopedKeys) AWSAccount.DUMMY_ACCOUNT.createKeyPair(accessKey, secret);

  const server = new S3rver({
    directory,
    address: host,
    port,
    silent: true,
    // Otherwise a request to http://minio:9000 would be read as one for a bucket named "minio".
    vhostBuckets: false,
  });
  server.store = server.context.store = new CheckedFilesystemStore(directory);
  server.middleware.unshift(guard(credentials, scopedKeys, region));
  server.on('error', (err, ctx) => {
    if (!err.status || err.status >= 500) {
      log(`${ctx ? `${ctx.method} ${ctx.url}: ` : ''}${err.stack || err}`);
    }
  });
  const { address } = await server.run();
  log(`S3 API on ${address}:${port}, region ${region}, data in ${directory}, ` +
    `${scopedKeys.length} bucket-scoped key(s), running as uid ${process.getuid()}`);

  let stopping = false;
  const stop = signal => {
    if (stopping) return;
    stopping = true;
    log(`${signal}: finishing open requests, then exiting`);
    server.httpServer.close(() => process.exit(0));
    server.httpServer.closeIdleConnections();
    // Do not hold a `docker stop` hostage to a client that never hangs up.
    setTimeout(() => process.exit(0), 5000).unref();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

function ready(url = DEFAULT_READY_URL) {
  const req = http.get(url, { timeout: 3000 }, res => {
    res.resume();
    process.exit(res.statusCode === 200 ? 0 : 1);
  });
  req.on('timeout', () => req.destroy(new Error('timed out')));
  req.on('error', err => exitWith(`${url}: ${err.message}`));
}

const [command, ...rest] = process.argv.slice(2);
if (command === 'server') {
  serve(rest).catch(err => exitWith(err.stack || String(err)));
} else if (command === 'ready') {
  ready(rest[0]);
} else if (command === 'own-data') {
  ownData(rest);
} else {
  process.stderr.write(fs.readFileSync(__filename, 'utf8').split('\n').slice(2, 10)
    .map(line => line.replace(/^\/\/ ?/, '')).join('\n') + '\n');
  process.exit(!command || ['-h', '--help', 'help'].includes(command) ? 0 : 1);
}
