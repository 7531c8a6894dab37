"""Peak RSS of `restore.py --history` over a prefix of N versions, by hand:

    python3 bench/history_memory.py . 200000

A tiny local server on 127.0.0.1 answers ListObjectVersions (the only request
--history makes) with N/4 keys of 4 entries each (every 10th key's newest a delete
marker), in four moments two hours apart, paged as S3 pages them (KeyMarker,
VersionIdMarker, MaxKeys); everything else is 404. Peak RSS as bench/run.py
measures it (ru_maxrss of the child).
"""

import http.server
import importlib.util
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

repo, total = Path(sys.argv[1]), int(sys.argv[2])
KEYS, PER_KEY, BASE = total // 4, 4, 1_780_000_000


def entry(n):
    key, rank = divmod(n, PER_KEY)
    seconds = BASE + (PER_KEY - 1 - rank) * 7200 + key * 0.02
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    stamp += f".{int(seconds * 1000) % 1000:03d}Z"
    name = f"mem/d{key % 100:02d}/f{key:07d}.bin"
    common = (
        f"<Key>{name}</Key><VersionId>v{n}</VersionId>"
        f"<IsLatest>{'true' if rank == 0 else 'false'}</IsLatest>"
        f"<LastModified>{stamp}</LastModified>"
    )
    if rank == 0 and key % 10 == 0:
        return name, f"<DeleteMarker>{common}</DeleteMarker>"
    size = 4096 + rank
    return name, (
        f'<Version>{common}<ETag>"{n:032x}"</ETag><Size>{size}</Size>'
        "<StorageClass>STANDARD</StorageClass></Version>"
    )


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
        if "versions" not in query:
            self.send_error(404)
            return
        start = 0
        if query.get("version-id-marker"):
            start = int(query["version-id-marker"][0][1:]) + 1
        end = min(start + int(query.get("max-keys", ["1000"])[0]), KEYS * PER_KEY)
        parts = [entry(n) for n in range(start, end)]
        truncated = end < KEYS * PER_KEY
        more = (
            f"<NextKeyMarker>{parts[-1][0]}</NextKeyMarker>"
            f"<NextVersionIdMarker>v{end - 1}</NextVersionIdMarker>"
            if truncated
            else ""
        )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?><ListVersionsResult '
            'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>mem</Name>'
            f"<Prefix>mem/</Prefix><MaxKeys>1000</MaxKeys>"
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{more}"
            + "".join(xml for _, xml in parts)
            + "</ListVersionsResult>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{server.server_address[1]}"
spec = importlib.util.spec_from_file_location("bench_run", repo / "bench" / "run.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_run"] = bench
spec.loader.exec_module(bench)
with tempfile.TemporaryDirectory() as home:
    env = bench.base_env(Path(home))
    argv = [sys.executable, str(repo / "restore.py"), "mem::mem", "--history"]
    if "--show" in sys.argv:  # the lines it prints, to check them
        import subprocess

        subprocess.run([*argv, "--endpoint-url", url], env=env, check=True)
    result = bench.measure([*argv, "--endpoint-url", url], env)
    print(
        f"{total} versions: {result.seconds:.1f} s, peak RSS {result.peak_rss_mib:.1f} MiB"
    )
