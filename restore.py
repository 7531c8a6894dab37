"""Restore a prefix (or one object) from S3 into a folder, safely.

usage: python restore.py BUCKET::PREFIX LOCAL [options]
       python restore.py s3://BUCKET/PREFIX LOCAL [options]

Every object under PREFIX/ is written to LOCAL/<key minus PREFIX/> through a
temporary file renamed into place, with its recorded mtime and mode. A key
that would land outside LOCAL is refused. With --at WHEN (a date, a date-time
or an age such as 7d), each key comes back as it was at WHEN, from the
bucket's object versions.
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

import argparse
import bisect
import contextlib
import functools
import itertools
import math
import re
import secrets
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, tzinfo
from operator import attrgetter
from pathlib import Path, PurePath, PurePosixPath
from typing import BinaryIO, Optional, TypeVar, Union

import botocore.exceptions

from s3common import (
    ARCHIVE_STORAGE_CLASSES,
    CASE_PROBE,
    FOLDER_FLAGS,
    MULTIPART_THRESHOLD,
    TEMPORARY_FILE,
    TEMPORARY_NAME,
    UTC,
    ArgumentParser,
    Cancelled,
    CliError,
    Console,
    ExitCode,
    FetchedObject,
    Filters,
    Location,
    ObjectVersion,
    RemoteObject,
    Store,
    Summary,
    UnsafeKey,
    add_shared_options,
    at_any_length,
    both_md5s,
    client_error_code,
    connect,
    exit_script,
    failure_line,
    folder_prefix,
    format_when,
    is_lock_state,
    is_long,
    is_within,
    key_error,
    map_failing_fast,
    may_come_under,
    open_folder,
    parse_location,
    parse_mode,
    parse_mtime,
    path_for_key,
    printable,
    relative_key,
    run_cli,
    run_collecting_failures,
    runtime_error,
    usage_error,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Download(RemoteObject):
    """One object (with --at, one version: its version_id) to write to one file."""

    # A default only because the fields before it have one (the plan gives each its path).
    path: PurePath = PurePath()  # noqa: RUF009 (immutable)
    # --checksum: the local file already holds these bytes; only mtime and mode are set.
    same_content: bool = False


@dataclass(frozen=True)
class Refused:
    """A key that would land outside LOCAL: never written."""

    key: str
    why: str


@dataclass(frozen=True)
class Conflict:
    """A key that collides locally with another one: not written."""

    key: str
    why: str


Step = Union[Download, Refused, Conflict]


@dataclass
class Outcome:
    """What running (or showing, --dry-run) the plan did, counted as it came."""

    transferred: int = 0
    skipped: int = 0  # already restored, or the same content (--checksum)
    failed: int = 0  # downloads that failed
    nbytes: int = 0
    archived: int = 0  # objects in an archive storage class, not restored
    refused: int = 0
    conflicts: int = 0


# Downloads the plan runs ahead of the workers (in the progress line's totals, final
# once the plan ends); the first starts once this many are planned.
PLAN_AHEAD = 1_000


# --- Deciding: pure functions --------------------------------------------------

_AGE = re.compile(r"(\d+)([smhdw])")
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# The ISO 8601 forms every supported Python's fromisoformat reads alike.
_ISO_WHEN = re.compile(
    r"\d{4}-\d{2}-\d{2}"
    r"([T ]\d{2}:\d{2}(:\d{2}(\.\d{3}|\.\d{6})?)?(Z|[+-]\d{2}:\d{2})?)?"
)


def parse_when(
    text: str, now: datetime, local_zone: Optional[tzinfo] = None
) -> datetime:
    """The moment --at names, in UTC: an ISO 8601 date or date-time
    (with no zone, in `local_zone`, else the system's), or an age (36h, 7d) before `now`."""
    age = _AGE.fullmatch(text)
    try:
        if age:
            seconds = int(age[1]) * _AGE_SECONDS[age[2]]
            # To the microsecond: some servers keep LastModified to the millisecond.
            return (now - timedelta(seconds=seconds)).astimezone(UTC)
        if _ISO_WHEN.fullmatch(text):
            # Python 3.9 and 3.10 read no "Z" suffix in fromisoformat.
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))  # noqa: FURB162
            if moment.tzinfo is None:
                if local_zone is None:
                    moment = moment.astimezone()  # the system's zone, then
                else:
                    moment = moment.replace(tzinfo=local_zone)
            return moment.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        pass
    raise ValueError(
        f"{text!r} is neither a date or date-time (2026-11-20, 2026-11-20T14:30, "
        "2026-11-20 14:30:05+01:00, Z for UTC) nor an age (90s, 15m, 36h, 7d, 2w)"
    )


def recency(version: ObjectVersion) -> tuple:
    """What orders a key's entries, newest last: LastModified; in the same second
    (S3 keeps whole seconds) the latest one, then a version before a delete marker
    (the listing does not say which of the two came first: restore rather than lose)."""
    return (version.last_modified, version.is_latest, version.size is not None)


