#!/usr/bin/env node
// Upload one file to a tus 1.0 endpoint with the REAL tus-js-client (Node API).
//
// Usage:
//   node tusjs_upload.mjs --endpoint http://127.0.0.1:PORT/files/ --file PATH
//       --chunk-size N [--interrupt-at-fraction F] [--metadata key=value ...]
//       [--resume-delay-ms MS] [--timeout SECONDS]
//
// What it does, with tus-js-client's own API only:
//   1. new tus.Upload(fs.createReadStream(PATH), {endpoint, chunkSize: N, uploadSize,
//      metadata: {filename: basename, filetype: guessed MIME type, ...},
//      retryDelays: [0, 200, 500], onProgress, onSuccess, onError}).start()
//      -> POST (Upload-Length, Upload-Metadata), then one PATCH per chunk.
//   2. With --interrupt-at-fraction F (0 <= F < 1): as soon as onProgress reports
//      bytesSent/bytesTotal > F, upload.abort() is called (normally in the middle
//      of a PATCH body, like a killed client).  Then a NEW tus.Upload for the same
//      file is started with `uploadUrl` = the first upload's `url`; tus-js-client
//      sends HEAD, takes Upload-Offset and PATCHes from there to the end.
//      (After --resume-delay-ms, default 0.)  If the upload succeeds before
//      progress passes F there is no interruption (resumed_from = null).
//      tus-js-client silently creates a NEW upload when the resume HEAD gets a
//      4xx; this driver treats that as a failure (the URL must not change).
//   3. A final `fetch(url, {method: "HEAD", headers: {"Tus-Resumable": "1.0.0"}})`
//      checks Upload-Offset == file size and reads Cin-Handle / Cin-Filelink
//      (null when the server does not send them).  When the creation (POST)
//      response also carried Cin-Handle, it must be the same as on the HEAD.
//
// Prints ONE line of JSON on stdout:
//   {"url", "handle", "filelink", "resumed_from" (Upload-Offset of the resume HEAD, or null),
//    "interrupted_at" (bytes reported sent when aborted, or null), "size",
//    "retries" (automatic retries tus-js-client made; each is also logged on stderr)}
// On failure: message on stderr, exit 1 (bad arguments: exit 2).  --timeout (default
// 300 s) bounds the whole run.

import fs from 'node:fs'
import path from 'node:path'
import tusPkg from 'tus-js-client'

const { Upload } = tusPkg

function die(msg, code = 1) {
  process.stderr.write(`tusjs_upload: ${msg}\n`, () => process.exit(code))
  // In case the callback never fires (stderr closed).
  setTimeout(() => process.exit(code), 1000).unref()
}

function usage(msg) {
  die(
    `${msg}\nusage: node tusjs_upload.mjs --endpoint URL --file PATH --chunk-size N ` +
      '[--interrupt-at-fraction F] [--metadata key=value ...] [--resume-delay-ms MS] [--timeout SECONDS]',
    2,
  )
}

function parseArgs(argv) {
  const args = { metadata: {}, interruptAt: null, resumeDelayMs: 0, timeout: 300 }
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i]
    const next = () => {
      if (i + 1 >= argv.length) usage(`${flag} needs a value`)
      return argv[++i]
    }
    switch (flag) {
      case '--endpoint': args.endpoint = next(); break
      case '--file': args.file = next(); break
      case '--chunk-size': args.chunkSize = Number(next()); break
      case '--interrupt-at-fraction': args.interruptAt = Number(next()); break
      case '--resume-delay-ms': args.resumeDelayMs = Number(next()); break
      case '--timeout': args.timeout = Number(next()); break
      case '--metadata': {
        const kv = next()
        const eq = kv.indexOf('=')
        if (eq <= 0) usage(`--metadata expects key=value, got ${JSON.stringify(kv)}`)
        args.metadata[kv.slice(0, eq)] = kv.slice(eq + 1)
        break
      }
      case '-h':
      case '--help': usage('help'); break
      default: usage(`unknown argument ${flag}`)
    }
  }
  if (!args.endpoint) usage('--endpoint is required')
  if (!args.file) usage('--file is required')
  if (!Number.isInteger(args.chunkSize) || args.chunkSize <= 0) usage('--chunk-size must be an integer > 0')
  if (args.interruptAt !== null && !(args.interruptAt >= 0 && args.interruptAt < 1)) {
    usage('--interrupt-at-fraction must be in [0, 1)')
  }
  if (!(args.resumeDelayMs >= 0)) usage('--resume-delay-ms must be >= 0')
  if (!(args.timeout >= 0)) usage('--timeout must be >= 0')
  return args
}

const MIME = {
  '.txt': 'text/plain', '.html': 'text/html', '.json': 'application/json', '.png': 'image/png',
  '.jpg': 'image/jpeg', '.jpeg': 'image/jpeg', '.gif': 'image/gif', '.pdf': 'application/pdf',
  '.mp4': 'video/mp4', '.zip': 'application/zip', '.csv': 'text/csv',
}

function describeError(err) {
  let msg = String(err && err.message ? err.message : err)
  const req = err && err.originalRequest
  const res = err && err.originalResponse
  if (req) msg += `\n  request: ${req.getMethod()} ${req.getURL()}`
  if (res) {
    msg += `\n  response status: ${res.getStatus()}`
    const body = res.getBody()
    if (body) msg += `\n  response body: ${JSON.stringify(body)}`
  }
  if (err && err.causingError && err.causingError.stack) msg += `\n  cause: ${err.causingError.stack}`
  return msg
}

