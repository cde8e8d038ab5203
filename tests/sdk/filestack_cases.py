#!/usr/bin/env python3
"""Upload files to a CIN edge POP over HTTPS with the official Filestack Python
SDK, unpatched, and read them back with its filelink helpers.

Nothing in the SDK is replaced. It is pointed at the POP the way a customer
with their own domain does it: `filestack.config.CNAME` makes it call
`https://upload.{CNAME}` and `https://cdn.{CNAME}`; the metadata helper calls
`https://www.filestackapi.com/api`, which the caller's hosts file maps to the
POP too. The POP's certificate is trusted through `REQUESTS_CA_BUNDLE`.

Usage:
  python filestack_cases.py --cname cin.test --cases CASES.json [--apikey KEY]

CASES.json is a list of {"name", "path", "intelligent", "tags"?}; on stdout one
JSON list, per case: {"name", "handle", "url", "upload_tags", "content_sha256",
"metadata"}. Any
failure ends the run with its error on stderr and exit status 1.
"""

import argparse
import hashlib
import json
import logging
import sys

import filestack
import filestack.uploads.intelligent_ingestion as _fii


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cname", required=True, help="the POP's domain, e.g. cin.test")
    ap.add_argument("--cases", required=True, help="JSON list of cases")
    ap.add_argument("--apikey", default="testkey")
    args = ap.parse_args(argv)

    # The intelligent-ingestion module logs to stdout; keep stdout for the JSON.
    for handler in _fii.log.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)

    filestack.config.CNAME = args.cname
    client = filestack.Client(args.apikey)
    with open(args.cases) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        store_params = {"upload_tags": case["tags"]} if case.get("tags") else None
        filelink = client.upload(
            filepath=case["path"], intelligent=case["intelligent"], store_params=store_params
        )
        content = filelink.get_content()
        results.append({
            "name": case["name"],
            "handle": filelink.handle,
            "url": filelink.url,
            "upload_tags": (filelink.upload_response or {}).get("upload_tags"),
            "content_sha256": hashlib.sha256(content).hexdigest(),
            "metadata": filelink.metadata(),
        })
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
