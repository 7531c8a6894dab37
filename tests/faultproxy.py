"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 server, for the reliability tests.

    proxy = FaultProxy("http://127.0.0.1:5000", slowdown_rate=0.1, reset_rate=0.1)
    proxy.start()
    run_script("backup.py", ..., "--endpoint-url", proxy.url)
    assert proxy.faults["SlowDown"] > 0
    proxy.close()

With `errors`, every request of an S3 operation gets one error, as S3 answers it:
FaultProxy(upstream, errors={"ListObjectsV2": ("AccessDenied", 403)}).

It reads each request whole (HTTP/1.1 keep-alive, Content-Length or chunked
bodies, `Expect: 100-continue`), then either answers it with a fault, without
forwarding it, or forwards it to the server and relays the answer.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import random
import re
import socket
import socketserver
import ssl
import struct
import threading
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

# Headers that describe one connection, not the message: never relayed as they are.
HOP_BY_HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
}
MAX_LINE = 65536
LAST_MODIFIED = re.compile(rb"<LastModified>([^<]+)</LastModified>")

ERROR_MESSAGES = {
    "AccessDenied": (403, "Forbidden", "Access Denied"),
    "SlowDown": (503, "Slow Down", "Please reduce your request rate."),
    "InternalError": (
        500,
        "Internal Server Error",
        "We encountered an internal error. Please try again.",
    ),
}


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def path(self) -> str:
        return unquote(urlsplit(self.target).path)

    @property
    def is_direct(self) -> bool:
        """Sent by the scripts' direct path for small objects, not through botocore."""
        return (self.header("user-agent") or "").startswith("s3backup-direct")

    @property
    def is_upload_part(self) -> bool:
        return "partNumber=" in urlsplit(self.target).query

    @property
    def operation(self) -> str:
        """The S3 operation of a path-style request (those the tests fail on purpose,
        and the rest by method and level)."""
        parts = urlsplit(self.target)
        query = parse_qs(parts.query, keep_blank_values=True)
        level = "Bucket" if "/" not in parts.path.strip("/") else "Object"
        subresources = {
            ("GET", "Bucket"): [
                ("versions", "ListObjectVersions"),
                ("list-type", "ListObjectsV2"),
                ("versioning", "GetBucketVersioning"),
                ("lifecycle", "GetBucketLifecycleConfiguration"),
                ("object-lock", "GetObjectLockConfiguration"),
            ],
            ("PUT", "Bucket"): [
                ("versioning", "PutBucketVersioning"),
                ("lifecycle", "PutBucketLifecycleConfiguration"),
                ("object-lock", "PutObjectLockConfiguration"),
                ("", "CreateBucket"),
            ],
            ("PUT", "Object"): [
                ("partNumber", "UploadPart"),
                ("retention", "PutObjectRetention"),
                ("", "PutObject"),
            ],
            ("GET", "Object"): [("retention", "GetObjectRetention"), ("", "GetObject")],
            ("POST", "Object"): [("uploads", "CreateMultipartUpload")],
        }
        for name, operation in subresources.get((self.method, level), []):
            if not name or name in query:
                return operation
        return f"{self.method.capitalize()}{level}"  # HeadBucket, HeadObject, ...

    @property
    def keep_alive(self) -> bool:
        connection = (self.header("connection") or "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"


def is_lock_header(name: str) -> bool:
    return name.lower().startswith("x-amz-object-lock-")


class ClientGone(Exception):
    """The client closed the connection, or sent something that is not HTTP."""


def read_line(reader: BinaryIO) -> bytes:
    line = reader.readline(MAX_LINE + 1)
    if not line or len(line) > MAX_LINE:
        raise ClientGone()
    return line


def read_exactly(reader: BinaryIO, size: int) -> bytes:
    data = reader.read(size)
    if len(data) != size:
        raise ClientGone()
    return data


def read_chunked_body(reader: BinaryIO) -> bytes:
    """A Transfer-Encoding: chunked body, decoded; trailers are dropped."""
    chunks = []
    while True:
        size = int(read_line(reader).split(b";")[0].strip(), 16)
        if size == 0:
            break
        chunks.append(read_exactly(reader, size))
        read_line(reader)  # the CRLF after the chunk
    while read_line(reader) not in (b"\r\n", b"\n"):
        pass
    return b"".join(chunks)


class BodyCut(Exception):
    """A request whose body the proxy stopped reading halfway, to cut it off."""


def read_request(
    reader: BinaryIO,
    writer: socket.socket,
    cuts: Callable[[Request], bool] = lambda request: False,
) -> Request | None:
    """The next request on the connection, body included; None once the client
    hangs up. BodyCut, half its body read, for a request that cuts(request)."""
    try:
        line = reader.readline(MAX_LINE + 1)
        while line in (b"\r\n", b"\n"):
            line = reader.readline(MAX_LINE + 1)
        if not line:
            return None
        method, target, version = line.decode("latin-1").split()
        headers = []
        while (line := read_line(reader)) not in (b"\r\n", b"\n"):
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        request = Request(method, target, version, headers, b"")
        # botocore waits (up to a second) for this before it sends a large body.
        if (request.header("expect") or "").lower() == "100-continue":
            writer.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        length = int(request.header("content-length") or 0)
        if cuts(request):
            read_exactly(reader, length // 2)
            raise BodyCut()
        if "chunked" in (request.header("transfer-encoding") or "").lower():
            body = read_chunked_body(reader)
        else:
            body = read_exactly(reader, length)
    except (ValueError, OSError):
        raise ClientGone() from None
    return Request(method, target, version, headers, body)


def response_bytes(
    status: int, reason: str, headers: list[tuple[str, str]], body: bytes
) -> bytes:
    head = [f"HTTP/1.1 {status} {reason}"]
    head += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def s3_error_response(
    code: str, request: Request, request_id: str, status: int | None = None
) -> bytes:
    """A response as S3 writes it for an error: XML body, except for HEAD.

    `status` for a code that ERROR_MESSAGES does not hold."""
    if status is None:
        status, reason, message = ERROR_MESSAGES[code]
    else:
        reason = message = HTTPStatus(status).phrase
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{request_id}</RequestId><HostId>faultproxy</HostId></Error>"
    ).encode()
    if request.method == "HEAD":
        body = b""
    headers = [
        ("x-amz-request-id", request_id),
        ("Content-Type", "application/xml"),
        ("Content-Length", str(len(body))),
    ]
    return response_bytes(status, reason, headers, body)


class FaultProxy:
    """Forwards HTTP requests to `upstream`, failing a seeded-random fraction of them.

    slowdown_rate, internal_error_rate and reset_rate are the fractions of
    requests answered 503 SlowDown, answered 500 InternalError, and cut off
    (connection reset, no answer). Requests for `throttled_keys` (paths that
    end in "/<key>"), and the UploadPart requests for `throttled_part_keys`,
    are answered 503 SlowDown every time. `errors` maps an S3 operation
    (Request.operation) to the (code, HTTP status) every request of it is answered
    with; it may change while the proxy runs. With refuse_direct, requests sent by the
    scripts' direct path are answered 403 AccessDenied; with corrupt_direct, one
    byte of the body of their successful GETs is changed; the requests of the
    operations in `hold` wait unanswered (`holding` is set) until release(); with
    ignore_if_match, the If-Match header is not passed on, as by a server that ignores it (on a server
    that checks signatures, that breaks them); with strip_lock, neither the
    Object Lock headers of PutObject and CreateMultipartUpload nor those of HEAD
    answers, as by a server that ignores Object Lock (moto only: it checks no
    signatures). The answers to the first `cut_ranges`
    GETs of a range (direct or not) break off before the end of their body; the
    bodies of the first `cut_puts` PutObject requests of more than 64 KiB (direct
    or not) are cut off halfway, the connection reset there ("cut put"). With
    `version_times`, each <LastModified> of a ListObjectVersions answer becomes
    version_times(that time) (aware UTC datetimes), written to the millisecond: a
    backup's history as if it had been written then. `faults`
    counts what was injected, `throttled_attempts` the requests refused per throttled
    key, `requests` lists (method, path, direct?) of every request, in order,
    `operations` their S3 operations, and `header_names` the (lower-case) names
    of their headers.
    """

    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        slowdown_rate: float = 0.0,
        internal_error_rate: float = 0.0,
        reset_rate: float = 0.0,
        throttled_keys: Collection[str] = (),
        throttled_part_keys: Collection[str] = (),
        refuse_direct: bool = False,
        corrupt_direct: bool = False,
        ignore_if_match: bool = False,
        strip_lock: bool = False,
        cut_ranges: int = 0,
        cut_puts: int = 0,
        errors: Mapping[str, tuple[str, int]] | None = None,
        hold: Collection[str] = (),
        version_times: Callable[[datetime.datetime], datetime.datetime] | None = None,
    ):
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.slowdown_rate = slowdown_rate
        self.internal_error_rate = internal_error_rate
        self.reset_rate = reset_rate
        self.throttled_keys = set(throttled_keys)
        self.throttled_part_keys = set(throttled_part_keys)
        self.refuse_direct = refuse_direct
        self.corrupt_direct = corrupt_direct
        self.ignore_if_match = ignore_if_match
        self.strip_lock = strip_lock
        self.cut_ranges = cut_ranges
        self.cut_puts = cut_puts
        self.errors = dict(errors or {})
        self.version_times = version_times
        self.hold = set(hold)
        self.holding = threading.Event()
        self._released = threading.Event()
        self._drop_held = False
        self.faults: Counter[str] = Counter()
        self.requests: list[tuple[str, str, bool]] = []
        self.operations: list[str] = []
        self.header_names: list[frozenset[str]] = []
        self.throttled_attempts: Counter[str] = Counter()
        self.forwarded = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def release(self, forward: bool = True) -> None:
        """Forward the held requests (or, as after a kill -9 of their client, drop
        them), and every later one of `hold` at once."""
        self._drop_held = not forward
        self._released.set()

    def stop_faults(self) -> None:
        """From now on forward every request."""
        with self._lock:
            self.slowdown_rate = self.internal_error_rate = self.reset_rate = 0.0
            self.throttled_keys = set()
            self.throttled_part_keys = set()

    def cuts_body(self, request: Request) -> bool:
        """Whether to cut off this request's body halfway (cut_puts)."""
        large = int(request.header("content-length") or 0) > 64 * 1024
        with self._lock:
            if not (self.cut_puts and request.operation == "PutObject" and large):
                return False
            self.cut_puts -= 1
            self.faults["cut put"] += 1
            self.requests.append((request.method, request.path, request.is_direct))
            return True

    def fault_for(self, request: Request) -> str | None:
        """The fault to inject for this request: "SlowDown", "InternalError",
        "AccessDenied", "reset", "cut", the code of an error of `errors`, or None."""
        with self._lock:
            self.requests.append((request.method, request.path, request.is_direct))
            self.operations.append(request.operation)
            self.header_names.append(frozenset(n.lower() for n, _ in request.headers))
            if request.operation in self.errors:
                code = self.errors[request.operation][0]
                self.faults[code] += 1
                return code
            if self.refuse_direct and request.is_direct:
                self.faults["AccessDenied"] += 1
                return "AccessDenied"
            if self.cut_ranges and request.method == "GET" and request.header("range"):
                self.cut_ranges -= 1
                self.faults["cut"] += 1
                return "cut"
            throttled = set(self.throttled_keys)
            if request.is_upload_part:
                throttled |= self.throttled_part_keys
            for key in throttled:
                if request.path.endswith("/" + key):
                    self.throttled_attempts[key] += 1
                    self.faults["SlowDown"] += 1
                    return "SlowDown"
            draw = self._random.random()
            fault = None
            if draw < self.slowdown_rate:
                fault = "SlowDown"
            elif draw < self.slowdown_rate + self.internal_error_rate:
                fault = "InternalError"
            elif draw < self.slowdown_rate + self.internal_error_rate + self.reset_rate:
                fault = "reset"
            if fault:
                self.faults[fault] += 1
            else:
                self.forwarded += 1
            return fault

    def error_status(self, code: str) -> int | None:
        """The HTTP status of an error of `errors` with this code; None for the others."""
        with self._lock:
            statuses = [
                status for known, status in self.errors.values() if known == code
            ]
        return statuses[0] if statuses else None

    def _rewrite_time(self, match: re.Match) -> bytes:
        text = match[1].decode().replace("Z", "+00:00")
        moment = self.version_times(datetime.datetime.fromisoformat(text))
        utc = moment.astimezone(datetime.timezone.utc)  # noqa: UP017 (3.11+)
        written = utc.strftime("%Y-%m-%dT%H:%M:%S.%f")
        return b"<LastModified>%s</LastModified>" % (written[:-3] + "Z").encode()

    def request_id(self) -> str:
        with self._lock:
            return f"{self._random.getrandbits(64):016X}"

    def forward(self, request: Request) -> bytes:
        """Send the request to the server; its response, ready to relay."""
        connection = http.client.HTTPConnection(
            self.upstream_host, self.upstream_port, timeout=120
        )
        try:
            connection.putrequest(
                request.method,
                request.target,
                skip_host=True,
                skip_accept_encoding=True,
            )
            for name, value in request.headers:
                if name.lower() in HOP_BY_HOP_HEADERS:
                    continue
                if self.ignore_if_match and name.lower() == "if-match":
                    continue
                if (
                    self.strip_lock
                    and is_lock_header(name)
                    and request.operation
                    in (
                        "PutObject",
                        "CreateMultipartUpload",
                    )
                ):
                    continue
                connection.putheader(name, value)
            if request.body or request.method in ("PUT", "POST"):
                connection.putheader("Content-Length", str(len(request.body)))
            connection.endheaders(request.body or None)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        if self.version_times and request.operation == "ListObjectVersions":
            body = LAST_MODIFIED.sub(self._rewrite_time, body)
        corrupt = self.corrupt_direct and request.is_direct and request.method == "GET"
        if corrupt and response.status == 200 and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
            with self._lock:
                self.faults["corrupted"] += 1
        headers = [
            (name, value)
            for name, value in response.getheaders()
            if name.lower() not in HOP_BY_HOP_HEADERS
            and not (
                self.strip_lock and request.method == "HEAD" and is_lock_header(name)
            )
        ]
        no_body = request.method == "HEAD" or response.status in (204, 304)
        if no_body:
            # A HEAD answer's Content-Length is the size of the object, not of this body.
            length = response.getheader("Content-Length")
            if length is not None:
                headers.append(("Content-Length", length))
        else:
            headers.append(("Content-Length", str(len(body))))
        return response_bytes(response.status, response.reason, headers, body)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy


