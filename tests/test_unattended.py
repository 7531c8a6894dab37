"""Unattended runs: --bwlimit's RATE and token bucket, the --json report of every way a
run ends, --help, and a README that links nothing outside the repository."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
import signal
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import ROOT, make_tree, run_script
from test_reliability import SIGINT_GRACE_SECONDS, start_script, wait_for

import backup
import restore
from s3common import (
    BURST_SECONDS,
    UTC,
    Cancelled,
    Console,
    Summary,
    TokenBucket,
    connect,
    parse_rate,
    run_report,
)

MiB = 1024 * 1024
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
COMMON_FIELDS = [
    "command",
    "source",
    "destination",
    "dry_run",
    "started",
    "finished",
    "seconds",
    "exit_code",
    "transferred",
    "skipped",
    "failed",
    "bytes",
]


# --- RATE -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, rate",
    [
        ("0", 0),
        ("1", 1),
        ("512", 512),
        ("1K", 1024),
        ("64k", 64 * 1024),
        ("8M", 8 * MiB),
        ("1.5M", 3 * MiB // 2),
        ("2G", 2 * 1024 * MiB),
        ("0M", 0),
    ],
)
def test_rate(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    "text", ["", "M", "8X", "8MB", "8 M", " 8M", "-1", "1e6", "0.5", "1,000", "∞"]
)
def test_bad_rate(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_rate(text)


# --- The token bucket, on a clock the test moves -------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Waits:
    """A stand-in for the run's cancel Event: records each wait, and is set or not."""

    def __init__(self, is_set: bool = False):
        self.timeouts: list[float] = []
        self._set = is_set

    def wait(self, timeout: float) -> bool:
        self.timeouts.append(timeout)
        return self._set


def test_bucket_starts_empty_and_takers_queue_in_turn():
    clock = Clock()
    bucket = TokenBucket(1000, clock)
    assert bucket.book(500) == pytest.approx(0.5)
    assert bucket.book(500) == pytest.approx(1.0)
    clock.now += 1.0
    assert bucket.book(100) == pytest.approx(0.1)


def test_bucket_pays_debts_at_its_rate_whatever_the_sizes():
    clock = Clock()
    bucket = TokenBucket(1000, clock)
    assert bucket.book(5000) == pytest.approx(5.0)  # larger than any burst
    clock.now += 2.0
    assert bucket.book(1) == pytest.approx(3.001)
    clock.now += 10.0
    assert bucket.book(100) == pytest.approx(0.0)  # paid off, and full again


def test_idle_bucket_lets_at_most_its_burst_through():
    clock = Clock()
    bucket = TokenBucket(1000, clock)
    clock.now += 3600
    burst = 1000 * BURST_SECONDS
    assert bucket.book(int(burst)) == 0
    assert bucket.book(1000) == pytest.approx(1.0)


def test_pace_waits_the_booked_time_and_stops_when_cancelled():
    clock = Clock()
    bucket = TokenBucket(2000, clock)
    running = Waits()
    bucket.pace(1000, running)
    bucket.pace(1000, running)
    assert running.timeouts == [pytest.approx(0.5), pytest.approx(1.0)]
    with pytest.raises(Cancelled):
        bucket.pace(1000, Waits(is_set=True))


