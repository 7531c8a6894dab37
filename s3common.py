"""What backup.py and restore.py share, in the order a reader looks for things:

- settings: sizes, worker counts and retries, each with the reason for its value;
- errors and exit codes: the one place (describe_error) that turns an exception
  into one line and an exit code;
- the command line: the shared options, --exclude/--include filters, RATE;
- locations, keys, bucket names and the metadata format, all pure: BUCKET::PREFIX,
  key to path and back, mtime and mode metadata, the MD5 an ETag or md5chksum states;
- the S3 session and listings: the client (connect), the server's clock,
  ListObjectsV2 in key order and in ranges, MD5s of files and objects
  (--checksum, --check);
- worker pools, named by what they do on a failure (and on Ctrl-C):
  map_failing_fast and call_failing_fast for reads, run_collecting_failures for
  transfers, PartWorkers for the parts of large downloads; the --bwlimit token
  bucket, and the byte budget of what workers hold in memory;
- console and summary: messages, the progress line, the closing summary, the JSON
  report, and run_cli, where each script's main begins and ends;
- the fast transfer path: the TransferEngine (boto3's transfer manager) for
  multipart uploads, and direct signed requests for small objects and for the
  parts of large downloads (read_range).
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
import ipaddress
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
    if isinstance(
        exc,
        (
            botocore.exceptions.NoCredentialsError,
            botocore.exceptions.PartialCredentialsError,
        ),
    ):
        return (
            (
                "no AWS credentials found: run 'aws configure', set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or pick a profile with --profile"
            ),
            ExitCode.FAILURE,
        )
    if isinstance(exc, botocore.exceptions.ProfileNotFound):
        return (
            (
                f"profile {exc.kwargs.get('profile')!r} is not in ~/.aws/config or "
                "~/.aws/credentials: check --profile or AWS_PROFILE"
            ),
            ExitCode.FAILURE,
        )
    if isinstance(exc, botocore.exceptions.ClientError):
        code = client_error_code(exc)
        line = _CLIENT_ERROR_LINES.get(code)
        if line is None:
            message = exc.response.get("Error", {}).get("Message")
            if not message:  # Ceph RGW leaves out most messages
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                message = f"the server answered HTTP {status} and gave no reason"
            line = f"{code}: {message}"
        return line, ExitCode.FAILURE
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return (
            f"could not connect to {exc.kwargs.get('endpoint_url')}: check the network or --endpoint-url",
            ExitCode.FAILURE,
        )
    if isinstance(
        exc, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)
    ):
        return (
            f"the connection kept failing after every retry ({exc}): run again later",
            ExitCode.FAILURE,
        )
    if isinstance(exc, botocore.exceptions.InvalidRegionError):
        return f"{exc}: check --region (e.g. eu-west-1)", ExitCode.USAGE
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return str(exc), ExitCode.FAILURE
    if isinstance(exc, UnicodeError):
        return (
            "the name is not valid UTF-8, so it cannot be an S3 key: rename it",
            ExitCode.FAILURE,
        )
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        where = f": {printable(exc.filename)}" if exc.filename else ""
        return f"{reason}{where}", ExitCode.FAILURE
    return (
        f"unexpected {type(exc).__name__}: {exc} (run with --debug for details)",
        ExitCode.FAILURE,
    )


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


# Every option's help says what it does and shows it in use (tests/test_unattended.py
# checks for the "e.g."), as `rclone copy --help` does.
def add_shared_options(parser: argparse.ArgumentParser) -> None:
    """The options both scripts take."""
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


# --- The S3 session, listings and MD5s of files and objects ------------------


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
class Connection:
    """The run's S3 client and what goes with it."""

    client: object  # a botocore S3 client, shared by every thread
    region: str
    direct: DirectRequests  # the same client's small-object requests, sent directly
    clock: ServerClock  # the time of the latest answer of either
    bandwidth: TokenBucket | None = None  # --bwlimit, shared by every transfer


def connect(args: argparse.Namespace, pool_size: int) -> Connection:
    """One S3 client for the run, after checking there are credentials to sign with."""
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
    config = Config(
        max_pool_connections=pool_size,
        retries={"mode": "standard", "total_max_attempts": attempts},
        # Local and S3-compatible servers rarely resolve bucket sub-domains.
        s3={"addressing_style": "path"} if endpoint_url else None,
        # botocore 1.36+ sends every streamed upload over https as aws-chunked
        # with a trailing CRC32, which Ceph RGW before 18 refuses
        # (XAmzContentSHA256Mismatch) and other S3-compatible servers may too.
        # Over http botocore signs the payload's SHA-256 instead, over https TLS
        # guards it, and small files carry a CRC32 header of our own (put_whole).
        request_checksum_calculation="when_required" if endpoint_url else None,
        user_agent_extra="s3backup",
    )

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
    return Connection(client, region, direct, clock, bandwidth)


