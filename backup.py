"""Back up a folder (or one file) to S3, uploading only what changed.

usage: python backup.py LOCAL BUCKET::PREFIX [options]
       python backup.py LOCAL s3://BUCKET/PREFIX [options]

Each file becomes the object PREFIX/<path relative to LOCAL>, with its mtime
and mode in user metadata. The bucket is created when it does not exist, with
versioning on and a lifecycle rule that keeps replaced and deleted versions for
--keep-days days (restore.py --at brings them back).
"""

# ruff: noqa: UP007, UP045
# (Optional and Union, not X | Y: Python 3.9 evaluates annotations here, since
# `from __future__ import annotations` would have to come before the lines below.)
# Ctrl-C from the first instant exits 130, quietly, until run_cli takes over:
# the script's first statements, on os and _signal, which the interpreter has
# loaded before any script (signal, their wrapper, would be an import to
# interrupt); os._exit, since nothing is written yet.
import _signal
import os

_signal.signal(_signal.SIGINT, lambda signum, frame: os._exit(130))
# With awscrt installed (aws-cli v2, boto3[crt]) botocore signs with it instead of
# its Python signer, whose failures are ours to report: the CRT's print a
# traceback when a file changes or Ctrl-C stops an upload. Its own switch:
os.environ.setdefault("BOTO_DISABLE_CRT", "true")

import errno
import hashlib
import itertools
import json
import math
import mimetypes
import operator
import stat
import tempfile
import threading
import time
import zlib
from argparse import ArgumentTypeError
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import PurePath, PureWindowsPath
from typing import BinaryIO, Optional, TextIO, Union

import botocore.exceptions

from s3common import (
    CHUNK,
    LIST_PAGE,
    MD5_METADATA,
    MULTIPART_THRESHOLD,
    READ_ATTEMPTS,
    TEMPORARY_NAME,
    ArgumentParser,
    CliError,
    Console,
    ExitCode,
    Failure,
    FileBody,
    FileChanged,
    Filters,
    Location,
    RemoteObject,
    Store,
    Summary,
    add_shared_options,
    at_any_length,
    both_md5s,
    bucket_name_problem,
    call_failing_fast,
    client_error_code,
    connect,
    describe_error,
    exit_script,
    failure_line,
    file_md5,
    folder_prefix,
    format_mtime,
    format_when,
    interrupt_after,
    is_lock_state,
    is_long,
    key_error,
    key_for,
    key_length_problem,
    key_problem,
    lock_state_key,
    map_failing_fast,
    may_come_under,
    md5chksum,
    open_any,
    open_folder,
    parse_location,
    parse_mtime,
    parse_timestamp,
    positive_int,
    printable,
    relative_key,
    restore_point,
    run_cli,
    run_collecting_failures,
    runtime_error,
    usage_error,
)

# --delete's keys held in memory until the uploads end; past this many they go to
# a temporary file: some MiB at most, however many objects go (bench/RESULTS.md,
# measured choices).
DELETES_HELD = 10_000
# Uploads the plan runs ahead of the executor: their count and bytes are in the
# progress line's totals, which are final once the plan ends.
PLAN_AHEAD = 10_000
# The one lifecycle rule of our own in a bucket: found and updated by this ID.
HISTORY_RULE_ID = "s3backup-retention"
DEFAULT_KEEP_DAYS = 30
ABORT_INCOMPLETE_DAYS = 7
# Linux stamps a write's ctime from a clock that lags the real time by up to one
# tick (at most 10 ms): a file whose ctime is more than this before a read began
# was not written during the read, even where a write leaves size and mtime as
# they were (a rewrite in place within one tick).
CLOCK_SLACK_NS = 20_000_000

# --storage-class takes the storage classes S3 names.
STORAGE_CLASSES = (
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "GLACIER_IR",
    "OUTPOSTS",
    "SNOW",
    "EXPRESS_ONEZONE",
)


class Vanished(Exception):
    """The file is gone since the walk found it (deleted, or its folder renamed)."""


def vanished_line(path: str) -> str:
    """The warning for a file gone since the walk found it."""
    return f"vanished during the backup, not uploaded: {printable(path)}"


@dataclass(frozen=True)
class LocalFile:
    path: str
    size: int
    mtime_ns: int
    mode: int


# The plan's steps, one per key, in key order.


@dataclass(frozen=True)
class Upload:
    """A file to upload, and why."""

    key: str
    file: LocalFile
    # "new", "size changed", "newer", "content changed" or "no MD5 to compare"
    reason: str
    md5: Optional[str] = None  # the file's, when --checksum has hashed it already


@dataclass(frozen=True)
class Keep:
    """A file that its object already holds: skipped."""

    key: str


@dataclass(frozen=True)
class Compare:
    """A file of its object's size, to compare by content (--checksum, --check)."""

    key: str
    file: LocalFile
    remote: RemoteObject


@dataclass(frozen=True)
class Delete:
    """An object with no file (--delete)."""

    key: str


@dataclass(frozen=True)
class StaleFolder:
    """A file where the backup holds a folder: `objects` under key/ (--delete's)."""

    key: str
    file: LocalFile
    objects: int


Step = Union[Upload, Keep, Compare, Delete, StaleFolder]


@dataclass(frozen=True)
class BackupPlan:
    """A plan's steps gathered (for --check): uploads and deletes in key order."""

    uploads: tuple[Upload, ...]
    deletes: tuple[str, ...]
    skipped: int

    @classmethod
    def of(cls, steps: Iterable[Step]) -> "BackupPlan":
        uploads, deletes, skipped = [], [], 0
        for step in steps:
            if isinstance(step, Upload):
                uploads.append(step)
            elif isinstance(step, Delete):
                deletes.append(step.key)
            elif isinstance(step, Keep):
                skipped += 1
        return cls(tuple(uploads), tuple(deletes), skipped)


@dataclass(frozen=True)
class CheckReport:
    """How a backup differs from LOCAL (--check), by key."""

    missing: tuple[str, ...]  # files with no object
    changed: tuple[tuple[str, str], ...]  # (key, why): files whose object differs
    extra: tuple[str, ...]  # objects with no file
    identical: int


class EmptySource(Exception):
    """--delete with no file to back up: every object under the prefix would go."""


class OutOfOrder(CliError):
    """A listing that is not in key order, which the plan cannot merge."""

    def __init__(self, key: str, after: str):
        super().__init__(
            f"the server listed {printable(key)} after {printable(after)}, out of "
            "S3's key order (UTF-8 bytes): this server cannot be backed up to safely"
        )


@dataclass
class Scan:
    """What the walk meets besides files: warnings said at once, errors and
    vanished files counted."""

    console: Optional[Console]  # None: a walk that only looks (listing_boundaries)
    errors: int = 0
    vanished: int = 0

    def warning(self, text: str) -> None:
        if self.console:
            self.console.warning(text)

    def detail(self, text: str) -> None:
        if self.console:
            self.console.detail(text)

    def vanish(self, path: str) -> None:
        self.vanished += 1
        self.warning(vanished_line(path))

    def vanish_folder(self, path: str) -> None:
        # Its files are not known: said, not counted.
        self.warning(
            f"folder vanished during the backup, not backed up: {printable(path)}"
        )

    def error(self, action: str, path: str, error: BaseException) -> None:
        self.errors += 1
        if self.console:
            self.console.error(failure_line(action, path, error), path=path)


class DeleteKeys:
    """--delete's keys in the order given, held until the uploads end: fewer than
    DELETES_HELD in memory, the ones before them in a temporary file, one JSON
    string a line (a key may hold any character, a newline too). The file has
    no name on POSIX, and on Windows goes when it is closed: it ends with the
    run, however the run ends."""

    def __init__(self):
        self._held: list[str] = []
        self._spilled: Optional[TextIO] = None
        self._count = 0

    def append(self, key: str) -> None:
        self._held.append(key)
        self._count += 1
        if len(self._held) >= DELETES_HELD:
            if self._spilled is None:
                # Open across appends and reads, until close().
                self._spilled = tempfile.TemporaryFile("w+", encoding="ascii")  # noqa: SIM115
            self._spilled.seek(0, os.SEEK_END)
            self._spilled.writelines(json.dumps(held) + "\n" for held in self._held)
            self._held.clear()

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        if self._spilled is not None:
            self._spilled.seek(0)
            for line in self._spilled:
                yield json.loads(line)
        yield from self._held

    def close(self) -> None:
        """Remove the temporary file, if there is one."""
        if self._spilled is not None:
            self._spilled.close()


@dataclass
class Outcome:
    """What the executor did, counted as it went: the report is made of this."""

    transferred: int = 0
    nbytes: int = 0
    skipped: int = 0  # files their objects hold
    vanished: int = 0  # files gone since the walk found them
    planned: int = 0  # uploads, as the plan gives them out
    failed: list[Failure[Upload]] = field(default_factory=list)
    # The plan's, held to the end.
    deletes: DeleteKeys = field(default_factory=DeleteKeys)
    deleted: int = 0
    delete_failures: list[Failure[str]] = field(default_factory=list)