def test_bucket_is_shared_safely_by_threads():
    clock = Clock()
    bucket = TokenBucket(1000, clock)
    delays: list[float] = []
    start = threading.Barrier(8)

    def taker():
        start.wait()
        for _ in range(200):
            delays.append(bucket.book(10))

    threads = [threading.Thread(target=taker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Every one of the 1,600 bookings got its own turn: 10 ms apart, none lost.
    assert sorted(delays) == pytest.approx([n / 100 for n in range(1, 1601)])


def test_no_bucket_on_the_transfer_paths_without_bwlimit(s3):
    parser = backup.build_parser()
    assert connect(parser.parse_args(["src", "b::p"]), "b").bandwidth is None
    assert (
        connect(parser.parse_args(["src", "b::p", "--bwlimit", "0"]), "b").bandwidth
        is None
    )
    limited = connect(parser.parse_args(["src", "b::p", "--bwlimit", "2M"]), "b")
    assert limited.bandwidth.rate == 2 * MiB


def test_every_byte_passes_the_bucket_once_on_every_path(s3, tmp_path, monkeypatch):
    """Multipart parts, a PutObject of a middle-sized file, small files, and their
    downloads: each byte is booked once (no checksum read, no path left out)."""
    booked = []
    book = TokenBucket.book

    def counting_book(self, nbytes):
        booked.append(nbytes)
        return book(self, nbytes)

    monkeypatch.setattr(TokenBucket, "book", counting_book)
    files = {"large.bin": b"L" * (17 * MiB), "middle.bin": b"M" * (3 * MiB)}
    files.update({f"small/{n}.bin": bytes([n]) * (n * 1000) for n in range(4)})
    source = make_tree(tmp_path / "src", files)
    total = sum(len(data) for data in files.values())
    limit = ["--bwlimit", "64G", "-q"]  # a limit that makes no one wait

    assert backup.main([str(source), "bytes::p", *limit]) == 0
    assert sum(booked) == total
    booked.clear()
    assert restore.main(["bytes::p", str(tmp_path / "out"), *limit]) == 0
    assert sum(booked) == total
    assert (tmp_path / "out" / "large.bin").read_bytes() == files["large.bin"]


# --- The report, from any Summary -------------------------------------------------


def test_report_takes_every_summary_field_but_none_and_names_bytes():
    extended = dataclasses.make_dataclass(
        "Extended",
        [("restore_point", "str | None", None), ("missing", "list", ())],
        bases=(Summary,),
    )
    console = Console(False, False, err=io.StringIO(), json=True)
    console.summarize(
        extended("uploaded", transferred=2, nbytes=10, deleted=1, restore_point="T")
    )
    console.error("upload failed: /a: no", path="/a")
    started = datetime(2026, 11, 20, 14, 30, 5, tzinfo=UTC)
    report = run_report(
        "backup", ("src", "b::p"), False, started, 61.25, 1, console, None
    )
    assert report == {
        "command": "backup",
        "source": "src",
        "destination": "b::p",
        "dry_run": False,
        "started": "2026-11-20T14:30:05Z",
        "finished": "2026-11-20T14:31:06Z",
        "seconds": 61.25,
        "exit_code": 1,
        "transferred": 2,
        "skipped": 0,
        "failed": 0,
        "bytes": 10,
        "deleted": 1,
        "restore_point": "T",
        "missing": (),
        "errors": [{"path": "/a", "message": "upload failed: /a: no"}],
    }


def test_report_of_a_run_stopped_early_counts_what_was_done():
    console = Console(False, False, err=io.StringIO(), json=True)
    console.advance(nbytes=300, files=1)
    console.advance(nbytes=200, files=1)
    started = datetime(2026, 11, 20, tzinfo=UTC)
    report = run_report(
        "restore", ("b::p", "dst"), False, started, 1.0, 130, console, "interrupted"
    )
    assert (report["transferred"], report["bytes"]) == (2, 500)
    assert report["error"] == "interrupted"
    assert "refused" not in report


def test_json_console_keeps_stdout_for_the_report():
    out, err = io.StringIO(), io.StringIO()
    console = Console(False, True, out=out, err=err, json=True)
    console.info("uploaded 1, skipped 0")
    console.detail("upload: a -> s3://b/a")
    console.warning("careful")
    assert out.getvalue() == ""
    assert err.getvalue() == "upload: a -> s3://b/a\nwarning: careful\n"
    assert not console.live


# --- --help -----------------------------------------------------------------------


@pytest.mark.parametrize("script", [backup, restore])
def test_help_gives_every_option_a_meaning_and_an_example_and_the_exit_codes(script):
    parser = script.build_parser()
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            if action.dest == "help":
                continue
            assert action.help and "(e.g. " in action.help, action.option_strings
            assert action.help.endswith(")"), action.option_strings
    text = parser.format_help()
    assert "examples:\n  python " in text
    for code in ("0", "1", "2", "130"):
        assert re.search(rf"^  {code} +\S", text, re.MULTILINE), code


def test_help_runs_as_a_user_sees_it(cli_env):
    result = run_script("restore.py", "--help", env=cli_env)
    assert result.returncode == 0
    assert "--bwlimit RATE" in result.stdout and "exit codes:" in result.stdout
    assert "python restore.py nightly::srv" in result.stdout


# --- README -----------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors_of(markdown: Path) -> set[str]:
    """The fragments of a Markdown file's headings (not of "#" lines in code blocks)."""
    anchors, in_code = set(), False
    for line in markdown.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif line.startswith("#") and not in_code:
            anchors.add(github_anchor(line.lstrip("#")))
    return anchors


def test_every_readme_link_resolves_inside_the_repository():
    readme = ROOT / "README.md"
    text = readme.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(
        r"""href=["']([^"']+)""", text
    )
    assert links, "the README links nothing: is the pattern still right?"
    for link in links:
        target, _, fragment = link.partition("#")
        assert "://" not in link and not link.startswith("mailto:"), link
        path = (ROOT / target).resolve() if target else readme
        assert path.is_relative_to(ROOT) and path.exists(), link
        if fragment:
            assert fragment in anchors_of(path), link


def test_readme_documents_every_option_of_both_scripts():
    text = (ROOT / "README.md").read_text()
    for script in (backup, restore):
        for action in script.build_parser()._actions:
            if action.help == argparse.SUPPRESS:
                continue
            for option in action.option_strings:
                assert f"`{option}" in text or f"{option}`" in text, option


# --- --json end to end --------------------------------------------------------------


def one_json_object(result) -> dict:
    """stdout as exactly one JSON object on one line, checked against the exit code."""
    assert result.stdout.count("\n") == 1 and result.stdout.endswith("\n"), (
        result.stdout,
        result.stderr,
    )
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    assert list(report)[: len(COMMON_FIELDS)] == COMMON_FIELDS
    assert ISO_UTC.fullmatch(report["started"]) and ISO_UTC.fullmatch(
        report["finished"]
    )
    assert report["finished"] >= report["started"]
    assert report["exit_code"] == result.returncode
    assert isinstance(report["errors"], list)
    return report


@pytest.fixture
def tree(tmp_path):
    return make_tree(
        tmp_path / "src",
        {"a.txt": b"a" * 100, "sub/b.txt": b"b" * 200, "sub/deeper/c.bin": b"c" * 50},
    )


def test_json_backup_then_no_change_backup(s3_server, cli_env, tree, bucket_name):
    location = f"{bucket_name}::host/home"
    first = run_script(
        "backup.py", str(tree), location, "--endpoint-url", s3_server, "--json",
        env=cli_env,
    )  # fmt: skip
    report = one_json_object(first)
    assert first.stderr == ""
    assert report["command"] == "backup"
    assert (report["source"], report["destination"]) == (str(tree), location)
    assert report["dry_run"] is False
    assert (report["transferred"], report["skipped"], report["failed"]) == (3, 0, 0)
    assert (report["bytes"], report["deleted"], report["errors"]) == (350, 0, [])
    assert report["exit_code"] == 0 and "error" not in report

    second = run_script(
        "backup.py", str(tree), location, "--endpoint-url", s3_server, "--json",
        "-v", env=cli_env,
    )  # fmt: skip
    report = one_json_object(second)
    assert (report["transferred"], report["skipped"], report["bytes"]) == (0, 3, 0)
    assert report["exit_code"] == 0


def test_json_restore_with_a_conflict(
    s3_server, cli_env, tmp_path, bucket_name, server_client
):
    server_client.create_bucket(Bucket=bucket_name)
    for key, data in {"p/a": b"file a", "p/a/b": b"under a", "p/c": b"c"}.items():
        server_client.put_object(Bucket=bucket_name, Key=key, Body=data)
    target = tmp_path / "restored"
    result = run_script(
        "restore.py", f"s3://{bucket_name}/p", str(target), "--json",
        "--endpoint-url", s3_server, env=cli_env,
    )  # fmt: skip
    report = one_json_object(result)
    assert result.returncode == 1
    assert report["command"] == "restore"
    assert (report["source"], report["destination"]) == (
        f"s3://{bucket_name}/p",
        str(target),
    )
    assert (report["transferred"], report["skipped"], report["failed"]) == (2, 0, 1)
    assert (report["refused"], report["conflicts"], report["archived"]) == (0, 1, 0)
    assert report["bytes"] == len(b"under a") + 1
    [error] = report["errors"]
    assert error["key"] == "p/a" and "conflict" in error["message"]
    assert error["message"] in result.stderr
    assert (target / "a" / "b").read_bytes() == b"under a"


@pytest.mark.parametrize("script", ["backup.py", "restore.py"])
def test_json_dry_run(s3_server, cli_env, tree, tmp_path, server_client, script):
    # backup: into a bucket that does not exist; restore: from one that does.
    bucket = f"dry-{script[:6]}-{tmp_path.name[-8:].lower().replace('_', '-')}"
    if script == "restore.py":
        server_client.create_bucket(Bucket=bucket)
        server_client.put_object(Bucket=bucket, Key="p/x.txt", Body=b"12345")
        args = [f"{bucket}::p", str(tmp_path / "out")]
    else:
        args = [str(tree), f"{bucket}::p"]
    result = run_script(
        script, *args, "--dry-run", "--json", "--endpoint-url", s3_server,
        env=cli_env,
    )  # fmt: skip
    report = one_json_object(result)
    assert result.returncode == 0 and report["dry_run"] is True
    if script == "restore.py":
        assert (report["transferred"], report["bytes"]) == (1, 5)
        assert not (tmp_path / "out").exists()
    else:
        assert (report["transferred"], report["bytes"], report["deleted"]) == (
            3,
            350,
            0,
        )
        assert bucket not in [
            b["Name"] for b in server_client.list_buckets()["Buckets"]
        ]


@pytest.mark.parametrize(
    "script, args, words",
    [
        ("backup.py", ["--json", "src"], "required: BUCKET::PREFIX"),
        ("backup.py", ["src", "b::p", "--json", "--no-such-option"], "unrecognized"),
        ("restore.py", ["b::p", "out", "--json", "--bwlimit", "8X"], "not a rate"),
        ("restore.py", ["b::p", "out", "--bwlimit=-1M", "--json"], "not a rate"),
        ("backup.py", ["src", "b::p", "--json", "--workers", "0"], "1 or more"),
    ],
)
def test_json_usage_error(cli_env, script, args, words):
    result = run_script(script, *args, env=cli_env)
    report = one_json_object(result)
    assert result.returncode == 2
    assert words in report["error"]
    assert result.stderr == report["error"] + "\n"
    assert (report["transferred"], report["errors"]) == (0, [])


def test_json_restore_from_a_missing_bucket(s3_server, cli_env, tmp_path):
    result = run_script(
        "restore.py", "no-such-bucket-here::p", str(tmp_path / "out"), "--json",
        "--endpoint-url", s3_server, env=cli_env,
    )  # fmt: skip
    report = one_json_object(result)
    assert result.returncode == 1
    assert "does not exist" in report["error"]
    assert (report["source"], report["destination"]) == (
        "no-such-bucket-here::p",
        str(tmp_path / "out"),
    )


def test_json_without_credentials(s3_server, cli_env, tree):
    env = {k: v for k, v in cli_env.items() if not k.startswith("AWS_ACCESS")}
    env = {k: v for k, v in env.items() if k not in ("AWS_SECRET_ACCESS_KEY",)}
    result = run_script(
        "backup.py", str(tree), "bucket::p", "--json", "--endpoint-url", s3_server,
        env=env,
    )  # fmt: skip
    report = one_json_object(result)
    assert result.returncode == 1
    assert "no AWS credentials found" in report["error"]


def test_json_interrupted_run_still_reports(
    s3_server, cli_env, tmp_path, bucket_name, server_client
):
    # Slowed down by --bwlimit, so that the run is surely under way when Ctrl-C
    # comes, and its workers are waiting in the token bucket.
    source = make_tree(
        tmp_path / "src", {f"f{n}.bin": bytes(512 * 1024) for n in range(8)}
    )
    process = start_script(
        "backup.py", str(source), f"{bucket_name}::p", "--json", "--bwlimit", "256K",
        "--endpoint-url", s3_server, env=cli_env,
    )  # fmt: skip

    def bucket_made() -> bool:
        assert process.poll() is None, "the backup ended before it was interrupted"
        names = [b["Name"] for b in server_client.list_buckets()["Buckets"]]
        return bucket_name in names

    try:
        wait_for(bucket_made, "the backup to create its bucket")
        time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            stdout, stderr = process.communicate(timeout=SIGINT_GRACE_SECONDS)
        finally:
            process.kill()
    # Workers waiting in the token bucket stop at once.
    assert time.monotonic() - sent < 5
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout)
    report = one_json_object(result)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert report["error"] == "interrupted: stopped cleanly, run again to finish"
    assert report["transferred"] < 8


# --- --bwlimit, timed --------------------------------------------------------------


def test_bwlimit_holds_uploads_and_restores_of_every_size_to_the_rate(
    s3_server, cli_env, tmp_path, bucket_name
):
    """24 MiB at 6 MiB/s: 4 s each way, in multipart parts (a 17 MiB file in two
    parts), one botocore PUT (3 MiB) and direct requests (4 x 1 MiB)."""
    files = {"large.bin": b"L" * (17 * MiB), "middle.bin": b"M" * (3 * MiB)}
    files.update({f"small/{n}.bin": bytes([n]) * MiB for n in range(4)})
    source = make_tree(tmp_path / "src", files)
    common = ["--bwlimit", "6M", "--json", "--endpoint-url", s3_server]
    up = run_script("backup.py", str(source), f"{bucket_name}::p", *common, env=cli_env)
    down = run_script(
        "restore.py", f"{bucket_name}::p", str(tmp_path / "out"), *common, env=cli_env
    )
    for result in (up, down):
        report = one_json_object(result)
        assert (report["exit_code"], report["bytes"]) == (0, 24 * MiB), result.stderr
        # Never faster than the rate allows (but for the bucket's burst); the upper
        # bound only leaves room for a machine shared with other work.
        assert 3.8 <= report["seconds"] <= 10, report
    assert (tmp_path / "out" / "large.bin").read_bytes() == files["large.bin"]
