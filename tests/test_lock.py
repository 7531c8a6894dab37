"""Object Lock (backup.py --lock-days): the renewal schedule on literals, and
end to end on the test server (moto's, RGW or SeaweedFS): locked uploads, the
stolen-key attack, renewals due and not due, --check's unlocked, the refusals."""

from __future__ import annotations

import json
import time
from datetime import timezone

import botocore.exceptions
import pytest
from conftest import TEST_SERVER, client_for, make_tree, run_script

from backup import DAY as DAY_SECONDS
from backup import (
    LockPolicy,
    must_read_locks,
    needs_renewal,
    renewal_due,
    state_until,
)
from s3common import Filters, format_when, lock_state_key

MiB = 1024 * 1024
UTC = timezone.utc  # noqa: UP017 (datetime.UTC is Python 3.11+)
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


# --- The schedule, pure -------------------------------------------------------------


@pytest.mark.parametrize(
    "days, interval_days, kept_days, until_days",
    [
        (1, 1, 0.75, 1.75),  # renewals at most once a day: a day more than 3N/4
        (2, 1, 1.5, 2.5),
        (4, 1, 3, 4),
        (30, 7.5, 22.5, 30),
        (36500, 9125, 27375, 36500),
    ],
)
def test_the_lock_is_renewed_every_quarter_and_keeps_three_quarters(
    days, interval_days, kept_days, until_days
):
    policy = LockPolicy(days, "GOVERNANCE")
    assert policy.interval == interval_days * DAY_SECONDS
    assert policy.kept == kept_days * DAY_SECONDS
    # An hour beyond the clock difference that SigV4 allows.
    assert policy.until(T0) == T0 + until_days * DAY_SECONDS + 3600
    assert policy.upload_args(T0)["ObjectLockMode"] == "GOVERNANCE"
    assert policy.until(T0) - T0 >= days * DAY_SECONDS


@pytest.mark.parametrize(
    "renewed_until, point, due",
    [
        (None, T0, True),  # no state: each object's lock is read
        (T0 + 30 * DAY_SECONDS, T0, False),  # just renewed
        (T0 + 22.5 * DAY_SECONDS, T0, False),  # exactly 3N/4 left
        (T0 + 22.5 * DAY_SECONDS - 1, T0, True),  # a second short of it
        (T0 + 30 * DAY_SECONDS, T0 + 7.5 * DAY_SECONDS + 1, True),  # N/4 later
        (T0 - DAY_SECONDS, T0, True),  # expired
    ],
)
def test_a_renewal_is_due_when_the_locks_fall_short_of_three_quarters(
    renewed_until, point, due
):
    assert renewal_due(renewed_until, LockPolicy(30, "GOVERNANCE"), point) is due


@pytest.mark.parametrize(
    "current, target, renew",
    [(None, T0, True), (T0 - 1, T0, True), (T0, T0, False), (T0 + 1, T0, False)],
)
def test_a_lock_is_never_shortened(current, target, renew):
    assert needs_renewal(current, target) is renew


def test_a_state_of_other_days_mode_or_filters_says_nothing():
    policy, filters = LockPolicy(30, "GOVERNANCE"), Filters(((False, "*.log"),))
    state = {
        "lock_days": 30,
        "mode": "GOVERNANCE",
        "filters": [[False, "*.log"]],
        "renewed_at": "2027-01-15T08:00:00Z",
        "renewed_until": "2027-02-14T09:00:00Z",
        "longest": "2027-03-16T09:00:00Z",
    }
    assert state_until(state, policy, filters) == (
        T0 + 30 * DAY_SECONDS + 3600,
        T0 + 60 * DAY_SECONDS + 3600,
    )
    assert state_until({**state, "lock_days": 31}, policy, filters) is None
    assert state_until({**state, "mode": "COMPLIANCE"}, policy, filters) is None
    assert state_until(state, policy, Filters()) is None
    assert state_until({**state, "renewed_until": "soon"}, policy, filters) is None
    assert state_until(None, policy, filters) is None
    assert state_until([1], policy, filters) is None
    without_longest = {k: v for k, v in state.items() if k != "longest"}
    assert state_until(without_longest, policy, filters) is None


