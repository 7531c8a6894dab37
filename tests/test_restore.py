"""restore.main against moto's in-process S3: mapping, safety, metadata, errors, re-runs."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
from conftest import make_tree

import backup
import restore

MiB = 1024 * 1024


def tree_files(root) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def leftovers(root) -> list[str]:
    return [path.name for path in root.rglob(".s3restore-*")]


@pytest.fixture
def bucket(s3):
    s3.create_bucket(Bucket="vault")
    return "vault"


def put(s3, key, body=b"x", **kwargs):
    s3.put_object(Bucket="vault", Key=key, Body=body, **kwargs)


def test_round_trip_keeps_bytes_mtimes_and_modes(s3, tmp_path):
    source = make_tree(
        tmp_path / "src",
        {"a.txt": b"alpha", "sub/deep/b.sh": b"#!/bin/sh\n", "empty": b""},
    )
    os.chmod(source / "sub" / "deep" / "b.sh", 0o750)
    os.utime(
        source / "a.txt", ns=(1_500_000_000_987_654_321, 1_500_000_000_987_654_321)
    )
    assert backup.main([str(source), "vault::p"]) == 0
    target = tmp_path / "new" / "parents" / "dst"
    assert restore.main(["vault::p", str(target)]) == 0
    assert tree_files(target) == tree_files(source)
    assert os.stat(target / "a.txt").st_mtime_ns == 1_500_000_000_987_654_321
    assert stat.S_IMODE(os.stat(target / "sub" / "deep" / "b.sh").st_mode) == 0o750
    for name in ("a.txt", "empty", "sub/deep/b.sh"):
        assert os.stat(target / name).st_mtime_ns == os.stat(source / name).st_mtime_ns
    assert leftovers(target) == []


def test_prefix_matches_on_folder_boundary(s3, bucket, tmp_path):
    put(s3, "photos/a.jpg", b"a")
    put(s3, "photos2/b.jpg", b"b")
    assert restore.main(["vault::photos", str(tmp_path / "out")]) == 0
    assert tree_files(tmp_path / "out") == {"a.jpg": b"a"}


def test_prefix_naming_one_object_restores_that_file(s3, bucket, tmp_path):
    put(s3, "docs/2024/report.pdf", b"pdf")
    put(s3, "docs/2024/report.pdf.bak", b"old")
    assert restore.main(["s3://vault/docs/2024/report.pdf", str(tmp_path / "out")]) == 0
    assert tree_files(tmp_path / "out") == {"report.pdf": b"pdf"}


def test_whole_bucket_and_folder_markers(s3, bucket, tmp_path, capsys):
    put(s3, "top.txt", b"t")
    put(s3, "dir/", b"")
    put(s3, "dir/inner.txt", b"i")
    assert restore.main(["vault", str(tmp_path / "out")]) == 0
    assert tree_files(tmp_path / "out") == {"top.txt": b"t", "dir/inner.txt": b"i"}
    assert "restored 2, skipped 0, failed 0" in capsys.readouterr().out


def test_existing_files_overwritten_and_extra_files_kept(s3, bucket, tmp_path):
    put(s3, "p/a.txt", b"from backup")
    target = make_tree(
        tmp_path / "out", {"a.txt": b"local edit", "mine.txt": b"not in backup"}
    )
    assert restore.main(["vault::p", str(target)]) == 0
    assert tree_files(target) == {"a.txt": b"from backup", "mine.txt": b"not in backup"}


def test_objects_without_metadata_get_last_modified_and_default_mode(
    s3, bucket, tmp_path
):
    put(s3, "p/plain.txt", b"by another tool")
    last_modified = s3.head_object(Bucket="vault", Key="p/plain.txt")[
        "LastModified"
    ].timestamp()
    old_umask = os.umask(0o022)
    try:
        assert restore.main(["vault::p", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old_umask)
    info = os.stat(tmp_path / "out" / "plain.txt")
    assert info.st_mtime == pytest.approx(last_modified, abs=1e-6)
    assert stat.S_IMODE(info.st_mode) == 0o644


def test_hostile_keys_are_refused_and_the_rest_restored(s3, bucket, tmp_path, capsys):
    for key in (
        "p/ok.txt",
        "p/../evil.txt",
        "p/a/../../evil2.txt",
        "p/c:\\evil3",
        "p/x\\..\\evil4",
    ):
        put(s3, key, b"data")
    target = tmp_path / "deep" / "out"
    assert restore.main(["vault::p", str(target)]) == 1
    # On POSIX a backslash is a name character: that key is one file inside LOCAL.
    assert tree_files(tmp_path) == {
        "deep/out/ok.txt": b"data",
        "deep/out/x\\..\\evil4": b"data",
    }
    err = capsys.readouterr().err
    assert err.count("refused: the key") == 3
    assert "p/../evil.txt" in err


def test_symlink_in_local_pointing_outside_is_not_followed(
    s3, bucket, tmp_path, capsys
):
    put(s3, "p/link/escaped.txt", b"data")
    put(s3, "p/fine.txt", b"fine")
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "out"
    target.mkdir()
    os.symlink(outside, target / "link")
    assert restore.main(["vault::p", str(target)]) == 1
    assert list(outside.iterdir()) == []
    assert (target / "fine.txt").read_bytes() == b"fine"
    assert "leads outside the destination" in capsys.readouterr().err


def test_a_folder_under_a_file_system_root_is_inside_it(tmp_path):
    # LOCAL at / (or C:\\): every folder is inside it, as path_for_key decides.
    folder = tmp_path / "a" / "b"
    restore.Folders(tmp_path.anchor).ensure(str(folder))
    assert folder.is_dir()


def test_a_link_to_a_neighbour_whose_name_extends_local_is_outside(tmp_path):
    target = tmp_path / "out"
    (tmp_path / "out2").mkdir()
    target.mkdir()
    os.symlink(tmp_path / "out2", target / "link")
    with pytest.raises(restore.CliError, match="leads outside the destination"):
        restore.Folders(str(target)).ensure(str(target / "link" / "sub"))
    assert list((tmp_path / "out2").iterdir()) == []


def test_file_and_folder_of_one_name_is_a_conflict(s3, bucket, tmp_path, capsys):
    put(s3, "p/a", b"file a")
    put(s3, "p/a/b", b"file b")
    assert restore.main(["vault::p", str(tmp_path / "out")]) == 1
    assert tree_files(tmp_path / "out") == {"a/b": b"file b"}
    assert "conflict" in capsys.readouterr().err


def test_a_file_beside_its_folder_is_found_across_the_keys_between_them(
    s3, bucket, tmp_path, capsys
):
    # In key order "p/a-b", "p/a.txt" and the refused key come between "p/a" and "p/a/x".
    keys = ["p/a", "p/a-b", "p/a.txt", "p/a/../../x", "p/a/", "p/a/x", "p/a0"]
    for key in keys:
        put(s3, key, key.encode())
    target = tmp_path / "out"
    assert restore.main(["vault::p", str(target), "--dry-run", "--json"]) == 1
    dry = json.loads(capsys.readouterr().out)
    assert restore.main(["vault::p", str(target), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert tree_files(target) == {
        name: f"p/{name}".encode() for name in ("a-b", "a.txt", "a/x", "a0")
    }
    for run in (dry, report):
        assert (run["refused"], run["conflicts"], run["transferred"]) == (1, 1, 4)
        assert sorted(error["key"] for error in run["errors"]) == [
            "p/a",
            "p/a/../../x",
        ]


def test_missing_bucket_is_one_line_and_writes_nothing(s3, tmp_path, capsys):
    assert restore.main(["no-such-bucket::p", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_forbidden_bucket(failing_proxy, tmp_path, capsys):
    proxy = failing_proxy(
        {"ListObjectsV2": ("AccessDenied", 403)}, buckets=("vault",), create=True
    )
    assert (
        restore.main(["vault::p", str(tmp_path / "out"), "--endpoint-url", proxy.url])
        == 1
    )
    assert "access denied" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_empty_prefix(s3, bucket, tmp_path, capsys):
    put(s3, "other/a", b"a")
    assert restore.main(["vault::p", str(tmp_path / "out")]) == 1
    assert (
        "nothing to restore: no objects under s3://vault/p" in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def test_archived_objects_are_reported_as_such(s3, bucket, tmp_path, capsys):
    put(s3, "p/cold.bin", b"cold", StorageClass="GLACIER")
    put(s3, "p/warm.bin", b"warm")
    assert restore.main(["vault::p", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert (
        "s3://vault/p/cold.bin (GLACIER)" in err
        and "restore it from the archive first" in err
    )
    assert tree_files(tmp_path / "out") == {"warm.bin": b"warm"}


def test_failed_download_keeps_the_old_file_and_no_temporary(
    server_client, failing_proxy, tmp_path, capsys
):
    proxy = failing_proxy({}, buckets=("vault",), create=True)
    put(server_client, "p/a.txt", b"new content")
    target = make_tree(tmp_path / "out", {"a.txt": b"old content"})
    proxy.errors["GetObject"] = ("InternalError", 500)
    assert restore.main(["vault::p", str(target), "--endpoint-url", proxy.url]) == 1
    assert tree_files(target) == {"a.txt": b"old content"}
    assert leftovers(target) == []
    assert "failed 1" in capsys.readouterr().out


def test_rerun_does_not_download_large_files_again(s3, tmp_path, capsys):
    source = make_tree(
        tmp_path / "src", {"big.bin": os.urandom(9 * MiB), "small.txt": b"s"}
    )
    assert backup.main([str(source), "vault::p"]) == 0
    target = tmp_path / "out"
    assert restore.main(["vault::p", str(target)]) == 0
    first_inode = os.stat(target / "big.bin").st_ino
    capsys.readouterr()
    assert restore.main(["vault::p", str(target)]) == 0
    assert "restored 1, skipped 1, failed 0" in capsys.readouterr().out
    # Restoring writes a new file and renames it into place: the same inode means untouched.
    assert os.stat(target / "big.bin").st_ino == first_inode
    assert tree_files(target) == tree_files(source)


def test_rerun_downloads_a_large_file_cut_short(s3, tmp_path, capsys):
    data = os.urandom(9 * MiB)
    source = make_tree(tmp_path / "src", {"big.bin": data})
    assert backup.main([str(source), "vault::p"]) == 0
    target = make_tree(tmp_path / "out", {"big.bin": data[: 4 * MiB]})
    assert restore.main(["vault::p", str(target)]) == 0
    assert (target / "big.bin").read_bytes() == data
    assert "restored 1, skipped 0" in capsys.readouterr().out


def overwrite_during_the_restore_fails_that_file_only(
    proxy, server_client, bucket_name, tmp_path, monkeypatch, capsys
) -> None:
    """Restore a small object and a large one through `proxy`, the large one
    overwritten between its HEAD and its parts: that file fails with one line, and
    the local file it would have replaced stays as it was."""
    server_client.create_bucket(Bucket=bucket_name)
    # The small file comes first, through botocore: the parts then go direct.
    put_on = {"Bucket": bucket_name}
    server_client.put_object(**put_on, Key="p/a-small.txt", Body=b"small")
    server_client.put_object(**put_on, Key="p/big.bin", Body=os.urandom(20 * MiB))
    target = make_tree(tmp_path / "out", {"big.bin": b"the old local file"})
    checked = restore.is_restored

    def overwritten_after_the_head(path, size, mtime_ns):
        server_client.put_object(**put_on, Key="p/big.bin", Body=os.urandom(20 * MiB))
        return checked(path, size, mtime_ns)

    monkeypatch.setattr(restore, "is_restored", overwritten_after_the_head)
    location, common = (
        f"{bucket_name}::p",
        ["--endpoint-url", proxy.url, "--workers", "1"],
    )
    code = restore.main([location, str(target), *common])
    out, err = capsys.readouterr()
    assert code == 1
    # The part was asked for direct, then through botocore: refused both times.
    big_gets = [
        direct
        for method, path, direct in proxy.requests
        if method == "GET" and path.endswith("/p/big.bin")
    ]
    assert big_gets == [True, False]
    assert err.splitlines() == [
        (
            f"error: restore failed: s3://{bucket_name}/p/big.bin: the object was "
            "overwritten while it was downloaded (its ETag changed): nothing was "
            "written; run again to restore the new version"
        )
    ]
    assert "restored 1, skipped 0, failed 1" in out
    assert tree_files(target) == {
        "a-small.txt": b"small",
        "big.bin": b"the old local file",
    }
    assert leftovers(target) == []


def test_a_large_object_overwritten_during_its_restore_fails_that_file_only(
    start_proxy, server_client, bucket_name, tmp_path, monkeypatch, capsys
):
    """Every part asks for the version the HEAD saw (If-Match): one overwritten
    between the HEAD and its parts is never stitched from two versions."""
    overwrite_during_the_restore_fails_that_file_only(
        start_proxy(), server_client, bucket_name, tmp_path, monkeypatch, capsys
    )


def test_a_server_that_ignores_if_match_still_never_stitches_two_versions(
    start_proxy, moto_server, server_client, bucket_name, tmp_path, monkeypatch, capsys
):
    """Each part's answer must carry the HEAD's ETag. On moto's server: a proxy that
    drops If-Match breaks the request's signature, which Ceph RGW checks."""
    proxy = start_proxy(moto_server, ignore_if_match=True)
    overwrite_during_the_restore_fails_that_file_only(
        proxy, server_client, bucket_name, tmp_path, monkeypatch, capsys
    )