def objects_at(
    versions: Iterable[ObjectVersion], when: float
) -> dict[str, RemoteObject]:
    """Each key's newest version whose LastModified is at or before `when`, keyed by
    S3 key; a key whose newest entry by then is a delete marker is left out.
    Times compare to the whole second: servers keep milliseconds, users type
    seconds, so all of the second that `when` names counts as at or before it.

    `versions` come as ListObjectVersions lists them: within the versions, and
    within the delete markers, a key's newest first. Entries of one key may sit
    on different pages, versions and markers apart: they are merged here by key.
    """
    newest: dict[str, tuple[tuple, ObjectVersion]] = {}
    before = math.floor(when) + 1
    for order, version in enumerate(versions):
        if version.last_modified >= before:
            continue
        rank = (*recency(version), -order)  # then the listing's own order
        if version.key not in newest or rank > newest[version.key][0]:
            newest[version.key] = (rank, version)
    return {
        key: RemoteObject(
            key,
            v.size,
            v.last_modified,
            v.storage_class,
            v.etag,
            version_id=v.version_id,
        )
        for key, (_, v) in newest.items()
        if v.size is not None
    }


# A moment: versions and delete markers each within this many seconds of the one before.
MOMENT_GAP = 60.0


@dataclass
class Moment:
    """One backup moment of --history: its first and last LastModified, and what it did."""

    first: float
    last: float
    added: int = 0
    changed: int = 0
    deleted: int = 0


def add_time(starts: list[float], ends: list[float], seconds: float) -> None:
    """Put a LastModified into the moments so far, as their sorted `starts` and
    `ends`: it joins (or bridges) the moments it is within MOMENT_GAP of. Memory
    grows with the moments, not with the times."""
    i = bisect.bisect_right(starts, seconds)  # starts[i - 1] <= seconds < starts[i]
    left = i > 0 and seconds - ends[i - 1] <= MOMENT_GAP
    right = i < len(starts) and starts[i] - seconds <= MOMENT_GAP
    if left and right:
        ends[i - 1] = ends.pop(i)
        del starts[i]
    elif left:
        ends[i - 1] = max(ends[i - 1], seconds)
    elif right:
        starts[i] = seconds
    else:
        starts.insert(i, seconds)
        ends.insert(i, seconds)


def by_key_newest_first(
    pages: Iterable[list[ObjectVersion]],
) -> Iterator[ObjectVersion]:
    """ListObjectVersions pages as each key's versions and delete markers together,
    newest first. A page lists its versions, then its markers, each in key order,
    each key's newest first; a key that goes on in the next page goes on with older ones."""
    for page in pages:
        ordered = sorted(page, key=recency, reverse=True)
        ordered.sort(key=lambda version: version.key)
        yield from ordered


def count_moments(
    changes: Iterable[tuple[object, float, bool]],
    starts: list[float],
    ends: list[float],
) -> list[Moment]:
    """The moments (sorted `starts` and `ends`, from add_time) newest first, with the
    files each added, changed and deleted: `changes` are (key, LastModified, whether
    a version and not a delete marker), each key's together and newest first. A key
    counts once per moment, by its state before the moment and at its end."""
    moments = [Moment(first, last) for first, last in zip(starts, ends)]

    def close(before: bool) -> None:
        if key is None:
            return
        moment = moments[index]
        if after and not before:
            moment.added += 1
        elif after:
            moment.changed += 1
        elif before:
            moment.deleted += 1

    key, index, after = None, -1, False
    for name, seconds, present in changes:
        at = bisect.bisect_left(ends, seconds)  # the moment that holds it
        if name != key:
            close(before=False)
            key, index, after = name, at, present
        elif at != index:
            close(before=present)
            index, after = at, present
    close(before=False)
    return moments[::-1]


