"""What backup.py and restore.py share, in the order a reader looks for things:

- settings: sizes, worker counts and retries, each with the reason for its value;
- errors and exit codes: the one place (describe_error) that turns an exception
  into one line and an exit code;
- the command line: the shared options, --exclude/--include filters, RATE, and
  the customer key of --sse-c-key-file;
- locations, keys, bucket names and the metadata format, all pure: BUCKET::PREFIX,
  key to path and back, mtime and mode metadata, the MD5 an ETag or md5chksum states;
- local paths of any length, the MD5s of files (--checksum, --check), and the
  body of a PUT that streams from its file (FileBody);
- worker pools, named by what they do on a failure (and on Ctrl-C):
  map_failing_fast and call_failing_fast for reads, run_collecting_failures for
  transfers, PartWorkers for the parts of large downloads; the --bwlimit token
  bucket;
- console and summary: messages, the progress line, the closing summary, the JSON
  report, and run_cli, where each script's main begins and ends;
- the Store, the one door to S3: every request of both scripts goes through its
  verbs (list, head, get, get_parts, put, upload_file, delete, ...), which decide
  how each is sent: direct signed requests for small objects and the parts of
  large downloads (DirectRequests), botocore for the rest and as their fallback,
  boto3's transfer manager for multipart uploads. connect() builds it.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import email.utils
import errno
import fnmatch
import functools
import gc
import hashlib
import hmac
import http.client
import io
import ipaddress
import itertools
import json
import math
import os
import queue
import re
import signal
import socket
import ssl
import sys
import threading
import time
import traceback
import urllib.request
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from enum import IntEnum
from pathlib import PurePath, PureWindowsPath
from typing import BinaryIO, Generic, NoReturn, TextIO, TypeVar
from urllib.parse import quote, urlsplit

import botocore
import botocore.exceptions
import botocore.httpsession
import botocore.session
import botocore.utils
import urllib3
from botocore.config import Config

T = TypeVar("T")
R = TypeVar("R")

# --- Settings: sizes, worker counts and retries ------------------------------

MiB = 1024 * 1024
UTC = timezone.utc  # datetime.UTC is Python 3.11 and newer  # noqa: UP017
MULTIPART_THRESHOLD = 8 * MiB
# Objects up to this size go up and down as one direct request (DirectRequests).
SMALL_OBJECT = MiB
# 16 MiB parts: fewer requests, faster than 8 MiB (bench/RESULTS.md, measured choices).
MULTIPART_CHUNKSIZE = 16 * MiB
# S3 seen from a laptop is tens of milliseconds away, where requests in flight
# decide the speed; nearby, more threads cost a little client CPU
# (bench/RESULTS.md, measured choices).
DEFAULT_WORKERS = 64
# Threads s3transfer may use for the parts of one large upload: 4 keep W3 under
# 64 MiB for a few percent of its time (bench/RESULTS.md, measured choices).
PART_WORKERS = 4
# Large downloads: parts of DOWNLOAD_PART bytes, fetched by DOWNLOAD_PART_WORKERS
# threads shared by every file of a run, each reading into one buffer of
# DOWNLOAD_BUFFER bytes. 4 threads of 32 MiB parts restore W6 as fast as more
# threads or larger parts; 256 KiB buffers as fast as 1 MiB ones, in less memory
# (bench/RESULTS.md, measured choices).
DOWNLOAD_PART = 32 * MiB
DOWNLOAD_PART_WORKERS = 4
DOWNLOAD_BUFFER = 256 * 1024
# Each worker holds one chunk of the body it streams to disk: 64 workers with 1 MiB
# chunks doubled the peak memory (bench/RESULTS.md, measured choices).
CHUNK = 64 * 1024
ARCHIVE_STORAGE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
# A file seen changing while it is read for its upload is read this many times in all.
READ_ATTEMPTS = 3
DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
CUSTOMER_KEY_BYTES = 32  # SSE-C's AES-256
# botocore retries a GET until its answer starts, not while the body comes:
# a part whose body breaks off is asked for again, as often as s3transfer does.
BODY_ATTEMPTS = 5
# The most keys one ListObjectsV2 page holds, and the size of a listing range.
LIST_PAGE = 1000
# Listing ranges read at once (and held until the plan reaches them), however
# many workers: each holds a page being parsed (some MiB at its peak).
LIST_RANGES_AT_ONCE = 8
# A --bwlimit bucket that has stood idle lets this many seconds' worth of bytes
# through at once; less would lose rate in the gaps between one worker's reads.
BURST_SECONDS = 0.1
# Enough attempts to ride out throttling (503 SlowDown), 500s and dropped
# connections; botocore's standard mode backs off exponentially between them.
RETRY_ATTEMPTS = 10


# --- Errors and exit codes: describe_error, the one place --------------------


class ExitCode(IntEnum):
    """The exit codes of both scripts, as the README's table gives them."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    INTERRUPTED = 130


class CliError(Exception):
    """A failure of the whole run, with the line to show and the exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILURE):
        super().__init__(message)
        self.code = code


class FileChanged(CliError):
    """The file changed while it was read or uploaded."""

    def __init__(self):
        super().__init__(
            f"it changed during the backup, {READ_ATTEMPTS} times in a row: "
            "not backed up as it is now; run again when nothing writes to it"
        )


class CustomerKeyError(CliError):
    """An object encrypted with a customer key (SSE-C) that this run does not have."""


NEEDS_KEY = "encrypted with a customer key (SSE-C): needs --sse-c-key-file"
ANOTHER_KEY = (
    "encrypted with another key than --sse-c-key-file's (SSE-C): give the key "
    "it was backed up with"
)


def http_status(exc: botocore.exceptions.ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def usage_error(message: str) -> CliError:
    """A bad command line or input: exit 2."""
    return CliError(message, ExitCode.USAGE)


def client_error_code(exc: BaseException) -> str:
    """S3's error code of a ClientError (e.g. "NoSuchBucket", "403"); "" for anything else."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


_CHECKSUM_MISMATCH = (
    "the server received bytes that do not match their checksum; a file being "
    "written to while it is read does this: run again once it is left alone"
)
OVERWRITTEN = (
    "the object was overwritten while it was downloaded (its ETag changed): nothing "
    "was written; run again to restore the new version"
)
_CLIENT_ERROR_LINES = {
    "BadDigest": _CHECKSUM_MISMATCH,
    "XAmzContentSHA256Mismatch": _CHECKSUM_MISMATCH,
    "AccessDenied": "access denied: check that these credentials may use the bucket",
    "403": "access denied: the bucket belongs to another account or these credentials may not use it",
    "AllAccessDisabled": "all access to this bucket has been disabled",
    "NoSuchBucket": "the bucket does not exist: check its name (and --endpoint-url)",
    "404": "not found: check the bucket name (and --endpoint-url)",
    "BucketAlreadyExists": "the bucket name is taken by another account: choose another name",
    "InvalidAccessKeyId": "the access key is not known to S3: check your credentials (aws configure)",
    "SignatureDoesNotMatch": "the secret key does not match the access key: check your credentials (aws configure)",
    "ExpiredToken": "the credentials have expired: renew them (e.g. aws sso login) and run again",
    "InvalidToken": "the session token is not valid: renew your credentials and run again",
    "InvalidObjectState": "the object is in an archive storage class (GLACIER or DEEP_ARCHIVE): "
    "restore it from the archive first (aws s3api restore-object), then run again",
    "SlowDown": "the server kept throttling requests (SlowDown) after every retry: run again later",
    "InternalError": "the server kept failing (InternalError) after every retry: run again later",
    "ServiceUnavailable": "the service was unavailable after every retry: run again later",
    "InvalidStorageClass": "the storage class is not supported by this server",
    "KMS.NotFoundException": "the KMS key was not found: check --sse-kms-key-id",
    "InvalidLocationConstraint": "the server does not take this region as a bucket location: "
    "check --region (on Ceph RGW it is the zonegroup's name, e.g. default)",
    "PreconditionFailed": OVERWRITTEN,
}


def describe_error(exc: BaseException) -> tuple[str, ExitCode]:
    """One actionable line and the exit code for an exception."""
    if isinstance(exc, CliError):
        return str(exc), exc.code
    if isinstance(exc, botocore.exceptions.InvalidRegionError):
        return f"{exc}: check --region (e.g. eu-west-1)", ExitCode.USAGE
    return failure_reason(exc), ExitCode.FAILURE


def failure_reason(exc: BaseException) -> str:
    """The line of describe_error for a failure at run time (exit 1)."""
    errors = botocore.exceptions
    if isinstance(exc, (errors.NoCredentialsError, errors.PartialCredentialsError)):
        return (
            "no AWS credentials found: run 'aws configure', set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or pick a profile with --profile"
        )
    if isinstance(exc, errors.ProfileNotFound):
        return (
            f"profile {exc.kwargs.get('profile')!r} is not in ~/.aws/config or "
            "~/.aws/credentials: check --profile or AWS_PROFILE"
        )
    if isinstance(exc, errors.ClientError):
        code = client_error_code(exc)
        if code in _CLIENT_ERROR_LINES:
            return _CLIENT_ERROR_LINES[code]
        message = exc.response.get("Error", {}).get("Message")
        if not message:  # Ceph RGW leaves out most messages
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = f"the server answered HTTP {status} and gave no reason"
        return f"{code}: {message}"
    if isinstance(exc, errors.EndpointConnectionError):
        url = exc.kwargs.get("endpoint_url")
        return f"could not connect to {url}: check the network or --endpoint-url"
    if isinstance(exc, (errors.ConnectionError, errors.HTTPClientError)):
        return f"the connection kept failing after every retry ({exc}): run again later"
    if isinstance(exc, errors.BotoCoreError):
        return str(exc)
    if isinstance(exc, UnicodeError):
        return "the name is not valid UTF-8, so it cannot be an S3 key: rename it"
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return reason + (f": {printable(exc.filename)}" if exc.filename else "")
    return f"unexpected {type(exc).__name__}: {exc} (run with --debug for details)"


def runtime_error(context: str, error: BaseException) -> CliError:
    """A failure of the whole run: what was being done, then why."""
    message, code = describe_error(error)
    return CliError(f"{context}: {message}", code)


def key_error(error: BaseException, key: str, otherwise: str) -> BaseException:
    """The error of a request about one object, once the bucket is known to exist:
    a 404 there is about the key (`otherwise`: what else it can mean to this script)."""
    if client_error_code(error) not in ("404", "NoSuchKey"):
        return error
    return CliError(
        f"the server answered 404 Not Found for the key {printable(key)}: it refuses "
        f"this name (some servers refuse control characters){otherwise}"
    )


def failure_line(action: str, where: str, error: BaseException) -> str:
    """'<action> failed: <where>: <why>', naming `where` once."""
    why = describe_error(error)[0]
    where = printable(where)
    return f"{action} failed: {where}: {why.removesuffix(f': {where}')}"


