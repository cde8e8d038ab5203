#!/usr/bin/env python3
"""Upload one file to a tus 1.0 endpoint with the REAL tus Python client (tuspy).

Usage:
  python tuspy_upload.py --endpoint http://127.0.0.1:PORT/files/ --file PATH
      --chunk-size N [--interrupt-after-chunks K] [--metadata key=value ...]
      [--retries R] [--upload-checksum] [--timeout SECONDS]

What it does, with tuspy's own API only (TusClient(...).uploader(...)):
  1. `uploader = TusClient(endpoint).uploader(file_path=PATH, chunk_size=N,
     metadata={"filename": basename, "filetype": guessed MIME type, ...})`;
     `uploader.set_url(uploader.create_url())` (tus creation: POST with
     Upload-Length + Upload-Metadata, upload URL from Location), then
     `uploader.upload_chunk()` in a loop (one PATCH per chunk) until
     `uploader.offset == file size`.  A 0-byte file is just the POST.
  2. With --interrupt-after-chunks K: after K PATCHes (K may be 0) the uploader
     and its client are thrown away, as if the process had been killed.  A NEW
     TusClient + uploader is made for the same file with `url=<upload URL>`;
     tuspy then asks the server for the offset (HEAD, Upload-Offset) and the
     loop goes on from that offset to the end.  If the upload is already
     complete after K chunks there is no interruption (resumed_from = null).
  3. A final `HEAD <upload URL>` (Tus-Resumable: 1.0.0) with requests checks
     that Upload-Offset equals the file size and reads the CIN headers
     `Cin-Handle` / `Cin-Filelink` (null when the server does not send them).

Prints ONE line of JSON on stdout:
  {"url": upload URL, "handle": Cin-Handle or null, "filelink": Cin-Filelink or null,
   "resumed_from": offset the server reported on resume (int) or null,
   "interrupted_at": client-side offset when it was interrupted (int) or null,
   "size": file size}
On failure it prints the error (with the HTTP status and body when there is
one) on stderr and exits 1; bad arguments exit 2.  --timeout (default 300 s)
bounds the whole run, since tuspy sets no socket timeouts.  --upload-checksum
makes tuspy send `Upload-Checksum: sha1 <base64>` on every PATCH.
"""

import argparse
import json
import mimetypes
import os
import signal
import sys
import traceback

# Loopback only: never send test traffic through an environment proxy.
for _k in list(os.environ):
    if _k.lower() in ("http_proxy", "https_proxy", "all_proxy"):
        del os.environ[_k]

import requests  # noqa: E402  (a dependency of tuspy)
from tusclient import client as tus_client  # noqa: E402
from tusclient.exceptions import TusCommunicationError  # noqa: E402


def _err(msg):
    print(msg, file=sys.stderr, flush=True)


