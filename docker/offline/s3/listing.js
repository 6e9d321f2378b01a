'use strict';
// s3rver 3.7.1 drops common prefixes from delimiter listings when a "directory" holds only
// deeper directories (objects a/b/c.txt alone: listing with "/" shows no "a/"). MLflow lists
// artifact directories exactly that way, so checkpoints/epoch-1/... would vanish from the UI and
// from downloads. This store lists everything under the prefix and groups it itself.

const FilesystemStore = require('s3rver/lib/stores/filesystem');

class GroupingFilesystemStore extends FilesystemStore {
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

module.exports = GroupingFilesystemStore;