def utc_time(seconds: float) -> str:
    """Seconds since the epoch as '2026-11-28 05:12:19 UTC'."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def folder_conflict(file_time: float, folder_time: float) -> str:
    """The conflict line of an object beside a folder of the same name: which is newer."""
    if file_time > folder_time:
        newer = (
            f"the file is newer ({utc_time(file_time)}, the folder's newest object "
            f"{utc_time(folder_time)}): it probably replaced the folder, whose objects "
            "backup.py --delete would remove"
        )
    elif file_time < folder_time:
        newer = (
            f"the folder is newer (its newest object {utc_time(folder_time)}, the file "
            f"{utc_time(file_time)}): it probably replaced the file"
        )
    else:
        newer = f"both were backed up at {utc_time(file_time)}"
    return f"conflict: the backup holds a folder of the same name; restored the folder; {newer}"


def plan_restore(
    objects: Iterable[RemoteObject],
    base_prefix: str,
    root: PurePath,
    filters: Filters,
    case_insensitive: bool,
) -> Iterator[Step]:
    """The steps (where each object goes, which are refused, which collide) from the
    listing in key order, as it comes. `base_prefix` is the prefix folder whose
    contents land directly in root.

    A file waits on a stack while keys under its name plus "/" may still come ("a",
    then "a-b" and "a.txt", then "a/x"); each one waiting is a prefix of the next,
    so no more wait than a key has characters. A file with objects under its name
    is a conflict: the folder is restored. On a case-insensitive file system names
    compare casefolded, in that order: the listing is held whole and sorted, what
    such a file system costs."""
    fold = str.casefold if case_insensitive else str
    named = placed(objects, base_prefix, root, filters, fold)
    if case_insensitive:
        named = iter(sorted(named, key=lambda pair: pair[0]))
    waiting: list[list] = []  # [name, download, newest LastModified under name/]
    for name, step in named:
        while waiting and not may_come_under(name, waiting[-1][0]):
            yield settled(*waiting.pop()[1:])
        if isinstance(step, Refused):
            yield step
            continue
        for folder in waiting:
            if name.startswith(folder[0] + "/"):
                folder[2] = max(folder[2] or 0.0, step.last_modified)
        if waiting and name == waiting[-1][0]:  # only when casefolded
            same = waiting[-1][1].key
            why = f"conflict: same name as {same} on this case-insensitive file system"
            yield Conflict(step.key, why)
        else:
            waiting.append([name, step, None])
    while waiting:
        yield settled(*waiting.pop()[1:])


def placed(
    objects: Iterable[RemoteObject],
    base_prefix: str,
    root: PurePath,
    filters: Filters,
    fold: Callable[[str], str],
) -> Iterator[tuple[str, Union[Download, Refused]]]:
    """(its name, folded, and its Download or Refused) for each object but folder
    markers that the filters select."""
    for obj in objects:
        if obj.key.endswith("/"):
            continue
        relative = relative_key(base_prefix, obj.key)
        if not filters.includes(relative):
            continue
        try:
            path = path_for_key(relative, root)
        except UnsafeKey as exc:
            yield fold(relative), Refused(obj.key, f"refused: the key {exc}")
            continue
        yield fold(relative), Download(**vars(obj), path=path)


def settled(download: Download, folder_time: Optional[float]) -> Step:
    """A waiting file's step: its download, or with objects under it (the newest at
    `folder_time`), a conflict."""
    if folder_time is None:
        return download
    return Conflict(download.key, folder_conflict(download.last_modified, folder_time))


def same_content(
    item: Download, local_md5: Optional[str], remote_md5: Optional[str]
) -> Download:
    """The download marked same_content when its file's MD5 is its object's (None: not known)."""
    if local_md5 is not None and local_md5 == remote_md5:
        return replace(item, same_content=True)
    return item


def restored_mtime_ns(metadata: dict, last_modified: float) -> int:
    """The mtime to give a restored file, in nanoseconds: the recorded one, else LastModified."""
    recorded = parse_mtime(metadata.get("mtime"))
    return recorded if recorded is not None else int(last_modified * 1e9)


def is_restored(path: PurePath, size: int, mtime_ns: int) -> bool:
    """Whether the file at path is already this object, restored whole (size and recorded mtime)."""
    try:
        info = at_any_length(os.stat, str(path))
    except OSError:
        return False
    # Allow for file systems that keep mtimes to the microsecond.
    return (
        stat.S_ISREG(info.st_mode)
        and info.st_size == size
        and abs(info.st_mtime_ns - mtime_ns) < 1000
    )


# --- Doing: listing, folders and files -------------------------------------------


def parent_prefix(prefix: str) -> str:
    """The prefix folder that holds the object named `prefix`."""
    parent = str(PurePosixPath(prefix).parent)
    return "" if parent == "." else parent


def listed(store: Store, prefix: str) -> Iterator[RemoteObject]:
    """The objects under PREFIX/, as listed; a failure to list, whenever, as a CliError."""
    try:
        yield from store.list(folder_prefix(prefix))
    except botocore.exceptions.ClientError as exc:
        raise list_error(store.bucket, prefix, exc) from None


def list_error(bucket: str, prefix: str, exc: BaseException) -> CliError:
    return runtime_error(f"cannot list {printable(f's3://{bucket}/{prefix}')}", exc)


def first_file(objects: Iterator[RemoteObject]) -> Optional[Iterator[RemoteObject]]:
    """The objects from the first one that is not a folder marker on; None if none."""
    for obj in objects:
        if not obj.key.endswith("/"):
            return itertools.chain((obj,), objects)
    return None


def find_objects(store: Store, prefix: str) -> tuple[Iterator[RemoteObject], str]:
    """The objects to restore, in key order, and their base prefix (what to take off
    their keys): everything under PREFIX/ as listed, if any; else the one object PREFIX."""
    objects = first_file(listed(store, prefix))
    if objects is not None or not prefix:
        return objects or iter(()), prefix
    try:
        head = store.head(prefix)
    except botocore.exceptions.ClientError as exc:
        if client_error_code(exc) in ("404", "NoSuchKey"):
            return iter(()), prefix
        raise list_error(store.bucket, prefix, exc) from None
    single = RemoteObject(
        prefix,
        head["ContentLength"],
        head["LastModified"].timestamp(),
        head.get("StorageClass", "STANDARD"),
        head.get("ETag", "").strip('"'),
    )
    return iter((single,)), parent_prefix(prefix)


def find_objects_at(
    store: Store, prefix: str, when: float
) -> tuple[Iterator[RemoteObject], str]:
    """find_objects as at `when`: each key's version at that moment."""
    objects = first_file(versions_at(store, prefix, when))
    if objects is not None or not prefix:
        return objects or iter(()), prefix
    return versions_at(store, prefix, when, one=True), parent_prefix(prefix)