# --- Deciding: pure functions --------------------------------------------------


def upload_reason(
    local: LocalFile,
    remote: Optional[RemoteObject],
    local_md5: Optional[str] = None,
    remote_md5: Optional[str] = None,
    by_content: bool = False,
) -> Optional[str]:
    """Why a file must go up, or None when the object already matches it.

    By content, a file of the object's size matches when both MD5s are known and
    equal, whatever the mtimes; else by its mtime.
    """
    if remote is None:
        return "new"
    if remote.size != local.size:
        return "size changed"
    if by_content:
        if local_md5 is None or remote_md5 is None:
            return "no MD5 to compare"
        return None if local_md5 == remote_md5 else "content changed"
    # S3 keeps LastModified to the whole second: compare at that resolution, or
    # every file written in the second before its upload would go up again.
    if local.mtime_ns // 1_000_000_000 > remote.last_modified:
        return "newer"
    return None


def pair_by_key(
    local: Iterable[tuple[str, LocalFile]], remote: Iterable[RemoteObject]
) -> Iterator[tuple[str, Optional[LocalFile], Optional[RemoteObject]]]:
    """(key, file, object) for every key of either stream, both in key order (the
    order of str, which is S3's UTF-8 byte order), merged; OutOfOrder if one is not."""
    files, objects = iter(local), iter(remote)
    file = next(files, None)
    obj = next(objects, None)
    while file is not None or obj is not None:
        if obj is not None and (file is None or obj.key < file[0]):
            key, pair = obj.key, (obj.key, None, obj)
        elif obj is None or file[0] < obj.key:
            key, pair = file[0], (file[0], file[1], None)
        else:
            key, pair = obj.key, (obj.key, file[1], obj)
        yield pair
        if pair[1] is not None:
            file = next(files, None)
            if file is not None and file[0] <= key:
                raise OutOfOrder(file[0], key)
        if pair[2] is not None:
            obj = next(objects, None)
            if obj is not None and obj.key <= key:
                raise OutOfOrder(obj.key, key)


def plan_backup(
    local: Iterable[tuple[str, LocalFile]],
    remote: Iterable[RemoteObject],
    prefix: str,
    filters: Filters,
    delete: bool,
    by_content: bool = False,
    single_file: bool = False,
    refuse_empty: bool = True,
) -> Iterator[Step]:
    """What to do with each key, from the local files and the listing, both in key
    order (S3's: UTF-8 bytes, a folder sorting as its name plus "/"); the steps
    come in that order, one key at a time, so neither side is ever held whole.

    Files outside the filters, and objects outside them or ending in "/" (folder
    markers), are left alone; by content, files of their object's size are to be
    compared (Compare); a single file's listing counts only its own key.
    --delete's deletes come once a file to back up has been seen, and EmptySource
    ends a plan that has none (unless not `refuse_empty`: --check). Without
    --delete, a file where the backup holds a folder is a StaleFolder."""
    # --delete's deletes, held until a file to back up has been seen.
    held: Optional[list[Delete]] = [] if delete and refuse_empty else None
    # Files whose key plus "/" may still begin a coming key, each a prefix of the next.
    folders: list[list] = []  # [key, file, objects under key/]
    files_left = True

    def files() -> Iterator[tuple[str, LocalFile]]:
        nonlocal files_left
        yield from local
        files_left = False

    for key, file, obj in pair_by_key(files(), remote):
        if held is not None and not files_left:
            break  # no file to back up: the rest of the listing changes nothing
        while folders and not may_come_under(key, folders[-1][0]):
            yield from stale_step(*folders.pop())
        if file is None:
            others = single_file or key.endswith("/")  # another file's, a marker
            if others or not filters.includes(relative_key(prefix, key)):
                continue
            if held is not None:
                held.append(Delete(key))
            elif delete:
                yield Delete(key)
            elif folders and key.startswith(folders[-1][0] + "/"):
                folders[-1][2] += 1
            continue
        if not delete:
            folders.append([key, file, 0])
        if not filters.includes(relative_key(prefix, key)):
            continue
        yield from held or ()
        held = None
        yield file_step(key, file, obj, by_content)
    while folders:
        yield from stale_step(*folders.pop())
    if held is not None:
        raise EmptySource()


def file_step(
    key: str, file: LocalFile, obj: Optional[RemoteObject], by_content: bool
) -> Step:
    """The step of a file: Upload, Keep, or (by content, an object of its size) Compare."""
    if by_content and obj is not None and obj.size == file.size:
        return Compare(key, file, obj)
    reason = upload_reason(file, obj)
    return Upload(key, file, reason) if reason else Keep(key)


def stale_step(key: str, file: LocalFile, objects: int) -> Iterator[StaleFolder]:
    """The StaleFolder of a file that stood where `objects` objects are (none if 0)."""
    if objects:
        yield StaleFolder(key, file, objects)


def by_content(
    step: Compare, local_md5: Optional[str], remote_md5: Optional[str]
) -> Step:
    """A Compare step decided by the two MD5s (None: not known)."""
    reason = upload_reason(step.file, step.remote, local_md5, remote_md5, True)
    return Upload(step.key, step.file, reason, local_md5) if reason else Keep(step.key)


def future_dated(upload: Upload, now: float) -> bool:
    """Whether the upload is planned only because the file's mtime is after now.

    Such a file stays "newer" than its object forever; its recorded mtime says
    whether the object already holds it.
    """
    return upload.reason == "newer" and upload.file.mtime_ns > now * 1e9


def after_recheck(upload: Upload, recorded: Optional[int]) -> Step:
    """A future-dated upload, kept when its object records the file's very mtime
    (`recorded`: its mtime metadata, None where there is none)."""
    return Keep(upload.key) if recorded == upload.file.mtime_ns else upload


def may_delete(outcome: Outcome, unread: int) -> bool:
    """Delete nothing once a file could not be read (`unread`) or uploaded: its
    object may be the one copy left of what it held."""
    return not (outcome.failed or unread)


def refuse_keys(
    files: Iterable[tuple[str, LocalFile]], prefix: str, root: PurePath, scan: Scan
) -> Iterator[tuple[str, LocalFile]]:
    """The files less those whose keys S3 refuses (errors of the scan), with a
    warning for those that restore.py refuses on this kind of system (root's flavour)."""
    windows = isinstance(root, PureWindowsPath)
    for key, file in files:
        problem = key_length_problem(key)
        if problem:
            scan.error("upload", file.path, CliError(problem))
            continue
        problem = key_problem(relative_key(prefix, key), windows)
        if problem:
            scan.warning(
                f"{printable(file.path)}: backed up, but restore.py on this kind of "
                f"system refuses it: the key {problem}"
            )
        yield key, file


def check_report(plan: BackupPlan, unread: frozenset[str] = frozenset()) -> CheckReport:
    """--check's differences, from a plan by content with --delete; `unread` files are errors, not differences."""
    return CheckReport(
        missing=tuple(item.key for item in plan.uploads if item.reason == "new"),
        changed=tuple(
            (item.key, item.reason)
            for item in plan.uploads
            if item.reason != "new" and item.key not in unread
        ),
        extra=plan.deletes,
        identical=plan.skipped,
    )


def listing_boundaries(keys_in_order: Iterable[str]) -> list[str]:
    """Where to cut a listing into ranges of one page each, from the keys it should
    hold, in key order.

    Every LIST_PAGE-th key but the last key itself: a range after the last key
    holds nothing that is expected, only what is new.
    """
    boundaries, last = [], None
    for count, key in enumerate(keys_in_order, 1):
        if count % LIST_PAGE == 0:
            boundaries.append(key)
        last = key
    if boundaries and boundaries[-1] == last:
        boundaries.pop()
    return boundaries


def history_rule(keep_days: Optional[int]) -> dict:
    """Our lifecycle rule: old versions expire after keep_days (None: no versioning,
    only the abort), delete markers left with no version go, incomplete multipart
    uploads are aborted."""
    rule = {
        "ID": HISTORY_RULE_ID,
        "Filter": {"Prefix": ""},
        "Status": "Enabled",
        "AbortIncompleteMultipartUpload": {
            "DaysAfterInitiation": ABORT_INCOMPLETE_DAYS
        },
    }
    if keep_days is not None:
        rule["NoncurrentVersionExpiration"] = {"NoncurrentDays": keep_days}
        rule["Expiration"] = {"ExpiredObjectDeleteMarker": True}
    return rule