@dataclass(frozen=True)
class RemoteObject:
    """One object of a listing (or, for restore.py --at, one version)."""

    key: str
    size: int
    last_modified: float  # seconds since the epoch
    storage_class: str = "STANDARD"
    etag: str = ""  # as listed, without its quotes
    version_id: str | None = None  # a version picked by restore.py --at


def list_objects(
    client, bucket: str, prefix: str, boundaries: Sequence[str] = (), workers: int = 1
) -> Iterator[RemoteObject]:
    """Every object whose key starts with `prefix`, in key order, from paged
    ListObjectsV2 requests that start at once.

    Sorted `boundaries` cut the keys into ranges that are listed side by side on
    up to `workers` threads (LIST_RANGES_AT_ONCE at most), as many ranges ahead
    of the one read: the first range ends with boundaries[0], the next starts
    after it, and the last is everything after boundaries[-1]. A range is held
    whole until it is read; one that reaches the end of the prefix ends the
    listing, without asking for the ranges after it (all empty). A directory
    bucket, or a server that lists out of order (UnorderedServer), is listed
    whole, without ranges, and sorted.
    """
    # One paginator for all ranges: each thread asking the client for its own would
    # load botocore's paginator model again (it looks through the data folder of
    # every AWS service) before the first request goes out (bench/RESULTS.md,
    # W4 without HeadBucket).
    paginator = client.get_paginator("list_objects_v2")

    def whole() -> Iterator[RemoteObject]:
        """The listing held whole and put in order: of a server that lists in no
        particular order and takes no StartAfter (as we can use it)."""
        listed = call_failing_fast(
            lambda: list_range(paginator, bucket, prefix, any_order=True)[0]
        )
        return iter(sorted(listed.result(), key=lambda obj: obj.key))

    if bucket.endswith(DIRECTORY_BUCKET_SUFFIX):
        return whole()
    ranges = zip(("", *boundaries), (*boundaries, None))
    at_once = min(workers, LIST_RANGES_AT_ONCE)
    listings = map_failing_fast(
        lambda bounds: list_range(paginator, bucket, prefix, *bounds),
        ranges,
        at_once,
        ahead=at_once,
    )

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


class UnorderedServer(Exception):
    """A listing from a server known not to list in S3's key order."""