def versions_at(
    store: Store, prefix: str, when: float, one: bool = False
) -> Iterator[RemoteObject]:
    """Each key's version at `when` under PREFIX/ (or, `one`, of the object PREFIX), in
    key order, a key at a time as listed (by_key_newest_first gives each key's entries
    together); a failure to list them, whenever it comes, as a CliError."""
    if one:
        pages = store.version_pages(prefix, through=prefix)
    else:
        pages = store.version_pages(folder_prefix(prefix))
    try:
        entries_by_key = itertools.groupby(
            by_key_newest_first(pages), attrgetter("key")
        )
        for key, entries in entries_by_key:
            if not one or key == prefix:
                yield from objects_at(entries, when).values()
    except botocore.exceptions.ClientError as exc:
        raise versions_error(store.bucket, prefix, exc) from None


def versions_error(bucket: str, prefix: str, exc: BaseException) -> CliError:
    return runtime_error(
        f"cannot list the versions of {printable(f's3://{bucket}/{prefix}')}", exc
    )


# --- --history: the backup's moments, or one object's versions --------------------

# (key number, LastModified, a version and not a delete marker): one entry spilled.
SPILLED = struct.Struct("<Id?")


def spill_changes(
    entries: Iterable[ObjectVersion], spill: BinaryIO
) -> tuple[list[float], list[float]]:
    """Write each entry to `spill` as compact SPILLED records (one key's together,
    keys numbered), and gather their times into moments: their starts and ends."""
    starts: list[float] = []
    ends: list[float] = []
    key, number = None, -1
    for entry in entries:
        if entry.key != key:
            key, number = entry.key, number + 1
        add_time(starts, ends, entry.last_modified)
        spill.write(SPILLED.pack(number, entry.last_modified, entry.size is not None))
    return starts, ends


def spilled_changes(spill: BinaryIO) -> Iterator[tuple[int, float, bool]]:
    spill.seek(0)
    while chunk := spill.read(SPILLED.size * 4096):
        yield from SPILLED.iter_unpack(chunk)


def prefix_moments(
    store: Store, location: Location, filters: Filters
) -> tuple[list[Moment], bool]:
    """The moments of the keys under the location that the filters select, and
    whether there was any key at all under it. One pass over the listing, its
    entries spilled to an unlinked temporary file: memory grows with the moments."""
    prefix = location.prefix
    listed = False

    def selected(entries: Iterable[ObjectVersion]) -> Iterator[ObjectVersion]:
        nonlocal listed
        for entry in entries:
            if entry.key.endswith("/") or (not prefix and is_lock_state(entry.key)):
                continue  # folder markers, and backup.py --lock-days's records
            listed = True
            if filters.includes(relative_key(prefix, entry.key)):
                yield entry

    pages = store.version_pages(folder_prefix(prefix))
    with tempfile.TemporaryFile() as spill:
        starts, ends = spill_changes(selected(by_key_newest_first(pages)), spill)
        return count_moments(spilled_changes(spill), starts, ends), listed


def object_versions(store: Store, location: Location) -> list[ObjectVersion]:
    """The versions and delete markers of the one object the location names, newest first."""
    key = location.prefix
    pages = store.version_pages(key, through=key)
    return [v for v in by_key_newest_first(pages) if v.key == key]


def moment_record(moment: Moment) -> dict:
    return {
        "at": format_when(moment.last),
        "added": moment.added,
        "changed": moment.changed,
        "deleted": moment.deleted,
    }


def version_record(version: ObjectVersion) -> dict:
    return {
        "at": format_when(version.last_modified),
        "size": version.size,
        "delete_marker": version.size is None,
        "current": version.is_latest,
        "version_id": version.version_id,
    }


def moment_line(record: dict) -> str:
    return (
        f"{record['at']}  added {record['added']}, changed {record['changed']}, "
        f"deleted {record['deleted']}"
    )


def version_line(record: dict) -> str:
    what = "deleted" if record["delete_marker"] else f"{record['size']} bytes"
    return f"{record['at']}  {what}{', current' if record['current'] else ''}"


def check_history_arguments(args) -> None:
    """Usage errors of --history, and of a LOCAL missing without it."""
    if not args.history:
        raise usage_error("the following arguments are required: LOCAL (see --help)")
    if args.local is not None:
        raise usage_error(
            f"--history lists and writes nothing: give no LOCAL ({printable(args.local)}), "
            "e.g. restore.py BUCKET::PREFIX --history"
        )
    if args.at is not None:
        raise usage_error(
            "--history lists every moment and takes no --at: restore one with "
            "restore.py BUCKET::PREFIX LOCAL --at WHEN"
        )


def show_history(args, console: Console) -> int:
    """--history: one line per moment under the location, or per version of the
    one object it names, newest first; changes nothing."""
    check_history_arguments(args)
    location = parse_location(args.location)
    filters = Filters(args.filters)
    store = connect(args, location.bucket, console)
    try:
        moments, listed = prefix_moments(store, location, filters)
        versions = (
            [] if listed or not location.prefix else object_versions(store, location)
        )
    except botocore.exceptions.ClientError as exc:
        raise versions_error(location.bucket, location.prefix, exc) from None
    if versions:
        records = [version_record(v) for v in versions]
        name = relative_key(parent_prefix(location.prefix), location.prefix)
        records = records if filters.includes(name) else []
        summary = Summary("listed", versions=records)
        lines = [version_line(r) for r in records]
    elif listed:
        records = [moment_record(m) for m in moments]
        summary = Summary("listed", moments=records)
        lines = [moment_line(r) for r in records]
    else:
        raise CliError(
            f"no history: nothing was ever under {printable(location.url())}"
        )
    for line in lines:
        console.info(line)
    kind = ("version" if versions else "moment") + ("" if len(records) == 1 else "s")
    console.summarize(summary, f"{len(records)} {kind} of {printable(location.url())}")
    return ExitCode.OK


