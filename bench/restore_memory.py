"""Peak RSS and time of restore.py over a prefix of N small objects, by hand:

    python3 bench/restore_memory.py . 200000             # --dry-run: list and plan
    python3 bench/restore_memory.py . 200000 --restore   # every object written
    python3 bench/restore_memory.py . 200000 --at        # --at a day later, --dry-run

A tiny local server on 127.0.0.1 stands in for S3: it answers ListObjectsV2 with N
keys in 1,000-key folders (`mem/d0001/f0001000.bin`), paged as S3 pages them
(max-keys, continuation-token), ListObjectVersions with one version of each
(key-marker, version-id-marker), and GetObject of any of them with 16 bytes;
everything else is 404. Objects made by a formula, not put: a million cost
nothing to make. With --restore the files land in a temporary folder in
/dev/shm, removed after. Peak RSS, wall and CPU time as bench/run.py measures
them (ru_maxrss and rusage of the child).
"""

import http.server
import importlib.util
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

repo, total = Path(sys.argv[1]), int(sys.argv[2])
restoring, at = "--restore" in sys.argv, "--at" in sys.argv
BODY = b"0123456789abcdef"
STAMP = "2026-12-07T10:00:00.000Z"
ETAG = '"4032af8d61035123906e58e067140cc5"'  # BODY's MD5


def key(n: int) -> str:
    return f"mem/d{n // 1000:04d}/f{n:07d}.bin"


def listing(query: dict) -> bytes:
    start = int(query.get("continuation-token", ["0"])[0])
    end = min(start + int(query.get("max-keys", ["1000"])[0]), total)
    more = end < total
    contents = "".join(
        f"<Contents><Key>{key(n)}</Key><LastModified>{STAMP}</LastModified>"
        f"<ETag>{ETAG}</ETag><Size>{len(BODY)}</Size>"
        "<StorageClass>STANDARD</StorageClass></Contents>"
        for n in range(start, end)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
        'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>mem</Name>'
        f"<Prefix>mem/</Prefix><KeyCount>{end - start}</KeyCount><MaxKeys>1000</MaxKeys>"
        f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>"
        + (f"<NextContinuationToken>{end}</NextContinuationToken>" if more else "")
        + contents
        + "</ListBucketResult>"
    ).encode()


def versions(query: dict) -> bytes:
    marker = query.get("version-id-marker", [""])[0]
    start = int(marker[1:]) + 1 if marker else 0
    end = min(start + int(query.get("max-keys", ["1000"])[0]), total)
    more = end < total
    entries = "".join(
        f"<Version><Key>{key(n)}</Key><VersionId>v{n}</VersionId><IsLatest>true</IsLatest>"
        f"<LastModified>{STAMP}</LastModified><ETag>{ETAG}</ETag><Size>{len(BODY)}</Size>"
        "<StorageClass>STANDARD</StorageClass></Version>"
        for n in range(start, end)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><ListVersionsResult '
        'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>mem</Name>'
        f"<Prefix>mem/</Prefix><MaxKeys>1000</MaxKeys>"
        f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>"
        + (
            f"<NextKeyMarker>{key(end - 1)}</NextKeyMarker>"
            f"<NextVersionIdMarker>v{end - 1}</NextVersionIdMarker>"
            if more
            else ""
        )
        + entries
        + "</ListVersionsResult>"
    ).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 does

    def log_message(self, *args):
        pass

    def answer(self, body: bytes, content_type: str, **headers) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        name = unquote(parts.path).removeprefix("/mem/")
        if query.get("list-type") == ["2"] and parts.path.rstrip("/") == "/mem":
            self.answer(listing(query), "application/xml")
        elif "versions" in query and parts.path.rstrip("/") == "/mem":
            self.answer(versions(query), "application/xml")
        elif name.startswith("mem/d") and name.endswith(".bin"):
            modified = "Mon, 07 Dec 2026 10:00:00 GMT"
            self.answer(BODY, "binary/octet-stream", ETag=ETAG, Last_Modified=modified)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def do_HEAD(self):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{server.server_address[1]}"
# bench/run.py beside this script: REPO may be an older tree's scripts.
spec = importlib.util.spec_from_file_location(
    "bench_run", Path(__file__).with_name("run.py")
)
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_run"] = bench
spec.loader.exec_module(bench)
with (
    tempfile.TemporaryDirectory() as home,
    tempfile.TemporaryDirectory(dir="/dev/shm") as into,
):
    env = bench.base_env(Path(home))
    argv = [sys.executable, str(repo / "restore.py"), "mem::mem", into + "/out", "-q"]
    argv += ["--endpoint-url", url] + ([] if restoring else ["--dry-run"])
    argv += ["--at", "2026-12-08T00:00:00Z"] if at else []
    result = bench.measure(argv, env)
    if restoring:
        restored = sum(1 for path in Path(into, "out").rglob("*.bin"))
        assert restored == total, f"{restored} files restored of {total}"
        shutil.rmtree(Path(into, "out"))
    what = ("restore" if restoring else "--dry-run") + (" --at" if at else "")
    print(
        f"{total} objects, {what}: {result.seconds:.1f} s, CPU {result.cpu_seconds:.1f} s, "
        f"peak RSS {result.peak_rss_mib:.1f} MiB"
    )