def one_line(text: str) -> str:
    """A message on one line: its line breaks (and the space around them) become one space."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip()


# --- Command line: shared options, --exclude/--include filters, RATE ---------


@dataclass(frozen=True)
class Filters:
    """--exclude/--include rules in command-line order; the last match wins."""

    rules: tuple[tuple[bool, str], ...] = ()  # (include?, glob)

    def __post_init__(self):
        compiled = tuple(
            (include, re.compile(fnmatch.translate(glob)))
            for include, glob in self.rules
        )
        object.__setattr__(self, "_compiled", compiled)

    def includes(self, relative: str) -> bool:
        """Whether a "/"-separated path relative to the root takes part."""
        included = True
        for include, pattern in self._compiled:
            if pattern.match(relative):
                included = include
        return included


class _FilterAction(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        rules = getattr(namespace, self.dest) or ()
        setattr(namespace, self.dest, (*rules, (option_string == "--include", value)))


EXIT_CODES_HELP = """
exit codes:
  0    everything done (including "nothing to do")
  1    a runtime failure: credentials, access, missing bucket, empty prefix, any file failed
  2    bad command line or input: unknown option, bad location or RATE, LOCAL missing
  130  interrupted (Ctrl-C): in-flight work stopped cleanly
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line and exit 2, not a usage dump,
    and --help ends with `examples` (lines of a shell session) and the exit codes."""

    def __init__(self, *, examples: str, **kwargs):
        super().__init__(
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="examples:\n" + examples.strip("\n") + "\n" + EXIT_CODES_HELP,
            **kwargs,
        )

    def error(self, message):
        raise usage_error(f"{message} (see --help)")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


RATE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([KMG]?)", re.IGNORECASE)


def parse_rate(text: str) -> int:
    """Bytes per second from a RATE: a number with an optional binary K, M or G; 0 is no limit."""
    match = _RATE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate: write bytes per second with K, M or G, e.g. 512K or 8M"
        )
    rate = int(Decimal(match[1]) * RATE_UNITS[match[2].upper()])
    if rate == 0 and Decimal(match[1]) != 0:
        raise argparse.ArgumentTypeError(f"{text!r} is less than 1 byte per second")
    return rate


@dataclass(frozen=True)
class CustomerKey:
    """An SSE-C key (32 bytes, AES-256): S3 encrypts each object with it and keeps
    only its MD5. Its repr, and so any message or traceback, never shows it."""

    secret: bytes = field(repr=False)

    @property
    def params(self) -> dict[str, str]:
        """The SSE-C parameters of botocore's S3 calls: the key in base64 and its
        MD5 given, so that botocore encodes nothing again."""
        md5 = hashlib.md5(self.secret, usedforsecurity=False).digest()
        return {
            "SSECustomerAlgorithm": "AES256",
            "SSECustomerKey": base64.b64encode(self.secret).decode(),
            "SSECustomerKeyMD5": base64.b64encode(md5).decode(),
        }


def read_customer_key(path: str) -> tuple[CustomerKey, str | None]:
    """--sse-c-key-file: the key, and a warning when others may read the file.

    A file of exactly 32 bytes is the key as it stands (whitespace bytes
    included); otherwise its text, surrounding whitespace stripped, must be the
    base64 of 32 bytes. Anything else, or a file that cannot be read: exit 2,
    with a message that never holds what the file holds."""
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            data = file.read(4096)
    except OSError as exc:
        raise usage_error(
            f"cannot read --sse-c-key-file {path!r} ({exc.strerror or exc}): "
            "give a readable file that holds the key"
        ) from None
    if len(data) != CUSTOMER_KEY_BYTES:
        try:
            data = base64.b64decode(data.strip(), validate=True)
        except ValueError:
            data = b""
    if len(data) != CUSTOMER_KEY_BYTES:
        raise usage_error(
            f"--sse-c-key-file {path!r} holds no SSE-C key: it must hold 32 bytes, "
            f"or their base64 (e.g. openssl rand -base64 32 > {path})"
        )
    warning = None
    if mode & 0o077:
        warning = (
            f"--sse-c-key-file {path!r} may be read by other users (mode "
            f"{mode & 0o777:o}): chmod 600 {path}"
        )
    return CustomerKey(data), warning


def cleartext_problem(url: str | None) -> str | None:
    """Why the customer key may not go to this endpoint: over plain http it would
    cross the network in the clear, which only a loopback address is spared."""
    if not url or urlsplit(url).scheme != "http":
        return None
    host = urlsplit(url).hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (
        f"--sse-c-key-file sends the key with every request, and {url} is plain "
        "http: give an https:// endpoint"
    )


# Every option's help says what it does and shows it in use (tests/test_unattended.py
# checks for the "e.g."), as `rclone copy --help` does.
def add_shared_options(parser: argparse.ArgumentParser) -> None:
    """The options both scripts take: where S3 is and the key, then add_run_options."""
    parser.add_argument(
        "--profile",
        metavar="NAME",
        help="credentials and region from this AWS profile (e.g. --profile work)",
    )
    parser.add_argument(
        "--region",
        metavar="NAME",
        help="region of the client and of a bucket backup creates (e.g. --region eu-west-1)",
    )
    parser.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="an S3-compatible server instead of AWS, default $AWS_ENDPOINT_URL "
        "(e.g. --endpoint-url http://127.0.0.1:9000)",
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=positive_int,
        default=DEFAULT_WORKERS,
        help=f"files transferred at once, default {DEFAULT_WORKERS} "
        "(e.g. --workers 128 for a bucket far away, --workers 16 for one nearby)",
    )
    parser.add_argument(
        "--sse-c-key-file",
        metavar="PATH",
        help="encrypt (backup) and decrypt (restore) with your own key (SSE-C), read "
        "from PATH: 32 bytes, or their base64 (e.g. --sse-c-key-file ~/.backup.key)",
    )
    add_run_options(parser)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The shared options of what a run takes and how it reports."""
    parser.add_argument(
        "--exclude",
        dest="filters",
        action=_FilterAction,
        default=(),
        metavar="GLOB",
        help="skip paths matching GLOB, where '*' also crosses '/'; repeatable "
        "(e.g. --exclude '*.tmp' --exclude '.git/*')",
    )
    parser.add_argument(
        "--include",
        dest="filters",
        action=_FilterAction,
        metavar="GLOB",
        help="take paths matching GLOB after an --exclude; the last match wins "
        "(e.g. --exclude '*' --include '*.jpg')",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="show what would be done and change nothing (e.g. --dry-run -v)",
    )
    parser.add_argument(
        "--checksum",
        action="store_true",
        help="compare files of the same size by content (MD5) instead of by mtime "
        "(e.g. --checksum after files were copied with cp -p)",
    )
    volume = parser.add_mutually_exclusive_group()
    volume.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print nothing but warnings and errors (e.g. -q in a crontab line)",
    )
    volume.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print one line per file (e.g. -v > files.log)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON report on stdout when the run ends, and nothing else "
        "(e.g. --json > report.json)",
    )
    parser.add_argument(
        "--bwlimit",
        metavar="RATE",
        type=parse_rate,
        default=0,
        help="at most RATE bytes per second for the whole run; K, M and G are binary, "
        "0 is no limit (e.g. --bwlimit 8M)",
    )
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


# --- Locations, keys, bucket names and the metadata format (pure) ------------


@dataclass(frozen=True)
class Location:
    """A bucket and a prefix in it, as parse_location reads BUCKET::PREFIX or s3://BUCKET/PREFIX."""

    bucket: str
    prefix: str  # normalised: no leading, trailing or doubled "/"; "" is the root

    def url(self, key: str | None = None) -> str:
        return f"s3://{self.bucket}/{self.prefix if key is None else key}"