def objects_to_restore(
    store: Store, location: Location, when: Optional[float]
) -> tuple[Iterator[RemoteObject], str]:
    """The objects under the location (as at `when`, if given), in key order, and
    their base prefix; CliError when there are none."""
    if when is None:
        objects, base_prefix = find_objects(store, location.prefix)
    else:
        objects, base_prefix = find_objects_at(store, location.prefix, when)
    if not location.prefix:  # backup.py --lock-days's records, no files of the backup
        objects = (obj for obj in objects if not is_lock_state(obj.key))
    files = first_file(objects)
    if files is None:
        at = "" if when is None else f" at {format_when(when)}"
        raise CliError(
            f"nothing to restore: no objects under {printable(location.url())}{at}"
        )
    return files, base_prefix


def content_checked(
    steps: Iterable[Step], store: Store, workers: int
) -> Iterator[Step]:
    """--checksum: the steps, a download whose file holds its object's bytes (MD5s,
    hashed on `workers` threads) marked same_content; an unreadable file is restored over."""

    def check(step: Step) -> Step:
        if not (isinstance(step, Download) and is_same_size_file(step)):
            return step
        local, remote = both_md5s(store, step.key, str(step.path), step)
        return same_content(step, None if isinstance(local, OSError) else local, remote)

    return map_failing_fast(check, steps, workers)


def is_same_size_file(item: Download) -> bool:
    """Whether the download's file is a regular file (not a link) of its size."""
    try:
        info = at_any_length(os.lstat, str(item.path))
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == item.size


def exists(path: str) -> bool:
    """os.path.exists, for a path of any length."""
    try:
        at_any_length(os.stat, path)
    except (OSError, ValueError):
        return False
    return True


def is_folder(path: str) -> bool:
    """os.path.isdir, for a path of any length."""
    try:
        return stat.S_ISDIR(at_any_length(os.stat, path).st_mode)
    except (OSError, ValueError):
        return False


def nearest_existing(path: str) -> str:
    """path, if it exists, else the nearest of its parents that does."""
    path = os.path.abspath(path)
    while not exists(path):
        path = os.path.dirname(path)
    return path


class Place:
    """A folder to make, rename and remove files in: through its file descriptor
    where its path is long (is_long), else by path. Give os calls name(...) and
    dir_fd=fd."""

    def __init__(self, folder: str):
        self.folder = folder
        self.fd = open_folder(folder) if is_long(folder) else None

    def name(self, name: str) -> str:
        return name if self.fd is not None else os.path.join(self.folder, name)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


# As tempfile.mkstemp opens its files.
_NEW_FILE = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NOINHERIT", 0)
    | getattr(os, "O_BINARY", 0)
)


def create_temporary(place: Place, pattern: str) -> tuple[int, str]:
    """A new file in place named by pattern (TEMPORARY_FILE, CASE_PROBE), open
    for writing: its file descriptor and its name for place."""
    while True:
        name = place.name(pattern.format(secrets.token_hex(4)))
        try:
            return os.open(name, _NEW_FILE, 0o600, dir_fd=place.fd), name
        except FileExistsError:
            continue  # one in 4 billion


def probe_case_insensitive(folder: str) -> bool:
    """Whether the file system holding folder treats names equal but for case as one."""
    with contextlib.closing(Place(folder)) as place:
        try:
            fd, probe = create_temporary(place, CASE_PROBE)
        except OSError as exc:
            raise CliError(
                f"cannot write to {printable(folder)}: {exc.strerror}: check its permissions"
            ) from None
        os.close(fd)
        try:
            folded = place.name(os.path.basename(probe).upper())
            os.stat(folded, dir_fd=place.fd)
            return True
        except OSError:
            return False
        finally:
            os.unlink(probe, dir_fd=place.fd)


def make_folders(path: str) -> None:
    """os.makedirs(path, exist_ok=True), for a path of any length."""
    if not is_long(path):
        os.makedirs(path, exist_ok=True)
        return
    fd = os.open("/" if os.path.isabs(path) else ".", FOLDER_FLAGS)
    try:
        for name in filter(None, path.split("/")):
            fd = open_or_make(fd, name)
    finally:
        os.close(fd)


def open_or_make(
    fd: int, name: str, before_making: Optional[Callable[[int], None]] = None
) -> int:
    """The file descriptor of the folder `name` in the folder open as fd, made
    if missing (once before_making(fd) has not raised); fd is closed."""
    try:
        try:
            inner = os.open(name, FOLDER_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if before_making:
                before_making(fd)
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=fd)
            inner = os.open(name, FOLDER_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)
    return inner