def merge_lifecycle_rules(existing: list[dict], rule: dict) -> list[dict]:
    """The bucket's rules with `rule` in place of the one of the same ID, or added
    at the end; every other rule exactly as it was (S3 replaces the whole set)."""
    merged = [rule if other.get("ID") == rule["ID"] else other for other in existing]
    return merged if rule in merged else [*merged, rule]


# What changes when a file is written to, replaced, resized or chmod'ed.
file_state = operator.attrgetter(
    "st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns"
)


def read_unchanged(
    before: os.stat_result, after: os.stat_result, started_ns: int
) -> bool:
    """Whether a file stat'ed before a read that began at started_ns (time.time_ns)
    and again after it was left as it was meanwhile."""
    return (
        file_state(before) == file_state(after)
        and after.st_ctime_ns < started_ns - CLOCK_SLACK_NS
    )


def upload_args(file: LocalFile, md5: Optional[str] = None) -> dict:
    """Metadata (mtime and mode as rclone writes them, and md5chksum when given)
    and Content-Type."""
    args = {
        "Metadata": {
            "mtime": format_mtime(file.mtime_ns),
            "mode": format(file.mode, "o"),
        }
    }
    if md5 is not None:
        args["Metadata"][MD5_METADATA] = md5chksum(md5)
    content_type, _ = mimetypes.guess_type(file.path, strict=False)
    if content_type:
        args["ContentType"] = content_type
    return args


# --- Object Lock (--lock-days): pure ---------------------------------------------


DAY = 86_400
MAX_LOCK_DAYS = 36_500
# Beyond the 15 minutes of clock difference SigV4 allows: a lock dated from our
# clock is never short of its days by the server's.
LOCK_MARGIN = 3600


@dataclass(frozen=True)
class LockPolicy:
    """--lock-days and --lock-mode: every current object stays locked `kept`
    past each restore point, renewed at most once every `interval`."""

    days: int
    mode: str  # "GOVERNANCE" or "COMPLIANCE", as S3 names them

    @property
    def interval(self) -> float:
        """Seconds between two renewals of one object: N/4 days, at least one day."""
        return max(self.days * DAY / 4, DAY)

    @property
    def kept(self) -> float:
        """Seconds every current object stays locked past a restore point: 3N/4 days."""
        return self.days * DAY * 3 / 4

    def until(self, now: float) -> int:
        """The date an upload or a renewal at `now` locks to: `kept` still to go
        when the next renewal is due (N days and the margin, for N of 4 or more)."""
        return math.ceil(now + self.interval + self.kept + LOCK_MARGIN)

    def upload_args(self, now: float) -> dict:
        """The lock headers of an upload at `now` (put_object's parameters)."""
        return {
            "ObjectLockMode": self.mode,
            "ObjectLockRetainUntilDate": format_when(self.until(now)),
        }


def lock_days(text: str) -> int:
    """An argparse type: --lock-days, 1 to MAX_LOCK_DAYS."""
    days = positive_int(text)
    if days > MAX_LOCK_DAYS:
        raise ArgumentTypeError(f"{text!r} is more than {MAX_LOCK_DAYS} (100 years)")
    return days


def lock_state(
    policy: LockPolicy, filters: Filters, at: float, until: float, longest: float
) -> dict:
    """The lock state object's JSON: every current object of the prefix (within
    these filters) was locked, by a renewal at `at`, until `until` at least, and
    none known to be locked beyond `longest`."""
    return {
        "lock_days": policy.days,
        "mode": policy.mode,
        "filters": [list(rule) for rule in filters.rules],
        "renewed_at": format_when(at),
        "renewed_until": format_when(until),
        "longest": format_when(longest),
    }


def state_until(
    state: Optional[dict], policy: LockPolicy, filters: Filters
) -> Optional[tuple[float, float]]:
    """The state's renewed_until and longest (seconds), if it was written with
    these days, mode and filters; else None: each object's lock is to be read."""
    ours = lock_state(policy, filters, 0, 0, 0)
    if not isinstance(state, dict) or any(
        state.get(name) != ours[name] for name in ("lock_days", "mode", "filters")
    ):
        return None
    try:
        until = parse_timestamp(str(state["renewed_until"])).timestamp()
        longest = parse_timestamp(str(state.get("longest", ""))).timestamp()
    except (KeyError, ValueError, TypeError):
        return None
    return until, longest


def must_read_locks(known: Optional[tuple[float, float]], target: float) -> bool:
    """Whether a renewal to `target` reads each lock first (a HeadObject each):
    when the state says nothing, or some lock may end later than `target`
    (of a run with more --lock-days), which a blind renewal would shorten."""
    return known is None or known[1] > target


def renewal_due(
    renewed_until: Optional[float], policy: LockPolicy, point: float
) -> bool:
    """Whether the locks renewed until `renewed_until` (None: not known) fall
    short of `kept` past the restore point `point`."""
    return renewed_until is None or renewed_until < point + policy.kept


def needs_renewal(current: Optional[float], target: float) -> bool:
    """Whether a lock ending at `current` (None: none) is to be extended to
    `target`: never to shorten one."""
    return current is None or current < target


# --- Doing: the local walk and the S3 calls -------------------------------------


