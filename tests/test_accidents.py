"""Accidents that leave a run half done: Ctrl-C in the first instant on a busy
machine, a kill -9 while backup sets up its bucket or uploads a large file, a
wrong secret key, and the counters of a run that did not get every file in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import botocore.exceptions
import pytest
from conftest import ROOT, TEST_SERVER, make_tree, run_script
from faultproxy import FaultProxy
from rgwserver import free_port
from test_reliability import MiB, incomplete_uploads, start_script, wait_for

from backup import HISTORY_RULE_ID


@pytest.fixture
def busy_cpus():
    """Two processes that keep both cores busy, as on a loaded server."""
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)
    ]
    yield
    for burner in burners:
        burner.kill()
        burner.wait()


def first_import_line(process: subprocess.Popen) -> list[str]:
    """Read -X importtime's lines up to the first one after site's: the first
    import of the script's own has ended. The lines read."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        if len(seen) > 1 and seen[-2].rstrip().endswith("| site"):
            break
    return seen


@pytest.mark.parametrize("script", ["backup.py", "restore.py"])
def test_ctrl_c_in_the_first_instant_on_a_busy_machine(
    tmp_path, cli_env, busy_cpus, script
):
    # Each import ends with a line of -X importtime: Ctrl-C as soon as the
    # script's first import has ended must find the handler in place. The
    # endpoint is dead: a signal that came late fails the run, never waits.
    args = (
        (str(tmp_path), "bucket::p")
        if script == "backup.py"
        else ("bucket::p", str(tmp_path / "d"))
    )
    for _ in range(8):
        process = subprocess.Popen(
            [sys.executable, "-X", "importtime", str(ROOT / script), *args,
             "--endpoint-url", f"http://127.0.0.1:{free_port()}"],
            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        seen = first_import_line(process)
        process.send_signal(signal.SIGINT)
        stdout, rest = process.communicate(timeout=60)
        stderr = "".join(seen) + rest
        assert process.returncode == 130, stderr[-2000:]
        assert stdout == ""
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


# --- The bucket's setup: Ctrl-C, kill -9, versioning turned off behind our back --


def history_of(client, bucket: str) -> tuple[str, list[str]]:
    """The bucket's versioning status and the IDs of its lifecycle rules."""
    status = client.get_bucket_versioning(Bucket=bucket).get("Status", "")
    try:
        rules = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    except botocore.exceptions.ClientError:
        rules = []
    return status, [rule["ID"] for rule in rules]


def backup_held_at(
    operation: str, args: tuple[str, ...], start_proxy, cli_env
) -> tuple[subprocess.Popen, FaultProxy]:
    """backup.py with `args`, held at its first request of `operation`."""
    proxy = start_proxy(hold={operation})
    process = start_script("backup.py", *args, "--endpoint-url", proxy.url, env=cli_env)
    wait_for(proxy.holding.is_set, f"backup's {operation}")
    return process, proxy


def backup_killed_at(operation: str, args: tuple[str, ...], start_proxy, cli_env):
    """backup.py with `args`, killed (kill -9) at its first request of
    `operation`, which never reaches the server."""
    process, proxy = backup_held_at(operation, args, start_proxy, cli_env)
    process.kill()
    process.communicate()
    proxy.release(forward=False)


@pytest.fixture
def source(tmp_path):
    return make_tree(tmp_path / "src", {"a.txt": b"a", "sub/b.txt": b"bb"})


@pytest.mark.parametrize(
    "operation",
    ["CreateBucket", "PutBucketLifecycleConfiguration", "PutBucketVersioning"],
)
def test_ctrl_c_while_backup_sets_up_its_bucket_finishes_the_setup_first(
    source, bucket_name, s3_server, server_client, start_proxy, cli_env, operation
):
    args = (str(source), f"{bucket_name}::p")
    process, proxy = backup_held_at(operation, args, start_proxy, cli_env)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)  # the signal has arrived before the held request is answered
    proxy.release()
    _stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert history_of(server_client, bucket_name) == ("Enabled", [HISTORY_RULE_ID])
    assert "Contents" not in server_client.list_objects_v2(Bucket=bucket_name)


