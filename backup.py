"""Back up a folder (or one file) to S3, uploading only what changed.

usage: python backup.py LOCAL BUCKET::PREFIX [options]
       python backup.py LOCAL s3://BUCKET/PREFIX [options]

Each file becomes the object PREFIX/<path relative to LOCAL>, with its mtime
and mode in user metadata. The bucket is created when it does not exist, with
versioning on and a lifecycle rule that keeps replaced and deleted versions for
--keep-days days (restore.py --at brings them back).
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import stat
import time
import zlib
from dataclasses import dataclass, field

import botocore.exceptions

from s3common import (
    MD5_METADATA,
    MULTIPART_THRESHOLD,
    PART_WORKERS,
    SMALL_OBJECT,
    STORAGE_CLASSES,
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
    list_objects,
    listing_boundaries,
    md5chksum,
    parse_location,
    positive_int,
    printable,
    relative_key,
    restore_point,
    run_cli,
    run_failure,
    run_in_parallel,
    usage_error,
)

DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
# The one lifecycle rule of our own in a bucket: found and updated by this ID.
HISTORY_RULE_ID = "s3backup-retention"
DEFAULT_KEEP_DAYS = 30
ABORT_INCOMPLETE_DAYS = 7


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
                scan.warnings.append(f"broken symbolic link skipped: {entry.path}")
                continue
            except OSError as exc:
                scan.errors.append(Failure(entry.path, exc))
                continue
            if stat.S_ISDIR(info.st_mode):
                identity = (info.st_dev, info.st_ino)
                if identity in ancestors:
                    scan.warnings.append(
                        f"symbolic link loop not followed: {entry.path}"
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
                scan.warnings.append(f"not a regular file, skipped: {entry.path}")
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


def bucket_exists(client, bucket: str) -> bool:
    """HeadBucket: whether the bucket is there; any other answer than yes or no is an error."""
    try:
        client.head_bucket(Bucket=bucket)
        return True
    except botocore.exceptions.ClientError as exc:
        if client_error_code(exc) not in ("404", "NoSuchBucket"):
            raise run_failure(f"bucket {bucket}", exc) from None
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
        raise run_failure(
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
            raise run_failure(f"cannot create bucket {bucket}", exc) from None
    client.get_waiter("bucket_exists").wait(
        Bucket=bucket, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
    )
    set_up_history(client, bucket, keep_days, new=True)
    console.info(f"created bucket s3://{bucket} in {region} {history}")


def make_uploader(connection: Connection, bucket: str, extra: dict, console: Console):
    """The work function for run_in_parallel: one file up, as one PUT or a parallel multipart."""
    client, direct = connection.client, connection.direct
    bandwidth = connection.bandwidth  # None without --bwlimit

    def put_whole(key: str, file: LocalFile, cancel) -> None:
        """One PutObject: a direct request for a small file, else through botocore.

        A file whose object needs md5chksum is read into memory (it is below the
        multipart threshold) and the MD5 taken of the very bytes sent.
        """
        # Bodies of one request are let through whole (they are at most 8 MiB):
        # botocore reads a body more than once, for its checksums, before it sends it.
        if bandwidth:
            bandwidth.take(file.size, cancel)
        with_md5 = needs_md5chksum(file.size, extra)
        if file.size > SMALL_OBJECT and not with_md5:
            with open(file.path, "rb") as body:
                client.put_object(
                    Bucket=bucket, Key=key, Body=body, **upload_args(file, extra)
                )
            return
        with open(file.path, "rb") as body:
            data = body.read()
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest() if with_md5 else None
        # Our own checksum header, so that botocore streams no aws-chunked body
        # with a trailing one (see connect), direct or not.
        checksum = crc32_header(zlib.crc32(data))
        args = {
            **upload_args(file, extra, md5),
            "ChecksumAlgorithm": "CRC32",
            "ChecksumCRC32": checksum,
        }
        try:
            direct.put(bucket, key, data, args)
        except DirectFailed as failure:
            # botocore sends it (again), with its retries and error messages.
            direct.client_after(failure).put_object(
                Bucket=bucket, Key=key, Body=data, **args
            )

    def upload(item: Upload, manager, cancel) -> None:
        file = item.file
        # One PutObject is the cheapest request for a small file; the transfer
        # manager's futures and callbacks cost more than the upload itself.
        if file.size < MULTIPART_THRESHOLD:
            put_whole(item.key, file, cancel)
            console.advance(nbytes=file.size)
        else:
            # CreateMultipartUpload carries the metadata before any part is read,
            # so the MD5 takes a pass of its own over the file first (unless
            # --checksum has just made it).
            args = upload_args(file, extra, item.md5 or file_md5(file.path))
            subscribers = [ProgressSubscriber(console)]
            if bandwidth:
                subscribers.append(BandwidthSubscriber(bandwidth, cancel))
            manager.upload(
                file.path, bucket, item.key, extra_args=args, subscribers=subscribers
            ).result()
        console.advance(files=1)
        console.detail(f"upload: {file.path} -> s3://{bucket}/{item.key}")

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
                console.detail(f"delete: s3://{bucket}/{key}")
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
    for warning in scan.warnings:
        console.warning(warning)
    for failure in scan.errors:
        console.error(
            failure_line("read", failure.item, failure.error), path=failure.item
        )

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
            raise run_failure(f"cannot list {location.url()}", exc) from None
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
    total_bytes = sum(upload.file.size for upload in plan.uploads)
    if plan.deletes and args.keep_days is None:
        warn_if_unversioned(client, location.bucket, console)

    if args.dry_run:
        for upload in plan.uploads:
            console.info(
                f"(dry run) upload: {upload.file.path} -> s3://{location.bucket}/{upload.key}"
            )
        for key in plan.deletes:
            console.info(f"(dry run) delete: s3://{location.bucket}/{key}")
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
    failures, _ = run_in_parallel(plan.uploads, uploader, client, args.workers)
    console.finish()
    for failure in failures:
        path = failure.item.file.path
        console.error(failure_line("upload", path, failure.error), path=path)

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
        console.info(f"nothing to upload: {location.url()} is up to date")
    failed_bytes = sum(f.item.file.size for f in failures if isinstance(f.item, Upload))
    summary = Summary(
        "uploaded",
        transferred=len(plan.uploads)
        - sum(isinstance(f.item, Upload) for f in failures),
        skipped=plan.skipped,
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
    if not (report.missing or report.changed or report.extra or summary.failed):
        console.info(f"{location.url()} holds every file exactly")
    console.summarize(summary)
    differs = report.missing or report.changed or report.extra
    return ExitCode.FAILURE if differs or summary.failed else ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    exit_script(main())