@pytest.mark.parametrize(
    "known, target, read",
    [
        (None, T0, True),  # nothing known: read each lock
        ((T0 - 9, T0 - 1), T0, False),  # every lock ends before the target
        ((T0 - 9, T0), T0, False),
        ((T0 - 9, T0 + 1), T0, True),  # one may end later: a blind renewal shortens it
    ],
)
def test_locks_are_read_before_a_renewal_that_could_shorten_one(known, target, read):
    assert must_read_locks(known, target) is read


# --- End to end ---------------------------------------------------------------------


@pytest.fixture
def lock_env(s3_server, cli_env):
    def run(script: str, *args: str, endpoint: str = s3_server):
        return run_script(script, *args, "--endpoint-url", endpoint, env=cli_env)

    return run


@pytest.fixture
def client(s3_server):
    return client_for(s3_server)


def lock_of(client, bucket: str, key: str) -> tuple[str | None, float | None]:
    head = client.head_object(Bucket=bucket, Key=key)
    until = head.get("ObjectLockRetainUntilDate")
    return head.get("ObjectLockMode"), until and until.timestamp()


def test_the_usage_errors_of_lock_options(tmp_path, lock_env):
    tree = make_tree(tmp_path / "src", {"a.txt": b"a"})
    for args, line in [
        (["--lock-mode", "compliance"], "--lock-mode goes with --lock-days N"),
        (["--lock-days", "3", "--no-versioning"], "--no-versioning turns off"),
        (["--lock-days", "0"], "must be 1 or more"),
        (["--lock-days", "36501"], "more than 36500"),
        (["--lock-days", "3", "--lock-mode", "strict"], "invalid choice"),
    ]:
        result = lock_env("backup.py", str(tree), "never-made::p", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert line in result.stderr and "Traceback" not in result.stderr


def test_every_upload_is_locked_and_the_backups_own_keys_cannot_delete_it(
    tmp_path, lock_env, client, bucket_name
):
    files = {"a.txt": b"a" * 10, "sub/b.txt": b"b", "big.bin": b"m" * (9 * MiB)}
    tree = make_tree(tmp_path / "src", files)
    before = time.time()
    first = lock_env(
        "backup.py", str(tree), f"{bucket_name}::p", "--lock-days", "3", "--json"
    )
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    keys = [f"p/{name}" for name in files]
    for key in keys:  # small (direct PUT) and multipart alike
        mode, until = lock_of(client, bucket_name, key)
        assert mode == "GOVERNANCE" and until >= before + 3 * DAY_SECONDS, key
    assert report["lock"]["mode"] == "GOVERNANCE"
    assert report["lock"]["until"] >= format_when(before + 3 * DAY_SECONDS)

    # Ransomware with the backup's keys: every delete of a version is refused.
    versions = client.list_object_versions(Bucket=bucket_name, Prefix="p/")
    targets = [
        {"Key": v["Key"], "VersionId": v["VersionId"]} for v in versions["Versions"]
    ]
    answer = client.delete_objects(Bucket=bucket_name, Delete={"Objects": targets})
    assert not answer.get("Deleted")
    assert sorted(e["Key"] for e in answer["Errors"]) == sorted(keys)
    assert {e["Code"] for e in answer["Errors"]} == {"AccessDenied"}

    # --delete places delete markers only, and restore --at brings the folder back.
    time.sleep(2)  # past the restore point's second: --at compares whole seconds
    for name in files:
        (tree / name).unlink()
    (tree / "new.txt").write_bytes(b"n")
    deleting = lock_env(
        "backup.py", str(tree), f"{bucket_name}::p", "--lock-days", "3", "--delete"
    )
    assert deleting.returncode == 0, deleting.stderr
    assert "deleted 3" in deleting.stdout
    listed = client.list_object_versions(Bucket=bucket_name, Prefix="p/")
    assert sorted(m["Key"] for m in listed["DeleteMarkers"]) == sorted(keys)
    assert len(listed["Versions"]) == 4
    restored = lock_env(
        "restore.py",
        f"{bucket_name}::p",
        str(tmp_path / "back"),
        "--at",
        report["restore_point"],
    )
    assert restored.returncode == 0, restored.stderr
    assert {
        p.relative_to(tmp_path / "back").as_posix(): p.read_bytes()
        for p in (tmp_path / "back").rglob("*")
        if p.is_file()
    } == files


def test_a_no_change_run_renews_nothing_and_asks_little(
    tmp_path, lock_env, start_proxy, bucket_name
):
    tree = make_tree(tmp_path / "src", {f"d{n}/f.txt": b"x" * n for n in range(12)})
    proxy = start_proxy()
    plain, locked = f"{bucket_name}::plain", f"{bucket_name}::locked"
    for target, args in ((locked, ["--lock-days", "30"]), (plain, [])):
        assert lock_env("backup.py", str(tree), target, *args).returncode == 0
    counts = {}
    for target, args in ((plain, []), (locked, ["--lock-days", "30"])):
        proxy.operations.clear()
        result = lock_env("backup.py", str(tree), target, *args, endpoint=proxy.url)
        assert result.returncode == 0, result.stderr
        assert "uploaded 0, skipped 12" in result.stdout
        counts[target] = list(proxy.operations)
    assert "PutObjectRetention" not in counts[locked]
    assert "HeadObject" not in counts[locked]
    # The bucket's lock and the prefix's state object: two requests more, not 12.
    assert sorted(counts[locked]) == sorted(
        [*counts[plain], "GetObjectLockConfiguration", "GetObject"]
    )


def test_a_due_renewal_extends_every_lock_once(
    tmp_path, lock_env, client, start_proxy, bucket_name
):
    tree = make_tree(tmp_path / "src", {f"f{n}.txt": b"x" for n in range(5)})
    location = f"{bucket_name}::p"
    assert (
        lock_env("backup.py", str(tree), location, "--lock-days", "4").returncode == 0
    )
    keys = [f"p/f{n}.txt" for n in range(5)]
    first = {key: lock_of(client, bucket_name, key)[1] for key in keys}
    # As the last renewal would have left it three days ago: 1 day of lock to
    # go, fewer than the 3 that 3N/4 asks for.
    long_ago = time.time() - 3 * DAY_SECONDS
    state = {
        "lock_days": 4,
        "mode": "GOVERNANCE",
        "filters": [],
        "renewed_at": format_when(long_ago - DAY_SECONDS),
        "renewed_until": format_when(long_ago + 4 * DAY_SECONDS),
        "longest": format_when(long_ago + 4 * DAY_SECONDS),
    }
    body = json.dumps(state).encode()
    client.put_object(
        Bucket=bucket_name,
        Key=lock_state_key("p"),
        Body=body,
        ChecksumAlgorithm="CRC32",
    )
    time.sleep(1.1)  # locks end on whole seconds: the renewal's, a second later
    proxy = start_proxy()
    result = lock_env(
        "backup.py",
        str(tree),
        location,
        "--lock-days",
        "4",
        "--json",
        endpoint=proxy.url,
    )
    assert result.returncode == 0, result.stderr
    assert proxy.operations.count("PutObjectRetention") == 5
    # One lock read back, no more: the state says no lock is longer than the renewal.
    assert proxy.operations.count("HeadObject") == 1
    for key in keys:
        assert lock_of(client, bucket_name, key)[1] > first[key]
    report = json.loads(result.stdout)
    written = json.loads(
        client.get_object(Bucket=bucket_name, Key=lock_state_key("p"))["Body"].read()
    )
    assert written["renewed_until"] == report["lock"]["until"]
    # The next run finds nothing due.
    proxy.operations.clear()
    again = lock_env(
        "backup.py", str(tree), location, "--lock-days", "4", endpoint=proxy.url
    )
    assert again.returncode == 0 and "PutObjectRetention" not in proxy.operations


def test_other_lock_days_read_each_lock_and_never_shorten_one(
    tmp_path, lock_env, client, start_proxy, bucket_name
):
    tree = make_tree(tmp_path / "src", {"a.txt": b"a", "b.txt": b"b"})
    location = f"{bucket_name}::p"
    assert (
        lock_env("backup.py", str(tree), location, "--lock-days", "10").returncode == 0
    )
    longer = {key: lock_of(client, bucket_name, key) for key in ("p/a.txt", "p/b.txt")}
    proxy = start_proxy()
    result = lock_env(
        "backup.py", str(tree), location, "--lock-days", "4", endpoint=proxy.url
    )
    assert result.returncode == 0, result.stderr
    assert proxy.operations.count("HeadObject") >= 2
    assert "PutObjectRetention" not in proxy.operations
    assert {key: lock_of(client, bucket_name, key) for key in longer} == longer
    # A renewal due later still reads them: the state remembers the longer locks.
    state_key = lock_state_key("p")
    state = json.loads(
        client.get_object(Bucket=bucket_name, Key=state_key)["Body"].read()
    )
    state["renewed_until"] = format_when(time.time())
    client.put_object(
        Bucket=bucket_name,
        Key=state_key,
        Body=json.dumps(state).encode(),
        ChecksumAlgorithm="CRC32",
    )
    proxy.operations.clear()
    due = lock_env(
        "backup.py", str(tree), location, "--lock-days", "4", endpoint=proxy.url
    )
    assert due.returncode == 0, due.stderr
    assert proxy.operations.count("HeadObject") >= 2
    assert "PutObjectRetention" not in proxy.operations
    assert {key: lock_of(client, bucket_name, key) for key in longer} == longer


def test_check_reports_unlocked_objects_and_a_run_locks_them(
    tmp_path, lock_env, client, bucket_name
):
    tree = make_tree(tmp_path / "src", {"a.txt": b"a", "sub/b.txt": b"b"})
    location = f"{bucket_name}::p"
    assert lock_env("backup.py", str(tree), location).returncode == 0  # no lock
    check = lock_env(
        "backup.py", str(tree), location, "--check", "--lock-days", "4", "--json"
    )
    assert check.returncode == 1, check.stderr
    assert json.loads(check.stdout)["unlocked"] == ["p/a.txt", "p/sub/b.txt"]
    check = lock_env("backup.py", str(tree), location, "--check", "--lock-days", "4")
    assert "unlocked: p/a.txt\nunlocked: p/sub/b.txt\n" in check.stdout
    assert "2 unlocked" in check.stdout and check.returncode == 1
    locking = lock_env("backup.py", str(tree), location, "--lock-days", "4")
    if TEST_SERVER in ("rgw", "moto"):
        # RGW 16 locks only a bucket created with Object Lock, moto only an empty one.
        assert locking.returncode == 1
        assert "cannot be turned on" in locking.stderr
        assert "new bucket with --lock-days" in locking.stderr
        return
    assert locking.returncode == 0, locking.stderr
    assert "turned on Object Lock" in locking.stdout
    check = lock_env("backup.py", str(tree), location, "--check", "--lock-days", "4")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "0 unlocked" in check.stdout


def test_lock_days_turns_object_lock_on_for_an_existing_bucket(
    tmp_path, lock_env, client, bucket_name
):
    client.create_bucket(Bucket=bucket_name)
    tree = make_tree(tmp_path / "src", {"a.txt": b"a"})
    result = lock_env("backup.py", str(tree), bucket_name, "--lock-days", "2")
    if TEST_SERVER == "rgw":
        assert result.returncode == 1
        assert "lock only a bucket created with it" in result.stderr
        assert "Contents" not in client.list_objects_v2(Bucket=bucket_name)
        return
    assert result.returncode == 0, result.stderr
    assert "turned on Object Lock" in result.stdout
    assert client.get_bucket_versioning(Bucket=bucket_name)["Status"] == "Enabled"
    assert lock_of(client, bucket_name, "a.txt")[0] == "GOVERNANCE"


def test_a_default_retention_longer_than_lock_days_is_refused(
    tmp_path, lock_env, client, bucket_name
):
    client.create_bucket(Bucket=bucket_name, ObjectLockEnabledForBucket=True)
    client.put_object_lock_configuration(
        Bucket=bucket_name,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 5}},
        },
    )
    tree = make_tree(tmp_path / "src", {"a.txt": b"a"})
    short = lock_env("backup.py", str(tree), bucket_name, "--lock-days", "2")
    assert short.returncode == 2
    assert "shorter than the default retention" in short.stderr
    assert "Contents" not in client.list_objects_v2(
        Bucket=bucket_name
    )  # nothing uploaded
    fits = lock_env("backup.py", str(tree), bucket_name, "--lock-days", "5")
    assert fits.returncode == 0, fits.stderr
    assert "locks new objects GOVERNANCE 5 days by default" in fits.stdout


