"""Back up a folder (or one file) to S3, uploading only what changed.

usage: python backup.py LOCAL BUCKET::PREFIX [options]
       python backup.py LOCAL s3://BUCKET/PREFIX [options]

Each file becomes the object PREFIX/<path relative to LOCAL>, with its mtime
and mode in user metadata. The bucket is created when it does not exist, with
versioning on and a lifecycle rule that keeps replaced and deleted versions for
--keep-days days (restore.py --at brings them back).
"""

from __future__ import annotations

import os
import signal

# Ctrl-C while botocore is imported (the first tenth of a second) exits 130,
# quietly, until run_cli takes over; os._exit, since nothing is written yet.
signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
# With awscrt installed (aws-cli v2, boto3[crt]) botocore signs with it instead of
# its Python signer, whose failures are ours to report: the CRT's print a
# traceback when a file changes or Ctrl-C stops an upload. Its own switch:
os.environ.setdefault("BOTO_DISABLE_CRT", "true")

import hashlib
import io
import mimetypes
import stat
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import BinaryIO

import botocore.exceptions

from s3common import (
    LIST_PAGE,
    MD5_METADATA,
    MULTIPART_THRESHOLD,
    PART_WORKERS,
    SMALL_OBJECT,
    ArgumentParser,
    BandwidthSubscriber,
    CliError,
    Connection,
    Console,
    Contents,
    DirectFailed,
    ExitCode,
    Failure,
    Filters,
    Location,
    ProgressSubscriber,
    RemoteObject,
    Summary,
    UnsafeKey,
    add_shared_options,
    bucket_name_problem,
    client_error_code,
    compare_contents,
    connect,
    crc32_header,
    exit_script,
    failure_line,
    file_md5,
    folder_prefix,
    format_mtime,
    in_background,
    key_for,
    key_length_problem,
    list_objects,
    map_in_background,
    md5chksum,
    parse_location,
    parse_mtime,
    path_for_key,
    positive_int,
    printable,
    relative_key,
    restore_point,
    run_cli,
    run_in_parallel,
    runtime_error,
    usage_error,
)

DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
# The one lifecycle rule of our own in a bucket: found and updated by this ID.
HISTORY_RULE_ID = "s3backup-retention"
DEFAULT_KEEP_DAYS = 30
ABORT_INCOMPLETE_DAYS = 7
# A file seen changing while it is read is read this many times in all.
READ_ATTEMPTS = 3
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


class FileChanged(CliError):
    """The file changed while it was read or uploaded."""

    def __init__(self):
        super().__init__(
            f"it changed during the backup, {READ_ATTEMPTS} times in a row: "
            "not backed up as it is now; run again when nothing writes to it"
        )


@dataclass(frozen=True)
class LocalFile:
    path: str
    size: int
    mtime_ns: int
    mode: int


@dataclass(frozen=True)
class Upload:
    key: str
    file: LocalFile
    # "new", "size changed", "newer", "content changed" or "no MD5 to compare"
    reason: str
    md5: str | None = None  # the file's, when --checksum has hashed it already


@dataclass(frozen=True)
class BackupPlan:
    uploads: tuple[Upload, ...]
    deletes: tuple[str, ...]
    skipped: int


@dataclass(frozen=True)
class CheckReport:
    """How a backup differs from LOCAL (--check), by key."""

    missing: tuple[str, ...]  # files with no object
    changed: tuple[tuple[str, str], ...]  # (key, why): files whose object differs
    extra: tuple[str, ...]  # objects with no file
    identical: int


@dataclass
class Scan:
    files: dict[str, LocalFile] = field(default_factory=dict)  # by S3 key
    warnings: list[str] = field(default_factory=list)
    errors: list[Failure] = field(default_factory=list)


# --- Deciding: pure functions --------------------------------------------------


def upload_reason(
    local: LocalFile,
    remote: RemoteObject | None,
    local_md5: str | None = None,
    remote_md5: str | None = None,
    by_content: bool = False,
) -> str | None:
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


