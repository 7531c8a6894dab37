"""CPU seconds per 10,000 signatures: our SigV4 against botocore's S3SigV4Auth.

usage: python bench/signer_time.py

BotocoreSigV4 is the candidate of issue 24 (SigV4's interface, botocore's signer; it
takes the time from botocore, so `now` is gone). First both sign 2,000 random
requests at random times and must give the same Authorization, X-Amz-Date,
X-Amz-Content-SHA256, Host and session token; then each signs 10,000 PUTs of 4 KiB,
as W1 sends them, five times (medians; time.process_time).
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import botocore.auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from s3common import SigV4


class BotocoreSigV4:
    def __init__(self, region: str, service: str):
        self.region, self.service = region, service

    def sign(self, credentials, method, host, path, headers, payload, query=""):
        # http: S3SigV4Auth signs the payload's SHA-256 whatever the real scheme.
        url = f"http://{host}{path}" + (f"?{query}" if query else "")
        request = AWSRequest(method, url, {**headers, "Host": host}, payload)
        botocore.auth.S3SigV4Auth(credentials, self.service, self.region).add_auth(
            request
        )
        return {name.lower(): value for name, value in request.headers.items()}


def check_same(count: int = 2000) -> None:
    rng = random.Random(7)
    clock = botocore.auth.get_current_datetime
    for i in range(count):
        now = datetime(2026, 1, 1) + timedelta(seconds=rng.randrange(10**8))
        botocore.auth.get_current_datetime = lambda now=now: now
        credentials = Credentials(f"AKID{i}", f"se/cret{i}", rng.choice([None, "t"]))
        key = "".join(rng.choice("aZ09 -_.~/+%#?&=üé日") for _ in range(20))
        host = rng.choice(["127.0.0.1:5000", "[::1]:9000", "b.s3.amazonaws.com"])
        method = rng.choice(["GET", "PUT"])
        args = (
            credentials, method, host, "/b/" + quote(key, safe="/~"),
            {"Content-Type": "text/plain;  x ", "x-amz-meta-mtime": str(rng.random())},
            rng.randbytes(rng.randrange(5000)) if method == "PUT" else b"",
        )  # fmt: skip
        query = rng.choice(["", "versionId=" + quote(key, safe="-_.~")])
        ours = SigV4("eu-west-1", "s3").sign(*args, now.timetuple(), query)
        theirs = BotocoreSigV4("eu-west-1", "s3").sign(*args, query)
        # Values of `headers` differ only in whitespace: ours sends them trimmed.
        for name in ("authorization", "x-amz-date", "x-amz-content-sha256", "host"):
            assert ours[name] == theirs[name], (ours, theirs)
        assert ours.get("x-amz-security-token") == theirs.get("x-amz-security-token")
    botocore.auth.get_current_datetime = clock
    print(f"{count} random requests: the same signatures")


def seconds(sign) -> float:
    started = time.process_time()
    for i in range(10_000):
        sign(f"/bucket/backup/d{i % 100:02}/f{i:06}.bin")
    return time.process_time() - started


def main() -> None:
    check_same()
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    headers = {
        "Content-Type": "application/octet-stream",
        "x-amz-meta-mtime": "1700000000.000000000",
        "x-amz-meta-mode": "100644",
        "x-amz-sdk-checksum-algorithm": "CRC32",
        "x-amz-checksum-crc32": "NhCmhg==",
    }
    body, host = bytes(4096), "127.0.0.1:5000"
    ours, theirs = SigV4("us-east-1", "s3"), BotocoreSigV4("us-east-1", "s3")
    runs: dict[str, list[float]] = {"SigV4 (ours)": [], "S3SigV4Auth": []}
    for _ in range(5):
        runs["SigV4 (ours)"].append(
            seconds(
                lambda path: ours.sign(
                    credentials, "PUT", host, path, headers, body, time.gmtime()
                )
            )
        )
        runs["S3SigV4Auth"].append(
            seconds(
                lambda path: theirs.sign(credentials, "PUT", host, path, headers, body)
            )
        )
    for name, values in runs.items():
        print(
            f"{name}: {statistics.median(values):.3f} s per 10,000 "
            f"({', '.join(f'{v:.3f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