def test_keep_days_shorter_than_the_lock_is_a_warning(tmp_path, lock_env, bucket_name):
    tree = make_tree(tmp_path / "src", {"a.txt": b"a"})
    result = lock_env(
        "backup.py", str(tree), bucket_name, "--lock-days", "40", "--keep-days", "7"
    )
    assert result.returncode == 0, result.stderr
    assert "--keep-days 7 is shorter than --lock-days 40" in result.stderr


def test_the_state_object_at_the_root_is_neither_restored_nor_deleted(
    tmp_path, lock_env, client, bucket_name
):
    tree = make_tree(tmp_path / "src", {"a.txt": b"a", "old.txt": b"o"})
    assert (
        lock_env("backup.py", str(tree), bucket_name, "--lock-days", "2").returncode
        == 0
    )
    (tree / "old.txt").unlink()
    deleting = lock_env(
        "backup.py", str(tree), bucket_name, "--lock-days", "2", "--delete"
    )
    assert deleting.returncode == 0, deleting.stderr
    assert "deleted 1" in deleting.stdout
    client.head_object(Bucket=bucket_name, Key=lock_state_key(""))
    restored = lock_env("restore.py", bucket_name, str(tmp_path / "back"))
    assert restored.returncode == 0, restored.stderr
    assert sorted(p.name for p in (tmp_path / "back").rglob("*")) == ["a.txt"]
    history = lock_env("restore.py", bucket_name, "--history", "--json")
    assert history.returncode == 0, history.stderr
    moments = json.loads(history.stdout)["moments"]
    # One moment: a.txt added (old.txt came and went within it), the state not counted.
    assert [(m["added"], m["changed"], m["deleted"]) for m in moments] == [(1, 0, 0)]