# The Server header of servers whose ListObjectsV2 is not in S3's key order and
# whose StartAfter skips keys, measured: SeaweedFS 4.48 lists a folder's keys
# before its siblings' that sort before "/" ("a/x" before "a-b", "a.txt"), in
# versioned buckets non-ASCII names before the others, and after
# StartAfter="a-b/z" it leaves out "a/x".
UNORDERED_SERVERS = ("SeaweedFS",)


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
    under it sorts after them), from a client's list_objects_v2 paginator.

    UnorderedServer from an UNORDERED_SERVERS one, unless `any_order` (the
    caller lists it whole and sorts it)."""
    params = {"Bucket": bucket, "Prefix": prefix}
    if after:
        params["StartAfter"] = after
    pages = paginator.paginate(**params, PaginationConfig={"PageSize": LIST_PAGE})
    objects = []
    for page in pages:
        headers = page.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        server = headers.get("server", "")
        if not any_order and server.startswith(UNORDERED_SERVERS):
            raise UnorderedServer(server)
        contents = page.get("Contents", [])
        for item in contents:
            # S3 lists keys in UTF-8 byte order, which is the order of str.
            if through is not None and item["Key"] > through:
                return objects, False
            objects.append(
                RemoteObject(
                    item["Key"],
                    item["Size"],
                    item["LastModified"].timestamp(),
                    item.get("StorageClass", "STANDARD"),
                    item.get("ETag", "").strip('"'),
                )
            )
        # A page that ends on `through` ends the range, without asking for another.
        if through is not None and contents and contents[-1]["Key"] == through:
            return objects, not page.get("IsTruncated")
    return objects, True


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


@dataclass
class Contents:
    """MD5s (hex) of files and of their objects, keyed by S3 key."""

    local: dict[str, str] = field(default_factory=dict)
    remote: dict[str, str | None] = field(default_factory=dict)  # None: not known
    # Files that could not be read, by key.
    failures: list[Failure] = field(default_factory=list)


def head_md5(
    client, bucket: str, key: str, version_id: str | None = None
) -> str | None:
    """One HEAD (of one version, if given): the object's MD5 (object_md5), or None
    if it has none or is gone."""
    versioned = {"VersionId": version_id} if version_id else {}
    try:
        head = client.head_object(Bucket=bucket, Key=key, **versioned)
    except botocore.exceptions.ClientError as exc:
        # 400: S3's answer to a HEAD of an SSE-C object without its key, whose
        # MD5 is not to be had.
        if client_error_code(exc) in ("404", "NoSuchKey", "400"):
            return None
        raise
    return object_md5(head)


def both_md5s(
    client, bucket: str, key: str, path: str, obj: RemoteObject
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
        return local, head_md5(client, bucket, key, obj.version_id)
    except botocore.exceptions.ClientError as exc:
        raise runtime_error(
            f"cannot read the metadata of s3://{bucket}/{key}", exc
        ) from None


def compare_contents(
    client, bucket: str, candidates: dict[str, tuple[str, RemoteObject]], workers: int
) -> Contents:
    """Hash each candidate (key: (file path, its object)) and find its object's MD5
    (both_md5s), on `workers` threads."""

    keys = sorted(candidates)
    md5s = map_failing_fast(
        lambda key: both_md5s(client, bucket, key, *candidates[key]), keys, workers
    )
    contents = Contents()
    for key in keys:
        local, remote = next(md5s)
        if isinstance(local, OSError):
            contents.failures.append(Failure(key, local))
        else:
            contents.local[key], contents.remote[key] = local, remote
    return contents


# --- Worker pools, the --bwlimit token bucket, the byte budget ---------------


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

    def take(self, nbytes: int, cancel: threading.Event) -> None:
        """Wait until nbytes may move; Cancelled when the run is interrupted meanwhile."""
        delay = self.book(nbytes)
        if delay > 0 and cancel.wait(delay):
            raise Cancelled()


class BandwidthSubscriber:
    """Holds each read of one s3transfer upload to the run's TokenBucket; s3transfer
    calls on_progress by name, from the thread that moves the bytes, and not for
    reads that only compute a checksum."""

    def __init__(self, bandwidth: TokenBucket, cancel: threading.Event):
        self._bandwidth = bandwidth
        self._cancel = cancel

    def on_progress(self, future, bytes_transferred, **kwargs):
        # A retry reports the bytes it goes back over as negative progress.
        if bytes_transferred > 0:
            self._bandwidth.take(bytes_transferred, self._cancel)


def throttled(
    chunks: Iterable[bytes], bandwidth: TokenBucket, cancel: threading.Event
) -> Iterator[bytes]:
    """The chunks, each let through when the bucket has room for it."""
    for chunk in chunks:
        bandwidth.take(len(chunk), cancel)
        yield chunk


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


# A thread waiting for room in a ByteBudget looks at the run's cancel event this
# often: Ctrl-C stops it within this many seconds.
CANCEL_CHECK_SECONDS = 0.1


class ByteBudget:
    """At most `limit` bytes held at once across every thread that takes from it.

    Takers are served in the order they came: one that does not fit waits, and
    so do those behind it, so a large taker is never passed over for ever. A
    taker of more than the whole budget takes the whole budget (it waits until
    nothing else is held): any size passes.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._free = limit
        self._lock = threading.Lock()
        self._waiting: collections.deque[threading.Condition] = collections.deque()

    def take(self, nbytes: int, cancel: threading.Event) -> int:
        """Wait until nbytes fit; the bytes taken (at most the whole budget).
        Cancelled when the run is interrupted meanwhile."""
        nbytes = min(nbytes, self.limit)
        with self._lock:
            if not self._waiting and nbytes <= self._free:
                self._free -= nbytes
                return nbytes
            turn = threading.Condition(self._lock)
            self._waiting.append(turn)
            try:
                while self._waiting[0] is not turn or nbytes > self._free:
                    if cancel.is_set():
                        raise Cancelled()
                    turn.wait(CANCEL_CHECK_SECONDS)
                self._free -= nbytes
            finally:
                self._waiting.remove(turn)
                self._wake_next()
        return nbytes

    def give(self, nbytes: int) -> None:
        """Give back bytes that take() returned."""
        with self._lock:
            self._free += nbytes
            self._wake_next()

    @contextlib.contextmanager
    def held(self, nbytes: int, cancel: threading.Event) -> Iterator[None]:
        """nbytes taken for the time of the with block, given back however it ends."""
        taken = self.take(nbytes, cancel)
        try:
            yield
        finally:
            self.give(taken)

    def _wake_next(self) -> None:
        # Under the lock: the first in line may fit in what is free now.
        if self._waiting:
            self._waiting[0].notify()