def normalize_prefix(raw: str) -> str:
    """Drop leading, trailing and repeated "/", read "\\" as "/"; refuse "." and ".."."""
    parts = [part for part in raw.replace("\\", "/").split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise usage_error(f"prefix {raw!r} may not contain '.' or '..' segments")
    return "/".join(parts)


_WHITESPACE_NAMES = {
    " ": "a space",
    "\t": "a tab",
    "\n": "a newline",
    "\r": "a carriage return",
}


def whitespace_problem(text: str) -> str | None:
    """What stray whitespace `text` starts or ends with ("ends with a space"), or None."""
    for where, char in (("starts", text[:1]), ("ends", text[-1:])):
        if char and char.isspace():
            return f"{where} with {_WHITESPACE_NAMES.get(char, 'whitespace')}"
    return None


def parse_location(text: str) -> Location:
    """Read BUCKET::PREFIX, BUCKET::, BUCKET, s3://BUCKET/PREFIX or s3://BUCKET."""
    # "bucket::photos " would otherwise back up a second copy under "photos ".
    problem = whitespace_problem(text)
    if problem:
        raise usage_error(f"location {text!r} {problem}: remove it")
    if text[:5].lower() == "s3://":
        bucket, _, prefix = text[5:].partition("/")
    else:
        bucket, _, prefix = text.partition("::")
    if not bucket:
        raise usage_error(
            f"no bucket in location {text!r}: write BUCKET::PREFIX or s3://BUCKET/PREFIX"
        )
    if bucket_name_problem(bucket, legacy=True):
        raise usage_error(
            f"{bucket!r} is not a bucket name: {bucket_name_problem(bucket)}"
        )
    return Location(bucket, normalize_prefix(prefix))


def key_for(prefix: str, relative: str) -> str:
    """The key of a "/"-separated path relative to the prefix."""
    return f"{prefix}/{relative}" if prefix else relative


def relative_key(prefix: str, key: str) -> str:
    """The part of a key under the prefix folder (the inverse of key_for)."""
    return key[len(prefix) + 1 :] if prefix else key


def folder_prefix(prefix: str) -> str:
    """The listing prefix that matches on a folder boundary."""
    return f"{prefix}/" if prefix else ""


# backup.py --lock-days records its last renewal of a prefix's locks in a small
# object beside the prefix, never a file of the mirror: LOCK_STATE_FOLDER/<prefix>.locks.
LOCK_STATE_FOLDER = ".s3backup"


def lock_state_key(prefix: str) -> str:
    """The key of the lock state of `prefix` ("" for the bucket's root)."""
    return f"{LOCK_STATE_FOLDER}/{prefix}.locks"


def is_lock_state(key: str) -> bool:
    """Whether a key is some prefix's lock state, which only the bucket's root holds."""
    return key.startswith(LOCK_STATE_FOLDER + "/") and key.endswith(".locks")


# S3 refuses longer keys (in UTF-8 bytes).
MAX_KEY_BYTES = 1024

# The names of restore.py's temporary files, which a killed run leaves: its
# downloads' and its case probe's, 8 characters of [a-z0-9_] in the middle
# (tempfile.mkstemp's, which earlier versions used; now 8 hex digits). A
# restore removes them; a backup never uploads them.
TEMPORARY_FILE = ".s3restore-{}.part"
CASE_PROBE = ".s3restore-case-{}"
TEMPORARY_NAME = re.compile(r"\.s3restore-(?:[a-z0-9_]{8}\.part|case-[a-z0-9_]{8})")


def key_length_problem(key: str) -> str | None:
    """Why S3 would refuse `key` for its length, or None."""
    size = len(key.encode("utf-8", "surrogateescape"))
    if size > MAX_KEY_BYTES:
        return f"its key is {size:,} bytes long, over S3's limit of {MAX_KEY_BYTES:,}: shorten the name or the prefix"
    return None


def printable(name: object) -> str:
    """A file name or key for one line of output: control and other unprintable
    characters escaped as Python's repr escapes them (a newline as \\n)."""
    text = str(name)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


class UnsafeKey(ValueError):
    """A key that would be written outside LOCAL, or not as the file it names."""


_DRIVE_LETTER = re.compile(r"[A-Za-z]:")
_WINDOWS_DEVICE_NAMES = {
    "CON", "PRN", "AUX", "NUL",
    *(f"COM{n}" for n in range(1, 10)),
    *(f"LPT{n}" for n in range(1, 10)),
}  # fmt: skip
_WINDOWS_FORBIDDEN = set('<>:"|?*') | {chr(code) for code in range(32)}


def is_within(path: PurePath, root: PurePath) -> bool:
    """Whether path is root or lies under it, compared part by part: /data2 is not
    under /data, and everything is under /."""
    return path.parts[: len(root.parts)] == root.parts


def key_problem(relative: str, windows: bool = False) -> str | None:
    """Why the key part `relative` cannot be restored as the file it names, or
    None: read as a POSIX path, where a backslash is an ordinary name character,
    or (windows) as a Windows path, which reads it as a separator and refuses it,
    with names that Windows reads as devices, streams or something else."""
    if not relative:
        return "names no file"
    if "\x00" in relative:
        return "holds a NUL character"
    if relative.startswith("/"):
        return "is an absolute path"
    if _DRIVE_LETTER.match(relative):
        return "starts with a drive letter"
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "has an empty, '.' or '..' segment"
    if windows:
        if "\\" in relative:
            return "holds a backslash, a folder separator on Windows"
        for part in parts:
            if _WINDOWS_FORBIDDEN.intersection(part):
                return f"segment {part!r} holds a character Windows forbids"
            if part[-1] in ". ":
                return f"segment {part!r} ends with a dot or space"
            if part.split(".")[0].rstrip(" ").upper() in _WINDOWS_DEVICE_NAMES:
                return f"segment {part!r} is a Windows device name"
    return None


def path_for_key(relative: str, root: PurePath) -> PurePath:
    """Where the key part `relative` lands under root; UnsafeKey if anywhere else
    (key_problem, for root's flavour of path)."""
    problem = key_problem(relative, isinstance(root, PureWindowsPath))
    if problem:
        raise UnsafeKey(problem)
    target = root.joinpath(*relative.split("/"))
    if not is_within(target, root):
        raise UnsafeKey("lands outside the destination")
    return target


_RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
DIRECTORY_BUCKET_SUFFIX = "--x-s3"  # S3 Express One Zone
_RESERVED_BUCKET_SUFFIXES = (
    "-s3alias",
    "--ol-s3",
    ".mrap",
    DIRECTORY_BUCKET_SUFFIX,
    "--table-s3",
)


def bucket_name_problem(name: str, legacy: bool = False) -> str | None:
    """Why S3 would refuse `name` for a new bucket, or None if it would not.

    With legacy=True, also accept what older buckets in us-east-1 may still be
    called: upper-case letters, underscores and up to 255 characters.
    """
    if legacy:
        name, max_length = name.lower().replace("_", "-"), 255
    else:
        max_length = 63
    if not 3 <= len(name) <= max_length:
        return f"a bucket name has 3 to {max_length} characters"
    if not re.fullmatch(r"[a-z0-9.-]+", name):
        return "a bucket name has only lowercase letters, digits, '.' and '-'"
    if not (name[0].isalnum() and name[-1].isalnum()):
        return "a bucket name starts and ends with a letter or digit"
    if ".." in name:
        return "a bucket name has no '..'"
    try:
        ipaddress.IPv4Address(name)
        return "a bucket name is not an IP address"
    except ValueError:
        pass
    for reserved in _RESERVED_BUCKET_PREFIXES:
        if name.startswith(reserved):
            return f"the prefix {reserved!r} is reserved by S3"
    for reserved in _RESERVED_BUCKET_SUFFIXES:
        if name.endswith(reserved):
            return f"the suffix {reserved!r} is reserved by S3"
    return None


def format_mtime(mtime_ns: int) -> str:
    """Seconds since the epoch with nanoseconds, as rclone writes its mtime metadata."""
    sign = "-" if mtime_ns < 0 else ""
    seconds, nanos = divmod(abs(mtime_ns), 1_000_000_000)
    return f"{sign}{seconds}.{nanos:09d}"


def parse_mtime(text: str | None) -> int | None:
    """Nanoseconds since the epoch (before 1970 too) from an mtime metadata value, or None if unusable."""
    if not text:
        return None
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        return None
    # Some 35,000 years either way: beyond that no file system keeps a time.
    if not value.is_finite() or not -(2**40) < value < 2**40:
        return None
    return int(value * 1_000_000_000)


def parse_mode(text: str | None) -> int | None:
    """Permission bits from a mode metadata value (octal st_mode), or None."""
    if not text:
        return None
    try:
        return int(text.strip(), 8) & 0o777
    except ValueError:
        return None


def format_when(seconds: float) -> str:
    """A moment in UTC to the second, in a form restore.py --at reads: 2026-11-28T05:12:03Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def restore_point(server_time: float | None, now: float) -> str:
    """The moment at which every object written before `server_time` (a Date header,
    else the local `now`) is in place, whatever resolution the server keeps LastModified
    to: a Date header is cut to the second, so the answer came before the next second."""
    if server_time is None:
        return format_when(math.ceil(now))
    return format_when(server_time + 1)


# User metadata holding the base64 MD5 of an object whose ETag is not its MD5
# (multipart uploads, SSE-KMS): rclone's name and format, so that rclone can
# check our objects and we can check rclone's.
MD5_METADATA = "md5chksum"
HASH_CHUNK = MiB
_PLAIN_ETAG = re.compile(r"[0-9a-f]{32}")


def md5_of_etag(etag: str) -> str | None:
    """The hex MD5 an ETag of plain form states; None for a multipart ETag ("<hex>-N") or any other form.

    A plain-form ETag is the object's MD5 only if it is not encrypted with SSE-KMS
    or SSE-C, which ListObjectsV2 does not say: only a HEAD does (object_md5).
    """
    etag = etag.strip('"').lower()
    return etag if _PLAIN_ETAG.fullmatch(etag) else None


def md5chksum(md5: str) -> str:
    """A hex MD5 as the md5chksum metadata writes it (base64 of the digest)."""
    return base64.b64encode(bytes.fromhex(md5)).decode()


def md5_of_md5chksum(value: str | None) -> str | None:
    """The hex MD5 in an md5chksum metadata value, or None if it holds none."""
    try:
        digest = base64.b64decode(value or "", validate=True)
    except ValueError:
        return None
    return digest.hex() if len(digest) == 16 else None


def object_md5(head: dict) -> str | None:
    """An object's hex MD5 from its HeadObject answer: the ETag when that is the MD5, else md5chksum."""
    encrypted = head.get("ServerSideEncryption", "").startswith("aws:kms") or bool(
        head.get("SSECustomerAlgorithm")
    )
    etag_md5 = None if encrypted else md5_of_etag(head.get("ETag", ""))
    return etag_md5 or md5_of_md5chksum(head.get("Metadata", {}).get(MD5_METADATA))


# --- Local paths of any length ----------------------------------------------------
# A path longer than the system takes whole (PATH_MAX: 4,096 bytes on Linux,
# 1,024 on macOS) fails with ENAMETOOLONG. Such paths go through directory file
# descriptors instead, a stretch of at most LONG_PATH bytes at a time; every
# shorter path goes as it is, at no cost.
LONG_PATH = 1024
FOLDER_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


# Where os takes no dir_fd (Windows) every path goes as it is.
BY_FOLDER_FD = {os.open, os.stat, os.mkdir, os.rename, os.unlink} <= os.supports_dir_fd


def is_long(path: str) -> bool:
    """Whether path, made absolute, is LONG_PATH bytes or longer (and is to go
    through directory file descriptors)."""
    return BY_FOLDER_FD and len(os.fsencode(os.path.abspath(path))) >= LONG_PATH


def first_stretch(path: str) -> tuple[str, str]:
    """path cut at a "/" into a first part under LONG_PATH bytes (at least one
    name) and the rest, relative to it."""
    names = path.split("/")
    size = count = 0
    for name in names[:-1]:
        size += len(os.fsencode(name)) + 1
        if size > LONG_PATH and count:
            break
        count += 1
    return "/".join(names[:count]) or "/", "/".join(names[count:]).lstrip("/")


def open_folder(path: str, dir_fd: int | None = None) -> int:
    """A file descriptor of the folder at path (relative to dir_fd), of any length."""
    try:
        return os.open(path, FOLDER_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    head, rest = first_stretch(path)
    fd = os.open(head, FOLDER_FLAGS, dir_fd=dir_fd)
    try:
        return open_folder(rest, fd)
    finally:
        os.close(fd)


def at_any_length(function: Callable[..., T], path: str, *args, **kwargs) -> T:
    """function(path, *args, **kwargs) of os (stat, open, chmod, ...) for a path
    of any length: one the system refuses whole goes as its name, with dir_fd
    its folder's file descriptor."""
    try:
        return function(path, *args, **kwargs)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    folder, name = os.path.split(path)
    fd = open_folder(folder)
    try:
        return function(name, *args, dir_fd=fd, **kwargs)
    except OSError as exc:
        exc.filename = path  # the user's name for it, not ours
        raise
    finally:
        os.close(fd)


def open_any(path: str, flags: int) -> int:
    """The opener (of open() and io.FileIO) of a file of any path length."""
    return at_any_length(os.open, path, flags, 0o666)


def file_md5(path: str) -> str:
    """The hex MD5 of a file's bytes, read once in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb", opener=open_any) as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class FileBody:
    """A PutObject body that streams from an open file, read again from its start
    for every send (a retry's included), so that no worker holds a body whole.

    `crc32` is the checksum of the read that decided the upload, which its
    header states. Each send's last bytes are held back until the bytes before
    them and they match it: a file changed since that read is never stored, on
    any server, but raises FileChanged (and the upload reads it again). A read
    of a given size returns at most CHUNK bytes (botocore asks for 1 MiB at a
    time). Seekable to its start and end only, which is all botocore
    does with a body it may send again."""

    def __init__(self, file: BinaryIO, size: int, crc32: int):
        self.file, self.size, self.crc32 = file, size, crc32
        self._at = 0
        self.seek(0)  # from the read that made crc32, the file is at its end

    def __len__(self) -> int:
        return self.size

    def read(self, amount: int | None = -1) -> bytes:
        left = self.size - self._at
        amount = left if amount is None or amount < 0 else min(amount, left, CHUNK)
        data = self.file.read(amount)
        if len(data) < amount:
            raise FileChanged()  # it shrank
        self._crc = zlib.crc32(data, self._crc)
        self._at += len(data)
        if data and self._at == self.size and self._crc != self.crc32:
            raise FileChanged()
        return data

    def sha256(self) -> str:
        """The hex SHA-256 of the file's bytes now, for the signature of a send:
        the send itself is checked."""
        digest = hashlib.sha256()
        self.seek(0)
        for _ in range(0, self.size, CHUNK):
            digest.update(self.file.read(CHUNK))
        self.seek(0)
        return digest.hexdigest()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        at = {os.SEEK_SET: 0, os.SEEK_CUR: self._at, os.SEEK_END: self.size}[whence]
        if at + offset not in (0, self.size):
            raise io.UnsupportedOperation("a FileBody seeks to its start or end")
        self._at = at + offset
        if self._at == 0:
            self.file.seek(0)
            self._crc = 0
        return self._at

    def tell(self) -> int:
        return self._at


def both_md5s(
    store: Store, key: str, path: str, obj: RemoteObject
) -> tuple[str | OSError, str | None]:
    """The file's MD5 (or why it could not be read) and its object's (None: not known).

    A listed ETag of plain form that equals the file's MD5 settles it with no
    request; otherwise one HEAD tells whether the ETag is the MD5, or gives md5chksum.
    """
    try:
        local = file_md5(path)
    except OSError as exc:
        return exc, None
    if md5_of_etag(obj.etag) == local:
        return local, local
    try:
        return local, store.md5(key, obj.version_id)
    except botocore.exceptions.ClientError as exc:
        raise runtime_error(
            f"cannot read the metadata of s3://{store.bucket}/{key}", exc
        ) from None


# --- Worker pools and the --bwlimit token bucket -----------------------------


@dataclass(frozen=True)
class Failure(Generic[T]):
    """One item of a run that failed (a path, a key, an Upload...), and why."""

    item: T
    error: BaseException


class Cancelled(Exception):
    """The run was interrupted while this transfer was under way."""


class TokenBucket:
    """At most `rate` bytes per second across every thread that takes from it (--bwlimit).

    A taker books its bytes at once, running the bucket into debt if need be, and
    waits until the rate has paid for them: any size passes, and takers queue in
    the order they came. A bucket left idle fills up to BURST_SECONDS of bytes.
    """

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self._clock = clock
        self._burst = rate * BURST_SECONDS
        self._tokens = 0.0
        self._filled_at = clock()
        self._lock = threading.Lock()

    def book(self, nbytes: int) -> float:
        """Take nbytes from the bucket; the seconds to wait before they may move."""
        with self._lock:
            now = self._clock()
            refill = (now - self._filled_at) * self.rate
            self._tokens = min(self._burst, self._tokens + refill) - nbytes
            self._filled_at = now
            return max(0.0, -self._tokens / self.rate)

    def pace(self, nbytes: int, cancel: threading.Event) -> None:
        """Wait until nbytes may move; Cancelled when the run is interrupted meanwhile."""
        delay = self.book(nbytes)
        if delay > 0 and cancel.wait(delay):
            raise Cancelled()


# glibc gives threads that allocate at once arenas of their own (up to 8 a core),
# and each arena keeps much of what its threads freed: with 64 upload threads
# W2 peaked at 73 MiB, 17 MiB more than with 4, for 4 MiB of bodies in flight.
# Python's threads take turns anyway (the GIL): one arena cost no speed
# (bench/RESULTS.md, measured choices).
MALLOC_ARENAS = 1
M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Have glibc's malloc share `arenas` arenas among every thread to come (mallopt
    M_ARENA_MAX); whether it did (only glibc has it)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), or no glibc
        return False
    import ctypes  # here: 2 ms to import, and only for glibc

    return ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas) == 1


def without_locals(error: BaseException) -> BaseException:
    """The error, with the variables of its tracebacks' frames cleared (and of the
    errors it chains): a failure kept until the run ends keeps no file body."""
    chain, seen = [error], set()
    while chain:
        link = chain.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        traceback.clear_frames(link.__traceback__)
        chain += [link.__cause__, link.__context__]
    return error


_END = object()  # the end of the items, in a worker's queue


def map_failing_fast(
    function: Callable[[T], R], items: Iterable[T], workers: int, ahead: int = 0
) -> Iterator[R]:
    """function(item) for each item on up to `workers` threads, started at once and
    at most `ahead` (default 2 × workers) items beyond the result awaited; the
    results in the items' order. On failure no further item starts, and the
    exception is raised in place of its result. On Ctrl-C the caller stops waiting
    at once: the threads are daemons, left to end with the process (for reads
    only: listings, HEADs, hashes)."""
    ahead = ahead or 2 * workers
    source = iter(items)
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    window: collections.deque[Future] = collections.deque()
    failures: list[BaseException] = []
    threads = 0

    def worker() -> None:
        while (job := jobs.get()) is not None:
            item, future = job
            if failures:
                future.cancel()
                continue
            try:
                future.set_result(function(item))
            # Whatever it is, it belongs to whoever asks for the result.
            except Exception as exc:  # noqa: BLE001
                failures.append(exc)
                future.set_exception(exc)

    def submit() -> bool:
        nonlocal threads
        item = next(source, _END)
        if item is _END:
            return False
        future: Future = Future()
        window.append(future)
        jobs.put((item, future))
        if threads < min(workers, len(window)):
            threads += 1
            threading.Thread(target=worker, daemon=True).start()
        return True

    while len(window) < ahead and submit():
        pass

    def results() -> Iterator[R]:
        while window:
            try:
                result = window.popleft().result()
            # Cancelled after another item's failure: that failure is the answer.
            except CancelledError:
                raise failures[0] from None
            yield result
            if not failures:
                submit()

    given = results()
    # The threads end with the results, read to the end or dropped unread.
    weakref.finalize(given, lambda: [jobs.put(None) for _ in range(threads)])
    return given


def call_failing_fast(call: Callable[[], R]) -> Future:
    """call() on a daemon thread; its Future, whose result() raises what call()
    raised. On Ctrl-C the caller stops waiting at once: the thread is left to end
    with the process."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(call())
        except Exception as exc:  # noqa: BLE001
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def run_collecting_failures(
    items: Iterable[T],
    work: Callable[[T, threading.Event], bool | None],
    workers: int,
    ahead: int = 0,
    store: Store | None = None,
) -> tuple[list[Failure[T]], list[T]]:
    """Call work(item, cancel) for every item on up to `workers` threads, the
    items drawn in this thread up to `ahead` (at least `workers`) before a
    thread takes them: the first item starts once `ahead` items are drawn, or
    all of them. Returns the failures and the items work() skipped (by
    returning False).

    On failure of one item, it is collected and the rest go on (as
    shutil.copytree does). On Ctrl-C, or a failure to draw the items (the
    plan's), no new item starts, the store (if any) cancels its transfers
    (multipart uploads are aborted), running items see `cancel` set (the
    store's), and the exception is raised again once every thread has stopped.
    """
    failures: list[Failure[T]] = []
    skipped: list[T] = []
    cancel = store.cancelled if store else threading.Event()
    jobs: queue.Queue = queue.Queue(maxsize=max(ahead, workers))

    def run_one(item: T) -> None:
        try:
            if work(item, cancel) is False:
                skipped.append(item)
        # One file's failure, whatever it is, must not stop the others.
        except Exception as exc:  # noqa: BLE001
            failures.append(Failure(item, without_locals(exc)))

    threads = QueueThreads(jobs, run_one, cancel)
    try:
        for item in items:
            if not threads.started and jobs.full():
                threads.start(workers)
            jobs.put(item)
        if not threads.started:
            threads.start(min(workers, jobs.qsize()))
        threads.stop()
    except BaseException:
        cancel.set()
        if store is not None:
            store.cancel()
        # Threads waiting for an item find none but the end.
        while not jobs.empty():
            jobs.get_nowait()
        threads.stop()
        raise
    return failures, skipped


class QueueThreads:
    """Daemon threads that run_one(item) for each item of a queue until they meet
    its end (or `cancel` is set), counted while alive. The main thread waits on
    that count, never in Thread.join: a join that Ctrl-C interrupts marks its
    thread as ended while it still runs (CPython gh-90882, Python 3.12 and older)."""

    def __init__(self, jobs: queue.Queue, run_one: Callable, cancel: threading.Event):
        self._jobs, self._run_one, self._cancel = jobs, run_one, cancel
        self._changed = threading.Condition()
        self.started = self._alive = 0

    def _work(self) -> None:
        try:
            while (item := self._jobs.get()) is not _END and not self._cancel.is_set():
                self._run_one(item)
        finally:
            with self._changed:
                self._alive -= 1
                self._changed.notify_all()

    def start(self, count: int) -> None:
        # Each counted just before it starts: Ctrl-C while Thread.start waits for
        # one to run (restore's workers start once its plan ends, as its first
        # downloads begin) leaves none counted that never ran, for stop to wait on.
        for _ in range(count):
            thread = threading.Thread(target=self._work, daemon=True)
            with self._changed:
                self.started += 1
                self._alive += 1
            thread.start()

    def stop(self) -> None:
        """Let each thread meet the end, and wait until none is alive."""
        for _ in range(self.started):
            self._jobs.put(_END)
        with self._changed:
            self._changed.wait_for(lambda: self._alive == 0)


class PartWorkers:
    """A fixed number of threads that run the parts of every large transfer of a
    run, so that the parts in flight (and the buffers they read into) are at most
    `count` however many files are under way. A file's worker hands its parts over and
    waits (run_all); parts never wait for other parts, so no number of waiting
    files can leave the threads stuck. The threads are daemons, started as needed."""

    def __init__(self, count: int):
        self._count = count
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = 0
        self._lock = threading.Lock()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def run_all(
        self, calls: Sequence[Callable[[], None]], stop: threading.Event
    ) -> None:
        """Run every call on the threads and wait until all have ended. Once one
        fails, `stop` is set (the others should see it and end) and the calls not
        started yet are skipped; the first failure is then raised here."""
        failures: list[Exception] = []
        ended = threading.Condition()
        left = len(calls)

        def job(call: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                nonlocal left
                try:
                    if not stop.is_set():
                        call()
                # It belongs to the file's worker, which raises it.
                except Exception as exc:  # noqa: BLE001
                    failures.append(exc)
                    stop.set()
                finally:
                    with ended:
                        left -= 1
                        ended.notify_all()

            return run

        with self._lock:
            while self._threads < self._count:
                self._threads += 1
                threading.Thread(target=self._work, daemon=True).start()
        for call in calls:
            self._jobs.put(job(call))
        with ended:
            ended.wait_for(lambda: left == 0)
        if failures:
            raise failures[0]

    def close(self) -> None:
        """End the threads once the parts handed over have run."""
        with self._lock:
            for _ in range(self._threads):
                self._jobs.put(None)
            self._threads = 0


# --- Console and summary: messages, progress, the JSON report, run_cli -------


def format_bytes(size: float) -> str:
    """A size for people: 512 B, 1.5 KiB, 3.2 MiB, 1.1 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class Console:
    """Messages on stdout/stderr, and a live progress line when stderr is a terminal.

    With `json`, stdout is kept for the report: what would go there is not printed
    (but -v's lines, which go to stderr), there is no progress line, and the
    files and bytes done are counted for a run that stops early.
    """

    def __init__(
        self,
        quiet: bool,
        verbose: bool,
        out: TextIO | None = None,
        err: TextIO | None = None,
        json: bool = False,
    ):
        self.quiet, self.verbose, self.json = quiet, verbose, json
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.live = not quiet and not json and self.err.isatty()
        self.summary: Summary | None = None  # the run's, once it has one
        self.errors: list[dict[str, str]] = []  # every error line, for the report
        self._lock = threading.Lock()
        self._shown = False
        self._files = self._total_files = 0
        self._bytes = self._total_bytes = 0
        self._totals_known = (
            True  # False while a plan that streams is still growing them
        )
        self._started = time.monotonic()
        self._drawn_at = 0.0

    def _write(self, stream: TextIO, text: str) -> None:
        with self._lock:
            self._clear_line()
            stream.write(text + "\n")
            stream.flush()

    def info(self, text: str) -> None:
        if not (self.quiet or self.json):
            self._write(self.out, text)

    def detail(self, text: str) -> None:
        if self.verbose:
            self._write(self.err if self.json else self.out, text)

    def warning(self, text: str) -> None:
        self._write(self.err, f"warning: {one_line(text)}")

    def error(self, text: str, path: str | None = None, key: str | None = None) -> None:
        """An error line about one file (`path`) or object (`key`), kept for the report."""
        self._write(self.err, f"error: {one_line(text)}")
        record = {"path": path} if path is not None else {}
        if key is not None:
            record["key"] = key
        self.errors.append({**record, "message": one_line(text)})

    def summarize(self, summary: Summary, line: str | None = None) -> None:
        """The run's summary: kept for the report, its line (or `line`) printed."""
        self.summary = summary
        self.info(summary.line() if line is None else line)

    def start(self, files: int = 0, nbytes: int = 0, known: bool = True) -> None:
        """Start the clock; the totals, or (known=False) their first part, which
        planned() adds to until totals_known()."""
        self._total_files, self._total_bytes = files, nbytes
        self._totals_known = known
        self._started = time.monotonic()

    def planned(self, files: int, nbytes: int) -> None:
        """Add to the totals while they are not known whole (start(known=False))."""
        with self._lock:
            self._total_files += files
            self._total_bytes += nbytes

    def totals_known(self) -> None:
        """The totals are whole now: the ETA can be shown."""
        self._totals_known = True

    def advance(self, nbytes: int = 0, files: int = 0) -> None:
        if not (self.live or self.json):
            return
        with self._lock:
            self._bytes += nbytes
            self._files += files
            now = time.monotonic()
            if self.live and now - self._drawn_at >= 0.1:
                self._drawn_at = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-6)
        rate = self._bytes / elapsed
        left = self._total_bytes - self._bytes
        # Totals that are still growing end in "+", and give no ETA yet.
        more = "" if self._totals_known else "+"
        eta = f"{left / rate:.0f} s" if rate > 0 and not more else "?"
        line = (
            f"{self._files}/{self._total_files}{more} files, "
            f"{format_bytes(self._bytes)}/{format_bytes(self._total_bytes)}{more}, "
            f"{format_bytes(rate)}/s, ETA {eta}"
        )
        self.err.write("\r\x1b[K" + line)
        self.err.flush()
        self._shown = True

    def _clear_line(self) -> None:
        if self._shown:
            self.err.write("\r\x1b[K")
            self._shown = False

    def finish(self) -> None:
        with self._lock:
            self._clear_line()
            self.err.flush()

    def done_so_far(self) -> tuple[int, int]:
        """Files and bytes transferred until now (counted only with a progress line or json)."""
        with self._lock:
            return self._files, self._bytes


@dataclass
class Summary:
    """The facts of a run. Every field but `verb` and `seconds` goes into the JSON
    report under its own name (`nbytes` as `bytes`), unless it is None: name a new
    field as its JSON key, and leave it None where it does not apply."""

    verb: str  # "uploaded", "restored" or "checked"
    transferred: int = 0
    skipped: int = 0
    failed: int = 0
    deleted: int | None = None  # backup
    vanished: int | None = None  # backup: files gone since the walk found them
    nbytes: int = 0
    seconds: float = 0.0
    restore_point: str | None = None  # backup: restore.py --at this brings the run back
    at: str | None = None  # restore --at: the moment restored, in UTC
    refused: int | None = None  # restore: keys that would land outside LOCAL
    conflicts: int | None = None  # restore: keys that collide locally
    archived: int | None = None  # restore: objects still in GLACIER or DEEP_ARCHIVE
    # backup.py --check only: the keys of each kind of difference.
    missing: list[str] | None = None
    changed: list[str] | None = None
    extra: list[str] | None = None
    unlocked: list[str] | None = None  # with --lock-days
    # backup --lock-days: {"mode", "until"}, the earliest date a current object is locked to
    lock: dict | None = None
    # restore.py --history: the backup's moments, or one object's versions.
    moments: list[dict] | None = None
    versions: list[dict] | None = None

    def line(self) -> str:
        if self.missing is not None:
            unlocked = (
                "" if self.unlocked is None else f"{len(self.unlocked)} unlocked, "
            )
            return (
                f"{self.verb} {self.skipped} identical, {len(self.missing)} missing, "
                f"{len(self.changed or ())} changed, {len(self.extra or ())} extra, "
                f"{unlocked}failed {self.failed}, in {self.seconds:.1f} s"
            )
        deleted = f", deleted {self.deleted}" if self.deleted else ""
        vanished = f", vanished {self.vanished}" if self.vanished else ""
        at = f", as at {self.at}" if self.at else ""
        point = f", restore point {self.restore_point}" if self.restore_point else ""
        lock = ""
        if self.lock and self.lock["until"]:
            lock = f", locked ({self.lock['mode']}) until {self.lock['until']}"
        return (
            f"{self.verb} {self.transferred}{at}, skipped {self.skipped}, failed {self.failed}"
            f"{vanished}{deleted}, {format_bytes(self.nbytes)} in {self.seconds:.1f} s{point}{lock}"
        )


@contextlib.contextmanager
def interrupt_after() -> Iterator[None]:
    """Ctrl-C within the block is held until the block is done, then raised: for
    the few requests that must not be left half done (a bucket's setup), and
    only on the main thread, where signals arrive."""
    came = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if came:
        raise KeyboardInterrupt


def exit_script(code: int) -> NoReturn:
    """Leave the script with `code`, without the interpreter's collections at exit.

    The process frees everything anyway, but at exit the interpreter first walks
    every object still alive in several collections, which with botocore's models
    is a noticeable part of a short run (bench/RESULTS.md, measured choices).
    Frozen objects are left out of them.
    """
    gc.freeze()
    raise SystemExit(code)


def utc_timestamp(when: datetime) -> str:
    """ISO 8601 in UTC to the second, as the JSON report writes times."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_value(value: object) -> object:
    """What json.dumps cannot write by itself: times in ISO 8601, anything else as text."""
    return utc_timestamp(value) if isinstance(value, datetime) else str(value)


def run_report(
    command: str,
    endpoints: tuple[str | None, str | None],
    dry_run: bool,
    started: datetime,
    seconds: float,
    exit_code: int,
    console: Console | None,
    error: str | None,
) -> dict:
    """The JSON report of a run, however it ended: its summary's fields if it got
    that far, else the files and bytes done until it stopped."""
    report = {
        "command": command,
        "source": endpoints[0],
        "destination": endpoints[1],
        "dry_run": dry_run,
        "started": utc_timestamp(started),
        "finished": utc_timestamp(started + timedelta(seconds=seconds)),
        "seconds": round(seconds, 3),
        "exit_code": int(exit_code),
    }
    summary = console.summary if console else None
    if summary is None:
        files, nbytes = console.done_so_far() if console else (0, 0)
        summary = Summary("", transferred=files, nbytes=nbytes)
    report.update(
        transferred=summary.transferred,
        skipped=summary.skipped,
        failed=summary.failed,
        bytes=summary.nbytes,
    )
    for item in dataclasses.fields(summary):
        value = getattr(summary, item.name)
        if item.name not in ("verb", "seconds", "nbytes") and value is not None:
            report.setdefault(item.name, value)
    if summary.verb == "uploaded":  # null: the run did not get every file in place
        report.setdefault("restore_point", None)
    report["errors"] = console.errors if console else []
    if error is not None:
        report["error"] = error
    return report


def run_cli(
    parser: argparse.ArgumentParser, run: Callable, argv: Iterable[str] | None
) -> int:
    """Parse argv, call run(args, console) -> int, turn every expected failure into a
    line and an exit code, and with --json print the run's report on stdout."""
    started, clock = datetime.now(UTC), time.monotonic()
    argv = sys.argv[1:] if argv is None else list(argv)
    # Read before parsing, so that a bad command line is reported as asked too.
    debug, as_json, dry_run = ("--debug" in argv, "--json" in argv, "--dry-run" in argv)
    command = parser.prog.removesuffix(".py")
    endpoints, console, error = (None, None), None, None
    # A file name that is not valid UTF-8 must not crash the per-file output.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    # The scripts' first lines make Ctrl-C exit quietly while they import; from
    # here on it raises KeyboardInterrupt, so that the run stops cleanly.
    quiet_interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = parser.parse_args(argv)
        # backup.py goes from LOCAL to the location, restore.py the other way.
        endpoints = (args.local, args.location)
        if command == "restore":
            endpoints = endpoints[::-1]
        as_json, dry_run = args.json, args.dry_run
        console = Console(args.quiet, args.verbose, json=args.json)
        code = int(run(args, console))
    except KeyboardInterrupt:
        error = "interrupted: stopped cleanly, run again to finish"
        sys.stderr.write(f"\n{error}\n")
        code = ExitCode.INTERRUPTED
    except BrokenPipeError:
        # Output piped into e.g. `head` that stopped reading: not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.FAILURE
    except Exception as exc:
        if debug:
            raise
        message, code = describe_error(exc)
        error = f"{parser.prog}: error: {one_line(message)}"
        sys.stderr.write(f"{error}\n")
    signal.signal(signal.SIGINT, quiet_interrupt)
    if as_json:
        report = run_report(
            command,
            endpoints,
            dry_run,
            started,
            time.monotonic() - clock,
            code,
            console,
            error,
        )
        sys.stdout.write(json.dumps(report, default=_json_value) + "\n")
        sys.stdout.flush()
    return code


# --- The Store: the one door to S3, and how it sends requests --------------


def endpoint_url_from(args: argparse.Namespace) -> str | None:
    """--endpoint-url, else $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL; checked for form."""
    url = args.endpoint_url
    if url is None:
        # An empty variable counts as unset, but an empty --endpoint-url is an error,
        # never a silent switch to AWS itself.
        url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL"
        )
    if url is None:
        return None
    problem = whitespace_problem(url)
    if problem:
        raise usage_error(f"endpoint URL {url!r} {problem}: remove it")
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed "[" of an IPv6 address
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise usage_error(
            f"endpoint URL {url!r} is not of the form http(s)://HOST[:PORT]"
        )
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise usage_error(f"endpoint URL {url!r} has a bad port number")
    return url


def check_endpoint_reachable(url: str) -> None:
    """Fail at once when nothing listens at the endpoint, instead of after every retry."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=10).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise CliError(
            f"cannot connect to {url} ({reason}): check --endpoint-url and that the server runs"
        ) from None


def parse_timestamp(value: str) -> datetime:
    """The two timestamp forms S3 sends, parsed without dateutil; botocore's parser otherwise."""
    try:
        if value.endswith("Z"):  # listings: 2024-05-01T12:30:00.000Z
            # Python 3.9 and 3.10 read no "Z" suffix in fromisoformat.
            return datetime.fromisoformat(value[:-1] + "+00:00")  # noqa: FURB162
        return email.utils.parsedate_to_datetime(
            value
        )  # headers: Wed, 01 May 2024 12:30:00 GMT
    except (TypeError, ValueError):
        return botocore.utils.parse_timestamp(value)


class ServerClock:
    """The latest time the server's answers told (their Date headers, to the second)."""

    def __init__(self):
        self.latest: float | None = None  # seconds since the epoch
        self._text = ""
        self._lock = threading.Lock()

    def saw(self, date: str | None) -> None:
        # A Date header changes once a second: parse only a new one.
        if not date or date == self._text:
            return
        try:
            seconds = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        with self._lock:
            self._text = date
            if self.latest is None or seconds > self.latest:
                self.latest = seconds

    def after_call(self, http_response, **kwargs) -> None:
        """botocore's after-call event: every answer botocore has parsed."""
        self.saw(http_response.headers.get("Date"))


@dataclass(frozen=True)
class RemoteObject:
    """One object of a listing (or, for restore.py --at, one version)."""

    key: str
    size: int
    last_modified: float  # seconds since the epoch
    storage_class: str = "STANDARD"
    etag: str = ""  # as listed, without its quotes
    version_id: str | None = None  # a version picked by restore.py --at


@dataclass(frozen=True)
class ObjectVersion:
    """One entry of a ListObjectVersions answer: a version, or a delete marker."""

    key: str
    version_id: str
    last_modified: float  # seconds since the epoch
    is_latest: bool
    size: int | None  # None for a delete marker
    storage_class: str = "STANDARD"
    etag: str = ""  # as listed, without its quotes


class UnorderedServer(Exception):
    """A listing from a server known not to list in S3's key order."""


# The Server header of servers whose ListObjectsV2 is not in S3's key order and
# whose StartAfter skips keys, measured: SeaweedFS 4.48 lists a folder's keys
# before its siblings' that sort before "/" ("a/x" before "a-b", "a.txt"), in
# versioned buckets non-ASCII names before the others, and after
# StartAfter="a-b/z" it leaves out "a/x".
UNORDERED_SERVERS = ("SeaweedFS",)


def listed_objects(page: dict, any_order: bool = False) -> list[RemoteObject]:
    """The objects of one ListObjectsV2 page; UnorderedServer from an
    UNORDERED_SERVERS one, unless `any_order` (the caller lists it whole and sorts it)."""
    headers = page.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    server = headers.get("server", "")
    if not any_order and server.startswith(UNORDERED_SERVERS):
        raise UnorderedServer(server)
    return [
        RemoteObject(
            item["Key"],
            item["Size"],
            item["LastModified"].timestamp(),
            item.get("StorageClass", "STANDARD"),
            item.get("ETag", "").strip('"'),
        )
        for item in page.get("Contents", [])
    ]


def may_come_under(key: str, name: str) -> bool:
    """Whether keys under `name` + "/" may still come in a listing that has reached
    `key`: in key order "a-b" and "a.txt" come between "a" and "a/x"."""
    return key < name + "/" or key.startswith(name + "/")


def list_range(
    paginator,
    bucket: str,
    prefix: str,
    after: str = "",
    through: str | None = None,
    any_order: bool = False,
) -> tuple[list[RemoteObject], bool]:
    """The objects under `prefix` whose keys sort after `after` and up to `through`
    (None: no end), and whether the listing met the end of the prefix (no key
    under it sorts after them), from a client's list_objects_v2 paginator."""
    params = {"Bucket": bucket, "Prefix": prefix}
    if after:
        params["StartAfter"] = after
    pages = paginator.paginate(**params, PaginationConfig={"PageSize": LIST_PAGE})
    objects: list[RemoteObject] = []
    for page in pages:
        listed = listed_objects(page, any_order)
        # S3 lists keys in UTF-8 byte order, which is the order of str.
        if through is not None and listed and listed[-1].key >= through:
            objects += (obj for obj in listed if obj.key <= through)
            # A page that ends on `through` ends the range, without asking for another.
            return objects, listed[-1].key == through and not page.get("IsTruncated")
        objects += listed
    return objects, True


def pages_ahead(pages: Iterable[T]) -> Iterator[T]:
    """The pages, the first asked for at once and each next one (on a thread of
    its own) while the one before is read: one page ahead, never more."""
    source = iter(pages)
    coming = call_failing_fast(lambda: next(source, None))

    def read() -> Iterator[T]:
        nonlocal coming
        while (page := coming.result()) is not None:
            coming = call_failing_fast(lambda: next(source, None))
            yield page

    return read()


def create_transfer_manager(client):
    """boto3's transfer manager, for multipart uploads, reading the parts of each
    file by name (PartFile)."""
    # Imported here, not at the top: boto3 and s3transfer take time to import,
    # and a backup with nothing to upload never needs them.
    from boto3.s3.transfer import TransferConfig
    from boto3.s3.transfer import create_transfer_manager as create
    from s3transfer.utils import OSUtils

    class Opener(OSUtils):
        def open(self, filename, mode):
            return PartFile(filename, mode)

        def get_file_size(self, filename):
            return at_any_length(os.stat, filename).st_size

    # The CRT transfer client ignores endpoint_url (boto3 issue 4839): pin classic.
    config = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNKSIZE,
        max_concurrency=PART_WORKERS,
        preferred_transfer_client="classic",
    )
    return create(client, config, osutil=Opener())


class PartFile(io.FileIO):
    """A file that s3transfer opens by name to read one part of it, and that
    raises FileChanged when it holds fewer bytes than asked for: the file was
    cut short since the upload began. A short body would otherwise go out under
    the part's Content-Length, and the server would wait for the rest (60 s).
    Its path may be of any length."""

    def __init__(self, name: str, mode: str = "r", closefd: bool = True):
        super().__init__(name, mode, closefd, opener=open_any)

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        if size is not None and 0 <= size != len(data):
            raise FileChanged()
        return data


class TransferProgress:
    """The subscriber of one s3transfer upload (it calls on_* by name): its size
    told, its bytes shown by progress(nbytes) and held to --bwlimit by
    pace(nbytes), from the thread that moves them (s3transfer calls on_progress
    for no read that only computes a checksum)."""

    def __init__(self, size: int, progress: Callable[[int], None], pace):
        self._size, self._progress, self._pace = size, progress, pace

    def on_queued(self, future, **kwargs):
        future.meta.provide_transfer_size(self._size)

    def on_progress(self, future, bytes_transferred, **kwargs):
        self._progress(bytes_transferred)
        # A retry reports the bytes it goes back over as negative progress.
        if bytes_transferred > 0:
            self._pace(bytes_transferred)


class DirectFailed(Exception):
    """No direct request could be sent, or it got no plain success: send it through botocore."""

    def __init__(self, reason: str, attempted: bool = True):
        super().__init__(reason)
        self.attempted = attempted


class SigV4:
    """AWS Signature Version 4 in headers, as botocore's S3SigV4Auth signs an S3 request
    (tests/test_direct.py checks that both give the same Authorization), keeping the
    signing key for the day instead of deriving it for every request."""

    def __init__(self, region: str, service: str):
        self.region, self.service = region, service
        self._keys: dict[tuple[str, str], bytes] = {}  # by (secret key, day)

    def _signing_key(self, secret_key: str, day: str) -> bytes:
        key = self._keys.get((secret_key, day))
        if key is None:
            key = f"AWS4{secret_key}".encode()
            for part in (day, self.region, self.service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {(secret_key, day): key}
        return key

    def sign(
        self,
        credentials,
        method: str,
        host: str,
        path: str,
        headers: dict[str, str],
        payload: bytes,
        now: time.struct_time,
        query: str = "",
        payload_hash: str | None = None,
    ) -> dict[str, str]:
        """The headers to send: `headers` and Host, X-Amz-Date, the payload's
        SHA-256 (or `payload_hash` where the payload is not at hand, a FileBody's:
        its SHA-256 or UNSIGNED_PAYLOAD), the session token if any, and the
        Authorization.

        `query` is the URL's query string, already encoded and in sorted order
        (as version_query writes it), which is then its canonical form."""
        timestamp = time.strftime("%Y%m%dT%H%M%SZ", now)
        signed = {
            name.lower(): " ".join(value.split()) for name, value in headers.items()
        }
        signed["host"] = host
        signed["x-amz-date"] = timestamp
        signed["x-amz-content-sha256"] = (
            payload_hash or hashlib.sha256(payload).hexdigest()
        )
        if credentials.token:
            signed["x-amz-security-token"] = credentials.token
        names = sorted(signed)
        canonical_request = "\n".join(
            [
                method,
                path,
                query,
                *(f"{name}:{signed[name]}" for name in names),
                "",
                ";".join(names),
                signed["x-amz-content-sha256"],
            ]
        )
        scope = f"{timestamp[:8]}/{self.region}/{self.service}/aws4_request"
        string_to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                timestamp,
                scope,
                hashlib.sha256(canonical_request.encode()).hexdigest(),
            ]
        )
        key = self._signing_key(credentials.secret_key, timestamp[:8])
        signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        signed["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
        return signed


def host_header(parts) -> str:
    """The Host header for a split URL, as botocore signs it: no default port."""
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    if parts.port is None or parts.port == {"http": 80, "https": 443}[parts.scheme]:
        return host
    return f"{host}:{parts.port}"


@dataclass(frozen=True)
class Route:
    """Where botocore sent an object request, and how it signed it."""

    origin: tuple[str, str]  # (scheme, host[:port]) to connect to
    host: str  # the Host header
    base_path: str  # the object's path with its key left off
    signer: SigV4


@dataclass(frozen=True)
class FetchedObject:
    metadata: dict[str, str]  # user metadata, names in lower case
    last_modified: float  # seconds since the epoch
    chunks: Iterator[bytes]


# The payload hash of a signature that leaves the body out.
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
# Parameters of put_object that a direct PUT sends, as the headers botocore sends them.
PUT_HEADERS = {
    "ChecksumAlgorithm": "x-amz-sdk-checksum-algorithm",
    "ChecksumCRC32": "x-amz-checksum-crc32",
    "ContentType": "Content-Type",
    "StorageClass": "x-amz-storage-class",
    "ServerSideEncryption": "x-amz-server-side-encryption",
    "SSEKMSKeyId": "x-amz-server-side-encryption-aws-kms-key-id",
    "ObjectLockMode": "x-amz-object-lock-mode",
    "ObjectLockRetainUntilDate": "x-amz-object-lock-retain-until-date",  # ISO 8601
    "SSECustomerAlgorithm": "x-amz-server-side-encryption-customer-algorithm",
    "SSECustomerKey": "x-amz-server-side-encryption-customer-key",
    "SSECustomerKeyMD5": "x-amz-server-side-encryption-customer-key-MD5",
}
# Answers meaning the route or the signature no longer fits: learn it again.
STALE_ROUTE_STATUSES = (301, 307, 400, 403)
# Learning the route again after this many stale answers stops: botocore does the rest.
MAX_ROUTE_CHANGES = 3
DIRECT_TIMEOUT = 60  # seconds, botocore's default connect and read timeouts
DIRECT_USER_AGENT = (
    f"s3backup-direct Botocore/{botocore.__version__} "
    f"Python/{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}"
)


def as_headers(params: dict) -> dict[str, str]:
    """The PUT_HEADERS parameters of a botocore call, as the headers it sends."""
    return {PUT_HEADERS[name]: params[name] for name in params if name in PUT_HEADERS}


def key_path(key: str) -> str:
    """A key as botocore writes it in a URL path."""
    return quote(key, safe="/~")


def version_query(version_id: str | None) -> str:
    """The query string of a request for one version of an object, as botocore writes it."""
    return "" if version_id is None else f"versionId={quote(version_id, safe='-_.~')}"


def version_param(version_id: str | None) -> dict:
    """The VersionId parameter of a request for one version (none: the current one)."""
    return {"VersionId": version_id} if version_id else {}


def crc32_header(crc: int) -> str:
    """A CRC32 as S3's x-amz-checksum-crc32 header writes it."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


class DirectRequests:
    """Whole-object GET and PUT of small objects, and ranged GETs of the parts of
    large ones, signed as botocore signs them and sent on one kept-alive
    connection per thread.

    botocore spends several times more CPU on each request (endpoint rules, event
    hooks, response parsing) than the same signed request sent with http.client,
    and for small files that is the whole cost of a backup or a restore
    (bench/RESULTS.md, measured choices).

    It only repeats what botocore has done: until botocore has completed a GetObject
    (PutObject) over the network, not one a mock answered in-process, get() (put())
    raises DirectFailed; after that it sends to the URL botocore used, signed (SigV4)
    for the region botocore signed for. It takes only a plain 200 answer (206 with
    exactly the bytes asked for, for a range):
    anything else raises DirectFailed, and the caller sends the request again through
    botocore, which retries, follows redirects and explains errors.
    """

    def __init__(
        self,
        client,
        make_retry_client: Callable[[], object] | None,
        credentials,
        ca_bundle: str,
        clock: ServerClock,
    ):
        self._client = client
        self._clock = clock
        self._make_retry_client = make_retry_client
        self._retry_client = None
        self._making_retry_client = threading.Lock()
        self._credentials = credentials
        self._routes: dict[tuple[str, str], Route] = {}  # by (operation, bucket)
        self._route_changes = 0
        self._local = threading.local()
        self._ssl_context = None
        self._ca_bundle = ca_bundle
        config = client.meta.config
        if (
            make_retry_client is not None
            and config.signature_version in (None, "s3v4", "v4")
            and not getattr(config, "client_cert", None)
        ):
            for operation in ("GetObject", "PutObject"):
                client.meta.events.register(f"after-call.s3.{operation}", self._learn)

    def _learn(self, http_response, context, model, **kwargs) -> None:
        """Take the route of a request botocore has just completed over the network."""
        signing = context.get("signing", {})
        params = context.get("input_params", {})
        key, (url, _, query) = params.get("Key") or "", http_response.url.partition("?")
        quoted = key_path(key)
        if (
            http_response.status_code in (200, 206)  # a whole object or a range
            and isinstance(http_response.raw, urllib3.response.HTTPResponse)
            and context.get("auth_type") == "v4"
            and signing.get("signing_name") == "s3"
            and "request_credentials" not in signing
            and key
            and url.endswith("/" + quoted)
            # No query string, or only the version asked for (as version_query writes it).
            and (not query or re.fullmatch(r"versionId=[^&]+", query))
            and not urllib.request.getproxies().get(urlsplit(url).scheme)
            and self._route_changes < MAX_ROUTE_CHANGES
        ):
            parts = urlsplit(url[: -len(quoted)])
            self._routes[model.name, params["Bucket"]] = Route(
                (parts.scheme, parts.netloc),
                host_header(parts),
                parts.path,
                SigV4(signing["region"], signing["signing_name"]),
            )

    def fallback_client(self, failure: DirectFailed):
        """The botocore client to send a request with once its direct request failed."""
        if not failure.attempted:
            return self._client
        with self._making_retry_client:
            if self._retry_client is None:
                self._retry_client = self._make_retry_client()
        return self._retry_client

    def _connection(self, origin: tuple[str, str]) -> http.client.HTTPConnection:
        """This thread's kept-alive connection to (scheme, host[:port])."""
        connections = self._local.__dict__.setdefault("connections", {})
        if origin not in connections:
            scheme, netloc = origin
            if scheme == "https":
                if self._ssl_context is None:
                    self._ssl_context = ssl.create_default_context(
                        cafile=self._ca_bundle
                    )
                connections[origin] = http.client.HTTPSConnection(
                    netloc,
                    timeout=DIRECT_TIMEOUT,
                    context=self._ssl_context,
                    blocksize=CHUNK,
                )
            else:
                connections[origin] = http.client.HTTPConnection(
                    netloc, timeout=DIRECT_TIMEOUT, blocksize=CHUNK
                )
        return connections[origin]

    def _drop(self, origin: tuple[str, str]) -> None:
        """Close this thread's connection after a failure; the next request opens another."""
        connection = self._local.__dict__.get("connections", {}).pop(origin, None)
        if connection is not None:
            connection.close()

    def _send(
        self,
        operation: str,
        bucket: str,
        key: str,
        method: str,
        body: bytes | FileBody,
        headers,
        query: str = "",
        status: int = 200,
    ) -> tuple[http.client.HTTPResponse, tuple[str, str]]:
        """One signed request; its response of that status (a GET's body unread)
        and its origin. What a FileBody raises while it is sent (FileChanged)
        goes on up, the request left unfinished: the server stores nothing."""
        route = self._routes.get((operation, bucket))
        if route is None:
            raise DirectFailed(
                f"botocore has completed no {operation} yet", attempted=False
            )
        path = route.base_path + key_path(key)
        origin = route.origin
        credentials = self._credentials.get_frozen_credentials()
        if isinstance(body, FileBody):
            # As botocore signs a streamed body with a checksum header: over TLS
            # unsigned (TLS and the CRC32 guard it), else by its SHA-256.
            tls = origin[0] == "https"
            payload_hash = UNSIGNED_PAYLOAD if tls else body.sha256()
            payload, headers = b"", {**headers, "Content-Length": str(len(body))}
        else:
            payload_hash, payload = None, body
        headers = route.signer.sign(
            credentials, method, route.host, path, headers, payload, time.gmtime(),
            query, payload_hash,
        )  # fmt: skip
        headers["User-Agent"] = DIRECT_USER_AGENT
        try:
            connection = self._connection(origin)
            connection.request(
                method, f"{path}?{query}" if query else path, body, headers
            )
            response = connection.getresponse()
            if response.status != status or method != "GET":
                response.read()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self._drop(origin)
            raise DirectFailed(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            self._drop(origin)
            raise
        if response.status != status:
            stale = response.status in STALE_ROUTE_STATUSES
            if stale and self._routes.pop((operation, bucket), None) is not None:
                self._route_changes += 1
            raise DirectFailed(f"HTTP {response.status} {response.reason}")
        self._clock.saw(response.getheader("Date"))
        return response, origin

    def put(self, bucket: str, key: str, data: bytes | FileBody, args: dict) -> None:
        """PutObject of data with put_object's Metadata and PUT_HEADERS parameters."""
        unknown = set(args) - {"Metadata", *PUT_HEADERS}
        if unknown:
            raise DirectFailed(f"no direct PUT with {sorted(unknown)}", attempted=False)
        headers = as_headers(args)
        for name, value in args.get("Metadata", {}).items():
            headers[f"x-amz-meta-{name}"] = value
        self._send("PutObject", bucket, key, "PUT", data, headers)

    def get(
        self,
        bucket: str,
        key: str,
        chunk_size: int,
        version_id: str | None = None,
        sse: dict | None = None,
    ) -> FetchedObject:
        """GetObject (of one version, if given; with the SSE-C parameters `sse`):
        its metadata and its body in chunks."""
        headers = {"x-amz-checksum-mode": "ENABLED", **as_headers(sse or {})}
        response, origin = self._send(
            "GetObject", bucket, key, "GET", b"", headers, version_query(version_id)
        )
        metadata = {
            name.lower()[len("x-amz-meta-") :]: value
            for name, value in response.getheaders()
            if name.lower().startswith("x-amz-meta-")
        }
        try:
            last_modified = parse_timestamp(response.getheader("Last-Modified", ""))
        except (TypeError, ValueError) as exc:
            self._drop(origin)
            raise DirectFailed(f"Last-Modified: {exc}") from exc
        chunks = self._chunks(response, origin, chunk_size)
        return FetchedObject(metadata, last_modified.timestamp(), chunks)

    def get_range(
        self,
        bucket: str,
        key: str,
        part: tuple[int, int],
        etag: str,
        version_id: str | None,
        buffer: memoryview,
        land: Callable[[memoryview, int], None],
        sse: dict,
    ) -> None:
        """GetObject of the bytes [start, end) of the object (of one version, if
        given; with the SSE-C parameters `sse`) while its ETag is `etag`, read into
        `buffer` and handed to land(data, offset) read by read; what land raises
        ends it as it is."""
        start, end = part
        headers = {"Range": f"bytes={start}-{end - 1}", "If-Match": etag}
        headers.update(as_headers(sse))
        response, origin = self._send(
            "GetObject",
            bucket,
            key,
            "GET",
            b"",
            headers,
            version_query(version_id),
            206,
        )

        def read(view: memoryview) -> int:
            try:
                return response.readinto(view)
            except (OSError, http.client.HTTPException) as exc:
                raise DirectFailed(f"{type(exc).__name__}: {exc}") from exc

        complete = False
        try:
            try:
                check_range_answer(
                    response.getheader("Content-Range"),
                    response.getheader("Content-Length"),
                    response.getheader("ETag"),
                    part,
                    etag,
                )
            except CliError as exc:
                raise DirectFailed(str(exc)) from None
            reached = read_range(read, buffer, part, land)
            if reached != end:
                raise DirectFailed(f"got {reached - start} bytes of {end - start}")
            complete = True
        finally:
            if not complete:
                self._drop(origin)

    def _chunks(
        self, response: http.client.HTTPResponse, origin, chunk_size: int
    ) -> Iterator[bytes]:
        """The body, checked against its Content-Length and any whole-object CRC32,
        else the MD5 its ETag or md5chksum states."""
        expected_crc = response.getheader("x-amz-checksum-crc32")
        if expected_crc and "-" in expected_crc:
            expected_crc = None  # a multipart object's checksum of part checksums
        # Servers without S3's additional checksums (Ceph RGW before 18) send none.
        expected_md5 = None if expected_crc else response_md5(response)
        md5 = hashlib.md5(usedforsecurity=False) if expected_md5 else None
        length = response.getheader("Content-Length")
        crc = received = 0
        complete = False
        try:
            while chunk := response.read(chunk_size):
                crc = zlib.crc32(chunk, crc)
                if md5:
                    md5.update(chunk)
                received += len(chunk)
                yield chunk
            complete = True
        except (OSError, http.client.HTTPException) as exc:
            raise DirectFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if not complete:
                self._drop(origin)
        if length is None or received != int(length):
            raise DirectFailed(f"got {received} bytes of {length}")
        if expected_crc and crc32_header(crc) != expected_crc:
            raise DirectFailed("the body does not match its CRC32 checksum")
        if md5 and md5.hexdigest() != expected_md5:
            raise DirectFailed("the body does not match its MD5 (ETag or md5chksum)")


# What a GetObject body read through botocore raises when the connection fails.
BODY_ERRORS = (
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
)


def range_problem(
    content_range: str | None, content_length: object, part: tuple[int, int]
) -> str | None:
    """What is wrong with the answer to a GET of the bytes [start, end), from its
    Content-Range and Content-Length; None when it holds exactly those bytes."""
    start, end = part
    if not (content_range or "").startswith(f"bytes {start}-{end - 1}/"):
        return f"asked for bytes {start}-{end - 1}, got {content_range or 'the whole object'}"
    if str(content_length) != str(end - start):
        return f"asked for {end - start} bytes, the answer holds {content_length}"
    return None


def check_range_answer(
    content_range: str | None,
    content_length: object,
    etag: str | None,
    part: tuple[int, int],
    expected_etag: str,
) -> None:
    """CliError unless the answer to a ranged GET of the bytes `part` of the
    version whose ETag is expected_etag holds exactly those bytes of it."""
    problem = range_problem(content_range, content_length, part)
    if problem:
        raise CliError(f"the server's answer to a ranged GET: {problem}")
    if etag != expected_etag:  # a server that ignores If-Match
        raise CliError(OVERWRITTEN)


def part_ranges(size: int, part_size: int) -> list[tuple[int, int]]:
    """The byte ranges [start, end) that cut an object of `size` bytes into parts
    of part_size (the last one shorter)."""
    return [
        (start, min(size, start + part_size)) for start in range(0, size, part_size)
    ]


_SEEK_AND_WRITE = threading.Lock()


def write_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of data at offset in fd, from any thread: os.pwrite, or on Windows
    (which has none) a seek and a write, one thread at a time."""
    while data:  # a write may take fewer bytes than given
        if hasattr(os, "pwrite"):
            written = os.pwrite(fd, data, offset)
        else:
            with _SEEK_AND_WRITE:
                os.lseek(fd, offset, os.SEEK_SET)
                written = os.write(fd, data)
        data, offset = data[written:], offset + written


def body_reader(body) -> Callable[[memoryview], int]:
    """readinto of a GetObject's streamed body; botocore before 1.38.20 has none: read and copy."""
    if hasattr(body, "readinto"):
        return body.readinto

    def read_and_copy(view: memoryview) -> int:
        data = body.read(len(view))
        view[: len(data)] = data
        return len(data)

    return read_and_copy


def read_range(
    read: Callable[[memoryview], int],
    buffer: memoryview,
    part: tuple[int, int],
    land: Callable[[memoryview, int], None],
) -> int:
    """Read the body of a GET of the bytes [start, end) with read(view) -> count into
    buffer, handing each read to land(data, offset); the offset it reached (end,
    unless the body ended early)."""
    offset, end = part
    while offset < end:
        count = read(buffer[: min(len(buffer), end - offset)])
        if not count:
            break
        land(buffer[:count], offset)
        offset += count
    return offset


def response_md5(response: http.client.HTTPResponse) -> str | None:
    """The MD5 a GetObject answer states for its body, as object_md5 reads a HEAD's:
    the ETag where that is the MD5, else the md5chksum metadata, else None."""
    return object_md5(
        {
            "ETag": response.getheader("ETag", ""),
            "ServerSideEncryption": response.getheader(
                "x-amz-server-side-encryption", ""
            ),
            "SSECustomerAlgorithm": response.getheader(
                "x-amz-server-side-encryption-customer-algorithm"
            ),
            "Metadata": {
                MD5_METADATA: response.getheader(f"x-amz-meta-{MD5_METADATA}")
            },
        }
    )


def goes_direct(size: int | None, storage_class: str) -> bool:
    """Whether a whole-object GET goes direct: an object of at most SMALL_OBJECT
    bytes (its size known from the listing), not archived (that GET fails either
    way, and botocore says why)."""
    return (
        size is not None
        and size <= SMALL_OBJECT
        and storage_class not in ARCHIVE_STORAGE_CLASSES
    )


class Store:
    """The one door to S3 of a run, for one bucket: every request of both scripts
    goes through its verbs, which say what the script wants (list, get, put,
    upload_file, ...) and never how it is sent.

    It owns the botocore client, the direct path (DirectRequests) and its fallback
    to botocore, the transfer manager of multipart uploads, the part workers of
    large downloads, the --bwlimit bucket and the run's cancellation. The options
    that go on every upload (storage class, encryption, the Object Lock of
    backup.py --lock-days) are given to it once, in `put_options` and `lock`,
    and the customer key (--sse-c-key-file) in `key`: on every upload, HEAD and
    GET of every path (see _read for objects that have none).

    Which path a request takes is decided here, by size: whole objects up to
    SMALL_OBJECT go direct (and back to botocore when that fails), larger ones
    through botocore, multipart uploads through s3transfer, and the parts of
    large downloads as direct ranged GETs on the part workers. Built by connect()
    for a run; tests build one around moto's in-process client with Store(client,
    bucket), whose requests all go through botocore.
    """

    def __init__(
        self,
        client,
        bucket: str,
        region: str = "us-east-1",
        direct: DirectRequests | None = None,
        clock: ServerClock | None = None,
        bandwidth: TokenBucket | None = None,
        put_options: dict | None = None,
        key: CustomerKey | None = None,
    ):
        self.client = client
        self.bucket = bucket
        self.region = region
        self.clock = clock or ServerClock()
        self.bandwidth = bandwidth  # None without --bwlimit
        # StorageClass, ServerSideEncryption, SSEKMSKeyId: on every upload.
        self.put_options = dict(put_options or {})
        self.key = key
        # backup.py --lock-days: its LockPolicy (upload_args(now), mode), once known.
        self.lock = None
        self.cancelled = threading.Event()  # set on Ctrl-C or a failed plan
        self._direct = direct or DirectRequests(client, None, None, "", self.clock)
        self._manager = None
        self._making_manager = threading.Lock()
        self._parts = PartWorkers(DOWNLOAD_PART_WORKERS)
        self._buffers = threading.local()  # each part worker's read buffer
        # The checks of the multipart uploads under way, by key: each is called
        # before its parts are joined, and what it raises fails (and aborts) it.
        self._before_complete: dict[str, Callable[[], None]] = {}
        client.meta.events.register(
            "before-parameter-build.s3.CompleteMultipartUpload", self._check_complete
        )

    # --- How a run stops ----------------------------------------------------

    def cancel(self) -> None:
        """Ctrl-C or a failed plan: waits see `cancelled`, multipart uploads abort."""
        self.cancelled.set()
        if self._manager is not None:
            # TransferManager.shutdown(cancel=True) passes its arguments on in the
            # wrong order and raises TypeError (boto/s3transfer#143); leaving it as
            # a context manager does on KeyboardInterrupt cancels (and aborts) them.
            self._manager.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)

    def close(self) -> None:
        """Wait for the transfers under way, and end the part workers. After
        cancel(), cancel again instead: an upload handed to the manager while it
        was shutting down stays registered but never runs, and waiting for it
        would never end."""
        if self.cancelled.is_set():
            self.cancel()
        elif self._manager is not None:
            self._manager.shutdown()
        self._parts.close()

    def _pace(self, nbytes: int) -> None:
        """--bwlimit: wait until nbytes may move (Cancelled on Ctrl-C meanwhile)."""
        if self.bandwidth:
            self.bandwidth.pace(nbytes, self.cancelled)

    def _paced(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self._pace(len(chunk))
            yield chunk

    # --- The bucket ---------------------------------------------------------

    def bucket_exists(self) -> bool:
        """HeadBucket: False for a missing bucket; a 403 explained (reason_for_forbidden)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except botocore.exceptions.ClientError as exc:
            code = client_error_code(exc)
            if code in ("404", "NoSuchBucket"):
                return False
            raise self.reason_for_forbidden(exc) if code == "403" else exc from None

    def reason_for_forbidden(self, forbidden: BaseException) -> BaseException:
        """HeadBucket's 403 has no body, so it cannot tell a wrong secret key from
        another account's bucket; a listing of no keys answers with an error code."""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=0)
        except botocore.exceptions.ClientError as exc:
            return exc
        return forbidden

    def create_bucket(self, lock: bool = False) -> None:
        """CreateBucket in the Store's region (with Object Lock, if `lock`), and
        wait until it exists; one of ours already there is fine."""
        # us-east-1 is the default location and refuses to be named as a constraint.
        options = {}
        if self.region != "us-east-1":
            options["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        if lock:  # and with it versioning, which nothing can turn off
            options["ObjectLockEnabledForBucket"] = True
        try:
            self.client.create_bucket(Bucket=self.bucket, **options)
        except botocore.exceptions.ClientError as exc:
            if client_error_code(exc) != "BucketAlreadyOwnedByYou":
                raise
        self.client.get_waiter("bucket_exists").wait(
            Bucket=self.bucket, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
        )

    def versioning(self) -> str:
        """GetBucketVersioning's status: "Enabled", "Suspended" or "" (never turned on)."""
        return self.client.get_bucket_versioning(Bucket=self.bucket).get("Status", "")

    def enable_versioning(self) -> None:
        self.client.put_bucket_versioning(
            Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"}
        )

    def lifecycle(self) -> tuple[list[dict], dict]:
        """The bucket's lifecycle rules, and the other settings to send back with them."""
        try:
            answer = self.client.get_bucket_lifecycle_configuration(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            if client_error_code(exc) == "NoSuchLifecycleConfiguration":
                return [], {}
            raise
        extra = {}
        if "TransitionDefaultMinimumObjectSize" in answer:
            extra["TransitionDefaultMinimumObjectSize"] = answer[
                "TransitionDefaultMinimumObjectSize"
            ]
        return answer.get("Rules", []), extra

    def set_lifecycle(self, rules: list[dict], extra: dict) -> None:
        self.client.put_bucket_lifecycle_configuration(
            Bucket=self.bucket, LifecycleConfiguration={"Rules": rules}, **extra
        )

    def lock_configuration(self) -> dict:
        """GetObjectLockConfiguration's configuration ({} where there is none)."""
        try:
            answer = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            if client_error_code(exc) != "ObjectLockConfigurationNotFoundError":
                raise
            return {}
        return answer.get("ObjectLockConfiguration", {})

    def enable_lock(self) -> None:
        self.client.put_object_lock_configuration(
            Bucket=self.bucket,
            ObjectLockConfiguration={"ObjectLockEnabled": "Enabled"},
        )

    # --- Listings -------------------------------------------------------------

    def list(
        self, prefix: str, boundaries: Sequence[str] = (), workers: int = 1
    ) -> Iterator[RemoteObject]:
        """Every object whose key starts with `prefix`, in key order, from paged
        ListObjectsV2 requests that start at once.

        Sorted `boundaries` cut the keys into ranges that are listed side by side on
        up to `workers` threads (LIST_RANGES_AT_ONCE at most), as many ranges ahead
        of the one read: the first range ends with boundaries[0], the next starts
        after it, and the last is everything after boundaries[-1]. A range is held
        whole until it is read; one that reaches the end of the prefix ends the
        listing, without asking for the ranges after it (all empty). With no
        boundaries the pages come one ahead of the one read, none held longer:
        memory stays flat however many keys the prefix holds. A directory
        bucket, or a server that lists out of order (UnorderedServer), is listed
        whole, without ranges, and sorted.
        """
        # One paginator for all ranges: one a thread would load botocore's paginator
        # model again before its first request (bench/RESULTS.md, W4 without HeadBucket).
        paginator = self.client.get_paginator("list_objects_v2")
        bucket = self.bucket

        def whole() -> Iterator[RemoteObject]:
            """The listing held whole and put in order: of a server that lists in no
            particular order and takes no StartAfter (as we can use it)."""
            listed = call_failing_fast(
                lambda: list_range(paginator, bucket, prefix, any_order=True)[0]
            )
            return iter(sorted(listed.result(), key=lambda obj: obj.key))

        if bucket.endswith(DIRECTORY_BUCKET_SUFFIX):
            return whole()
        if boundaries:
            ranges = zip(("", *boundaries), (*boundaries, None))
            at_once = min(workers, LIST_RANGES_AT_ONCE)
            listings = map_failing_fast(
                lambda bounds: list_range(paginator, bucket, prefix, *bounds),
                ranges,
                at_once,
                ahead=at_once,
            )
        else:
            pages = paginator.paginate(
                Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE}
            )
            listings = ((listed_objects(page), False) for page in pages_ahead(pages))

        def objects() -> Iterator[RemoteObject]:
            try:
                for listed, at_end in listings:
                    yield from listed
                    if at_end:
                        return
            except UnorderedServer:
                # Raised by the first page of the first range, before any object
                # of it is yielded.
                yield from whole()

        return objects()

    def version_pages(
        self, prefix: str, through: str | None = None
    ) -> Iterator[list[ObjectVersion]]:
        """Every version and delete marker under `prefix` (up to the key `through`,
        if given), one ListObjectVersions page at a time: its versions, then its
        markers.

        botocore's paginator carries both NextKeyMarker and NextVersionIdMarker on as
        KeyMarker and VersionIdMarker, and goes on while IsTruncated: a key with more
        versions than a page, or a page that holds only delete markers, ends nothing.
        """
        pages = self.client.get_paginator("list_object_versions").paginate(
            Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE}
        )
        for page in pages:
            # Delete markers have no Size, StorageClass or ETag.
            entries = [
                ObjectVersion(
                    item["Key"],
                    item["VersionId"],
                    item["LastModified"].timestamp(),
                    item.get("IsLatest", False),
                    item.get("Size"),
                    item.get("StorageClass", "STANDARD"),
                    item.get("ETag", "").strip('"'),
                )
                for item in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
            ]
            yield entries
            # Keys are listed in order: once past `through`, later pages hold none of it.
            if through is not None and any(v.key > through for v in entries):
                break

    def incomplete_uploads(self, prefix: str) -> Iterator[tuple[str, str, float]]:
        """(key, upload ID, initiated) of each incomplete multipart upload under prefix."""
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                yield upload["Key"], upload["UploadId"], upload["Initiated"].timestamp()

    # --- Objects: reading -----------------------------------------------------

    def _read(self, call: Callable[..., T], **params) -> T:
        """call(**params), a HEAD or a GET of an object, with the customer key if
        there is one.

        Every server refuses an object that has a customer key without it (400),
        and with another key (400 or 403); AWS refuses the key on an object that
        has none, where Ceph RGW and SeaweedFS ignore it. So a refusal with the
        key is asked again without it: answered, the object has no customer key;
        refused (400), it has another one. Raised then as CustomerKeyError."""
        if self.key is None:
            try:
                return call(**params)
            except botocore.exceptions.ClientError as exc:
                if http_status(exc) == 400:
                    raise CustomerKeyError(NEEDS_KEY) from None
                raise
        try:
            return call(**params, **self.key.params)
        except botocore.exceptions.ClientError as exc:
            if http_status(exc) not in (400, 403):
                raise
            refused = exc
        try:
            return call(**params)
        except botocore.exceptions.ClientError as exc:
            if http_status(exc) == 400:
                raise CustomerKeyError(ANOTHER_KEY) from None
            raise refused from None

    def head(self, key: str, version_id: str | None = None) -> dict:
        """HeadObject (of one version, if given)."""
        return self._read(
            self.client.head_object,
            Bucket=self.bucket,
            Key=key,
            **version_param(version_id),
        )

    def md5(self, key: str, version_id: str | None = None) -> str | None:
        """One HEAD: the object's MD5 (object_md5), None if it has none, is gone,
        or is encrypted with a customer key while the run has none."""
        try:
            head = self.head(key, version_id)
        except CustomerKeyError:
            if self.key:  # another key than the run's: said, not taken for a change
                raise
            return None
        except botocore.exceptions.ClientError as exc:
            if client_error_code(exc) in ("404", "NoSuchKey"):
                return None
            raise
        return object_md5(head)

    def etag_is_md5(self, size: int) -> bool:
        """Whether an upload of `size` bytes will have its MD5 as its ETag: a single
        PutObject without SSE-KMS or a customer key (md5chksum is for the others)."""
        encryption = self.put_options.get("ServerSideEncryption", "")
        return not (
            size >= MULTIPART_THRESHOLD or encryption.startswith("aws:kms") or self.key
        )

    def customer_keys_blocked(self) -> bool:
        """Whether the bucket refuses uploads with a customer key (GetBucketEncryption's
        BlockedEncryptionTypes, AWS's default for new buckets since April 2026);
        False where the server keeps no such setting."""
        try:
            answer = self.client.get_bucket_encryption(Bucket=self.bucket)
        except botocore.exceptions.ClientError:
            return False  # none set, or not a setting this server has
        rules = answer.get("ServerSideEncryptionConfiguration", {}).get("Rules", [])
        blocked = [rule.get("BlockedEncryptionTypes", {}) for rule in rules]
        return any("SSE-C" in types.get("EncryptionType", ()) for types in blocked)

    def get(
        self,
        key: str,
        use: Callable[[FetchedObject], T],
        version_id: str | None = None,
        size: int | None = None,
        storage_class: str = "STANDARD",
    ) -> T:
        """use() the object (of one version, if given) from one GetObject, its
        chunks held to --bwlimit.

        A small object (goes_direct, by its listed `size`) goes direct, with no
        HEAD first; if that fails at any point, its body included, botocore
        fetches it again, with its retries and error messages.
        """
        client = self.client
        if goes_direct(size, storage_class):
            sse = self.key.params if self.key else None
            try:
                fetched = self._direct.get(self.bucket, key, CHUNK, version_id, sse)
                return use(
                    dataclasses.replace(fetched, chunks=self._paced(fetched.chunks))
                )
            except DirectFailed as failure:
                client = self._direct.fallback_client(failure)
        response = self._read(
            client.get_object, Bucket=self.bucket, Key=key, **version_param(version_id)
        )
        chunks = self._paced(response["Body"].iter_chunks(CHUNK))
        return use(
            FetchedObject(
                response["Metadata"], response["LastModified"].timestamp(), chunks
            )
        )

    def metadata(
        self,
        key: str,
        version_id: str | None = None,
        size: int | None = None,
        storage_class: str = "STANDARD",
    ) -> tuple[dict, float]:
        """The object's user metadata and LastModified. A small object's come from
        a GET on the direct path, its body read and dropped: there that costs less
        client CPU than botocore's HEAD."""
        if goes_direct(size, storage_class):

            def drained(fetched: FetchedObject) -> tuple[dict, float]:
                for _ in fetched.chunks:
                    pass
                return fetched.metadata, fetched.last_modified

            return self.get(key, drained, version_id, size, storage_class)
        head = self.head(key, version_id)
        return head["Metadata"], head["LastModified"].timestamp()

    def get_parts(
        self,
        key: str,
        head: dict,
        fd: int,
        progress: Callable[[int], None],
        version_id: str | None = None,
    ) -> None:
        """The object whose HEAD is `head` written into fd, in parts of
        DOWNLOAD_PART bytes fetched side by side on the part workers, each of the
        version whose ETag the HEAD gave (If-Match), never of one written since;
        progress(nbytes) for each read written (negative: bytes to come again)."""
        stop = threading.Event()
        size, etag = head["ContentLength"], head["ETag"]
        # The HEAD says whether the object has a customer key (AWS refuses one
        # on an object that has none).
        sse = self.key.params if self.key and "SSECustomerAlgorithm" in head else {}
        self._parts.run_all(
            [
                functools.partial(
                    self._get_part, key, etag, version_id, sse, part, fd, progress, stop
                )
                for part in part_ranges(size, DOWNLOAD_PART)
            ],
            stop,
        )

    def _buffer(self) -> memoryview:
        """This part worker's buffer."""
        if not hasattr(self._buffers, "view"):
            self._buffers.view = memoryview(bytearray(DOWNLOAD_BUFFER))
        return self._buffers.view

    def _get_part(
        self, key, etag, version_id, sse, part, fd, progress, stop: threading.Event
    ) -> None:
        """Write the bytes `part` of the object at their offset in fd: a direct
        ranged GET, else botocore's, asked again while its body breaks off;
        `stop` set means another part of the file failed."""
        landed = 0  # bytes of this part written (and shown) so far

        def land(data: memoryview, offset: int) -> None:
            nonlocal landed
            if self.cancelled.is_set() or stop.is_set():
                raise Cancelled()
            self._pace(len(data))
            write_all(fd, data, offset)
            landed += len(data)
            progress(len(data))

        try:
            self._direct.get_range(
                self.bucket, key, part, etag, version_id, self._buffer(), land, sse
            )
            return
        except DirectFailed as failure:
            client = self._direct.fallback_client(failure)
        start, end = part
        for attempt in range(1, BODY_ATTEMPTS + 1):
            progress(-landed)  # those bytes come again
            landed = 0
            response = client.get_object(
                Bucket=self.bucket,
                Key=key,
                Range=f"bytes={start}-{end - 1}",
                IfMatch=etag,
                **version_param(version_id),
                **sse,
            )
            try:
                check_range_answer(
                    response.get("ContentRange"),
                    response.get("ContentLength"),
                    response.get("ETag"),
                    part,
                    etag,
                )
                body = body_reader(response["Body"])
                reached = read_range(body, self._buffer(), part, land)
                if reached != end:
                    raise botocore.exceptions.IncompleteReadError(
                        actual_bytes=reached - start, expected_bytes=end - start
                    )
                return
            except BODY_ERRORS:
                # botocore retries until the answer starts, not while its body comes.
                if attempt == BODY_ATTEMPTS:
                    raise
            finally:
                response["Body"].close()

    # --- Objects: writing -----------------------------------------------------

    def _upload_args(self, args: dict) -> dict:
        """args with the options of every upload (the customer key among them)
        and, with a lock, its headers."""
        args = {**args, **self.put_options, **(self.key.params if self.key else {})}
        if self.lock is not None:
            args.update(self.lock.upload_args(time.time()))
        return args

    def put(
        self, key: str, data: bytes | FileBody, args: dict, plain: bool = False
    ) -> None:
        """One PutObject of data (bytes, or a FileBody streamed from its file)
        with put_object's `args` (Metadata, ContentType), the options of every
        upload (none if `plain`: a record of the tool's own) and a CRC32 of the
        data: direct for a small body, else through botocore.

        Our own checksum header, so that botocore streams no aws-chunked body
        with a trailing one (see connect), direct or not; a locked bucket takes
        no upload without one. The body is let through --bwlimit whole (it is
        under MULTIPART_THRESHOLD): over http both ways read it once more for
        the payload's hash before they send it.
        """
        self._pace(len(data))
        crc = data.crc32 if isinstance(data, FileBody) else zlib.crc32(data)
        args = {
            **(args if plain else self._upload_args(args)),
            "ChecksumAlgorithm": "CRC32",
            "ChecksumCRC32": crc32_header(crc),
        }
        client = self.client
        if len(data) <= SMALL_OBJECT:
            try:
                self._direct.put(self.bucket, key, data, args)
                return
            except DirectFailed as failure:
                client = self._direct.fallback_client(failure)
        if isinstance(data, FileBody):
            data.seek(0)  # botocore sends it again from where it finds it
        client.put_object(Bucket=self.bucket, Key=key, Body=data, **args)

    def upload_file(
        self,
        path: str,
        key: str,
        size: int,
        args: dict,
        progress: Callable[[int], None],
        before_complete: Callable[[], None],
    ) -> None:
        """A multipart upload of the file at path (`size` bytes when the upload
        began), its parts read by name and sent
        side by side (PART_WORKERS), each with its checksum, through s3transfer.

        before_complete() is called before the parts are joined; what it raises
        fails the upload, which s3transfer then aborts. With a lock, every part
        carries a CRC32 (S3 takes no upload to a locked bucket without a
        checksum), and PutObjectRetention always follows the upload: moto and Ceph
        RGW 16 drop the lock of CreateMultipartUpload, and finding that out would
        take a HeadObject, a request all the same.
        """
        args = self._upload_args(args)
        if self.lock is not None:
            args["ChecksumAlgorithm"] = "CRC32"
        subscribers = [TransferProgress(size, progress, self._pace)]
        self._before_complete[key] = before_complete
        try:
            self._transfer_manager().upload(
                path, self.bucket, key, extra_args=args, subscribers=subscribers
            ).result()
        finally:
            del self._before_complete[key]
        if self.lock is not None:
            until = parse_timestamp(args["ObjectLockRetainUntilDate"]).timestamp()
            self.put_retention(key, self.lock.mode, until)

    def _check_complete(self, params, **kwargs) -> None:
        """botocore's event before each CompleteMultipartUpload is built."""
        check = self._before_complete.get(params["Key"])
        if check is not None:
            check()

    def _transfer_manager(self):
        """boto3's transfer manager, made on first use: a run with nothing large to
        upload never imports it."""
        with self._making_manager:
            if self._manager is None:
                self._manager = create_transfer_manager(self.client)
            return self._manager

    def delete(self, keys: Iterable[str]) -> Iterator[tuple[str, Exception | None]]:
        """DeleteObjects of the keys, DELETE_BATCH at a time: each key, and why it
        could not be deleted (None: deleted). No VersionId: on a versioned bucket
        each delete places a delete marker, which Object Lock allows."""
        keys = iter(keys)
        while batch := list(itertools.islice(keys, DELETE_BATCH)):
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                )
            except botocore.exceptions.ClientError as exc:
                yield from ((key, exc) for key in batch)
                continue
            failed = {error["Key"]: error for error in response.get("Errors", [])}
            for key in batch:
                error = failed.get(key)
                if error is None:
                    yield key, None
                else:
                    yield key, CliError(f"{error.get('Code')}: {error.get('Message')}")

    def abort_upload(self, key: str, upload_id: str) -> None:
        self.client.abort_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload_id
        )

    def put_retention(self, key: str, mode: str, until: float) -> None:
        """PutObjectRetention of the key's current version (never with a bypass)."""
        self.client.put_object_retention(
            Bucket=self.bucket,
            Key=key,
            Retention={
                "Mode": mode,
                "RetainUntilDate": datetime.fromtimestamp(until, UTC),
            },
        )

    def lock_of(self, key: str) -> tuple[str | None, float | None]:
        """The mode and the end (seconds) of the lock of the key's current version,
        from HeadObject (moto answers no GetObjectRetention); (None, None) without one."""
        head = self.head(key)
        until = head.get("ObjectLockRetainUntilDate")
        return head.get("ObjectLockMode"), (until.timestamp() if until else None)