def leads_inside(fd: int, root: tuple[int, int]) -> bool:
    """Whether the folder open as fd lies inside the one whose (st_dev, st_ino)
    is root: found by going up through "..", whatever links led to it."""
    current = os.open(".", FOLDER_FLAGS, dir_fd=fd)
    try:
        info = os.fstat(current)
        while (info.st_dev, info.st_ino) != root:
            parent = os.open("..", FOLDER_FLAGS, dir_fd=current)
            os.close(current)
            current, below = parent, info
            info = os.fstat(current)
            if (info.st_dev, info.st_ino) == (below.st_dev, below.st_ino):
                return False  # "/", its own parent
        return True
    finally:
        os.close(current)


class Folders:
    """Creates the folders files land in, once each, and never outside the root;
    removes the temporary files a killed restore left in each, before the first
    file lands there."""

    def __init__(self, root: str):
        self._base = str(PurePath(root))
        self._root = PurePath(os.path.realpath(root))
        info = at_any_length(os.stat, root)
        self._identity = (info.st_dev, info.st_ino)
        self._made: set[str] = set()
        self._cleaned: set[tuple[int, int]] = set()  # (st_dev, st_ino)
        # Held from a folder's creation to its clean-up: a worker that cleaned up
        # a folder in the middle of another's first write there would remove it.
        self._lock = threading.Lock()

    def ensure(self, folder: str) -> None:
        if folder in self._made:
            return
        with self._lock:
            if folder in self._made:
                return
            if is_long(folder):
                self._ensure_by_fd(folder)
            else:
                self._ensure_by_path(folder)
            self._made.add(folder)

    def _ensure_by_path(self, folder: str) -> None:
        # A symbolic link already inside LOCAL may point elsewhere: follow it and
        # check before creating anything through it, and after, for one made meanwhile.
        self._refuse_outside(folder)
        try:
            os.makedirs(folder, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise CliError(
                f"a file stands where the backup has a folder: {printable(blocking_file(folder))}: "
                "move it away and run again"
            ) from None
        self._refuse_outside(folder)
        self._clean(folder)

    def _ensure_by_fd(self, folder: str) -> None:
        """ensure() of a long path (whose realpath says nothing): made a name at a
        time from the root's file descriptor, and found inside it by identity."""

        def inside(fd: int) -> None:
            if not leads_inside(fd, self._identity):
                raise outside_error(folder)

        names = os.path.relpath(folder, self._base).split(os.sep)
        names = [name for name in names if name not in ("", ".")]
        fd = open_folder(self._base)
        try:
            for depth, name in enumerate(names):
                current, fd = fd, None  # open_or_make closes it
                try:
                    fd = open_or_make(current, name, inside)
                except NotADirectoryError:
                    blocking = os.path.join(self._base, *names[: depth + 1])
                    raise CliError(
                        f"a file stands where the backup has a folder: {printable(blocking)}: "
                        "move it away and run again"
                    ) from None
            inside(fd)
            self._clean(fd)
        finally:
            if fd is not None:
                os.close(fd)

    def _clean(self, folder: Union[str, int]) -> None:
        """Remove the temporary files in folder (a path, or an open fd), unless
        they are gone already: another name may lead to the same folder."""
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) not in self._cleaned:
            remove_temporary_files(folder)
            self._cleaned.add((info.st_dev, info.st_ino))

    def _refuse_outside(self, folder: str) -> None:
        if not is_within(PurePath(os.path.realpath(folder)), self._root):
            raise outside_error(folder)


def outside_error(folder: str) -> CliError:
    return CliError(
        f"refused: {printable(folder)} leads outside the destination (through a symbolic link)"
    )


def remove_temporary_files(folder: Union[str, int]) -> None:
    """Remove the files named as restore's temporary files in folder (a path, or
    an open fd): a killed run's."""
    dir_fd = folder if isinstance(folder, int) else None
    with os.scandir(folder) as listing:
        for entry in listing:
            if TEMPORARY_NAME.fullmatch(entry.name) and entry.is_file(
                follow_symlinks=False
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path, dir_fd=dir_fd)


def blocking_file(folder: str) -> str:
    """The file that stops makedirs(folder): folder itself or the first of its parents that is not a folder."""
    blocking = folder
    parent = os.path.dirname(folder)
    while parent != blocking and not os.path.isdir(parent):
        blocking, parent = parent, os.path.dirname(parent)
    return blocking


