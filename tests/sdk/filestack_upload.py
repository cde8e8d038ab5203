#!/usr/bin/env python3
"""Upload one file to a CIN edge POP with the OFFICIAL Filestack Python SDK.

Approach: URL rewriting, not TLS.  filestack-python 4.0.0 hard-codes
`https://upload.filestackapi.com/multipart/start` (the `CFG.MULTIPART_START_URL`
property in filestack/__init__.py) and then calls
`https://{location_url}/multipart/{upload,commit,complete}` with the
`location_url` our server returns ("127.0.0.1:PORT").  We therefore
  1. replace the class attribute `type(filestack.config).MULTIPART_START_URL`
     with `<POP>/multipart/start` (and `CDN_URL` with `<POP>`, so that
     `Filelink.url` names the POP: building it sends nothing), and
  2. wrap `requests.adapters.HTTPAdapter.send`, which every request of the SDK
     goes through (module-level `requests.post/put/get` via
     `filestack.utils.RequestsWrapper`, the part/chunk PUTs to the signed URL,
     and the `requests.Session().post` of the intelligent-mode
     `/multipart/complete`), to rewrite `https://<loopback>...` to `http://`.
     The rewrite happens AFTER requests has picked the adapter for the
     original https:// URL, so the SDK behaves exactly as it would over TLS
     (in particular the Retry-on-202 adapter it mounts for `http://` only is
     NOT used, just like in production).  Any request whose host is not
     loopback is refused before it leaves the process, and environment
     proxies are ignored.
The output is built from the Filelink object and its `upload_response` (the
JSON of `/multipart/complete`); no other Filestack API is called.

Usage:
  python filestack_upload.py --pop http://127.0.0.1:PORT --file PATH
      [--intelligent] [--apikey KEY]
      [--container B --location s3 --path P] [--region R] [--access A]
      [--filename NAME] [--mimetype TYPE] [--timeout SECONDS] [--verbose]

Prints one line of JSON on stdout:
  {"handle": ..., "url": ..., "size": ..., "filename": ..., "mimetype": ...}
(values as returned by /multipart/complete; null when absent).  On failure it
prints the error on stderr and exits 1 (2 for bad arguments).
"""

import argparse
import json
import logging
import os
import sys
import traceback
from urllib.parse import urlsplit, urlunsplit

import requests
import requests.adapters

import filestack
import filestack.uploads.intelligent_ingestion as _fii

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

_verbose = False


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _is_loopback(host):
    return host is not None and (host.lower() in LOOPBACK_HOSTS or host.startswith("127."))


def _install_rewrite(default_timeout):
    original_send = requests.adapters.HTTPAdapter.send

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        parts = urlsplit(request.url)
        if not _is_loopback(parts.hostname):
            raise RuntimeError(
                "refusing non-loopback request: %s %s" % (request.method, request.url)
            )
        if parts.scheme == "https":
            request.url = urlunsplit(("http",) + tuple(parts[1:]))
        if timeout is None:
            timeout = default_timeout
        # Never go through an environment proxy: everything stays on 127.0.0.1.
        resp = original_send(self, request, stream=stream, timeout=timeout, verify=verify,
                             cert=cert, proxies={})
        if _verbose:
            _log("sdk-driver: %s %s -> %s" % (request.method, request.url, resp.status_code))
        if resp.status_code >= 300 and not stream:
            _log("sdk-driver: %s %s -> HTTP %s: %s"
                 % (request.method, request.url, resp.status_code, resp.text[:2000]))
        return resp

    requests.adapters.HTTPAdapter.send = send


def _configure_sdk(pop):
    pop = pop.rstrip("/")
    cfg_class = type(filestack.config)
    # In 4.0.0 these are @property on CFG; a plain class attribute replaces them.
    cfg_class.MULTIPART_START_URL = pop + "/multipart/start"
    cfg_class.CDN_URL = pop
    cfg_class.API_URL = pop + "/api"
    # The intelligent-ingestion module logs to a StreamHandler on *stdout*;
    # keep stdout for our single JSON line.
    for h in _fii.log.handlers:
        if isinstance(h, logging.StreamHandler):
            h.setStream(sys.stderr)


def main(argv=None):
    global _verbose
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pop", required=True, help="e.g. http://127.0.0.1:8080")
    ap.add_argument("--file", required=True)
    ap.add_argument("--intelligent", action="store_true")
    ap.add_argument("--apikey", default="testkey")
    ap.add_argument("--container")
    ap.add_argument("--location")
    ap.add_argument("--path")
    ap.add_argument("--region")
    ap.add_argument("--access")
    ap.add_argument("--filename")
    ap.add_argument("--mimetype")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="per-request timeout in seconds (the SDK sets none)")
    ap.add_argument("--verbose", action="store_true", help="log every request on stderr")
    args = ap.parse_args(argv)
    _verbose = args.verbose

    pop = urlsplit(args.pop)
    if pop.scheme not in ("http", "https") or not _is_loopback(pop.hostname):
        ap.error("--pop must be an http(s) URL on a loopback address, got %r" % args.pop)
    if not os.path.isfile(args.file):
        ap.error("--file %r is not a file" % args.file)

    store_params = {
        k: v
        for k, v in (
            ("container", args.container),
            ("location", args.location),
            ("path", args.path),
            ("region", args.region),
            ("access", args.access),
            ("filename", args.filename),
            ("mimetype", args.mimetype),
        )
        if v is not None
    }

    _configure_sdk(args.pop)
    _install_rewrite(args.timeout)

    try:
        client = filestack.Client(args.apikey)
        flink = client.upload(
            filepath=args.file,
            store_params=store_params or None,
            intelligent=args.intelligent,
        )
        resp = flink.upload_response or {}
        out = {
            "handle": flink.handle,
            "url": resp.get("url"),
            "size": resp.get("size"),
            "filename": resp.get("filename"),
            "mimetype": resp.get("mimetype"),
        }
    except Exception as e:  # noqa: BLE001 - report anything the SDK raises
        traceback.print_exc(file=sys.stderr)
        _log("sdk-driver: upload failed: %s: %s" % (type(e).__name__, e))
        return 1

    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