def client_config(pool_size: int, attempts: int, endpoint_url: str | None) -> Config:
    """The botocore client's configuration."""
    return Config(
        max_pool_connections=pool_size,
        retries={"mode": "standard", "total_max_attempts": attempts},
        # Local and S3-compatible servers rarely resolve bucket sub-domains.
        s3={"addressing_style": "path"} if endpoint_url else None,
        # botocore 1.36+ sends every streamed upload over https as aws-chunked
        # with a trailing CRC32, which Ceph RGW before 18 refuses
        # (XAmzContentSHA256Mismatch) and other S3-compatible servers may too.
        # Over http botocore signs the payload's SHA-256 instead, over https TLS
        # guards it, and small files carry a CRC32 header of our own (Store.put).
        request_checksum_calculation="when_required" if endpoint_url else None,
        user_agent_extra="s3backup",
    )


def customer_key(
    args: argparse.Namespace, console: Console | None
) -> CustomerKey | None:
    """--sse-c-key-file's key (None without it), its file's warning said; refused
    for an endpoint of plain http but on loopback (exit 2)."""
    if args.sse_c_key_file is None:
        return None
    key, warning = read_customer_key(args.sse_c_key_file)
    if warning and console:
        console.warning(warning)
    problem = cleartext_problem(endpoint_url_from(args))
    if problem:
        raise usage_error(problem)
    return key