_END = object()  # the end of the items, in a worker's queue


def map_failing_fast(
    function: Callable[[T], R], items: Iterable[T], workers: int, ahead: int = 0
) -> Iterator[R]:
    """function(item) for each item on up to `workers` threads, started at once and
    at most `ahead` (default 2 × workers) items beyond the result awaited; the
    results in the items' order.

    On failure: no further item starts, and the exception is raised in place of
    its result. On Ctrl-C the caller stops waiting at once: the threads are
    daemons, left to end with the process (for reads only: listings, HEADs, hashes).
    """
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

    def stop_threads() -> None:
        for _ in range(threads):
            jobs.put(None)

    given = results()
    # The threads end with the results, read to the end or dropped unread.
    weakref.finalize(given, stop_threads)
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
    engine: TransferEngine | None,
    workers: int,
    ahead: int = 0,
) -> tuple[list[Failure[T]], list[T]]:
    """Call work(item, cancel) for every item on up to `workers` threads, the
    items drawn in this thread up to `ahead` (at least `workers`) before a
    thread takes them: the first item starts once `ahead` items are drawn, or
    all of them.

    Returns the failures and the items work() skipped (by returning False).

    On failure of one item, it is collected and the rest go on (as
    shutil.copytree does). On Ctrl-C, or a failure to draw the items (the
    plan's), no new item starts, the engine (if any) cancels (and so aborts)
    its transfers, running items see `cancel` set, and the exception is raised
    again once every thread has stopped.
    """
    failures: list[Failure[T]] = []
    skipped: list[T] = []
    cancel = threading.Event()
    jobs: queue.Queue = queue.Queue(maxsize=max(ahead, workers))
    # The main thread waits on the count of threads alive, never in
    # Thread.join: a join that Ctrl-C interrupts marks its thread as ended while
    # it still runs (CPython gh-90882, Python 3.12 and older).
    changed = threading.Condition()
    started = alive = 0

    def worker():
        nonlocal alive
        try:
            while (item := jobs.get()) is not _END and not cancel.is_set():
                try:
                    if work(item, cancel) is False:
                        skipped.append(item)
                # One file's failure, whatever it is, must not stop the others.
                except Exception as exc:  # noqa: BLE001
                    failures.append(Failure(item, without_locals(exc)))
        finally:
            with changed:
                alive -= 1
                changed.notify_all()

    def start_threads(count: int) -> None:
        nonlocal started, alive
        for _ in range(count):
            with changed:
                started += 1
                alive += 1
            threading.Thread(target=worker, daemon=True).start()

    def stop_threads() -> None:
        for _ in range(started):
            jobs.put(_END)
        with changed:
            changed.wait_for(lambda: alive == 0)

    try:
        for item in items:
            if not started and jobs.full():
                start_threads(workers)
            jobs.put(item)
        if not started:
            start_threads(min(workers, jobs.qsize()))
        stop_threads()
    except BaseException:
        cancel.set()
        if engine is not None:
            engine.cancel()
        # Threads waiting for an item find none but the end.
        while not jobs.empty():
            jobs.get_nowait()
        stop_threads()
        raise
    if engine is not None:
        engine.close()
    return failures, skipped


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


class ProgressSubscriber:
    """Feeds s3transfer's byte counts to the progress line (it calls on_* by name)."""

    def __init__(self, console: Console, size: int | None = None):
        self._console = console
        self._size = size

    def on_queued(self, future, **kwargs):
        if self._size is not None:
            future.meta.provide_transfer_size(self._size)

    def on_progress(self, future, bytes_transferred, **kwargs):
        self._console.advance(nbytes=bytes_transferred)


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


# --- Fast transfer path: s3transfer for large uploads, direct requests -------


def create_transfer_manager(client, open_file: Callable[[str, str], BinaryIO]):
    """boto3's transfer manager, for multipart uploads; open_file(name, mode) opens
    the files it uploads by name."""
    # Imported here, not at the top: boto3 and s3transfer take time to import,
    # and a backup with nothing to upload never needs them.
    from boto3.s3.transfer import TransferConfig
    from boto3.s3.transfer import create_transfer_manager as create
    from s3transfer.utils import OSUtils

    class Opener(OSUtils):
        def open(self, filename, mode):
            return open_file(filename, mode)

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