def walk_folder(
    root: str, prefix: str, follow_symlinks: bool, scan: Scan, look_only: bool = False
) -> Iterator[tuple[str, Optional[LocalFile]]]:
    """Every regular file under root with its S3 key, in key order: the order of
    str (S3's UTF-8 byte order), a folder sorting as its name plus "/". One
    folder's entries are held at a time, for each folder on the way down.

    Symbolic links are followed unless told not to; a link back to a folder
    on the way down is a loop, reported and not followed. `look_only` takes
    the file system's word for what is a file, with no stat (and no LocalFile).
    """
    root_stat = at_any_length(os.stat, root)
    ancestors = frozenset({(root_stat.st_dev, root_stat.st_ino)})
    walk = FolderWalk(follow_symlinks, scan, look_only)
    stack = [iter(walk.entries(root, "", ancestors))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
        elif entry[3] is None:
            yield key_for(prefix, entry[0]), entry[2]
        else:
            relative, path, _, inside = entry
            stack.append(iter(walk.entries(path, relative, inside)))


# A folder's file or sub-folder: (relative path, path, LocalFile, None) or
# (relative path ending in "/", path, None, the sub-folder's ancestors).
Entry = tuple[str, str, Optional[LocalFile], Optional[frozenset]]


@dataclass(frozen=True)
class FolderWalk:
    """How walk_folder reads each folder on its way down."""

    follow_symlinks: bool
    scan: Scan
    look_only: bool

    def entries(
        self, folder: str, relative_folder: str, ancestors: frozenset
    ) -> list[Entry]:
        """The files and sub-folders of one folder, in key order."""
        try:
            entries, fd = list_folder(folder)
        except FileNotFoundError:
            self.scan.vanish_folder(folder)
            return []
        except OSError as exc:
            self.scan.error("read", folder, exc)
            return []
        try:
            found = [
                item
                for entry in entries
                if (item := self.entry(entry, folder, relative_folder, ancestors))
            ]
        finally:
            if fd is not None:
                os.close(fd)
        found.sort(key=lambda item: item[0])
        return found

    def entry(
        self,
        entry: os.DirEntry,
        folder: str,
        relative_folder: str,
        ancestors: frozenset,
    ) -> Optional[Entry]:
        """One entry of a folder, or None for one not backed up (said why)."""
        scan = self.scan
        relative = relative_folder + entry.name
        path = os.path.join(folder, entry.name)  # entry.path is its name alone by fd
        try:
            if not self.follow_symlinks and entry.is_symlink():
                return None
            if self.look_only and entry.is_file():
                return (relative, path, None, None)
            info = entry.stat()
        except FileNotFoundError:
            if entry.is_symlink():
                scan.warning(f"broken symbolic link skipped: {printable(path)}")
            elif entry.is_dir(follow_symlinks=False):  # as the listing said
                scan.vanish_folder(path)
            else:
                scan.vanish(path)
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP and entry.is_symlink():
                # A link that leads to itself (self -> self, a -> b -> a): no file.
                scan.warning(f"symbolic link loop not followed: {printable(path)}")
            else:
                scan.error("read", path, exc)
            return None
        if stat.S_ISDIR(info.st_mode):
            identity = (info.st_dev, info.st_ino)
            if identity not in ancestors:
                return (relative + "/", path, None, ancestors | {identity})
            scan.warning(f"symbolic link loop not followed: {printable(path)}")
        elif stat.S_ISREG(info.st_mode) and TEMPORARY_NAME.fullmatch(entry.name):
            scan.detail(f"skipped, restore's temporary file: {printable(path)}")
        elif stat.S_ISREG(info.st_mode):
            file = LocalFile(path, info.st_size, info.st_mtime_ns, info.st_mode)
            return (relative, path, file, None)
        else:
            scan.warning(f"not a regular file, skipped: {printable(path)}")
        return None


def list_folder(folder: str) -> tuple[list[os.DirEntry], Optional[int]]:
    """A folder's entries, and the file descriptor they were listed through
    where its path is long (to close once their stat() is done): their own
    paths may be too long for the system."""
    if not is_long(folder):
        with os.scandir(folder) as listing:
            return list(listing), None
    fd = open_folder(folder)
    try:
        with os.scandir(fd) as listing:
            return list(listing), fd
    except BaseException:
        os.close(fd)
        raise


def stat_local(local: str) -> os.stat_result:
    """LOCAL's stat, once it is known to be a folder or a regular file."""
    try:
        info = at_any_length(os.stat, local)
    except FileNotFoundError:
        raise usage_error(
            f"{local!r} does not exist: give the folder or file to back up"
        ) from None
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        raise usage_error(f"{local!r} is not a regular file or a folder")
    return info


def local_files(
    local: str, info: os.stat_result, prefix: str, follow_symlinks: bool, scan: Scan
) -> Iterator[tuple[str, LocalFile]]:
    """The files to back up from LOCAL (with its stat_local), in key order."""
    if stat.S_ISDIR(info.st_mode):
        return walk_folder(local, prefix, follow_symlinks, scan)
    name = os.path.basename(os.path.normpath(local))
    file = LocalFile(local, info.st_size, info.st_mtime_ns, info.st_mode)
    return iter([(key_for(prefix, name), file)])


def stored_already(store: Store, upload: Upload, now: float) -> bool:
    """Whether a future-dated upload (at `now`) is to be skipped: its object
    records the file's very mtime (a HeadObject; after_recheck)."""
    if not future_dated(upload, now):
        return False
    try:
        head = store.head(upload.key)
    except botocore.exceptions.ClientError:
        return False  # uploaded again, which says what is wrong if anything is
    recorded = parse_mtime(head.get("Metadata", {}).get("mtime"))
    return isinstance(after_recheck(upload, recorded), Keep)


def content_decided(
    steps: Iterable[Step],
    store: Store,
    workers: int,
    unread: list[Failure[Compare]],
) -> Iterator[Step]:
    """The steps with each Compare decided by the MD5s of file and object, hashed
    on `workers` threads; a file that cannot be read goes into `unread` and up
    ("no MD5 to compare"), where its upload says why it failed."""

    def decide(step: Step) -> Step:
        if not isinstance(step, Compare):
            return step
        local, remote = both_md5s(store, step.key, step.file.path, step.remote)
        if isinstance(local, OSError):
            unread.append(Failure(step, local))
            return by_content(step, None, remote)
        return by_content(step, local, remote)

    return map_failing_fast(decide, steps, workers)


@dataclass(frozen=True)
class BucketState:
    exists: bool
    # "Enabled", "Suspended", "" (never turned on), "unknown (<code>)", or None
    # when the run did not ask (--no-versioning, --check).
    versioning: Optional[str]


def bucket_state(store: Store, ask_versioning: bool) -> BucketState:
    """HeadBucket and, beside it, GetBucketVersioning: whether the bucket is there,
    and whether it keeps history; any other answer than yes or no is an error."""
    versioning = None
    if ask_versioning:
        versioning = call_failing_fast(lambda: versioning_status(store))
    try:
        exists = store.bucket_exists()
    except botocore.exceptions.ClientError as exc:
        raise runtime_error(f"bucket {store.bucket}", exc) from None
    return BucketState(exists, versioning.result() if versioning else None)


def versioning_status(store: Store) -> str:
    """The bucket's versioning, or "unknown (<code>)" where it cannot be read ("" for
    a missing bucket: HeadBucket says that)."""
    try:
        return store.versioning()
    except botocore.exceptions.ClientError as exc:
        code = client_error_code(exc)
        return "" if code in ("404", "NoSuchBucket") else f"unknown ({code})"


def describe_history(keep_days: Optional[int]) -> str:
    if keep_days is None:
        return (
            f"without versioning (lifecycle rule {HISTORY_RULE_ID}: incomplete "
            f"uploads aborted after {ABORT_INCOMPLETE_DAYS} days)"
        )
    return (
        f"with versioning (lifecycle rule {HISTORY_RULE_ID}: old versions kept "
        f"{keep_days} days)"
    )


class HistoryUnsupported(Exception):
    """The server has no versioning or lifecycle rules (NotImplemented), as some
    S3-compatible servers do not."""


def set_up_history(store: Store, keep_days: Optional[int], new: bool) -> bool:
    """Put our lifecycle rule beside the bucket's own, then turn versioning on
    (unless keep_days is None): the rule first, so that no version is kept
    with nothing to expire it. Whether anything had to change."""
    changed = False
    try:
        rules, extra = [], {}
        if not new:
            rules, extra = store.lifecycle()
        merged = merge_lifecycle_rules(rules, history_rule(keep_days))
        if merged != rules:
            store.set_lifecycle(merged, extra)
            changed = True
        if keep_days is not None and (new or store.versioning() != "Enabled"):
            store.enable_versioning()
            changed = True
    except botocore.exceptions.ClientError as exc:
        if new and client_error_code(exc) == "NotImplemented":
            raise HistoryUnsupported() from None
        raise runtime_error(
            f"cannot turn on history (versioning and lifecycle rule) for bucket {store.bucket}",
            exc,
        ) from None
    return changed


def unfinished_keep_days(store: Store) -> Optional[int]:
    """The days our own rule keeps old versions for, in a bucket whose versioning
    was never turned on; None without the rule (or with --no-versioning's, which
    keeps none), or where the rules cannot be read (a server without lifecycle
    rules, as s3rver, or keys not allowed to read them): not ours to finish."""
    try:
        rules, _ = store.lifecycle()
    except botocore.exceptions.ClientError:
        return None
    for rule in rules:
        if rule.get("ID") == HISTORY_RULE_ID:
            return rule.get("NoncurrentVersionExpiration", {}).get("NoncurrentDays")
    return None


def unversioned_warning(bucket: str, status: str, deleting: bool = False) -> str:
    state = {"": "off", "Suspended": "suspended"}.get(status, status)
    if deleting:
        return (
            f"versioning of s3://{bucket} is {state}: the objects --delete removes "
            "cannot be recovered (backup.py --keep-days N turns it on)"
        )
    return (
        f"versioning of s3://{bucket} is {state}: overwritten and deleted files "
        "cannot be recovered (backup.py --keep-days N turns it on; --no-versioning "
        "says that a mirror without history is meant)"
    )


def create_bucket(
    store: Store,
    keep_days: Optional[int],
    dry_run: bool,
    console: Console,
    lock: bool = False,
) -> None:
    """Create the missing bucket in the store's region (with Object Lock, if
    `lock`), and set up its history (keep_days None: no versioning)."""
    bucket, region = store.bucket, store.region
    problem = bucket_name_problem(bucket)
    if problem:
        raise usage_error(f"cannot create bucket {bucket!r}: {problem}")
    history = describe_history(keep_days) + (" and Object Lock" if lock else "")
    if dry_run:
        console.info(f"(dry run) create bucket s3://{bucket} in {region} {history}")
        return
    try:
        with interrupt_after():  # a bucket is not left without its history
            try:
                store.create_bucket(lock)
            except botocore.exceptions.ClientError as exc:
                raise runtime_error(f"cannot create bucket {bucket}", exc) from None
            set_up_history(store, keep_days, new=True)
    except HistoryUnsupported:
        # The bucket exists now, and a later run would find it and go on without
        # history anyway: say so once, and back up.
        console.warning(
            f"this server has no versioning or lifecycle rules (NotImplemented): "
            f"bucket s3://{bucket} keeps no history, so an overwritten or deleted "
            "file cannot be brought back"
        )
        history = "without history"
    console.info(f"created bucket s3://{bucket} in {region} {history}")


@dataclass(frozen=True)
class ReadStart:
    """The start of one read of a file for its upload: its stat then, and when."""

    path: str
    before: os.stat_result
    started_ns: int  # time.time_ns() before the stat

    @classmethod
    def of(cls, path: str, source: Optional[BinaryIO] = None) -> "ReadStart":
        """Now, for the open file `source`, or else for the file at `path`."""
        started = time.time_ns()
        info = (
            at_any_length(os.stat, path)
            if source is None
            else os.fstat(source.fileno())
        )
        return cls(path, info, started)

    def file(self) -> LocalFile:
        """The file as it was when the read began."""
        info = self.before
        return LocalFile(self.path, info.st_size, info.st_mtime_ns, info.st_mode)

    def check(self, after: Optional[os.stat_result] = None) -> None:
        """FileChanged unless the file has been left as it was since the read began
        (`after`: its stat now, if there is one at hand)."""
        after = at_any_length(os.stat, self.path) if after is None else after
        if not read_unchanged(self.before, after, self.started_ns):
            raise FileChanged()


def read_whole(source: BinaryIO, start: ReadStart) -> bytes:
    """The bytes of the open file, from one read during which it did not change."""
    # One byte more than its size at most: a file that grew is not read whole.
    data = source.read(start.before.st_size + 1)
    if len(data) != start.before.st_size:
        raise FileChanged()
    # The open file's own stat: one system call less than by name (each one lets
    # the other upload threads take the GIL), and what was read is this file.
    start.check(os.fstat(source.fileno()))
    return data


def read_digests(
    source: BinaryIO, start: ReadStart, with_md5: bool
) -> tuple[int, Optional[str]]:
    """The CRC32 and (with_md5) the hex MD5 of the open file, from one read in
    chunks during which it did not change."""
    crc, md5 = 0, hashlib.md5(usedforsecurity=False) if with_md5 else None
    size = 0
    while chunk := source.read(CHUNK):
        crc = zlib.crc32(chunk, crc)
        if md5:
            md5.update(chunk)
        size += len(chunk)
    if size != start.before.st_size:
        raise FileChanged()
    start.check(os.fstat(source.fileno()))
    return crc, md5 and md5.hexdigest()


class Uploader:
    """One file up (called by run_collecting_failures), as one PUT or a parallel
    multipart upload, from one read of it during which it did not change. Its
    call counts the bytes stored (what the object holds) into `outcome` and the
    key into `locks`, and aborts the key's stale uploads; False (skipped) when
    the file is future-dated and its object records its very mtime; it raises
    Vanished when the file is gone since the walk."""

    def __init__(
        self,
        store: Store,
        console: Console,
        outcome: Outcome,
        locks: Optional["LockRun"],
        prefix: str,
    ):
        self.store, self.console = store, console
        self.outcome, self.locks = outcome, locks
        self.now = time.time()
        # The server's time when the run began is within the second its first
        # answers' Date header names: uploads initiated before its end are taken
        # for a killed run's (by then, this run has none of its own on the key).
        before = store.clock.latest + 1 if store.clock.latest else self.now
        self.stale = StaleUploads(store, prefix, before, console)
        self.counting = threading.Lock()

    def __call__(self, item: Upload, cancel: threading.Event) -> bool:
        if stored_already(self.store, item, self.now):
            return False
        file = self.read_and_put(item, cancel).file()
        if file.size < MULTIPART_THRESHOLD:
            self.console.advance(nbytes=file.size)
        self.console.advance(files=1)
        self.console.detail(
            f"upload: {printable(file.path)} -> "
            f"{printable(f's3://{self.store.bucket}/{item.key}')}"
        )
        # The size as stored: the file may have shrunk since the walk.
        with self.counting:
            self.outcome.nbytes += file.size
            if self.locks:
                self.locks.uploaded.append(item.key)
        self.stale.uploaded(item.key)
        return True

    def read_and_put(self, item: Upload, cancel: threading.Event) -> ReadStart:
        """put_once, as many as READ_ATTEMPTS times while the file changes."""
        path = item.file.path
        for attempt in range(READ_ATTEMPTS):
            if attempt:
                time.sleep(CLOCK_SLACK_NS / 1e9)
            try:
                return self.put_once(item, cancel)
            except FileChanged:
                pass
            except FileNotFoundError as exc:
                if exc.filename != path:
                    raise
                self.console.warning(vanished_line(path))
                raise Vanished() from None
        raise FileChanged()

    def put_once(self, item: Upload, cancel: threading.Event) -> ReadStart:
        """The file up from one read; FileChanged if it changed during the read."""
        path = item.file.path
        with open(path, "rb", opener=open_any) as source:
            start = ReadStart.of(path, source)
            # One PutObject is the cheapest request for a small file; the transfer
            # manager's futures and callbacks cost more than the upload itself.
            if start.before.st_size < MULTIPART_THRESHOLD:
                self.put_small(item.key, start, source)
                return start
        md5 = item.md5 if start.file() == item.file else None
        self.put_multipart(item.key, start, md5)
        return start

    def put_small(self, key: str, start: ReadStart, source: BinaryIO) -> None:
        """One PutObject, its checksums (and md5chksum, when the object needs it)
        from one read of the file. A body of up to a CHUNK is held from that read;
        a larger one streams from the file (FileBody), each send checked against
        that read, so that workers hold chunks, not bodies, and as many bodies
        are in flight as there are workers (a server far away wants them)."""
        file = start.file()
        with_md5 = not self.store.etag_is_md5(file.size)
        if file.size <= CHUNK:
            data = read_whole(source, start)
            md5 = hashlib.md5(data, usedforsecurity=False) if with_md5 else None
            self.store.put(key, data, upload_args(file, md5 and md5.hexdigest()))
            return
        crc, md5 = read_digests(source, start, with_md5)
        self.store.put(key, FileBody(source, file.size, crc), upload_args(file, md5))

    def put_multipart(self, key: str, start: ReadStart, md5: Optional[str]) -> None:
        """Parallel parts read from the file by name, as s3transfer does: each
        part's checksum is over the bytes read for it, and the parts are joined
        only if the file was left alone from before the first read to after the
        last, so they are one state of it. (Reading the parts through a file
        object of ours would check it too, but s3transfer holds up to 10 parts
        of such a file in memory: 319 MiB peak for W3 against 79 MiB.)

        CreateMultipartUpload carries the metadata before any part is read, so
        the MD5 takes a pass of its own over the file first (unless --checksum
        has just made it of this very file). The pass is within the checked
        read: a change during it fails the upload too."""
        file = start.file()
        args = upload_args(file, md5 or file_md5(file.path))
        self.store.upload_file(
            file.path,
            key,
            file.size,
            args,
            lambda nbytes: self.console.advance(nbytes=nbytes),
            start.check,
        )


class StaleUploads:
    """The incomplete multipart uploads under the prefix that began before this
    run (`before`, the server's time), as a kill -9 or a power cut leaves them:
    listed once, when the run's first upload is done, and aborted for each key
    the run uploads. A failure to list or abort them is a warning: our lifecycle
    rule aborts them after ABORT_INCOMPLETE_DAYS days anyway."""

    def __init__(self, store: Store, prefix: str, before: float, console: Console):
        self._store, self._prefix = store, prefix
        self._before, self._console = before, console
        self._lock = threading.Lock()
        self._by_key: Optional[dict[str, list[str]]] = None

    def uploaded(self, key: str) -> None:
        with self._lock:
            if self._by_key is None:
                self._by_key = self._listed()
            upload_ids = self._by_key.pop(key, ())
        for upload_id in upload_ids:
            try:
                self._store.abort_upload(key, upload_id)
            except botocore.exceptions.ClientError as exc:
                self._warn(f"an incomplete upload of {printable(key)}", exc)

    def _listed(self) -> dict[str, list[str]]:
        by_key: dict[str, list[str]] = {}
        try:
            for key, upload_id, initiated in self._store.incomplete_uploads(
                self._prefix
            ):
                if initiated < self._before:
                    by_key.setdefault(key, []).append(upload_id)
        except botocore.exceptions.ClientError as exc:
            self._warn("the incomplete uploads of earlier runs", exc)
        return by_key

    def _warn(self, what: str, error: BaseException) -> None:
        message, _ = describe_error(error)
        self._console.warning(
            f"could not abort {what}: {message} (the lifecycle rule aborts it "
            f"after {ABORT_INCOMPLETE_DAYS} days)"
        )


def delete_objects(
    store: Store, outcome: Outcome, console: Console, deleted: Optional[set] = None
) -> None:
    """Delete the outcome's deletes in batches; counted into it (and their keys
    into `deleted`), failures key by key."""
    for key, error in store.delete(outcome.deletes):
        if error is not None:
            outcome.delete_failures.append(Failure(key, error))
            continue
        outcome.deleted += 1
        if deleted is not None:
            deleted.add(key)
        console.detail(f"delete: {printable(f's3://{store.bucket}/{key}')}")


def warn_if_unversioned(store: Store, console: Console) -> None:
    """Before --delete deletes anything with --no-versioning (without it, the run
    has said so already): say so once if the bucket keeps no old versions."""
    status = versioning_status(store)
    if status != "Enabled":
        console.warning(unversioned_warning(store.bucket, status, deleting=True))


# --- Object Lock (--lock-days): the S3 calls --------------------------------------


def lock_policy(args) -> Optional[LockPolicy]:
    """--lock-days and --lock-mode, checked against the other options (exit 2)."""
    if args.lock_days is None:
        if args.lock_mode:
            raise usage_error("--lock-mode goes with --lock-days N")
        return None
    if args.no_versioning:
        raise usage_error(
            "--lock-days locks versions, which --no-versioning turns off: give one"
        )
    return LockPolicy(args.lock_days, (args.lock_mode or "governance").upper())


def lock_bucket(
    store: Store, policy: LockPolicy, mode_given: bool, console: Console
) -> LockPolicy:
    """An existing bucket's Object Lock: turned on where it is off (exit 1 where
    the server refuses), its default retention checked against --lock-days
    (exit 2 when longer; its mode is ours unless --lock-mode says otherwise)."""
    bucket = store.bucket
    try:
        configuration = store.lock_configuration()
        if configuration.get("ObjectLockEnabled") != "Enabled":
            store.enable_lock()
            console.info(f"turned on Object Lock for s3://{bucket}")
            return policy
    except botocore.exceptions.ClientError as exc:
        raise runtime_error(
            f"bucket {bucket} has no Object Lock and it cannot be turned on (some "
            "servers, Ceph RGW among them, lock only a bucket created with it: "
            "back up to a new bucket with --lock-days)",
            exc,
        ) from None
    # The bucket's default retention, a year counted as 365 days.
    retention = configuration.get("Rule", {}).get("DefaultRetention", {})
    days = retention.get("Days") or 365 * retention.get("Years", 0)
    mode = retention.get("Mode") if days else None
    if days > policy.days:
        raise usage_error(
            f"--lock-days {policy.days} is shorter than the default retention of "
            f"s3://{bucket} ({mode} {days} days): give --lock-days {days} or more"
        )
    if mode and not mode_given:
        policy = LockPolicy(policy.days, mode)
    if mode:
        console.info(
            f"s3://{bucket} locks new objects {mode} {days} days by default; this "
            f"backup locks each object {policy.mode} for {policy.days} days or more"
        )
    return policy


def read_lock_state(store: Store, key: str) -> Optional[dict]:
    """The prefix's lock state; None when there is none or it is not ours to read."""
    try:
        body = store.get(key, lambda fetched: b"".join(fetched.chunks))
    except botocore.exceptions.ClientError as exc:
        if client_error_code(exc) in ("NoSuchKey", "404"):
            return None
        raise runtime_error(
            f"cannot read the lock state s3://{store.bucket}/{key}", exc
        ) from None
    try:
        return json.loads(body)
    except ValueError:
        return None


def renew_locks(
    store: Store,
    keys: list[str],
    policy: LockPolicy,
    target: float,
    read_first: bool,
    workers: int,
) -> tuple[list[Failure[str]], float]:
    """Extend the lock of each key's current version to `target`, side by side;
    read_first: only those whose lock (read by HEAD) ends earlier, a COMPLIANCE
    one staying COMPLIANCE. The failures, and the latest lock read (0: none)."""

    def renew(key: str) -> tuple[Optional[Failure[str]], float]:
        current = None
        try:
            mode = policy.mode
            if read_first:
                current_mode, current = store.lock_of(key)
                if not needs_renewal(current, target):
                    return None, current
                if current_mode == "COMPLIANCE":
                    mode = current_mode
            store.put_retention(key, mode, target)
        except botocore.exceptions.ClientError as exc:
            return Failure(key, exc), current or 0
        return None, current or 0

    results = list(map_failing_fast(renew, keys, workers))
    failures = [failure for failure, _ in results if failure is not None]
    return failures, max((current for _, current in results), default=0)


def keep_locked(
    store: Store, location: Location, locks: "LockRun", point: float
) -> tuple[Optional[dict], list[Failure[str]]]:
    """After a run that got every file in place: renew the prefix's locks where
    due (recorded in its state object once all succeeded), check that the server
    keeps them, and say until when no current object can be erased."""
    policy = locks.policy
    state_key = lock_state_key(location.prefix)
    known = state_until(read_lock_state(store, state_key), policy, locks.filters)
    until, longest = known or (None, 0)
    due = renewal_due(until, policy, point)
    kept, target = locks.kept(), policy.until(point)
    if due:
        until = target if kept else None
        read_first = must_read_locks(known, target)
        failures, seen = renew_locks(
            store, kept, policy, target, read_first, locks.workers
        )
        if failures:
            return None, failures
        longest = max(longest, seen, policy.until(time.time()))
    if locks.uploaded:
        first = policy.until(locks.started)
        until = first if until is None else min(until, first)
    probe = locks.uploaded[:1] or (kept[:1] if due else [])
    if probe and store.lock_of(probe[0])[1] is None:
        raise CliError(
            f"the server keeps no Object Lock: {printable(location.url())} was "
            "uploaded with locks, yet it has none (it does not lock objects): "
            "nothing of this backup is protected from deletion"
        )
    if due and until is not None:
        state = lock_state(policy, locks.filters, point, until, longest)
        body = json.dumps(state, indent=1).encode()
        store.put(state_key, body, {"ContentType": "application/json"}, plain=True)
    return {"mode": policy.mode, "until": until and format_when(until)}, []


@dataclass
class LockRun:
    """What a --lock-days run gathers for keep_locked: the keys listed (within
    the filters), and those it uploaded and deleted."""

    policy: LockPolicy
    filters: Filters
    workers: int
    started: float = 0.0  # time.time() before the first upload
    listed: list[str] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)
    only: Optional[str] = None  # a single file's key: the listing's others are not its

    def saw(self, prefix: str, key: str) -> None:
        """A listed key: recorded if it is a current object of the backup."""
        if key.endswith("/") or (self.only is not None and key != self.only):
            return
        if self.filters.includes(relative_key(prefix, key)):
            self.listed.append(key)

    def kept(self) -> list[str]:
        """The current objects this run left as they were."""
        gone = set(self.uploaded) | self.deleted
        return [key for key in self.listed if key not in gone]


