"""Bad command lines, hostile input and broken environments, end to end.

Each row runs backup.py or restore.py as a real subprocess against moto's
server on 127.0.0.1 and checks what a user sees: the exit code of the SPEC,
one error line that names the problem, no traceback, and no secret printed,
whether the run is verbose or not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from conftest import (
    FAKE_SECRET,
    FAKE_TOKEN,
    ROOT,
    TEST_SERVER,
    UNPRIVILEGED,
    free_port,
    make_tree,
)

FAILURE, USAGE = 1, 2  # exit codes of the SPEC

CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
SOURCE_FILES = {"a.txt": b"alpha", "sub/b.txt": b"bravo"}
LONG_BUCKET_NAME = "b" * 64


@dataclass(frozen=True)
class Place:
    """Where one row runs: a tree to back up, a bucket holding it under p/, a server."""

    tmp: Path
    source: Path  # a folder holding SOURCE_FILES
    dest: Path  # a folder to restore into, not there yet
    bucket: str  # exists, with SOURCE_FILES under the prefix p/
    endpoint: str
    dead_endpoint: str  # on 127.0.0.1, where nothing listens
    client: object  # boto3 client on the moto server

    def fill(self, text: str) -> str:
        return text.format(
            tmp=self.tmp,
            src=self.source,
            dest=self.dest,
            bucket=self.bucket,
            endpoint=self.endpoint,
            dead=self.dead_endpoint,
        )

    def keys(self, prefix: str) -> list[str]:
        listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for item in listing.get("Contents", [])]


@dataclass(frozen=True)
class Row:
    script: str  # "backup.py" or "restore.py"
    args: tuple[str, ...]  # str.format placeholders: see Place.fill
    exit_code: int
    names: tuple[str, ...]  # what the error line must say (placeholders too)
    env: dict[str, str | None] = field(default_factory=dict)  # None removes
    arrange: Callable[[Place], None] | None = None
    check: Callable[[Place], None] | None = None
    unprivileged: bool = False
    seconds: float = 60  # a run still going after this has failed


# --- What some rows set up, and what they check afterwards ----------------------


def make_fifo(place: Place) -> None:
    os.mkfifo(place.tmp / "fifo")


def make_unreadable_file(place: Place) -> None:
    (place.source / "secret.txt").write_bytes(b"hidden")
    os.chmod(place.source / "secret.txt", 0)


def only_readable_files_went_up(place: Place) -> None:
    assert place.keys("up/") == ["up/a.txt", "up/sub/b.txt"]


def make_empty_folder(place: Place) -> None:
    (place.tmp / "empty").mkdir()


def nothing_deleted(place: Place) -> None:
    assert place.keys("p/") == ["p/a.txt", "p/sub/b.txt"]


def no_bucket_named(name: str) -> Callable[[Place], None]:
    def check(place: Place) -> None:
        names = [bucket["Name"] for bucket in place.client.list_buckets()["Buckets"]]
        assert name not in names

    return check


def put_hostile_key(template: str) -> Callable[[Place], None]:
    def arrange(place: Place) -> None:
        key = place.fill(template)
        place.client.put_object(Bucket=place.bucket, Key=key, Body=b"evil")
        assert key in place.keys("p/"), "the server must keep the key as given"

    return arrange


def nothing_escaped_and_the_rest_restored(place: Place) -> None:
    assert {
        path.relative_to(place.dest).as_posix(): path.read_bytes()
        for path in place.dest.rglob("*")
        if path.is_file()
    } == SOURCE_FILES
    outside = [
        path
        for path in place.tmp.rglob("*")
        if path.is_file()
        and place.dest not in path.parents
        and path.read_bytes() == b"evil"
    ]
    assert outside == []


def make_dest_a_file(place: Place) -> None:
    place.dest.write_bytes(b"not a folder")


def dest_untouched_file(place: Place) -> None:
    assert place.dest.read_bytes() == b"not a folder"


def make_read_only_dest(place: Place) -> None:
    place.dest.mkdir()
    os.chmod(place.dest, 0o555)


def dest_still_empty(place: Place) -> None:
    assert list(place.dest.iterdir()) == []


def make_file_name_not_utf8(place: Place) -> None:
    with open(bytes(place.source) + b"/bad-\xff.txt", "wb") as file:
        file.write(b"no key can name this file")


def make_config_unparsable(place: Place) -> None:
    (place.tmp / "home" / ".aws" / "config").write_text("[profile broken\nregion=\n")


def nothing_restored(place: Place) -> None:
    assert not place.dest.exists()


# --- The table ------------------------------------------------------------------

AT_MOTO = ("--endpoint-url", "{endpoint}")
NO_DOTDOT_KEYS = pytest.mark.skipif(
    TEST_SERVER == "seaweedfs",
    reason="SeaweedFS refuses keys with .. segments (InvalidRequest): "
    "the hostile key cannot be put",
)
NO_CREDENTIALS = dict.fromkeys(CREDENTIAL_VARIABLES)
THROUGH_DEAD_PROXY = {
    name: "{dead}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
}

ROWS = [
    # backup.py: LOCAL
    pytest.param(
        Row(
            "backup.py", ("{tmp}/missing", "{bucket}::p", *AT_MOTO), USAGE, ("missing",)
        ),
        id="backup-local-missing",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{tmp}/fifo", "{bucket}::p", *AT_MOTO),
            USAGE,
            ("fifo", "not a regular file"),
            arrange=make_fifo,
        ),
        id="backup-local-is-a-fifo",
    ),
    pytest.param(
        Row("backup.py", ("/dev/null", "{bucket}::p", *AT_MOTO), USAGE, ("/dev/null",)),
        id="backup-local-is-dev-null",
    ),
    pytest.param(
        Row(
            "backup.py", ("", "{bucket}::p", *AT_MOTO), USAGE, ("''", "does not exist")
        ),
        id="backup-local-empty-string",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::up", *AT_MOTO),
            FAILURE,
            ("bad-", "UTF-8"),
            arrange=make_file_name_not_utf8,
            check=only_readable_files_went_up,
        ),
        id="backup-file-name-not-utf8",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::up", *AT_MOTO),
            FAILURE,
            ("secret.txt", "Permission denied"),
            arrange=make_unreadable_file,
            check=only_readable_files_went_up,
            unprivileged=True,
        ),
        id="backup-unreadable-file-in-tree",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{tmp}/empty", "{bucket}::p", "--delete", *AT_MOTO),
            USAGE,
            ("--delete",),
            arrange=make_empty_folder,
            check=nothing_deleted,
        ),
        id="backup-delete-with-empty-folder",
    ),
    # backup.py: locations and bucket names
    pytest.param(
        Row("backup.py", ("{src}", "::x", *AT_MOTO), USAGE, ("no bucket", "'::x'")),
        id="location-without-bucket",
    ),
    pytest.param(
        Row("backup.py", ("{src}", "s3://", *AT_MOTO), USAGE, ("no bucket", "'s3://'")),
        id="location-bare-s3-scheme",
    ),
    pytest.param(
        Row("backup.py", ("{src}", "", *AT_MOTO), USAGE, ("no bucket", "''")),
        id="location-empty",
    ),
    pytest.param(
        Row("backup.py", ("{src}", "my bucket::p", *AT_MOTO), USAGE, ("'my bucket'",)),
        id="location-with-spaces",
    ),
    pytest.param(
        Row(
            "backup.py", ("{src}", "s3:///x", *AT_MOTO), USAGE, ("no bucket", "s3:///x")
        ),
        id="location-s3-triple-slash",
    ),
    pytest.param(
        Row("backup.py", ("{src}", "{bucket}::a/../b", *AT_MOTO), USAGE, ("'..'",)),
        id="location-prefix-with-dotdot",
    ),
    pytest.param(
        Row("backup.py", ("{src}", "ab::p", *AT_MOTO), USAGE, ("'ab'", "3 to")),
        id="bucket-name-too-short",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "New-Upper-Bucket::p", *AT_MOTO),
            USAGE,
            ("New-Upper-Bucket", "lowercase"),
            check=no_bucket_named("New-Upper-Bucket"),
        ),
        id="bucket-name-uppercase-new",
    ),
    pytest.param(
        Row("backup.py", ("{src}", "a..b::p", *AT_MOTO), USAGE, ("'a..b'", "'..'")),
        id="bucket-name-double-dot",
    ),
    pytest.param(
        Row(
            "backup.py", ("{src}", "192.168.1.1::p", *AT_MOTO), USAGE, ("192.168.1.1",)
        ),
        id="bucket-name-ip-address",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "xn--abc::p", *AT_MOTO),
            USAGE,
            ("xn--abc", "reserved"),
        ),
        id="bucket-name-reserved-prefix",
    ),
    pytest.param(
        # Written as a URL: "-abc::p" on its own would be read as an option.
        Row(
            "backup.py", ("{src}", "s3://-abc/p", *AT_MOTO), USAGE, ("'-abc'", "starts")
        ),
        id="bucket-name-leading-dash",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", f"{LONG_BUCKET_NAME}::p", *AT_MOTO),
            USAGE,
            (LONG_BUCKET_NAME, "63"),
            check=no_bucket_named(LONG_BUCKET_NAME),
        ),
        id="bucket-name-64-characters",
    ),
    # backup.py: options
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::p", "--frobnicate", *AT_MOTO),
            USAGE,
            ("--frobnicate",),
        ),
        id="backup-unknown-option",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::p", "--workers", "0", *AT_MOTO),
            USAGE,
            ("--workers", "'0'"),
        ),
        id="backup-workers-zero",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::p", "--workers", "abc", *AT_MOTO),
            USAGE,
            ("--workers", "'abc'"),
        ),
        id="backup-workers-not-a-number",
    ),
    pytest.param(
        Row("backup.py", ("{src}",), USAGE, ("BUCKET::PREFIX", "required")),
        id="backup-location-not-given",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::p", "--storage-class", "FROZEN", *AT_MOTO),
            USAGE,
            ("--storage-class", "FROZEN"),
        ),
        id="backup-unknown-storage-class",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::p", "--sse-kms-key-id", "key-1", *AT_MOTO),
            USAGE,
            ("--sse-kms-key-id", "aws:kms"),
        ),
        id="backup-kms-key-without-sse-kms",
    ),
    # backup.py: credentials and endpoints
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::p", *AT_MOTO),
            FAILURE,
            ("credentials", "aws configure"),
            env=NO_CREDENTIALS,
        ),
        id="backup-no-credentials",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::p", "--profile", "nope", *AT_MOTO),
            FAILURE,
            ("'nope'", "profile"),
        ),
        id="backup-profile-not-found",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::p", *AT_MOTO),
            FAILURE,
            ("config",),
            arrange=make_config_unparsable,
        ),
        id="backup-aws-config-unparsable",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::p", "--region", "bad_region!", *AT_MOTO),
            USAGE,
            ("bad_region!",),
        ),
        id="backup-region-malformed",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::p", "-q", "-v", *AT_MOTO),
            USAGE,
            ("not allowed",),
        ),
        id="backup-quiet-and-verbose",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::p", "--endpoint-url", "{dead}"),
            FAILURE,
            ("cannot connect", "{dead}"),
        ),
        id="backup-endpoint-refuses-connections",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::p", "--endpoint-url", "localhost:9000"),
            USAGE,
            ("'localhost:9000'", "http"),
        ),
        id="backup-endpoint-malformed",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::p"),
            USAGE,
            ("http://127.0.0.1:0", "port"),
            env={"AWS_ENDPOINT_URL": "http://127.0.0.1:0"},
        ),
        id="backup-endpoint-from-environment-bad-port",
    ),
    pytest.param(
        Row(
            "backup.py",
            ("{src}", "{bucket}::p", "--endpoint-url", "http://[::1"),
            USAGE,
            ("'http://[::1'",),
        ),
        id="backup-endpoint-unclosed-ipv6-bracket",
    ),
    pytest.param(
        # Ignoring "" would send the backup to AWS itself: the proxies keep any
        # such request on 127.0.0.1, where it fails.
        Row(
            "backup.py",
            ("{src}", "{bucket}::p", "--endpoint-url", ""),
            USAGE,
            ("''", "endpoint"),
            env={**THROUGH_DEAD_PROXY, "NO_PROXY": None, "no_proxy": None},
            seconds=10,
        ),
        id="backup-endpoint-empty",
    ),
    # restore.py
    pytest.param(
        Row(
            "restore.py",
            ("no-such-bucket-here::p", "{dest}", *AT_MOTO),
            FAILURE,
            ("no-such-bucket-here", "does not exist"),
            check=nothing_restored,
        ),
        id="restore-bucket-missing",
    ),
    pytest.param(
        Row(
            "restore.py",
            ("{bucket}::nothing-here", "{dest}", *AT_MOTO),
            FAILURE,
            ("nothing to restore", "nothing-here"),
            check=nothing_restored,
        ),
        id="restore-prefix-with-no-objects",
    ),
    pytest.param(
        Row(
            "restore.py",
            ("{bucket}::p", "{dest}", *AT_MOTO),
            FAILURE,
            ("p/../evil", "refused"),
            arrange=put_hostile_key("p/../evil"),
            check=nothing_escaped_and_the_rest_restored,
        ),
        id="restore-key-with-dotdot",
        marks=NO_DOTDOT_KEYS,
    ),
    pytest.param(
        Row(
            "restore.py",
            ("{bucket}::p", "{dest}", *AT_MOTO),
            FAILURE,
            ("p/a/../../evil", "refused"),
            arrange=put_hostile_key("p/a/../../evil"),
            check=nothing_escaped_and_the_rest_restored,
        ),
        id="restore-key-climbing-out-of-a-folder",
        marks=NO_DOTDOT_KEYS,
    ),
    pytest.param(
        Row(
            "restore.py",
            ("{bucket}::p", "{dest}", *AT_MOTO),
            FAILURE,
            ("p/{tmp}/evil", "absolute"),
            arrange=put_hostile_key("p/{tmp}/evil"),
            check=nothing_escaped_and_the_rest_restored,
        ),
        id="restore-key-absolute-path",
        marks=pytest.mark.skipif(
            TEST_SERVER == "seaweedfs",
            reason="SeaweedFS stores // in a key as /: "
            "the key p//tmp/.../evil cannot be put",
        ),
    ),
    pytest.param(
        Row(
            "restore.py",
            ("{bucket}::p", "{dest}", *AT_MOTO),
            USAGE,
            ("not a folder",),
            arrange=make_dest_a_file,
            check=dest_untouched_file,
        ),
        id="restore-local-is-a-file",
    ),
    pytest.param(
        Row("restore.py", ("{bucket}::p", "", *AT_MOTO), USAGE, ("''",)),
        id="restore-local-empty-string",
    ),
    pytest.param(
        Row(
            "restore.py",
            ("{bucket}::p", "{dest}", *AT_MOTO),
            FAILURE,
            ("{dest}", "Permission denied"),
            arrange=make_read_only_dest,
            check=dest_still_empty,
            unprivileged=True,
        ),
        id="restore-local-read-only",
    ),
    pytest.param(
        Row(
            "restore.py",
            ("{bucket}::p", "{dest}", *AT_MOTO),
            FAILURE,
            ("credentials", "aws configure"),
            env=NO_CREDENTIALS,
            check=nothing_restored,
        ),
        id="restore-no-credentials",
    ),
    pytest.param(
        Row(
            "restore.py",
            ("s3://", "{dest}", *AT_MOTO),
            USAGE,
            ("no bucket",),
            check=nothing_restored,
        ),
        id="restore-location-bare-s3-scheme",
    ),
    pytest.param(
        Row(
            "restore.py",
            ("{bucket}::p", "{dest}", "--workers", "-3", *AT_MOTO),
            USAGE,
            ("--workers", "'-3'"),
        ),
        id="restore-workers-negative",
    ),
    pytest.param(
        Row(
            "restore.py",
            ("{bucket}::p", "{dest}", "--delete", *AT_MOTO),
            USAGE,
            ("--delete",),
        ),
        id="restore-unknown-option",
    ),
]
# A dry run tries LOCAL's case as the real run does: into a read-only LOCAL it fails alike.
ROWS += [
    pytest.param(replace(row, args=(*row.args, "--dry-run")), id=f"{param.id}-dry-run")
    for param in ROWS
    if param.id == "restore-local-read-only"
    for row in param.values
]


@pytest.fixture
def place(tmp_path, s3_server, server_client, bucket_name) -> Place:
    source = make_tree(tmp_path / "src", SOURCE_FILES)
    server_client.create_bucket(Bucket=bucket_name)
    # Versioned, as backup makes it: an unversioned bucket is warned of on every run.
    server_client.put_bucket_versioning(
        Bucket=bucket_name, VersioningConfiguration={"Status": "Enabled"}
    )
    for relative, data in SOURCE_FILES.items():
        server_client.put_object(Bucket=bucket_name, Key=f"p/{relative}", Body=data)
    return Place(
        tmp=tmp_path,
        source=source,
        dest=tmp_path / "dest",
        bucket=bucket_name,
        endpoint=s3_server,
        dead_endpoint=f"http://127.0.0.1:{free_port()}",
        client=server_client,
    )


def run_row(row: Row, args: list[str], place: Place, env: dict[str, str]):
    """The script as a user runs it, in the row's temporary folder."""
    command = [sys.executable, str(ROOT / row.script), *args]
    try:
        return subprocess.run(
            [*UNPRIVILEGED, *command] if row.unprivileged else command,
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=row.seconds,
            stdin=subprocess.DEVNULL,
            cwd=place.tmp,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"still running after {row.seconds} s: {exc.stderr!r}")


@pytest.mark.parametrize("verbosity", [(), ("-v",)], ids=["plain", "verbose"])
@pytest.mark.parametrize("row", ROWS)
def test_bad_input_is_one_clear_line_and_the_right_exit_code(
    row: Row, verbosity: tuple[str, ...], place: Place, cli_env
):
    env = dict(cli_env)
    for name, value in row.env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = place.fill(value)
    if row.arrange:
        row.arrange(place)

    result = run_row(
        row, [place.fill(arg) for arg in row.args] + list(verbosity), place, env
    )

    assert "Traceback" not in result.stderr
    assert result.returncode == row.exit_code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith((f"{row.script}: error: ", "error: ")), result.stderr
    for name in row.names:
        assert place.fill(name) in lines[0]
    for secret in (FAKE_SECRET, FAKE_TOKEN):
        assert secret not in result.stdout + result.stderr
    if row.check:
        row.check(place)