def write_atomically(
    path: str, fill: Callable[[BinaryIO], None], mode: int, mtime_ns: int
) -> None:
    """Write a file through a temporary file in its folder, renamed into place
    only when complete; in a long folder, by the folder's file descriptor."""
    folder, name = os.path.split(path)
    with contextlib.closing(Place(folder)) as place:
        fd, temporary = create_temporary(place, TEMPORARY_FILE)
        target, dir_fd = place.name(name), place.fd
        try:
            with os.fdopen(fd, "wb") as out:
                fill(out)
            os.chmod(temporary, mode, dir_fd=dir_fd)
            os.utime(temporary, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd)
            os.replace(temporary, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as exc:
            os.unlink(temporary, dir_fd=dir_fd)
            if isinstance(exc, IsADirectoryError) and exc.filename2 == target:
                raise CliError(
                    f"a folder stands where the backup has a file: {printable(path)}: "
                    "move it away and run again"
                ) from None
            if isinstance(exc, OSError) and exc.filename in (temporary, target):
                # The temporary file is ours: the user knows the target.
                exc.filename, exc.filename2 = path, None
            raise


class Restorer:
    """One object down (called by run_collecting_failures) into its file, written
    through a temporary file; the parts of large ones side by side (Store.get_parts).
    Its call gives False when the file already held the object."""

    def __init__(
        self, store: Store, folders: Folders, default_mode: int, console: Console
    ):
        self.store, self.folders, self.console = store, folders, console
        self.default_mode = default_mode

    def __call__(self, item: Download, cancel: threading.Event) -> bool:
        path = str(item.path)
        self.folders.ensure(os.path.dirname(path))
        if item.same_content:
            self.keep(item, path)
            return False
        if item.size < MULTIPART_THRESHOLD:
            self.store.get(
                item.key,
                functools.partial(self.write_object, item, path, cancel),
                item.version_id,
                item.size,
                item.storage_class,
            )
        elif not self.write_large(item, path):
            self.console.advance(files=1)
            self.console.detail(f"already restored: {printable(path)}")
            return False
        self.console.advance(files=1)
        self.console.detail(
            f"restore: {printable(f's3://{self.store.bucket}/{item.key}')} -> "
            f"{printable(path)}"
        )
        return True

    def file_mode(self, metadata: dict) -> int:
        mode = parse_mode(metadata.get("mode"))
        return self.default_mode if mode is None else mode

    def write_object(
        self, item: Download, path: str, cancel: threading.Event, fetched: FetchedObject
    ) -> None:
        """The fetched object's body into its file."""

        def fill(out: BinaryIO) -> None:
            for chunk in fetched.chunks:
                if cancel.is_set():
                    raise Cancelled()
                out.write(chunk)

        mtime_ns = restored_mtime_ns(fetched.metadata, fetched.last_modified)
        write_atomically(path, fill, self.file_mode(fetched.metadata), mtime_ns)
        self.console.advance(nbytes=item.size)

    def write_large(self, item: Download, path: str) -> bool:
        """A HEAD for the metadata, then parallel ranged GETs written in place,
        unless an earlier (interrupted) run already restored this very file whole."""
        head = self.store.head(item.key, item.version_id)
        mtime_ns = restored_mtime_ns(head["Metadata"], head["LastModified"].timestamp())
        # The size of the version the parts ask for, whatever the listing said.
        if is_restored(path, head["ContentLength"], mtime_ns):
            return False

        def fill(out: BinaryIO) -> None:
            advance = self.console.advance  # by the bytes written
            self.store.get_parts(item.key, head, out.fileno(), advance, item.version_id)

        write_atomically(path, fill, self.file_mode(head["Metadata"]), mtime_ns)
        return True

    def keep(self, item: Download, path: str) -> None:
        """The file already holds the object's bytes: give it the recorded mode and mtime."""
        metadata, last_modified = self.store.metadata(
            item.key, item.version_id, item.size, item.storage_class
        )
        at_any_length(os.chmod, path, self.file_mode(metadata))
        mtime_ns = restored_mtime_ns(metadata, last_modified)
        at_any_length(os.utime, path, ns=(mtime_ns, mtime_ns))
        self.console.advance(files=1)
        self.console.detail(f"same content: {printable(path)}")


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- The command ----------------------------------------------------------------


EXAMPLES = """
  python restore.py my-bucket::documents --history   # the moments --at can bring back
  python restore.py my-bucket::documents ~/Documents-restored
  python restore.py s3://family-archive/photos/2024 ~/Pictures/2024 --include '*.jpg'
  python restore.py my-bucket::misc/notes.txt ~/recovered   # one object: ~/recovered/notes.txt
  python restore.py my-bucket::documents ~/Documents-restored --dry-run -v
  python restore.py my-bucket::documents ~/Documents --checksum   # fetch only what differs
  python restore.py nightly::srv /srv/data-restored --json --bwlimit 20M > report.json
  python restore.py my-bucket::documents ~/Documents-yesterday --at 1d   # as it was a day ago
  python restore.py my-bucket::documents/taxes/2025.pdf ~/recovered --at 2026-11-20
"""


def build_parser() -> ArgumentParser:
    """restore.py's command line."""
    parser = ArgumentParser(
        prog="restore.py",
        description="Restore a prefix (or one object) from S3 into a folder.",
        examples=EXAMPLES,
    )
    parser.add_argument(
        "location",
        metavar="BUCKET::PREFIX",
        help="what to restore, also s3://BUCKET/PREFIX; a prefix or one object",
    )
    parser.add_argument(
        "local",
        metavar="LOCAL",
        nargs="?",
        help="the folder to restore into (created if missing); none with --history",
    )
    parser.add_argument(
        "--at",
        metavar="WHEN",
        type=when_argument,
        help="restore the prefix as it was at WHEN: a date or date-time (no zone "
        "means local time) or an age (36h, 7d, 2w); older states need a bucket "
        "with versioning (e.g. --at 2026-11-20, --at '2026-11-20 14:30', "
        "--at 2026-11-20T14:30:05Z, --at 7d)",
    )
    parser.add_argument(
        "--history",
        action="store_true",
        help="list the backup's moments, newest first, each with its --at value and "
        "the files it added, changed and deleted (for one object: its versions); "
        "takes no LOCAL, changes nothing (e.g. restore.py my-bucket::documents --history)",
    )
    add_shared_options(parser)
    return parser


def when_argument(text: str) -> datetime:
    """--at's value, read at the moment the command line is."""
    try:
        return parse_when(text, datetime.now().astimezone())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def downloads_of(
    steps: Iterable[Step], outcome: Outcome, location: Location, console: Console
) -> Iterator[Download]:
    """The plan's downloads, added to the progress line's totals as they come; its
    refused keys and conflicts said, one error line each, and counted."""
    for step in steps:
        if isinstance(step, Download):
            console.planned(1, step.size)
            yield step
            continue
        console.error(f"{printable(location.url(step.key))}: {step.why}", key=step.key)
        if isinstance(step, Refused):
            outcome.refused += 1
        else:
            outcome.conflicts += 1
    console.totals_known()


def show_plan(steps: Iterable[Step], location: Location, console: Console) -> Outcome:
    """--dry-run: one line for each object a restore would fetch, and what it would do."""
    outcome = Outcome()
    for item in downloads_of(steps, outcome, location, console):
        outcome.archived += item.storage_class in ARCHIVE_STORAGE_CLASSES
        if item.same_content:
            outcome.skipped += 1
            continue
        outcome.transferred += 1
        outcome.nbytes += item.size
        console.info(
            f"(dry run) restore: {printable(location.url(item.key))} -> {printable(item.path)}"
        )
    return outcome


def execute_restore(
    steps: Iterable[Step], store: Store, location: Location, local: str, args, console
) -> Outcome:
    """Download the plan's objects on --workers threads, the plan drawn PLAN_AHEAD
    downloads ahead of them; one error line for each that fails."""
    outcome = Outcome()
    console.start(known=False)
    folders = Folders(local)
    folders.ensure(local)  # where the case probe was
    restorer = Restorer(store, folders, 0o666 & ~current_umask(), console)
    counting = threading.Lock()

    def restore(item: Download, cancel: threading.Event) -> None:
        restored = restorer(item, cancel)
        with counting:
            if restored:
                outcome.transferred += 1
                outcome.nbytes += item.size
            else:
                outcome.skipped += 1

    downloads = downloads_of(steps, outcome, location, console)
    try:
        failures, _ = run_collecting_failures(
            downloads, restore, args.workers, PLAN_AHEAD, store
        )
    finally:
        store.close()
    console.finish()
    for failure in failures:
        where = location.url(failure.item.key)
        if failure.item.storage_class in ARCHIVE_STORAGE_CLASSES:
            where += f" ({failure.item.storage_class})"
        error = key_error(
            failure.error, failure.item.key, ", or it was deleted since it was listed"
        )
        console.error(failure_line("restore", where, error), key=failure.item.key)
    outcome.failed = len(failures)
    outcome.archived = sum(
        f.item.storage_class in ARCHIVE_STORAGE_CLASSES for f in failures
    )
    return outcome


def checked_local(args) -> str:
    """LOCAL, a folder or nothing yet (else a usage error, exit 2)."""
    if not args.local or (exists(args.local) and not is_folder(args.local)):
        raise usage_error(
            f"{args.local!r} is not a folder: give a folder to restore into"
        )
    return args.local


def run(args, console: Console) -> int:
    """gather (list the objects) -> plan -> execute (or show, with --dry-run) ->
    report, the listing flowing through the plan into the workers as it comes."""
    if args.history or args.local is None:
        return show_history(args, console)
    started = time.monotonic()
    location = parse_location(args.location)
    filters = Filters(args.filters)
    local = checked_local(args)
    store = connect(args, location.bucket, console)
    when = None if args.at is None else args.at.timestamp()

    objects, base_prefix = objects_to_restore(store, location, when)
    if not args.dry_run:
        make_folders(local)
    # A dry run probes where LOCAL would be made, and removes its probe: it
    # reports the conflicts the real run would.
    case_insensitive = probe_case_insensitive(nearest_existing(local))
    steps = plan_restore(objects, base_prefix, Path(local), filters, case_insensitive)
    if args.checksum:
        steps = content_checked(steps, store, args.workers)
    if args.dry_run:
        outcome = show_plan(steps, location, console)
    else:
        outcome = execute_restore(steps, store, location, local, args, console)
    return report_restore(args, outcome, when, console, started)


def report_restore(
    args, outcome: Outcome, when: Optional[float], console: Console, started: float
) -> int:
    """The closing summary; the exit code."""
    summary = Summary(
        "restored",
        transferred=outcome.transferred,
        skipped=outcome.skipped,
        failed=outcome.failed + outcome.refused + outcome.conflicts,
        nbytes=outcome.nbytes,
        seconds=time.monotonic() - started,
        refused=outcome.refused,
        conflicts=outcome.conflicts,
        archived=outcome.archived,
        at=None if when is None else format_when(when),
    )
    if args.dry_run:
        console.summarize(
            summary,
            f"(dry run) would restore {outcome.transferred} ({outcome.nbytes} bytes), "
            f"skip {outcome.skipped}",
        )
    else:
        console.summarize(summary)
    return ExitCode.FAILURE if summary.failed else ExitCode.OK


def main(argv: Optional[list[str]] = None) -> int:
    """Run restore.py with argv (default: the command line); the exit code."""
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    exit_script(main())