def check_locks(store: Store, locks: LockRun) -> list[str]:
    """--check --lock-days: the keys whose lock ends before `kept` from now, or
    that have none (one HeadObject each, side by side)."""
    soon = time.time() + locks.policy.kept

    def unlocked(key: str) -> bool:
        try:
            until = store.lock_of(key)[1]
        except botocore.exceptions.ClientError as exc:
            raise runtime_error(f"cannot read the lock of {printable(key)}", exc)
        return until is None or until < soon

    keys = locks.listed
    shorts = map_failing_fast(unlocked, keys, locks.workers)
    return [key for key, short in zip(keys, shorts) if short]


# --- The command ----------------------------------------------------------------


EXAMPLES = """
  python backup.py ~/Documents my-bucket::documents
  python backup.py ~/Photos s3://family-archive/photos --storage-class STANDARD_IA
  python backup.py ~/project work-bucket::project --exclude '.git/*' --delete
  python backup.py ~/notes.txt my-bucket::misc      # one file: s3://my-bucket/misc/notes.txt
  python backup.py ~/Documents my-bucket::documents --dry-run -v
  python backup.py ~/Documents my-bucket::documents --check   # exit 0: the backup holds it
  python backup.py /srv/data nightly::srv --json -q --bwlimit 8M > report.json
  python backup.py ~/Documents old-bucket::documents --keep-days 30   # turn history on
"""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="backup.py",
        description="Back up a folder (or one file) to S3, uploading only what changed.",
        examples=EXAMPLES,
    )
    parser.add_argument("local", metavar="LOCAL", help="the folder or file to back up")
    parser.add_argument(
        "location",
        metavar="BUCKET::PREFIX",
        help="where to, also s3://BUCKET/PREFIX; the bucket is created if missing",
    )
    add_shared_options(parser)
    parser.add_argument(
        "--delete",
        action="store_true",
        help="delete objects under the prefix whose files no longer exist locally "
        "(e.g. --delete --dry-run to see what would go)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare LOCAL with the backup by content and change nothing; "
        "exit 0 when the backup holds LOCAL exactly, 1 when it does not "
        "(e.g. --check --exclude '*.tmp')",
    )
    parser.add_argument(
        "--no-follow-symlinks",
        dest="follow_symlinks",
        action="store_false",
        help="skip symbolic links instead of following them (e.g. --no-follow-symlinks)",
    )
    add_history_options(parser)
    add_upload_options(parser)
    return parser