def plan_backup(
    local: dict[str, LocalFile],
    remote: dict[str, RemoteObject],
    prefix: str,
    filters: Filters,
    delete: bool,
    contents: Contents | None = None,
) -> BackupPlan:
    """What to upload and delete, from the local and the remote listing keyed by S3 key.

    With `contents` (--checksum), files of their object's size are compared by MD5.
    """
    uploads, skipped = [], 0
    for key in sorted(local):
        if not filters.includes(relative_key(prefix, key)):
            continue
        reason = upload_reason(
            local[key],
            remote.get(key),
            contents.local.get(key) if contents else None,
            contents.remote.get(key) if contents else None,
            by_content=contents is not None,
        )
        if reason:
            md5 = contents.local.get(key) if contents else None
            uploads.append(Upload(key, local[key], reason, md5))
        else:
            skipped += 1
    deletes = ()
    if delete:
        deletes = tuple(
            key
            for key in sorted(remote)
            if key not in local
            and not key.endswith("/")
            and filters.includes(relative_key(prefix, key))
        )
    return BackupPlan(tuple(uploads), deletes, skipped)


def history_rule(keep_days: int | None) -> dict:
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


def file_state(info: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is written to, replaced, resized or chmod'ed."""
    return (
        info.st_dev,
        info.st_ino,
        info.st_size,
        info.st_mtime_ns,
        info.st_ctime_ns,
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


def future_dated(plan: BackupPlan, now: float) -> list[Upload]:
    """The uploads planned only because the file's mtime is after now.

    Such a file stays "newer" than its object forever; its recorded mtime says
    whether the object already holds it.
    """
    return [
        upload
        for upload in plan.uploads
        if upload.reason == "newer" and upload.file.mtime_ns > now * 1e9
    ]


def stale_folders(
    local: dict[str, LocalFile],
    remote: dict[str, RemoteObject],
    prefix: str,
    filters: Filters,
) -> dict[str, int]:
    """Folders in the backup that LOCAL now holds as a file: the number of objects
    under each that --delete would remove, by the file's key."""
    stale: dict[str, int] = {}
    for key in remote:
        relative = relative_key(prefix, key)
        if key in local or key.endswith("/") or not filters.includes(relative):
            continue
        parts = relative.split("/")
        for depth in range(1, len(parts)):
            folder = key_for(prefix, "/".join(parts[:depth]))
            if folder in local:
                stale[folder] = stale.get(folder, 0) + 1
                break
    return stale


def without_recorded(plan: BackupPlan, recorded: dict[str, int | None]) -> BackupPlan:
    """The plan less the uploads whose object records the file's very mtime
    (`recorded`: the mtime metadata by key, None where there is none)."""
    uploads = tuple(
        upload
        for upload in plan.uploads
        if recorded.get(upload.key, None) != upload.file.mtime_ns
    )
    skipped = plan.skipped + len(plan.uploads) - len(uploads)
    return replace(plan, uploads=uploads, skipped=skipped)


def refuse_keys(scan: Scan, prefix: str, root: PurePath) -> list[Failure]:
    """Take out of the scan the files whose keys S3 refuses (their failures), and
    warn of those that restore.py refuses on this kind of system (root's flavour)."""
    refused = []
    for key, file in list(scan.files.items()):
        problem = key_length_problem(key)
        if problem:
            del scan.files[key]
            refused.append(Failure(file.path, CliError(problem)))
            continue
        try:
            path_for_key(relative_key(prefix, key), root)
        except UnsafeKey as exc:
            scan.warnings.append(
                f"{printable(file.path)}: backed up, but restore.py on this kind of "
                f"system refuses it: the key {exc}"
            )
    return refused


def same_size_files(
    local: dict[str, LocalFile],
    remote: dict[str, RemoteObject],
    prefix: str,
    filters: Filters,
) -> dict[str, tuple[str, RemoteObject]]:
    """The files to compare by content: those of their object's size, within the filters."""
    return {
        key: (file.path, remote[key])
        for key, file in local.items()
        if key in remote
        and remote[key].size == file.size
        and filters.includes(relative_key(prefix, key))
    }


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


def needs_md5chksum(size: int, extra: dict) -> bool:
    """Whether the object's ETag will not be its MD5: a multipart upload, or SSE-KMS."""
    return size >= MULTIPART_THRESHOLD or extra.get(
        "ServerSideEncryption", ""
    ).startswith("aws:kms")


def upload_args(file: LocalFile, extra: dict, md5: str | None = None) -> dict:
    """Metadata (mtime and mode as rclone writes them, and md5chksum when given),
    Content-Type and the pass-through options."""
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
    args.update(extra)
    return args


def listing_boundaries(expected_keys: Iterable[str]) -> list[str]:
    """Where to cut a listing into ranges of one page each, from the keys it should hold.

    Every LIST_PAGE-th key in sorted order but the last key itself: a range after
    the last key holds nothing that is expected, only what is new.
    """
    ordered = sorted(expected_keys)
    return ordered[LIST_PAGE - 1 : -1 : LIST_PAGE]


# --- Doing: the local walk and the S3 calls -------------------------------------


def scan_folder(root: str, prefix: str, follow_symlinks: bool) -> Scan:
    """Every regular file under root, in sorted order, keyed by its S3 key.

    Symbolic links are followed unless told not to; a link back to a folder
    on the way down is a loop, reported and not followed.
    """
    scan = Scan()
    root_stat = os.stat(root)
    stack = [(root, "", frozenset({(root_stat.st_dev, root_stat.st_ino)}))]
    while stack:
        folder, relative_folder, ancestors = stack.pop()
        try:
            with os.scandir(folder) as entries:
                entries = sorted(entries, key=lambda entry: entry.name)
        except OSError as exc:
            scan.errors.append(Failure(folder, exc))
            continue
        subfolders = []
        for entry in entries:
            relative = relative_folder + entry.name
            try:
                if not follow_symlinks and entry.is_symlink():
                    continue
                info = entry.stat()
            except FileNotFoundError:
                if entry.is_symlink():
                    scan.warnings.append(
                        f"broken symbolic link skipped: {printable(entry.path)}"
                    )
                else:
                    scan.warnings.append(
                        f"vanished during the backup, not uploaded: {printable(entry.path)}"
                    )
                continue
            except OSError as exc:
                scan.errors.append(Failure(entry.path, exc))
                continue
            if stat.S_ISDIR(info.st_mode):
                identity = (info.st_dev, info.st_ino)
                if identity in ancestors:
                    scan.warnings.append(
                        f"symbolic link loop not followed: {printable(entry.path)}"
                    )
                else:
                    subfolders.append(
                        (entry.path, relative + "/", ancestors | {identity})
                    )
            elif stat.S_ISREG(info.st_mode):
                scan.files[key_for(prefix, relative)] = LocalFile(
                    entry.path, info.st_size, info.st_mtime_ns, info.st_mode
                )
            else:
                scan.warnings.append(
                    f"not a regular file, skipped: {printable(entry.path)}"
                )
        stack.extend(reversed(subfolders))
    return scan


def stat_local(local: str) -> os.stat_result:
    """LOCAL's stat, once it is known to be a folder or a regular file."""
    try:
        info = os.stat(local)
    except FileNotFoundError:
        raise usage_error(
            f"{local!r} does not exist: give the folder or file to back up"
        ) from None
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        raise usage_error(f"{local!r} is not a regular file or a folder")
    return info


def scan_local(
    local: str, info: os.stat_result, prefix: str, follow_symlinks: bool
) -> Scan:
    """The files to back up from LOCAL (with its stat_local)."""
    if stat.S_ISDIR(info.st_mode):
        return scan_folder(local, prefix, follow_symlinks)
    name = os.path.basename(os.path.normpath(local))
    file = LocalFile(local, info.st_size, info.st_mtime_ns, info.st_mode)
    return Scan(files={key_for(prefix, name): file})


def recorded_mtimes(
    client, bucket: str, uploads: list[Upload], workers: int
) -> dict[str, int | None]:
    """The mtime recorded on each upload's object (HeadObject), None where there is none."""

    def recorded(upload: Upload) -> int | None:
        try:
            head = client.head_object(Bucket=bucket, Key=upload.key)
        except botocore.exceptions.ClientError:
            return None  # uploaded again, which says what is wrong if anything is
        return parse_mtime(head.get("Metadata", {}).get("mtime"))

    answers = map_in_background(recorded, uploads, workers)
    return {upload.key: answer.result() for upload, answer in zip(uploads, answers)}


def bucket_exists(client, bucket: str) -> bool:
    """HeadBucket: whether the bucket is there; any other answer than yes or no is an error."""
    try:
        client.head_bucket(Bucket=bucket)
        return True
    except botocore.exceptions.ClientError as exc:
        if client_error_code(exc) not in ("404", "NoSuchBucket"):
            raise runtime_error(f"bucket {bucket}", exc) from None
    return False


def describe_history(keep_days: int | None) -> str:
    if keep_days is None:
        return (
            f"without versioning (lifecycle rule {HISTORY_RULE_ID}: incomplete "
            f"uploads aborted after {ABORT_INCOMPLETE_DAYS} days)"
        )
    return (
        f"with versioning (lifecycle rule {HISTORY_RULE_ID}: old versions kept "
        f"{keep_days} days)"
    )


def bucket_versioning(client, bucket: str) -> str:
    """GetBucketVersioning's status: "Enabled", "Suspended" or "" (never turned on)."""
    return client.get_bucket_versioning(Bucket=bucket).get("Status", "")


class HistoryUnsupported(Exception):
    """The server has no versioning or lifecycle rules (NotImplemented), as some
    S3-compatible servers do not."""


def set_up_history(client, bucket: str, keep_days: int | None, new: bool) -> bool:
    """Put our lifecycle rule beside the bucket's own, then turn versioning on
    (unless keep_days is None): the rule first, so that no version is kept
    with nothing to expire it. Whether anything had to change."""
    changed = False
    try:
        rules, extra = [], {}
        if not new:
            rules, extra = lifecycle_configuration(client, bucket)
        merged = merge_lifecycle_rules(rules, history_rule(keep_days))
        if merged != rules:
            client.put_bucket_lifecycle_configuration(
                Bucket=bucket, LifecycleConfiguration={"Rules": merged}, **extra
            )
            changed = True
        if keep_days is not None and (
            new or bucket_versioning(client, bucket) != "Enabled"
        ):
            client.put_bucket_versioning(
                Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
            )
            changed = True
    except botocore.exceptions.ClientError as exc:
        if new and client_error_code(exc) == "NotImplemented":
            raise HistoryUnsupported() from None
        raise runtime_error(
            f"cannot turn on history (versioning and lifecycle rule) for bucket {bucket}",
            exc,
        ) from None
    return changed


def lifecycle_configuration(client, bucket: str) -> tuple[list[dict], dict]:
    """The bucket's lifecycle rules, and the other settings to send back with them."""
    try:
        answer = client.get_bucket_lifecycle_configuration(Bucket=bucket)
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


def create_bucket(
    client,
    bucket: str,
    region: str,
    keep_days: int | None,
    dry_run: bool,
    console: Console,
) -> None:
    """Create the missing bucket in `region`, wait until it exists, and set up its
    history (keep_days None: no versioning)."""
    problem = bucket_name_problem(bucket)
    if problem:
        raise usage_error(f"cannot create bucket {bucket!r}: {problem}")
    history = describe_history(keep_days)
    if dry_run:
        console.info(f"(dry run) create bucket s3://{bucket} in {region} {history}")
        return
    # us-east-1 is the default location and refuses to be named as a constraint.
    location = (
        {}
        if region == "us-east-1"
        else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    )
    try:
        client.create_bucket(Bucket=bucket, **location)
    except botocore.exceptions.ClientError as exc:
        if client_error_code(exc) != "BucketAlreadyOwnedByYou":
            raise runtime_error(f"cannot create bucket {bucket}", exc) from None
    client.get_waiter("bucket_exists").wait(
        Bucket=bucket, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
    )
    try:
        set_up_history(client, bucket, keep_days, new=True)
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
    def of(cls, path: str, source: BinaryIO | None = None) -> ReadStart:
        """Now, for the open file `source`, or else for the file at `path`."""
        started = time.time_ns()
        info = os.stat(path) if source is None else os.fstat(source.fileno())
        return cls(path, info, started)

    def file(self) -> LocalFile:
        """The file as it was when the read began."""
        info = self.before
        return LocalFile(self.path, info.st_size, info.st_mtime_ns, info.st_mode)

    def check(self, after: os.stat_result | None = None) -> None:
        """FileChanged unless the file has been left as it was since the read began
        (`after`: its stat now, if there is one at hand)."""
        after = os.stat(self.path) if after is None else after
        if not read_unchanged(self.before, after, self.started_ns):
            raise FileChanged()


def read_whole(source: BinaryIO, start: ReadStart) -> bytes:
    """The bytes of the open file, from one read during which it did not change."""
    data = source.read()
    if len(data) != start.before.st_size:
        raise FileChanged()
    # The open file's own stat: one system call less than by name (each one lets
    # the other upload threads take the GIL), and what was read is this file.
    start.check(os.fstat(source.fileno()))
    return data


class PartFile(io.FileIO):
    """A file that s3transfer opens by name to read one part of it, and that
    raises FileChanged when it holds fewer bytes than asked for: the file was
    cut short since the upload began. A short body would otherwise go out under
    the part's Content-Length, and the server would wait for the rest (60 s)."""

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        if size is not None and 0 <= size != len(data):
            raise FileChanged()
        return data


def before_complete_multipart(client, check: Callable[[str], None]) -> None:
    """Call check(key) before the client sends each CompleteMultipartUpload.

    An exception from check fails that request, so s3transfer fails the upload
    and aborts it (its clean-up after a failure): the parts are never joined.
    """

    def before(params, **kwargs) -> None:
        check(params["Key"])

    client.meta.events.register(
        "before-parameter-build.s3.CompleteMultipartUpload", before
    )


def make_uploader(connection: Connection, bucket: str, extra: dict, console: Console):
    """The work function for run_in_parallel: one file up, as one PUT or a parallel
    multipart, from one read of it during which it did not change; False when it
    vanished since the scan."""
    client, direct = connection.client, connection.direct
    bandwidth = connection.bandwidth  # None without --bwlimit
    # The read of each multipart upload under way, by key, checked before its parts are joined.
    multipart_reads: dict[str, ReadStart] = {}
    before_complete_multipart(
        client,
        lambda key: multipart_reads[key].check() if key in multipart_reads else None,
    )

    def put_whole(key: str, file: LocalFile, data: bytes, cancel) -> None:
        """One PutObject of the bytes read: a direct request for a small file, else
        through botocore. md5chksum, when the object needs it, is of those bytes."""
        # Bodies of one request are let through whole (they are at most 8 MiB):
        # botocore reads a body more than once, for its checksums, before it sends it.
        if bandwidth:
            bandwidth.take(file.size, cancel)
        md5 = None
        if needs_md5chksum(file.size, extra):
            md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        # Our own checksum header, so that botocore streams no aws-chunked body
        # with a trailing one (see connect), direct or not.
        args = {
            **upload_args(file, extra, md5),
            "ChecksumAlgorithm": "CRC32",
            "ChecksumCRC32": crc32_header(zlib.crc32(data)),
        }
        if file.size > SMALL_OBJECT:
            client.put_object(Bucket=bucket, Key=key, Body=data, **args)
            return
        try:
            direct.put(bucket, key, data, args)
        except DirectFailed as failure:
            # botocore sends it (again), with its retries and error messages.
            direct.fallback_client(failure).put_object(
                Bucket=bucket, Key=key, Body=data, **args
            )

    def put_multipart(
        key: str, start: ReadStart, md5: str | None, manager, cancel
    ) -> None:
        """Parallel parts read from the file by name, as s3transfer does: each
        part's checksum is over the bytes read for it, and the parts are joined
        only if the file was left alone from before the first read to after the
        last, so they are one state of it. (Reading the parts through a file
        object of ours would check it too, but s3transfer holds up to 10 parts
        of such a file in memory: 319 MiB peak for W3 against 79 MiB.)"""
        file = start.file()
        subscribers = [ProgressSubscriber(console, size=file.size)]
        if bandwidth:
            subscribers.append(BandwidthSubscriber(bandwidth, cancel))
        multipart_reads[key] = start
        try:
            # CreateMultipartUpload carries the metadata before any part is read,
            # so the MD5 takes a pass of its own over the file first (unless
            # --checksum has just made it of this very file). The pass is within
            # the checked read: a change during it fails the upload too.
            args = upload_args(file, extra, md5 or file_md5(file.path))
            manager.upload(
                file.path, bucket, key, extra_args=args, subscribers=subscribers
            ).result()
        finally:
            del multipart_reads[key]

    def put_once(item: Upload, manager, cancel) -> ReadStart:
        """The file up from one read; FileChanged if it changed during the read."""
        path = item.file.path
        with open(path, "rb") as source:
            start = ReadStart.of(path, source)
            # One PutObject is the cheapest request for a small file; the transfer
            # manager's futures and callbacks cost more than the upload itself.
            # Its bytes are read once, so that its checksum and body are the same read.
            if start.before.st_size < MULTIPART_THRESHOLD:
                put_whole(item.key, start.file(), read_whole(source, start), cancel)
                return start
        md5 = item.md5 if start.file() == item.file else None
        put_multipart(item.key, start, md5, manager, cancel)
        return start

    def upload(item: Upload, manager, cancel) -> bool:
        path = item.file.path
        for attempt in range(READ_ATTEMPTS):
            if attempt:
                time.sleep(CLOCK_SLACK_NS / 1e9)
            try:
                start = put_once(item, manager, cancel)
                break
            except FileChanged:
                pass
            except FileNotFoundError as exc:
                if exc.filename != path:
                    raise
                console.warning(
                    f"vanished during the backup, not uploaded: {printable(path)}"
                )
                return False
        else:
            raise FileChanged()
        file = start.file()
        if file.size < MULTIPART_THRESHOLD:
            console.advance(nbytes=file.size)
        console.advance(files=1)
        console.detail(
            f"upload: {printable(path)} -> {printable(f's3://{bucket}/{item.key}')}"
        )
        return True

    return upload


def delete_objects(
    client, bucket: str, keys: tuple[str, ...], console: Console
) -> list[Failure]:
    """Delete keys in batches; the failures, key by key."""
    failures = []
    for start in range(0, len(keys), DELETE_BATCH):
        batch = keys[start : start + DELETE_BATCH]
        try:
            response = client.delete_objects(
                Bucket=bucket,
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
        except botocore.exceptions.ClientError as exc:
            failures.extend(Failure(key, exc) for key in batch)
            continue
        failed = {error["Key"]: error for error in response.get("Errors", [])}
        for key in batch:
            if key in failed:
                error = failed[key]
                failures.append(
                    Failure(
                        key, CliError(f"{error.get('Code')}: {error.get('Message')}")
                    )
                )
            else:
                console.detail(f"delete: {printable(f's3://{bucket}/{key}')}")
    return failures


def warn_if_unversioned(client, bucket: str, console: Console) -> None:
    """Before --delete deletes anything: say so once if the bucket keeps no old versions."""
    try:
        status = bucket_versioning(client, bucket)
    except botocore.exceptions.ClientError as exc:
        status = f"unknown ({client_error_code(exc)})"
    if status != "Enabled":
        console.warning(
            f"versioning of s3://{bucket} is {status or 'off'}: the objects --delete "
            "removes cannot be recovered (backup.py --keep-days N turns it on)"
        )


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
    return parser


def extra_args_from(args) -> dict:
    if args.sse_kms_key_id and args.sse != "aws:kms":
        raise usage_error("--sse-kms-key-id goes with --sse aws:kms")
    extra = {}
    if args.storage_class:
        extra["StorageClass"] = args.storage_class
    if args.sse:
        extra["ServerSideEncryption"] = args.sse
    if args.sse_kms_key_id:
        extra["SSEKMSKeyId"] = args.sse_kms_key_id
    return extra


def run(args, console: Console) -> int:
    started = time.monotonic()
    location = parse_location(args.location)
    extra = extra_args_from(args)
    filters = Filters(args.filters)
    local = stat_local(args.local)
    is_folder = stat.S_ISDIR(local.st_mode)
    if args.delete and not is_folder:
        raise usage_error("--delete needs LOCAL to be a folder")
    if args.keep_days is not None and args.no_versioning:
        raise usage_error(
            "--keep-days keeps old versions, which --no-versioning turns off: give one"
        )
    if args.check and args.delete:
        raise usage_error("--check changes nothing: it does not go with --delete")

    connection = connect(args, pool_size=args.workers + PART_WORKERS)
    client = connection.client
    # HeadBucket goes out as soon as there is a client, and the folder is
    # scanned while the server answers it (W4 on s3rver: 0.01 to 0.09 s sooner
    # in three sets of 20-30 runs in turn).
    found = in_background(lambda: bucket_exists(client, location.bucket))
    scan = scan_local(args.local, local, location.prefix, args.follow_symlinks)
    if args.delete and not any(
        filters.includes(relative_key(location.prefix, key)) for key in scan.files
    ):
        raise usage_error(
            f"refusing --delete: {args.local!r} has no files to back up, "
            "so every object under the prefix would be deleted"
        )
    refused = refuse_keys(scan, location.prefix, PurePath(args.local))
    for warning in scan.warnings:
        console.warning(warning)
    for failure in scan.errors:
        console.error(
            failure_line("read", failure.item, failure.error), path=failure.item
        )
    for failure in refused:
        console.error(
            failure_line("upload", failure.item, failure.error), path=failure.item
        )
    scan.errors.extend(refused)

    # A single file is listed by its own key, a folder on its folder boundary.
    listing_prefix = (
        next(iter(scan.files)) if not is_folder else folder_prefix(location.prefix)
    )
    # The listing goes out beside HeadBucket rather than after it, in ranges of
    # a page cut at the local keys and listed side by side, instead of one round
    # trip per page in turn. Measured with bench/run.py --latency 50: W4 1.75 s
    # -> 1.33 s (on s3rver, which takes one request at a time, within noise).
    # The listing counts only once HeadBucket has found the bucket.
    listing = in_background(
        lambda: list_objects(
            client,
            location.bucket,
            listing_prefix,
            listing_boundaries(scan.files),
            args.workers,
        )
    )
    remote = {}
    if found.result():
        try:
            remote = listing.result()
        except botocore.exceptions.ClientError as exc:
            raise runtime_error(
                f"cannot list {printable(location.url())}", exc
            ) from None
        if not is_folder:
            remote = {key: obj for key, obj in remote.items() if key == listing_prefix}
        if args.keep_days is not None and not args.check:
            history = describe_history(args.keep_days)
            if args.dry_run:
                console.info(f"(dry run) set up s3://{location.bucket} {history}")
            elif set_up_history(client, location.bucket, args.keep_days, new=False):
                console.info(f"set up s3://{location.bucket} {history}")
    elif args.check:
        raise CliError(
            f"the bucket {location.bucket} does not exist: nothing is backed up at {location.url()}"
        )
    else:
        keep_days = None if args.no_versioning else args.keep_days or DEFAULT_KEEP_DAYS
        create_bucket(
            client, location.bucket, connection.region, keep_days, args.dry_run, console
        )
    contents = None
    if args.checksum or args.check:
        contents = compare_contents(
            client,
            location.bucket,
            same_size_files(scan.files, remote, location.prefix, filters),
            args.workers,
        )
    if args.check:
        plan = plan_backup(scan.files, remote, location.prefix, filters, True, contents)
        return report_check(plan, contents, scan, location, console, started)
    # A file that could not be hashed goes up, and its upload reports why it failed.
    plan = plan_backup(
        scan.files, remote, location.prefix, filters, args.delete, contents
    )
    recheck = future_dated(plan, time.time())
    if recheck:
        plan = without_recorded(
            plan, recorded_mtimes(client, location.bucket, recheck, args.workers)
        )
    if not args.delete:
        stale = stale_folders(scan.files, remote, location.prefix, filters)
        for key, count in sorted(stale.items()):
            console.warning(
                f"{printable(scan.files[key].path)} is a file now, but the backup still "
                f"holds {count} objects under {printable(location.url(key))}/, the folder "
                "it replaced: restore.py brings that folder back instead of the file; "
                "backup.py --delete removes them"
            )
    total_bytes = sum(upload.file.size for upload in plan.uploads)
    if plan.deletes and args.keep_days is None:
        warn_if_unversioned(client, location.bucket, console)

    if args.dry_run:
        for upload in plan.uploads:
            console.info(
                f"(dry run) upload: {printable(upload.file.path)} -> "
                f"{printable(location.url(upload.key))}"
            )
        for key in plan.deletes:
            console.info(f"(dry run) delete: {printable(location.url(key))}")
        summary = Summary(
            "uploaded",
            transferred=len(plan.uploads),
            skipped=plan.skipped,
            deleted=len(plan.deletes),
            nbytes=total_bytes,
            seconds=time.monotonic() - started,
        )
        console.summarize(
            summary,
            f"(dry run) would upload {len(plan.uploads)} ({total_bytes} bytes), "
            f"skip {plan.skipped}, delete {len(plan.deletes)}",
        )
        return ExitCode.OK

    console.start(len(plan.uploads), total_bytes)
    uploader = make_uploader(connection, location.bucket, extra, console)
    failures, vanished = run_in_parallel(
        plan.uploads, uploader, client, args.workers, open_file=PartFile
    )
    console.finish()
    for failure in failures:
        error = failure.error
        if client_error_code(error) == "404":
            # The bucket was there a moment ago: what the server refuses is the key.
            error = CliError(
                f"the server answered 404 Not Found for the key "
                f"{printable(failure.item.key)}: it refuses this name (some servers "
                "refuse control characters): rename the file"
            )
        path = failure.item.file.path
        console.error(failure_line("upload", path, error), path=path)

    deleted = 0
    if plan.deletes:
        if failures or scan.errors:
            console.warning(
                "not deleting anything: some files could not be read or uploaded"
            )
        else:
            delete_failures = delete_objects(
                client, location.bucket, plan.deletes, console
            )
            for failure in delete_failures:
                console.error(
                    failure_line("delete", location.url(failure.item), failure.error),
                    key=failure.item,
                )
            deleted = len(plan.deletes) - len(delete_failures)
            failures += delete_failures

    if not plan.uploads and not plan.deletes and not scan.errors:
        console.info(f"nothing to upload: {printable(location.url())} is up to date")
    failed_bytes = sum(f.item.file.size for f in failures if isinstance(f.item, Upload))
    failed_bytes += sum(upload.file.size for upload in vanished)
    summary = Summary(
        "uploaded",
        transferred=len(plan.uploads)
        - sum(isinstance(f.item, Upload) for f in failures)
        - len(vanished),
        skipped=plan.skipped + len(vanished),
        failed=len(failures) + len(scan.errors),
        deleted=deleted,
        nbytes=total_bytes - failed_bytes,
        seconds=time.monotonic() - started,
        restore_point=restore_point(connection.clock.latest, time.time()),
    )
    console.summarize(summary)
    return ExitCode.FAILURE if summary.failed else ExitCode.OK


def report_check(
    plan: BackupPlan,
    contents: Contents,
    scan: Scan,
    location: Location,
    console: Console,
    started: float,
) -> int:
    """--check's output: one line per difference, the summary; exit 0 only when identical."""
    for failure in contents.failures:
        path = scan.files[failure.item].path
        console.error(failure_line("read", path, failure.error), path=path)
    report = check_report(plan, frozenset(f.item for f in contents.failures))
    for key in report.missing:
        console.info(f"missing: {printable(key)}")
    for key, why in report.changed:
        console.info(f"changed: {printable(key)} ({why})")
    for key in report.extra:
        console.info(f"extra: {printable(key)}")
    summary = Summary(
        "checked",
        skipped=report.identical,
        failed=len(contents.failures) + len(scan.errors),
        seconds=time.monotonic() - started,
        missing=list(report.missing),
        changed=[key for key, _ in report.changed],
        extra=list(report.extra),
    )
    holds_all = not (report.missing or report.changed or report.extra or summary.failed)
    if holds_all:
        console.info(f"{printable(location.url())} holds every file exactly")
    console.summarize(summary)
    return ExitCode.OK if holds_all else ExitCode.FAILURE


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    exit_script(main())