def test_a_first_run_killed_before_versioning_is_finished_by_the_next(
    source, bucket_name, s3_server, server_client, start_proxy, cli_env
):
    args = (str(source), f"{bucket_name}::p")
    backup_killed_at("PutBucketVersioning", args, start_proxy, cli_env)
    assert history_of(server_client, bucket_name) == ("", [HISTORY_RULE_ID])
    args += ("--endpoint-url", s3_server)
    result = run_script("backup.py", *args, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (
        f"finished setting up s3://{bucket_name} with versioning (lifecycle rule "
        f"{HISTORY_RULE_ID}: old versions kept 30 days)"
    ) in result.stdout
    assert history_of(server_client, bucket_name) == ("Enabled", [HISTORY_RULE_ID])
    again = run_script("backup.py", *args, env=cli_env)
    assert again.returncode == 0 and again.stderr == ""
    assert "setting up" not in again.stdout


def unversioned_line(bucket: str, state: str) -> str:
    return (
        f"warning: versioning of s3://{bucket} is {state}: overwritten and deleted "
        "files cannot be recovered (backup.py --keep-days N turns it on; "
        "--no-versioning says that a mirror without history is meant)"
    )


def test_a_first_run_killed_before_its_rule_is_warned_of_on_every_run(
    source, bucket_name, s3_server, server_client, start_proxy, cli_env
):
    # Before our rule is in place the bucket cannot be told from an empty one
    # of the user's: it is not reconfigured, and every run says so.
    args = (str(source), f"{bucket_name}::p")
    backup_killed_at("PutBucketLifecycleConfiguration", args, start_proxy, cli_env)
    args += ("--endpoint-url", s3_server)
    for _ in range(2):
        result = run_script("backup.py", *args, env=cli_env)
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines() == [unversioned_line(bucket_name, "off")]
    assert history_of(server_client, bucket_name) == ("", [])
    quiet = run_script("backup.py", *args, "--no-versioning", env=cli_env)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_versioning_suspended_behind_the_backups_back_is_warned_of(
    source, bucket_name, s3_server, server_client, cli_env
):
    args = (str(source), f"{bucket_name}::p", "--endpoint-url", s3_server)
    assert run_script("backup.py", *args, env=cli_env).returncode == 0
    server_client.put_bucket_versioning(
        Bucket=bucket_name, VersioningConfiguration={"Status": "Suspended"}
    )
    for _ in range(2):
        result = run_script("backup.py", *args, env=cli_env)
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines() == [
            unversioned_line(bucket_name, "suspended")
        ]
    # Suspended by the user is the user's choice: never turned back on unasked.
    assert history_of(server_client, bucket_name) == ("Suspended", [HISTORY_RULE_ID])


# --- A wrong secret key ---------------------------------------------------------


ANOTHER_SECRET = "not-the-secret-of-this-access-key"


@pytest.mark.parametrize("script", ["backup.py", "restore.py"])
def test_a_wrong_secret_key_is_named_as_such(
    tmp_path, bucket_name, s3_server, server_client, cli_env, script
):
    if TEST_SERVER == "moto":
        pytest.skip("moto's server does not check signatures: see the proxy's test")
    server_client.create_bucket(Bucket=bucket_name)
    server_client.put_object(Bucket=bucket_name, Key="p/a.txt", Body=b"a")
    source = make_tree(tmp_path / "src", {"a.txt": b"a"})
    location = f"{bucket_name}::p"
    args = (
        (str(source), location)
        if script == "backup.py"
        else (location, str(tmp_path / "d"))
    )
    env = {**cli_env, "AWS_SECRET_ACCESS_KEY": ANOTHER_SECRET}
    result = run_script(script, *args, "--endpoint-url", s3_server, env=env)
    assert result.returncode == 1
    assert "the secret key does not match the access key" in result.stderr
    assert "another account" not in result.stderr
    assert ANOTHER_SECRET not in result.stderr + result.stdout


def test_a_bare_403_of_head_bucket_is_explained_by_a_listing(
    source, bucket_name, failing_proxy, cli_env
):
    # As RGW answers a wrong secret key: HeadBucket a 403 with no body (a HEAD
    # has none), the listing SignatureDoesNotMatch.
    proxy = failing_proxy(
        {
            "HeadBucket": ("SignatureDoesNotMatch", 403),
            "ListObjectsV2": ("SignatureDoesNotMatch", 403),
        },
        buckets=(bucket_name,),
        create=True,
    )
    args = (str(source), f"{bucket_name}::p", "--endpoint-url", proxy.url)
    result = run_script("backup.py", *args, env=cli_env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        (
            f"backup.py: error: bucket {bucket_name}: the secret key does not match the "
            "access key: check your credentials (aws configure)"
        )
    ]
    assert "PutObject" not in proxy.operations


# --- A kill -9 in the middle of a multipart upload ------------------------------


def test_the_next_run_aborts_the_incomplete_upload_a_killed_run_left(
    tmp_path, bucket_name, s3_server, server_client, start_proxy, cli_env
):
    large = os.urandom(12 * MiB)  # multipart, above the 8 MiB threshold
    source = make_tree(tmp_path / "src", {"large.bin": large, "small.txt": b"s"})
    server_client.create_bucket(Bucket=bucket_name)
    args = (str(source), f"{bucket_name}::p", "--no-versioning")
    backup_killed_at("UploadPart", args, start_proxy, cli_env)
    [left] = incomplete_uploads(server_client, bucket_name)
    assert left["Key"] == "p/large.bin"

    result = run_script("backup.py", *args, "--endpoint-url", s3_server, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert incomplete_uploads(server_client, bucket_name) == []
    body = server_client.get_object(Bucket=bucket_name, Key="p/large.bin")["Body"]
    assert body.read() == large


# --- The counters of a run that did not get every file in as the walk saw it ----


def test_bytes_count_what_is_stored_when_a_file_shrinks_during_its_upload(
    tmp_path, bucket_name, s3_server, server_client, start_proxy, cli_env
):
    source = make_tree(tmp_path / "src", {"large.bin": os.urandom(12 * MiB)})
    args = (str(source), f"{bucket_name}::p", "--json")
    process, proxy = backup_held_at("UploadPart", args, start_proxy, cli_env)
    os.truncate(source / "large.bin", 0)
    proxy.release()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    report = json.loads(stdout)
    assert (report["transferred"], report["bytes"]) == (1, 0)
    head = server_client.head_object(Bucket=bucket_name, Key="p/large.bin")
    assert head["ContentLength"] == 0


def test_a_backup_that_failed_a_file_names_no_restore_point(
    tmp_path, bucket_name, s3_server, start_proxy, cli_env
):
    source = make_tree(tmp_path / "src", {"bad.txt": b"b", "good.txt": b"g"})
    proxy = start_proxy(throttled_keys={"bad.txt"})
    env = {**cli_env, "AWS_MAX_ATTEMPTS": "1"}
    args = (str(source), f"{bucket_name}::p", "--endpoint-url", proxy.url)
    result = run_script("backup.py", *args, "--json", env=env)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert (report["transferred"], report["failed"]) == (1, 1)
    assert report["restore_point"] is None
    plain = run_script("backup.py", *args, env=env)
    assert plain.returncode == 1
    assert "restore point" not in plain.stdout
    proxy.stop_faults()
    done = run_script("backup.py", *args, "--json", env=env)
    assert done.returncode == 0
    assert json.loads(done.stdout)["restore_point"].endswith("Z")