def add_history_options(parser: ArgumentParser) -> None:
    """--keep-days, --no-versioning, --lock-days and --lock-mode."""
    parser.add_argument(
        "--keep-days",
        type=positive_int,
        metavar="N",
        help="keep replaced and deleted versions N days (default "
        f"{DEFAULT_KEEP_DAYS}, set when backup creates the bucket); given for an "
        "existing bucket, turns its versioning on and sets this rule "
        "(e.g. --keep-days 90)",
    )
    parser.add_argument(
        "--no-versioning",
        action="store_true",
        help="create the bucket without versioning: a mirror with no history to "
        "restore --at (e.g. --no-versioning)",
    )
    parser.add_argument(
        "--lock-days",
        type=lock_days,
        metavar="N",
        help="Object Lock: no one can delete or overwrite an uploaded version for "
        "N days (1 to 36500), and unchanged objects stay locked at least 3N/4 "
        "days past each run (e.g. --lock-days 30)",
    )
    parser.add_argument(
        "--lock-mode",
        choices=("governance", "compliance"),
        help="with --lock-days: governance (default; lifted only by a user allowed "
        "s3:BypassGovernanceRetention) or compliance (lifted by no one, the root "
        "account included) (e.g. --lock-mode compliance)",
    )


def add_upload_options(parser: ArgumentParser) -> None:
    """The options of every upload: storage class and encryption."""
    parser.add_argument(
        "--storage-class",
        choices=STORAGE_CLASSES,
        metavar="CLASS",
        help="storage class of the uploaded objects (e.g. --storage-class STANDARD_IA)",
    )
    parser.add_argument(
        "--sse",
        choices=("AES256", "aws:kms"),
        help="server-side encryption, AES256 or aws:kms (e.g. --sse AES256)",
    )
    parser.add_argument(
        "--sse-kms-key-id",
        metavar="ID",
        help="the KMS key for --sse aws:kms (e.g. --sse aws:kms --sse-kms-key-id alias/backup)",
    )


