"""A local S3 endpoint for tests: moto's S3 server in a thread of the test process.

lmtune talks to it through pyarrow's S3 filesystem exactly as to AWS (``s3://bucket/path?endpoint_override=
127.0.0.1:PORT&scheme=http``). One deviation of moto from S3 is corrected on the wire: it answers
CompleteMultipartUpload with a ``CompleteMultipartUploadResponse`` element where S3 sends
``CompleteMultipartUploadResult``, and the AWS C++ SDK inside pyarrow rejects the former as an error
embedded in a 200 response. And the SDK streams uploads with ``Transfer-Encoding: chunked``, whose body
moto (behind werkzeug's server) reads as empty; it is handed over whole, with a Content-Length, and
with the SDK's ``aws-chunked`` framing (checksum trailer) removed.
"""

from __future__ import annotations

import contextlib
import io
import threading
from typing import Iterator

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _like_s3(app):
    def wrapped(environ, start_response):
        if environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
            # werkzeug's server de-chunks the body but moto reads CONTENT_LENGTH bytes of it (none).
            body = environ["wsgi.input"].read()
            if "aws-chunked" in environ.get("HTTP_CONTENT_ENCODING", ""):
                body = _aws_unchunk(body)
                for key in ("HTTP_CONTENT_ENCODING", "HTTP_X_AMZ_TRAILER", "HTTP_X_AMZ_DECODED_CONTENT_LENGTH"):
                    environ.pop(key, None)
                environ["HTTP_X_AMZ_CONTENT_SHA256"] = "UNSIGNED-PAYLOAD"
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            del environ["HTTP_TRANSFER_ENCODING"]
        captured: dict = {}

        def capture(status, headers, exc_info=None):
            captured.update(status=status, headers=headers, exc_info=exc_info)

        body = b"".join(app(environ, capture))
        headers = captured["headers"]
        if b"<CompleteMultipartUploadResponse" in body:
            body = body.replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        start_response(captured["status"], headers, captured["exc_info"])
        return [body]

    return wrapped


def _aws_unchunk(body: bytes) -> bytes:
    """The payload of an ``aws-chunked`` body: ``<hex size>[;chunk-signature=…]\\r\\n<data>\\r\\n`` … ``0``, trailers."""
    out, pos = bytearray(), 0
    while True:
        eol = body.index(b"\r\n", pos)
        size = int(body[pos:eol].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += body[eol + 2: eol + 2 + size]
        pos = eol + 2 + size + 2


@contextlib.contextmanager
def local_s3(bucket: str) -> Iterator[str]:
    """Serve S3 on a free local port with ``bucket`` created; yields ``host:port``."""
    import boto3
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_request(self, *args, **kwargs) -> None:
            pass

    server = make_server("127.0.0.1", 0, _like_s3(DomainDispatcherApplication(create_backend_app)),
                         threaded=True, request_handler=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"127.0.0.1:{server.server_port}"
    try:
        boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                     aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.shutdown()
        thread.join()
