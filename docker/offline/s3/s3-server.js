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
const GroupingFilesystemStore = require('./listing');
const { verifySigV4 } = require('./sigv4');

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

// Runs ahead of s3rver: answers health probes, turns away unsigned requests (MinIO buckets
// are private) and checks SigV4 signatures, which s3rver does not.
function guard(credentials) {
  const lookupSecret = key => (key === credentials.user ? credentials.password : undefined);
  return async (ctx, next) => {
    if (HEALTH_PATHS.has(ctx.path) && ['GET', 'HEAD'].includes(ctx.method)) {
      ctx.status = 200;
      return;
    }
    const { headers } = ctx.req;
    // aws-chunked bodies would be stored with their chunk framing; refuse rather than corrupt.
    if (
      /^STREAMING-/.test(headers['x-amz-content-sha256'] || '') ||
      /aws-chunked/.test(headers['content-encoding'] || '')
    ) {
      throw new S3Error(
        'NotImplemented',
        'aws-chunked (streaming) uploads are not supported by this S3 stand-in',
      );
    }
    const signed =
      'authorization' in headers || 'X-Amz-Algorithm' in ctx.query || 'Signature' in ctx.query;
    if (!signed) throw new S3Error('AccessDenied', 'Access Denied.');
    verifySigV4(ctx.req, lookupSecret); // SigV2 passes through to s3rver's own check
    return next();
  };
}

async function serve(args) {
  const { directory, host, port } = parseServerArgs(args);
  const credentials = readCredentials();
  fs.mkdirSync(directory, { recursive: true });
  fs.accessSync(directory, fs.constants.W_OK);

  // The only key pair is the root user's; s3rver's built-in S3RVER/S3RVER goes away.
  AWSAccount.DUMMY_ACCOUNT.revokeAccessKey('S3RVER');
  AWSAccount.DUMMY_ACCOUNT.createKeyPair(credentials.user, credentials.password);

  const server = new S3rver({
    directory,
    address: host,
    port,
    silent: true,
    // Otherwise a request to http://minio:9000 would be read as one for a bucket named "minio".
    vhostBuckets: false,
  });
  server.store = server.context.store = new GroupingFilesystemStore(directory);
  server.middleware.unshift(guard(credentials));
  server.on('error', (err, ctx) => {
    if (!err.status || err.status >= 500) {
      log(`${ctx ? `${ctx.method} ${ctx.url}: ` : ''}${err.stack || err}`);
    }
  });
  const { address } = await server.run();
  log(`S3 API on ${address}:${port}, data in ${directory}, running as uid ${process.getuid()}`);

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