class TransferEngine:
    """The transfer manager for multipart uploads, created on first use (a run
    with nothing large to upload never imports it), and what stopping it means:
    cancel() on Ctrl-C cancels (and so aborts) its transfers, close() waits for
    them."""

    def __init__(self, client, open_file: Callable[[str, str], BinaryIO]):
        self._client = client
        self._open_file = open_file
        self._manager = None
        self._lock = threading.Lock()

    def manager(self):
        """boto3's transfer manager, made on the first call."""
        with self._lock:
            if self._manager is None:
                self._manager = create_transfer_manager(self._client, self._open_file)
            return self._manager

    def cancel(self) -> None:
        """Cancel (and so abort) the transfers under way (Ctrl-C)."""
        if self._manager is not None:
            # TransferManager.shutdown(cancel=True) passes its arguments on in the
            # wrong order and raises TypeError (boto/s3transfer#143); leaving it as
            # a context manager does on KeyboardInterrupt cancels (and aborts) them.
            self._manager.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)

    def close(self) -> None:
        """Wait for the transfers under way, and end."""
        if self._manager is not None:
            self._manager.shutdown()


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
    ) -> dict[str, str]:
        """The headers to send: `headers` and Host, X-Amz-Date, the payload's
        SHA-256, the session token if any, and the Authorization.

        `query` is the URL's query string, already encoded and in sorted order
        (as version_query writes it), which is then its canonical form."""
        timestamp = time.strftime("%Y%m%dT%H%M%SZ", now)
        signed = {
            name.lower(): " ".join(value.split()) for name, value in headers.items()
        }
        signed["host"] = host
        signed["x-amz-date"] = timestamp
        signed["x-amz-content-sha256"] = hashlib.sha256(payload).hexdigest()
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


def key_path(key: str) -> str:
    """A key as botocore writes it in a URL path."""
    return quote(key, safe="/~")


def version_query(version_id: str | None) -> str:
    """The query string of a request for one version of an object, as botocore writes it."""
    return "" if version_id is None else f"versionId={quote(version_id, safe='-_.~')}"


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
                    netloc, timeout=DIRECT_TIMEOUT, context=self._ssl_context
                )
            else:
                connections[origin] = http.client.HTTPConnection(
                    netloc, timeout=DIRECT_TIMEOUT
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
        body: bytes,
        headers,
        query: str = "",
        status: int = 200,
    ) -> tuple[http.client.HTTPResponse, tuple[str, str]]:
        """One signed request; its response of that status (a GET's body unread)
        and its origin."""
        route = self._routes.get((operation, bucket))
        if route is None:
            raise DirectFailed(
                f"botocore has completed no {operation} yet", attempted=False
            )
        path = route.base_path + key_path(key)
        origin = route.origin
        credentials = self._credentials.get_frozen_credentials()
        headers = route.signer.sign(
            credentials, method, route.host, path, headers, body, time.gmtime(), query
        )
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
        if response.status != status:
            stale = response.status in STALE_ROUTE_STATUSES
            if stale and self._routes.pop((operation, bucket), None) is not None:
                self._route_changes += 1
            raise DirectFailed(f"HTTP {response.status} {response.reason}")
        self._clock.saw(response.getheader("Date"))
        return response, origin

    def put(self, bucket: str, key: str, data: bytes, args: dict) -> None:
        """PutObject of data with put_object's Metadata and PUT_HEADERS parameters."""
        unknown = set(args) - {"Metadata", *PUT_HEADERS}
        if unknown:
            raise DirectFailed(f"no direct PUT with {sorted(unknown)}", attempted=False)
        headers = {
            PUT_HEADERS[name]: args[name] for name in args if name in PUT_HEADERS
        }
        for name, value in args.get("Metadata", {}).items():
            headers[f"x-amz-meta-{name}"] = value
        self._send("PutObject", bucket, key, "PUT", data, headers)

    def get(
        self, bucket: str, key: str, chunk_size: int, version_id: str | None = None
    ) -> FetchedObject:
        """GetObject (of one version, if given): its metadata and its body in chunks."""
        headers = {"x-amz-checksum-mode": "ENABLED"}
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
    ) -> None:
        """GetObject of the bytes [start, end) of the object (of one version, if
        given) while its ETag is `etag`, read into `buffer` and handed to
        land(data, offset) read by read; what land raises ends it as it is."""
        start, end = part
        headers = {"Range": f"bytes={start}-{end - 1}", "If-Match": etag}
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
            problem = range_problem(
                response.getheader("Content-Range"),
                response.getheader("Content-Length"),
                part,
            )
            if problem:
                raise DirectFailed(problem)
            if response.getheader("ETag") != etag:  # a server that ignores If-Match
                raise DirectFailed(f"ETag {response.getheader('ETag')}, not {etag}")
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