@pytest.mark.skipif(
    TEST_SERVER != "moto",
    reason=f"{TEST_SERVER} checks signatures: a proxy cannot strip the signed lock "
    "headers of an upload, and it keeps every lock it is given",
)
def test_a_server_that_keeps_no_lock_is_found_out(
    tmp_path, lock_env, start_proxy, bucket_name
):
    tree = make_tree(tmp_path / "src", {"a.txt": b"a", "big.bin": b"m" * (9 * MiB)})
    proxy = start_proxy(strip_lock=True)
    result = lock_env(
        "backup.py", str(tree), bucket_name, "--lock-days", "3", endpoint=proxy.url
    )
    assert result.returncode == 1
    assert "does not lock objects" in result.stderr
    assert "locked (" not in result.stdout


def test_every_upload_to_a_lock_bucket_carries_a_checksum(
    tmp_path, lock_env, start_proxy, bucket_name
):
    # AWS (and moto, for PutObject) takes no upload to a bucket with a default
    # retention without Content-MD5 or an x-amz-checksum.
    files = {"a.txt": b"a", "mid.bin": b"s" * (2 * MiB), "big.bin": b"m" * (17 * MiB)}
    tree = make_tree(tmp_path / "src", files)
    proxy = start_proxy()
    result = lock_env(
        "backup.py", str(tree), bucket_name, "--lock-days", "2", endpoint=proxy.url
    )
    assert result.returncode == 0, result.stderr
    uploads = [
        (operation, names)
        for operation, names in zip(proxy.operations, proxy.header_names)
        if operation in ("PutObject", "UploadPart")
    ]
    assert sorted({operation for operation, _ in uploads}) == [
        "PutObject",
        "UploadPart",
    ]
    for operation, names in uploads:
        checksums = {n for n in names if n.startswith("x-amz-checksum-")}
        assert checksums or "content-md5" in names or "x-amz-trailer" in names, (
            operation,
            sorted(names),
        )


def test_compliance_locks_hold_against_a_governance_bypass(
    tmp_path, lock_env, client, bucket_name
):
    tree = make_tree(tmp_path / "src", {"a.txt": b"a"})
    result = lock_env(
        "backup.py",
        str(tree),
        bucket_name,
        "--lock-days",
        "1",
        "--lock-mode",
        "compliance",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["lock"]["mode"] == "COMPLIANCE"
    assert lock_of(client, bucket_name, "a.txt")[0] == "COMPLIANCE"
    [version] = client.list_object_versions(Bucket=bucket_name, Prefix="a.txt")[
        "Versions"
    ]
    with pytest.raises(botocore.exceptions.ClientError):
        client.delete_object(
            Bucket=bucket_name,
            Key="a.txt",
            VersionId=version["VersionId"],
            BypassGovernanceRetention=True,
        )
    assert client.head_object(Bucket=bucket_name, Key="a.txt")["ContentLength"] == 1