def test_a_large_object_replaced_after_the_listing_comes_down_whole(
    s3, bucket, tmp_path, monkeypatch
):
    put(s3, "p/big.bin", os.urandom(9 * MiB))
    newer = os.urandom(12 * MiB + 1)
    planned = restore.plan_restore

    def replaced_after_the_listing(*args, **kwargs):
        put(s3, "p/big.bin", newer)
        return planned(*args, **kwargs)

    monkeypatch.setattr(restore, "plan_restore", replaced_after_the_listing)
    assert restore.main(["vault::p", str(tmp_path / "out")]) == 0
    assert tree_files(tmp_path / "out") == {"big.bin": newer}


def test_dry_run_writes_nothing(s3, bucket, tmp_path, capsys):
    put(s3, "p/a.txt", b"a")
    assert restore.main(["vault::p", str(tmp_path / "out"), "--dry-run"]) == 0
    assert (
        f"(dry run) restore: s3://vault/p/a.txt -> {tmp_path / 'out' / 'a.txt'}"
        in capsys.readouterr().out
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("platform", ["linux", "darwin", "win32"])
@pytest.mark.parametrize("local_exists", [False, True], ids=["new LOCAL", "LOCAL"])
def test_dry_run_reports_the_conflicts_the_real_run_meets(
    s3, bucket, tmp_path, capsys, monkeypatch, platform, local_exists
):
    # Whatever the platform says, both probe the file system that LOCAL is (or would be) on.
    monkeypatch.setattr(sys, "platform", platform)
    for key in ("p/Notes.txt", "p/notes.txt", "p/d", "p/d/x.txt"):
        put(s3, key, key.encode())
    target = tmp_path / "out"
    if local_exists:
        target.mkdir()

    def conflicts(*options) -> list[str]:
        restore.main(["vault::p", str(target), *options])
        return [
            line for line in capsys.readouterr().err.splitlines() if "conflict" in line
        ]

    before = sorted(tmp_path.rglob("*"))
    dry = conflicts("--dry-run")
    assert sorted(tmp_path.rglob("*")) == before  # the probe is gone, LOCAL not made
    assert dry == conflicts()
    assert dry  # p/d beside p/d/x.txt, on any file system


def test_filters_choose_what_is_restored(s3, bucket, tmp_path):
    for key in ("p/a.log", "p/sub/b.log", "p/keep.log", "p/c.txt"):
        put(s3, key, b"x")
    assert (
        restore.main(
            [
                "vault::p",
                str(tmp_path / "out"),
                "--exclude",
                "*.log",
                "--include",
                "keep.log",
            ]
        )
        == 0
    )
    assert sorted(tree_files(tmp_path / "out")) == ["c.txt", "keep.log"]


def test_local_that_is_a_file_is_refused(s3, bucket, tmp_path, capsys):
    put(s3, "p/a.txt", b"a")
    (tmp_path / "file").write_bytes(b"keep me")
    assert restore.main(["vault::p", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_bytes() == b"keep me"


def test_verbose_prints_one_line_per_file(s3, bucket, tmp_path, capsys):
    put(s3, "p/a.txt", b"a")
    put(s3, "p/b.txt", b"b")
    assert restore.main(["vault::p", str(tmp_path / "out"), "-v"]) == 0
    lines = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("restore: ")
    ]
    assert len(lines) == 2


def test_quiet_prints_nothing(s3, bucket, tmp_path, capsys):
    put(s3, "p/a.txt", b"a")
    assert restore.main(["vault::p", str(tmp_path / "out"), "-q"]) == 0
    assert capsys.readouterr() == ("", "")
