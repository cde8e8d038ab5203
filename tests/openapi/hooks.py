"""How schemathesis sends the bodies of tus PATCH and creation-with-upload requests."""

import schemathesis
from schemathesis.transport.serialization import serialize_binary


@schemathesis.serializer("application/offset+octet-stream")
def tus_body(ctx, value):
    return {"data": serialize_binary(value)}