def reset(connection: socket.socket, reader: BinaryIO) -> None:
    """End the connection with a reset (RST), as a crashed server's does."""
    reader.close()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


class _Handler(socketserver.BaseRequestHandler):
    """One client connection: requests one after another (keep-alive) until it ends."""

    def handle(self) -> None:
        proxy: FaultProxy = self.server.proxy
        connection: socket.socket = self.request
        reader = connection.makefile("rb")
        try:
            while True:
                try:
                    request = read_request(reader, connection, proxy.cuts_body)
                except ClientGone:
                    return
                except BodyCut:
                    reset(connection, reader)
                    return
                if request is None:
                    return
                fault = proxy.fault_for(request)
                if fault == "reset":
                    # The request was read but never answered: the client sees a reset.
                    reset(connection, reader)
                    return
                if fault == "cut":
                    # The answer starts, then the connection ends 1,000 bytes short.
                    connection.sendall(proxy.forward(request)[:-1000])
                    return
                if not fault and request.operation in proxy.hold:
                    proxy.holding.set()
                    proxy._released.wait(timeout=120)
                    if proxy._drop_held:
                        return
                if fault:
                    answer = s3_error_response(
                        fault, request, proxy.request_id(), proxy.error_status(fault)
                    )
                else:
                    answer = proxy.forward(request)
                connection.sendall(answer)
                if not request.keep_alive:
                    return
        except (OSError, http.client.HTTPException):
            return
        finally:
            reader.close()


class TlsPassThrough:
    """HTTPS on 127.0.0.1 in front of an HTTP server: it ends TLS and passes the bytes on.

    The certificate is made for 127.0.0.1 and written to `cert_path`, for
    AWS_CA_BUNDLE; `url` is where to send requests.
    """

    def __init__(self, upstream: str, folder: Path):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.cert_path, key_path = folder / "cert.pem", folder / "key.pem"
        write_self_signed_certificate(self.cert_path, key_path)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(self.cert_path, key_path)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            secure = self._context.wrap_socket(client, server_side=True)
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        threading.Thread(target=_pipe, args=(server, secure), daemon=True).start()
        _pipe(secure, server)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def write_self_signed_certificate(cert_path: Path, key_path: Path) -> None:
    """A key and a certificate for 127.0.0.1, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2000, 1, 1))
        .not_valid_after(datetime.datetime(2100, 1, 1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