def put_options_from(args) -> dict:
    """The options of every upload: --storage-class, --sse, --sse-kms-key-id."""
    if args.sse_kms_key_id and args.sse != "aws:kms":
        raise usage_error("--sse-kms-key-id goes with --sse aws:kms")
    if args.sse and args.sse_c_key_file:
        raise usage_error(
            "--sse-c-key-file does not go with --sse: encrypt with your own key or "
            "with one the server holds, not both"
        )
    options = {}
    if args.storage_class:
        options["StorageClass"] = args.storage_class
    if args.sse:
        options["ServerSideEncryption"] = args.sse
    if args.sse_kms_key_id:
        options["SSEKMSKeyId"] = args.sse_kms_key_id
    return options


@dataclass(frozen=True)
class Job:
    """The command line, checked: what to back up, where to, and how."""

    location: Location
    filters: Filters
    local: os.stat_result  # LOCAL's stat: a folder or a regular file
    put_options: dict
    policy: Optional[LockPolicy]  # --lock-days

    @property
    def is_folder(self) -> bool:
        return stat.S_ISDIR(self.local.st_mode)

    @classmethod
    def of(cls, args) -> "Job":
        """The job, or a usage error (exit 2) for options that do not go together."""
        job = cls(
            parse_location(args.location),
            Filters(args.filters),
            stat_local(args.local),
            put_options_from(args),
            lock_policy(args),
        )
        if args.delete and not job.is_folder:
            raise usage_error("--delete needs LOCAL to be a folder")
        if args.keep_days is not None and args.no_versioning:
            raise usage_error(
                "--keep-days keeps old versions, which --no-versioning turns off: give one"
            )
        if args.check and args.delete:
            raise usage_error("--check changes nothing: it does not go with --delete")
        return job


def run(args, console: Console) -> int:
    """gather (walk and list) -> plan -> execute (or show, with --dry-run; or
    compare, with --check) -> report."""
    started = time.monotonic()
    job = Job.of(args)
    store = connect(args, job.location.bucket, console, job.put_options)
    scan = Scan(console)
    locks = LockRun(job.policy, job.filters, args.workers) if job.policy else None
    found, files, listing = gather(args, job, store, scan, locks)
    steps = plan_job(args, job, files, listing, found.result().exists)
    if not args.check:
        prepare_bucket(args, job, store, found.result(), locks, console)
    unread: list[Failure[Compare]] = []
    if args.checksum or args.check:
        steps = content_decided(steps, store, args.workers, unread)
    if args.check:
        plan = BackupPlan.of(steps)  # the listing is read whole by then
        unlocked = locks and check_locks(store, locks)
        return report_check(plan, unread, scan, job.location, started, unlocked)
    if args.dry_run:
        outcome = show_plan(steps, store, job.location, args.no_versioning, console)
    else:
        outcome = execute_backup(steps, store, job.location, args, console, scan, locks)
    return report_backup(args, outcome, scan, store, job.location, locks, started)


def plan_job(
    args,
    job: Job,
    files: Iterator[tuple[str, LocalFile]],
    listing: Iterator[RemoteObject],
    exists: bool,
) -> Iterator[Step]:
    """The plan with its first step drawn, before anything changes: a --delete
    that would empty the prefix is refused by then (exit 2); --check of a
    missing bucket is an error."""
    if not exists and args.check:
        raise CliError(
            f"the bucket {job.location.bucket} does not exist: nothing is backed up "
            f"at {job.location.url()}"
        )
    steps = plan_backup(
        files,
        listing if exists else (),
        job.location.prefix,
        job.filters,
        delete=args.delete or args.check,
        by_content=args.checksum or args.check,
        single_file=not job.is_folder,
        refuse_empty=not args.check,
    )
    try:
        first = next(steps, None)
    except EmptySource:
        raise usage_error(
            f"refusing --delete: {args.local!r} has no files to back up, "
            "so every object under the prefix would be deleted"
        ) from None
    return itertools.chain(() if first is None else (first,), steps)


def prepare_bucket(
    args,
    job: Job,
    store: Store,
    found: BucketState,
    locks: Optional["LockRun"],
    console: Console,
) -> None:
    """The bucket made ready for the run: created if missing, its history set up
    or said to be missing, its Object Lock for --lock-days (in `locks`; a bucket
    created now has it), with the warning of --keep-days shorter than the lock."""
    if found.exists:
        update_history(args, store, found.versioning, console)
        keep_days = args.keep_days
    else:
        keep_days = None if args.no_versioning else args.keep_days or DEFAULT_KEEP_DAYS
        create_bucket(store, keep_days, args.dry_run, console, lock=bool(job.policy))
    if locks:
        if found.exists and not args.dry_run:
            mode_given = args.lock_mode is not None
            locks.policy = lock_bucket(store, locks.policy, mode_given, console)
        if keep_days and keep_days < locks.policy.days:
            console.warning(
                f"--keep-days {keep_days} is shorter than --lock-days "
                f"{locks.policy.days}: replaced and deleted versions live until "
                "their lock ends"
            )
        store.lock = locks.policy
    if store.key and not args.dry_run and store.customer_keys_blocked():
        raise CliError(blocked_customer_keys(store.bucket))


def blocked_customer_keys(bucket: str) -> str:
    """The line for a bucket that refuses uploads with a customer key, and how to allow them."""
    allowed = {
        "Rules": [
            {
                "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"},
                "BlockedEncryptionTypes": {"EncryptionType": ["NONE"]},
            }
        ]
    }
    return (
        f"s3://{bucket} refuses uploads encrypted with a customer key (SSE-C; AWS "
        "blocks them in new buckets since April 2026): allow them with aws s3api "
        f"put-bucket-encryption --bucket {bucket} "
        f"--server-side-encryption-configuration '{json.dumps(allowed)}'"
    )


def report_backup(
    args,
    outcome: Outcome,
    scan: Scan,
    store: Store,
    location: Location,
    locks: Optional["LockRun"],
    started: float,
) -> int:
    """The closing summary (with its restore point and, with --lock-days, until
    when nothing can be erased, once the locks are kept); the exit code."""
    console = scan.console
    failed = len(outcome.failed) + len(outcome.delete_failures)
    point = None
    if not args.dry_run:  # a dry run says what it could not read, and fails nothing
        failed += scan.errors
    if not (args.dry_run or failed):  # else not every file is in place
        point = restore_point(store.clock.latest, time.time())
    lock, lock_failed = finish_locks(store, location, locks, point, console)
    summary = Summary(
        "uploaded",
        transferred=outcome.transferred,
        skipped=outcome.skipped,
        failed=failed + lock_failed,
        deleted=outcome.deleted,
        vanished=outcome.vanished + scan.vanished,
        nbytes=outcome.nbytes,
        seconds=time.monotonic() - started,
        restore_point=point,
        lock=lock,
    )
    if args.dry_run:
        console.summarize(
            summary,
            f"(dry run) would upload {outcome.transferred} ({outcome.nbytes} bytes), "
            f"skip {outcome.skipped}, delete {outcome.deleted}",
        )
        return ExitCode.OK
    if not (outcome.planned or outcome.deletes or scan.errors):
        console.info(f"nothing to upload: {printable(location.url())} is up to date")
    console.summarize(summary)
    return ExitCode.FAILURE if summary.failed else ExitCode.OK


def finish_locks(
    store: Store,
    location: Location,
    locks: Optional[LockRun],
    point: Optional[str],
    console: Console,
) -> tuple[Optional[dict], int]:
    """keep_locked after a --lock-days run that got every file in place (at the
    restore point `point`): the report's lock, and how many renewals failed."""
    if not (locks and point):
        return None, 0
    lock, failures = keep_locked(
        store, location, locks, parse_timestamp(point).timestamp()
    )
    for failure in failures:
        console.error(
            failure_line("lock renewal", location.url(failure.item), failure.error)
            + " (the next run renews it)",
            key=failure.item,
        )
    return lock, len(failures)