// One tus.Upload run; resolves with {interruptedAt} when aborted, {} on success.
function runUpload(args, opts, state) {
  return new Promise((resolve, reject) => {
    let aborted = false
    let upload = null
    const options = {
      endpoint: args.endpoint,
      chunkSize: args.chunkSize,
      uploadSize: state.size,
      metadata: state.metadata,
      retryDelays: [0, 200, 500],
      onShouldRetry(err, retryAttempt) {
        const status = err.originalResponse ? err.originalResponse.getStatus() : 0
        const retry = !(status >= 400 && status < 500) || status === 409 || status === 423
        if (retry) {
          state.retries++
          process.stderr.write(`tusjs_upload: retry #${retryAttempt + 1} after: ${describeError(err)}\n`)
        }
        return retry
      },
      onAfterResponse(req, res) {
        const method = req.getMethod()
        if (method === 'POST' && state.creationHandle === undefined) {
          state.creationHandle = res.getHeader('Cin-Handle') ?? null
        }
        if (method === 'HEAD' && opts.resuming && state.resumedFrom === null) {
          const off = Number.parseInt(res.getHeader('Upload-Offset'), 10)
          if (res.getStatus() >= 200 && res.getStatus() < 300 && !Number.isNaN(off)) state.resumedFrom = off
        }
      },
      onProgress(bytesSent, bytesTotal) {
        if (aborted || !opts.interruptAt || bytesTotal === 0) return
        if (bytesSent / bytesTotal > opts.interruptAt.fraction) {
          aborted = true
          const interruptedAt = bytesSent
          upload.abort().then(() => resolve({ interruptedAt }), reject)
        }
      },
      onSuccess() {
        resolve({})
      },
      onError(err) {
        reject(err)
      },
    }
    if (opts.uploadUrl) options.uploadUrl = opts.uploadUrl
    upload = new Upload(fs.createReadStream(args.file), options)
    state.current = upload
    upload.start()
  })
}

async function main() {
  const args = parseArgs(process.argv.slice(2))
  let st
  try {
    st = fs.statSync(args.file)
  } catch (e) {
    usage(`cannot stat ${args.file}: ${e.message}`)
    return
  }
  if (!st.isFile()) usage(`not a regular file: ${args.file}`)
  if (args.timeout > 0) {
    setTimeout(() => die(`upload did not finish within ${args.timeout} s`), args.timeout * 1000).unref()
  }

  const state = {
    size: st.size,
    metadata: {
      filename: path.basename(args.file),
      filetype: MIME[path.extname(args.file).toLowerCase()] || 'application/octet-stream',
      ...args.metadata,
    },
    resumedFrom: null,
    creationHandle: undefined,
    retries: 0,
    current: null,
  }

  let stage = 'uploading'
  try {
    const first = await runUpload(
      args,
      { interruptAt: args.interruptAt === null ? null : { fraction: args.interruptAt } },
      state,
    )
    const url = state.current.url
    if (!url) throw new Error('tus-js-client finished without an upload URL')
    let interruptedAt = null
    if (first.interruptedAt !== undefined) {
      interruptedAt = first.interruptedAt
      if (args.resumeDelayMs > 0) await new Promise((r) => setTimeout(r, args.resumeDelayMs))
      stage = 'resuming'
      await runUpload(args, { uploadUrl: url, resuming: true }, state)
      if (state.current.url !== url) {
        throw new Error(
          `resume did not continue ${url}: tus-js-client created a new upload ${state.current.url} ` +
            '(the resume HEAD failed with a 4xx)',
        )
      }
      if (state.resumedFrom === null) throw new Error('resume finished without a successful HEAD')
      if (state.resumedFrom > state.size) {
        throw new Error(`resume HEAD reported Upload-Offset ${state.resumedFrom} > size ${state.size}`)
      }
    } else if (args.interruptAt !== null) {
      process.stderr.write(
        `tusjs_upload: note: upload finished before progress passed ${args.interruptAt}: no interruption\n`,
      )
    }

    stage = 'final HEAD'
    const res = await fetch(url, { method: 'HEAD', headers: { 'Tus-Resumable': '1.0.0' } })
    if (res.status >= 300) throw new Error(`final HEAD ${url} -> ${res.status}`)
    const finalOffset = res.headers.get('Upload-Offset')
    if (finalOffset === null || Number(finalOffset) !== state.size) {
      throw new Error(`final HEAD ${url}: Upload-Offset ${JSON.stringify(finalOffset)}, expected ${state.size}`)
    }
    const handle = res.headers.get('Cin-Handle')
    const filelink = res.headers.get('Cin-Filelink')
    if (state.creationHandle && handle && state.creationHandle !== handle) {
      throw new Error(`Cin-Handle differs: POST said ${state.creationHandle}, HEAD says ${handle}`)
    }
    const out = {
      url,
      handle,
      filelink,
      resumed_from: state.resumedFrom,
      interrupted_at: interruptedAt,
      size: state.size,
      retries: state.retries,
    }
    process.stdout.write(`${JSON.stringify(out)}\n`, () => process.exit(0))
  } catch (err) {
    die(`failed while ${stage}: ${describeError(err)}`)
  }
}

main().catch((err) => die(`unexpected error: ${err && err.stack ? err.stack : err}`))
