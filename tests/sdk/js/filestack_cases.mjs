// Uploads files to a CIN edge POP over HTTPS with the official filestack-js SDK,
// unpatched, and reads them back with its metadata and download helpers.
//
// Nothing in the SDK is replaced. It is pointed at the POP the way a customer
// with their own domain does it: `init(apikey, { cname })` makes it call
// `https://upload.{cname}`, `https://www.{cname}/api/file` and `https://cdn.{cname}`.
// `download` builds `https://cdn.filestackcontent.com/{apikey}/{handle}`
// whatever the cname, so the caller's hosts file maps that name to the POP
// too. The POP's certificate is trusted through NODE_EXTRA_CA_CERTS. The SDK's
// Node adapter cannot call a URL with a port: the POP is on 443.
//
// Usage: node filestack_cases.mjs --cname cin.test --cases CASES.json [--apikey KEY]
// CASES.json: a list of {"name", "path", "intelligent", "tags"?}. Prints one JSON
// list, per case: {"name", "handle", "url", "upload_tags", "content_sha256",
// "metadata"}. Any failure ends the run with its error on stderr, exit status 1.

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as filestack from 'filestack-js';

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  if (at === -1) {
    if (fallback === undefined) throw new Error(`--${name} is required`);
    return fallback;
  }
  return process.argv[at + 1];
}

const cname = option('cname');
const apikey = option('apikey', 'testkey');
const cases = JSON.parse(readFileSync(option('cases'), 'utf8'));
// No error reports to Filestack's Sentry: nothing leaves the test.
const client = filestack.init(apikey, { cname, forwardErrors: false });

const results = [];
for (const c of cases) {
  const uploadOptions = { intelligent: c.intelligent };
  if (c.tags) uploadOptions.tags = c.tags;
  const uploaded = await client.upload(c.path, uploadOptions);
  if (!uploaded || !uploaded.handle) {
    throw new Error(`${c.name}: the upload gave no handle: ${JSON.stringify(uploaded)}`);
  }
  const metadata = await client.metadata(uploaded.handle);
  const download = await client.download(uploaded.handle);
  const body = Buffer.from(download.data);
  results.push({
    name: c.name,
    handle: uploaded.handle,
    url: uploaded.url,
    upload_tags: uploaded.uploadTags ?? null,
    content_sha256: createHash('sha256').update(body).digest('hex'),
    metadata,
  });
}
console.log(JSON.stringify(results));