def update_history(
    args, store: Store, versioning: Optional[str], console: Console
) -> None:
    """An existing bucket's history: set up as --keep-days asks; finished where a
    first run was stopped between our lifecycle rule and versioning (the rule
    goes first, and versioning was never turned on); else, where it keeps none,
    said in one warning."""
    bucket = store.bucket
    keep_days, finishing = args.keep_days, False
    if keep_days is None and versioning == "":
        keep_days = unfinished_keep_days(store)
        finishing = keep_days is not None
    if keep_days is None and args.lock_days and versioning != "Enabled":
        keep_days = DEFAULT_KEEP_DAYS  # Object Lock needs versioning on
    if keep_days is None:
        if versioning not in (None, "Enabled"):
            console.warning(unversioned_warning(bucket, versioning))
        return
    history = describe_history(keep_days)
    done = "finished setting up" if finishing else "set up"
    if args.dry_run:
        console.info(f"(dry run) {done} s3://{bucket} {history}")
        return
    with interrupt_after():
        changed = set_up_history(store, keep_days, new=False)
    if changed:
        console.info(f"{done} s3://{bucket} {history}")


def show_plan(
    steps: Iterable[Step],
    store: Store,
    location: Location,
    no_versioning: bool,
    console: Console,
) -> Outcome:
    """--dry-run: each upload in key order, then each delete, one line each; a
    future-dated file asks its object's recorded mtime, as the real run does."""
    now = time.time()
    outcome = Outcome()
    for upload in uploads_of(steps, outcome, location, console):
        if stored_already(store, upload, now):
            outcome.skipped += 1
            continue
        outcome.transferred += 1
        outcome.nbytes += upload.file.size
        console.info(
            f"(dry run) upload: {printable(upload.file.path)} -> "
            f"{printable(location.url(upload.key))}"
        )
    if outcome.deletes and no_versioning:
        warn_if_unversioned(store, console)
    for key in outcome.deletes:
        console.info(f"(dry run) delete: {printable(location.url(key))}")
    outcome.deletes.close()
    outcome.deleted = len(outcome.deletes)  # would be
    return outcome


def execute_backup(
    steps: Iterable[Step],
    store: Store,
    location: Location,
    args,
    console: Console,
    scan: Scan,
    locks: Optional[LockRun] = None,
) -> Outcome:
    """Upload the plan's files on --workers threads, the plan drawn PLAN_AHEAD
    uploads ahead of them, then its deletes unless a file could not be read (an
    error of the `scan`) or uploaded; one error line for each that fails. With
    `locks`, each upload is recorded there."""
    outcome = Outcome()
    console.start(known=False)
    if locks:
        locks.started = time.time()
    uploader = Uploader(store, console, outcome, locks, location.prefix)
    uploads = uploads_of(steps, outcome, location, console)
    try:
        failures, skipped = run_collecting_failures(
            uploads, uploader, args.workers, PLAN_AHEAD, store
        )
    finally:
        store.close()
    console.finish()
    count_uploads(outcome, failures, skipped, console)
    if outcome.deletes and not may_delete(outcome, scan.errors):
        console.warning(
            "not deleting anything: some files could not be read or uploaded"
        )
    elif outcome.deletes:
        if args.no_versioning:
            warn_if_unversioned(store, console)
        delete_objects(store, outcome, console, locks and locks.deleted)
        for failure in outcome.delete_failures:
            console.error(
                failure_line("delete", location.url(failure.item), failure.error),
                key=failure.item,
            )
    outcome.deletes.close()
    return outcome


def count_uploads(
    outcome: Outcome,
    failures: list[Failure[Upload]],
    skipped: list[Upload],
    console: Console,
) -> None:
    """The uploads' outcome counted, one error line for each that failed."""
    vanished = [f.item for f in failures if isinstance(f.error, Vanished)]
    failures = [f for f in failures if not isinstance(f.error, Vanished)]
    outcome.failed = failures
    outcome.skipped += len(skipped)
    outcome.vanished = len(vanished)
    outcome.transferred = outcome.planned - len(failures) - len(skipped) - len(vanished)
    for failure in failures:
        path = failure.item.file.path
        error = key_error(failure.error, failure.item.key, ": rename the file")
        console.error(failure_line("upload", path, error), path=path)


def gather(
    args,
    job: Job,
    store: Store,
    scan: Scan,
    locks: Optional["LockRun"] = None,
) -> tuple[Future, Iterator[tuple[str, LocalFile]], Iterator[RemoteObject]]:
    """HeadBucket, the local files and the listing, in key order, all under way.

    HeadBucket goes out as soon as there is a client, and the listing beside it
    rather than after it (what it finds counts only once HeadBucket has found
    the bucket). A folder is listed on its folder boundary, in ranges of a page
    cut at its keys, found by a first walk that keeps only every LIST_PAGE-th,
    and listed side by side; a single file by its own key. `locks` records
    the keys listed.
    """
    prefix = job.location.prefix
    ask_versioning = not (args.no_versioning or args.check)
    found = call_failing_fast(lambda: bucket_state(store, ask_versioning))
    files = local_files(args.local, job.local, prefix, args.follow_symlinks, scan)
    if job.is_folder:
        walk = walk_folder(args.local, prefix, args.follow_symlinks, Scan(None), True)
        listing_prefix = folder_prefix(prefix)
        boundaries = listing_boundaries(key for key, _ in walk)
    else:
        [(listing_prefix, _)] = files = list(files)
        boundaries = []
        if locks:
            locks.only = listing_prefix
    listing = store.list(listing_prefix, boundaries, args.workers)
    files = refuse_keys(files, prefix, PurePath(args.local), scan)
    return found, files, listed(listing, job.location, locks)


def listed(
    listing: Iterator[RemoteObject],
    location: Location,
    locks: Optional["LockRun"] = None,
) -> Iterator[RemoteObject]:
    """The listing without the lock states at the bucket's root (never files of
    the mirror), a failure of it being one of the whole run; recorded in `locks`."""
    try:
        for obj in listing:
            if not location.prefix and is_lock_state(obj.key):
                continue
            if locks:
                locks.saw(location.prefix, obj.key)
            yield obj
    except botocore.exceptions.ClientError as exc:
        raise runtime_error(f"cannot list {printable(location.url())}", exc) from None


def uploads_of(
    steps: Iterable[Step], outcome: Outcome, location: Location, console: Console
) -> Iterator[Upload]:
    """The plan's uploads, counted (and added to the progress line's totals) as
    they come; its other steps counted (Keep), held to the end (Delete) or said
    (StaleFolder)."""
    for step in steps:
        if isinstance(step, Upload):
            outcome.planned += 1
            console.planned(1, step.file.size)
            yield step
        elif isinstance(step, Keep):
            outcome.skipped += 1
        elif isinstance(step, Delete):
            outcome.deletes.append(step.key)
        elif isinstance(step, StaleFolder):
            console.warning(
                f"{printable(step.file.path)} is a file now, but the backup still "
                f"holds {step.objects} objects under {printable(location.url(step.key))}/, "
                "the folder it replaced: restore.py brings that folder back instead "
                "of the file; backup.py --delete removes them"
            )
    console.totals_known()


def report_check(
    plan: BackupPlan,
    unread: list[Failure[Compare]],
    scan: Scan,
    location: Location,
    started: float,
    unlocked: Optional[list[str]] = None,
) -> int:
    """--check's output: one line per difference, the summary; exit 0 only when
    identical (and, with --lock-days, every object locked long enough)."""
    console = scan.console
    unread = sorted(unread, key=lambda failure: failure.item.key)
    for failure in unread:
        path = failure.item.file.path
        console.error(failure_line("read", path, failure.error), path=path)
    report = check_report(plan, frozenset(f.item.key for f in unread))
    for key in report.missing:
        console.info(f"missing: {printable(key)}")
    for key, why in report.changed:
        console.info(f"changed: {printable(key)} ({why})")
    for key in report.extra:
        console.info(f"extra: {printable(key)}")
    for key in unlocked or ():
        console.info(f"unlocked: {printable(key)}")
    summary = Summary(
        "checked",
        skipped=report.identical,
        failed=len(unread) + scan.errors,
        seconds=time.monotonic() - started,
        missing=list(report.missing),
        changed=[key for key, _ in report.changed],
        extra=list(report.extra),
        unlocked=unlocked,
    )
    holds_all = not (
        report.missing or report.changed or report.extra or unlocked or summary.failed
    )
    if holds_all:
        console.info(f"{printable(location.url())} holds every file exactly")
    console.summarize(summary)
    return ExitCode.OK if holds_all else ExitCode.FAILURE


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    exit_script(main())