def _parse_metadata(pairs):
    meta = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise argparse.ArgumentTypeError(f"--metadata expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        meta[key] = value
    return meta


def _new_uploader(endpoint, path, chunk_size, metadata, retries, checksum, url=None):
    client = tus_client.TusClient(endpoint)
    kwargs = dict(file_path=path, chunk_size=chunk_size, metadata=metadata,
                  retries=retries, retry_delay=1, upload_checksum=checksum)
    if url is not None:
        kwargs["url"] = url  # tuspy HEADs the URL here and sets .offset from Upload-Offset
    return client.uploader(**kwargs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--endpoint", required=True, help="tus creation URL, e.g. http://127.0.0.1:PORT/files/")
    ap.add_argument("--file", required=True)
    ap.add_argument("--chunk-size", type=int, required=True, help="bytes per PATCH")
    ap.add_argument("--interrupt-after-chunks", type=int, default=None, metavar="K")
    ap.add_argument("--metadata", action="append", default=[], metavar="key=value",
                    help="extra/overriding Upload-Metadata entries (repeatable)")
    ap.add_argument("--retries", type=int, default=0, help="tuspy retries per chunk (default 0)")
    ap.add_argument("--upload-checksum", action="store_true",
                    help="send Upload-Checksum (sha1) with every PATCH")
    ap.add_argument("--timeout", type=float, default=300.0, help="abort the whole run after this many seconds")
    args = ap.parse_args(argv)

    if args.chunk_size <= 0:
        ap.error("--chunk-size must be > 0")
    if args.interrupt_after_chunks is not None and args.interrupt_after_chunks < 0:
        ap.error("--interrupt-after-chunks must be >= 0")
    if not os.path.isfile(args.file):
        ap.error(f"no such file: {args.file}")
    try:
        extra_meta = _parse_metadata(args.metadata)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))

    if args.timeout > 0:
        def _on_alarm(_sig, _frame):
            raise TimeoutError(f"upload did not finish within {args.timeout} s")
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, args.timeout)

    path = os.path.abspath(args.file)
    size = os.path.getsize(path)
    metadata = {
        "filename": os.path.basename(path),
        "filetype": mimetypes.guess_type(path)[0] or "application/octet-stream",
    }
    metadata.update(extra_meta)

    stage = "creating the upload (POST)"
    try:
        uploader = _new_uploader(args.endpoint, path, args.chunk_size, metadata, args.retries,
                                 args.upload_checksum)
        uploader.set_url(uploader.create_url())
        uploader.offset = 0
        url = uploader.url

        stage = "uploading chunks (PATCH)"
        chunks = 0
        resumed_from = None
        interrupted_at = None
        while uploader.offset < size:
            if args.interrupt_after_chunks is not None and interrupted_at is None \
                    and chunks == args.interrupt_after_chunks:
                # Simulate a killed client: forget everything but the upload URL.
                interrupted_at = uploader.offset
                del uploader
                stage = "resuming (HEAD for the offset)"
                uploader = _new_uploader(args.endpoint, path, args.chunk_size, metadata,
                                         args.retries, args.upload_checksum, url=url)
                resumed_from = uploader.offset
                if not 0 <= resumed_from <= size:
                    raise RuntimeError(f"server reported Upload-Offset {resumed_from} for a {size}-byte file")
                stage = "uploading chunks after resume (PATCH)"
                continue
            before = uploader.offset
            uploader.upload_chunk()
            chunks += 1
            if uploader.offset <= before:
                raise RuntimeError(f"PATCH at offset {before} did not advance Upload-Offset "
                                   f"(server answered {uploader.offset})")
        if args.interrupt_after_chunks is not None and interrupted_at is None:
            _err(f"note: upload finished after {chunks} chunks, before --interrupt-after-chunks "
                 f"{args.interrupt_after_chunks}: no interruption")

        stage = "final HEAD"
        resp = requests.head(url, headers={"Tus-Resumable": "1.0.0"}, timeout=30)
        if resp.status_code >= 300:
            raise RuntimeError(f"final HEAD {url} -> {resp.status_code} {resp.text!r}")
        final_offset = resp.headers.get("Upload-Offset")
        if final_offset is None or int(final_offset) != size:
            raise RuntimeError(f"final HEAD {url}: Upload-Offset {final_offset!r}, expected {size}")
        out = {
            "url": url,
            "handle": resp.headers.get("Cin-Handle"),
            "filelink": resp.headers.get("Cin-Filelink"),
            "resumed_from": resumed_from,
            "interrupted_at": interrupted_at,
            "size": size,
        }
    except TusCommunicationError as e:  # TusUploadFailed is a subclass
        _err(f"tuspy_upload: failed while {stage}: {e!r}")
        if getattr(e, "status_code", None) is not None:
            _err(f"  HTTP status: {e.status_code}")
        if getattr(e, "response_content", None):
            _err(f"  response body: {e.response_content!r}")
        return 1
    except Exception as e:  # noqa: BLE001
        _err(f"tuspy_upload: failed while {stage}: {e!r}")
        traceback.print_exc(file=sys.stderr)
        return 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)

    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
