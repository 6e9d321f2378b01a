'use strict';
// s3rver's filesystem store, with two changes the stack relies on.
//
// Listings: s3rver 3.7.1 drops common prefixes from delimiter listings when a "directory"
// holds only deeper directories (objects a/b/c.txt alone: listing with "/" shows no "a/").
// MLflow lists artifact directories exactly that way, so checkpoints/epoch-1/... would vanish
// from the UI and from downloads. This store lists everything under the prefix and groups it
// itself.
//
// Paths: s3rver joins bucket names and keys onto the data directory as they come, so a key
// such as a/../../other/x would reach another bucket (or leave the data directory), which
// would void any limit on a key's bucket. Names with "." or ".." segments are refused, as
// MinIO refuses them (XMinioInvalidObjectName).
//
// Deletes: after removing an object's files s3rver removes the directories left empty above
// it. DeleteObjects deletes its keys concurrently, so two keys of one directory race there and
// one of them fails with ENOENT (or ENOTEMPTY beside a new upload): a 500 for a delete that
// has happened. Those two are taken as done.

const FilesystemStore = require('s3rver/lib/stores/filesystem');
const S3Error = require('s3rver/lib/models/error');

function invalidName(what, name) {
  const error = new S3Error('InvalidArgument', `${what} "${name}" has a "." or ".." path segment`);
  error.code = 'XMinioInvalidObjectName';
  return error;
}

class CheckedFilesystemStore extends FilesystemStore {
  getBucketPath(bucket) {
    if (!bucket || bucket.includes('/') || bucket === '.' || bucket === '..') {
      throw invalidName('bucket name', bucket);
    }
    return super.getBucketPath(bucket);
  }

  getResourcePath(bucket, key = '', resource) {
    this.getBucketPath(bucket);
    if (key.split('/').some(segment => segment === '.' || segment === '..')) {
      throw invalidName('object name', key);
    }
    return super.getResourcePath(bucket, key, resource);
  }

  async deleteObject(bucket, key) {
    try {
      await super.deleteObject(bucket, key);
    } catch (err) {
      if (err.code !== 'ENOENT' && err.code !== 'ENOTEMPTY') throw err;
    }
  }

  async listObjects(bucket, options = {}) {
    const { delimiter = '', prefix = '' } = options;
    if (!delimiter) return super.listObjects(bucket, options);

    const all = await super.listObjects(bucket, { ...options, delimiter: '', maxKeys: Infinity });
    const objects = [];
    const commonPrefixes = new Set();
    for (const object of all.objects) {
      const cut = object.key.indexOf(delimiter, prefix.length);
      if (cut === -1) objects.push(object);
      else commonPrefixes.add(object.key.slice(0, cut + delimiter.length));
    }
    // One complete page: s3rver builds continuation tokens from object keys only, which cannot
    // resume after a common prefix, so a grouped listing is never cut at MaxKeys.
    return { objects, commonPrefixes: [...commonPrefixes].sort(), isTruncated: false };
  }
}

module.exports = CheckedFilesystemStore;
