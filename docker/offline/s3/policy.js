'use strict';
// Stands in for the MinIO user and bucket policy that limit the tracking server's key to its
// bucket: a scoped key may list its bucket, read, write and delete the objects in it
// (multipart uploads and copies within the bucket included) and see only that bucket in
// ListBuckets. It may not create or delete buckets, change their settings, or touch any other
// bucket. Everything not allowed here is refused with AccessDenied.

const { refuse } = require('./sigv4');

// Query parameters that only shape a read (listings, response headers, part numbers); any
// other sub-resource (?acl, ?policy, ?cors, ?tagging, ?versions, ...) is a different action.
const PLAIN_PARAMS = new Set([
  'prefix', 'delimiter', 'marker', 'max-keys', 'list-type', 'continuation-token', 'start-after',
  'encoding-type', 'fetch-owner', 'max-uploads', 'key-marker', 'upload-id-marker',
  'max-parts', 'part-number-marker', 'partNumber', 'versionId',
  'response-content-type', 'response-content-language', 'response-expires',
  'response-cache-control', 'response-content-disposition', 'response-content-encoding',
  'x-id',
]);
const AUTH_PARAM = /^X-Amz-/;

function decode(text) {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

// The bucket and key as s3rver's router reads them from the path.
function target(rawPath) {
  const [, bucket = '', ...rest] = rawPath.split('/');
  return { bucket: decode(bucket), key: rest.length ? decode(rest.join('/')) : '' };
}

// The source bucket of x-amz-copy-source, read the way s3rver reads it.
function copySourceBucket(header) {
  let source;
  try {
    source = decodeURI(header);
  } catch {
    source = header;
  }
  return source.replace(/^\//, '').split('/')[0];
}

function allowedAction(method, bucket, key, params) {
  const sub = params.filter(name => !PLAIN_PARAMS.has(name) && !AUTH_PARAM.test(name));
  const only = (...names) => sub.every(name => names.includes(name));
  if (!bucket) return method === 'GET' && sub.length === 0; // ListBuckets, filtered by the caller
  if (!key) {
    switch (method) {
      case 'HEAD':
        return sub.length === 0;
      case 'GET': // ListObjects(V2), GetBucketLocation, ListMultipartUploads
        return only('location', 'uploads');
      case 'POST': // DeleteObjects
        return sub.length === 1 && sub[0] === 'delete';
      default: // creating, deleting or configuring the bucket
        return false;
    }
  }
  switch (method) {
    case 'GET':
    case 'HEAD':
      return only('uploadId'); // GetObject, HeadObject, ListParts
    case 'PUT':
      return only('uploadId'); // PutObject, CopyObject, UploadPart
    case 'DELETE':
      return only('uploadId'); // DeleteObject, AbortMultipartUpload
    case 'POST':
      return only('uploads', 'uploadId') && sub.length === 1; // Create/CompleteMultipartUpload
    default:
      return false;
  }
}

/**
 * Throws AccessDenied unless a key limited to `bucket` may make this request. Returns true
 * for ListBuckets, whose answer the caller narrows to the key's own bucket.
 */
function authorizeScoped(bucket, req) {
  const url = req.url;
  const queryAt = url.indexOf('?');
  const rawPath = queryAt < 0 ? url : url.slice(0, queryAt);
  const params = new URLSearchParams(queryAt < 0 ? '' : url.slice(queryAt + 1));
  const wanted = target(rawPath);
  const denied = () => refuse('AccessDenied', 'Access Denied. This key is limited to its own bucket.');
  if (wanted.bucket ? wanted.bucket !== bucket : rawPath !== '/') throw denied();
  if (!allowedAction(req.method, wanted.bucket, wanted.key, [...params.keys()])) throw denied();
  const copySource = req.headers['x-amz-copy-source'];
  if (copySource !== undefined && copySourceBucket(copySource) !== bucket) throw denied();
  return !wanted.bucket;
}

module.exports = { authorizeScoped };