def connect(
    args: argparse.Namespace,
    bucket: str,
    console: Console | None = None,
    put_options: dict | None = None,
) -> Store:
    """The run's Store for `bucket`: one S3 client, after checking there are
    credentials to sign with, the options of every upload and the customer key.
    Called before the run starts any thread: glibc's malloc is told to share one
    arena first."""
    key = customer_key(args, console)
    limit_malloc_arenas()
    # A connection for each worker, and for each part in flight.
    pool_size = args.workers + max(PART_WORKERS, DOWNLOAD_PART_WORKERS)
    core = botocore.session.Session(profile=args.profile)
    # dateutil's parsing of LastModified was much of a no-change backup's CPU
    # (bench/RESULTS.md, measured choices).
    core.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=parse_timestamp
    )
    credentials = core.get_credentials()
    if credentials is None:
        raise botocore.exceptions.NoCredentialsError()
    region = args.region or core.get_config_variable("region") or "us-east-1"
    endpoint_url = endpoint_url_from(args)
    if endpoint_url:
        check_endpoint_reachable(endpoint_url)
    # A user's AWS_MAX_ATTEMPTS (or max_attempts in ~/.aws/config) wins.
    attempts = core.get_config_variable("max_attempts") or RETRY_ATTEMPTS
    config = client_config(pool_size, attempts, endpoint_url)
    clock = ServerClock()

    def make_client(client_config: Config):
        client = core.create_client(
            "s3", region_name=region, endpoint_url=endpoint_url, config=client_config
        )
        client.meta.events.register("after-call.s3", clock.after_call)
        return client

    client = make_client(config)
    # After a failed direct request botocore makes one attempt fewer, so that each
    # request is tried `attempts` times in all; with one attempt, nothing goes direct.
    # That client is made only when first needed: making a client takes time.
    make_retry_client = None
    if attempts > 1:
        retry_config = config.merge(
            Config(retries={"mode": "standard", "total_max_attempts": attempts - 1})
        )
        make_retry_client = functools.partial(make_client, retry_config)
    verify = core.get_config_variable("ca_bundle") or True
    direct = DirectRequests(
        client,
        make_retry_client,
        credentials,
        botocore.httpsession.get_cert_path(verify),
        clock,
    )
    bandwidth = TokenBucket(args.bwlimit) if args.bwlimit else None
    return Store(client, bucket, region, direct, clock, bandwidth, put_options, key)
