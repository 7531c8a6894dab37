"""backup.py's plan as a stream: the local walk and the listing merged in S3 key order,
and the rules that the plan decides (pure, literals), then the same order against a server."""

from __future__ import annotations

import io
import threading

import pytest
from conftest import TEST_SERVER, make_tree, run_script
from plans import steps_of

import backup
import s3common
from backup import (
    Compare,
    Delete,
    EmptySource,
    Keep,
    LocalFile,
    Outcome,
    OutOfOrder,
    Scan,
    StaleFolder,
    Upload,
    may_delete,
    pair_by_key,
    plan_backup,
    walk_folder,
)
from s3common import (
    Console,
    Failure,
    Filters,
    RemoteObject,
    map_failing_fast,
    run_collecting_failures,
)

# Names whose order differs by how a string is compared: "-" and "." sort before
# "/", "0" after it; U+FF5E sorts before U+1F600 by code point and in UTF-8, after
# it in UTF-16 (a surrogate pair starts with 0xD83D).
NAMES = [
    "a-c",
    "a.txt",
    "a/b",
    "a/c",
    "a0",
    "B",
    "é.txt",
    "\uff5e.txt",
    "\U0001f600.txt",
]


def utf8_order(keys):
    return sorted(keys, key=lambda key: key.encode("utf-8"))


def local(path="/src/x", size=1, mtime_ns=1_000_000_000_000):
    return LocalFile(path, size, mtime_ns, 0o100644)


def remote(key, size=1, last_modified=2000.0):
    return RemoteObject(key, size, last_modified)


def kinds(steps):
    return [f"{type(step).__name__} {step.key}" for step in steps]


def test_names_sort_in_utf8_byte_order_not_utf16():
    assert utf8_order(NAMES) == sorted(NAMES)
    utf16 = sorted(NAMES, key=lambda name: name.encode("utf-16-be"))
    assert utf16 != sorted(NAMES)
    assert (
        sorted(NAMES).index("a.txt")
        < sorted(NAMES).index("a/b")
        < sorted(NAMES).index("a0")
    )


def test_the_walk_gives_keys_in_s3_order_a_folder_as_its_name_plus_slash(tmp_path):
    tree = make_tree(tmp_path / "src", {name: name.encode() for name in NAMES})
    scan = Scan(None)
    keys = [key for key, _ in walk_folder(str(tree), "p", True, scan)]
    assert keys == utf8_order(f"p/{name}" for name in NAMES)
    assert keys[:5] == ["p/B", "p/a-c", "p/a.txt", "p/a/b", "p/a/c"]
    assert scan.errors == 0


def test_pairs_merge_both_sides_by_key():
    files = [("a-c", local()), ("a.txt", local()), ("a/b", local())]
    objects = [remote("a"), remote("a.txt"), remote("a/"), remote("a/b"), remote("a0")]
    pairs = [
        (key, f is not None, o is not None) for key, f, o in pair_by_key(files, objects)
    ]
    assert pairs == [
        ("a", False, True),
        ("a-c", True, False),
        ("a.txt", True, True),
        ("a/", False, True),
        ("a/b", True, True),
        ("a0", False, True),
    ]


@pytest.mark.parametrize(
    ("files", "objects"),
    [
        pytest.param(["a"], ["a/b", "a.txt"], id="listing: a/b before a.txt"),
        pytest.param(["a"], ["\U0001f600", "\uff5e"], id="listing in UTF-16 order"),
        pytest.param(["b", "a"], [], id="files"),
        pytest.param(["x"], ["a", "a"], id="a key twice"),
    ],
)
def test_a_side_out_of_key_order_stops_the_plan(files, objects):
    with pytest.raises(OutOfOrder):
        list(pair_by_key([(k, local()) for k in files], [remote(k) for k in objects]))


def test_the_plan_follows_key_order_across_names_that_sort_apart():
    files = {f"p/{name}": local() for name in NAMES}
    objects = {"p/a.txt": remote("p/a.txt"), "p/zzz": remote("p/zzz")}
    steps = steps_of(files, objects, "p", Filters(), delete=True)
    assert [step.key for step in steps] == utf8_order([*files, "p/zzz"])
    assert kinds(steps)[2] == "Keep p/a.txt"
    assert kinds(steps)[-4:] == [
        "Delete p/zzz",
        "Upload p/é.txt",
        "Upload p/\uff5e.txt",
        "Upload p/\U0001f600.txt",
    ]


def test_a_file_where_the_backup_holds_a_folder_is_stale_once_its_objects_pass():
    files = {"p/a": local("src/a"), "p/a.txt": local(), "p/b": local()}
    objects = {k: remote(k) for k in ("p/a-c", "p/a/", "p/a/x", "p/a/y/z", "p/a0")}
    steps = steps_of(files, objects, "p", Filters(), delete=False)
    expected = "Upload p/a, Upload p/a.txt, StaleFolder p/a, Upload p/b"
    assert kinds(steps) == expected.split(", ")
    assert steps[2] == StaleFolder("p/a", files["p/a"], 2)
    # With --delete they are deleted instead (the folder marker stays).
    deleting = steps_of(files, objects, "p", Filters(), delete=True)
    assert [step.key for step in deleting if isinstance(step, Delete)] == [
        "p/a-c",
        "p/a/x",
        "p/a/y/z",
        "p/a0",
    ]


def test_a_stale_folder_at_the_end_and_names_that_extend_the_files():
    files = {"p/a": local(), "p/a-1": local(), "p/a-10": local()}
    objects = {k: remote(k) for k in ("p/a-1/x", "p/a/y")}
    steps = steps_of(files, objects, "p", Filters(), delete=False)
    stale = {step.key: step.objects for step in steps if isinstance(step, StaleFolder)}
    assert stale == {"p/a-1": 1, "p/a": 1}


def test_delete_with_no_file_to_back_up_is_refused_before_any_step():
    objects = {k: remote(k) for k in ("p/a", "p/b")}
    steps = plan_backup([], [objects[k] for k in sorted(objects)], "p", Filters(), True)
    with pytest.raises(EmptySource):
        next(steps)
    # Files that the filters leave out count as none.
    only_logs = [("p/x.log", local())]
    excluded = Filters(((False, "*.log"),))
    with pytest.raises(EmptySource):
        list(plan_backup(only_logs, [objects["p/a"]], "p", excluded, True))

    # The refusal comes once the files have ended, without the rest of the listing.
    def listing():
        yield objects["p/a"]
        raise AssertionError("listed further than needed")

    with pytest.raises(EmptySource):
        list(plan_backup([], listing(), "p", Filters(), True))
    # Without --delete, an empty folder is simply nothing to do; --check's
    # deletes are the objects in excess.
    assert list(plan_backup([], [objects["p/a"]], "p", Filters(), False)) == []
    checked = plan_backup(
        [], [objects["p/a"]], "p", Filters(), True, refuse_empty=False
    )
    assert list(checked) == [Delete("p/a")]


def test_deletes_before_the_first_file_come_out_in_key_order():
    files = {"p/m": local()}
    objects = {k: remote(k) for k in ("p/a", "p/b", "p/m", "p/z")}
    steps = steps_of(files, objects, "p", Filters(), delete=True)
    assert kinds(steps) == ["Delete p/a", "Delete p/b", "Keep p/m", "Delete p/z"]


def test_a_single_file_counts_only_its_own_key_of_the_listing():
    files = {"p/notes.txt": local()}
    objects = {
        k: remote(k) for k in ("p/notes.txt", "p/notes.txt.bak", "p/notes.txt/x")
    }
    steps = steps_of(files, objects, "p", Filters(), delete=False, single_file=True)
    assert kinds(steps) == ["Keep p/notes.txt"]


def test_by_content_same_size_files_are_compared_and_others_decided():
    files = {"p/same": local(size=5), "p/grown": local(size=9), "p/new": local()}
    objects = {k: remote(k, size=5) for k in ("p/grown", "p/same")}
    steps = steps_of(files, objects, "p", Filters(), delete=False, by_content=True)
    assert kinds(steps) == ["Upload p/grown", "Upload p/new", "Compare p/same"]
    assert isinstance(steps[2], Compare) and steps[2].remote == objects["p/same"]
    assert backup.by_content(steps[2], "1" * 32, "1" * 32) == Keep("p/same")
    assert backup.by_content(steps[2], None, "1" * 32).reason == "no MD5 to compare"


@pytest.mark.parametrize(
    ("failed", "unread", "allowed"),
    [(0, 0, True), (1, 0, False), (0, 1, False)],
)
def test_nothing_is_deleted_after_a_failed_upload_or_read(failed, unread, allowed):
    upload = Upload("p/a", local(), "new")
    outcome = Outcome(failed=[Failure(upload, OSError("boom"))] * failed)
    outcome.deletes.append("p/gone")
    assert may_delete(outcome, unread) is allowed


# --- The helpers that run it ------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_line_says_when_its_totals_are_still_growing():
    growing, known = Terminal(), Terminal()
    console = Console(quiet=False, verbose=False, out=io.StringIO(), err=growing)
    console.start(known=False)
    console.planned(2, 2048)
    console.advance(nbytes=1024, files=1)
    assert "1/2+ files, 1.0 KiB/2.0 KiB+," in growing.getvalue()
    assert growing.getvalue().endswith("ETA ?")
    console = Console(quiet=False, verbose=False, out=io.StringIO(), err=known)
    console.start(known=False)
    console.planned(2, 2048)
    console.totals_known()
    console.advance(nbytes=1024, files=1)
    assert "1/2 files, 1.0 KiB/2.0 KiB," in known.getvalue()
    assert "ETA ?" not in known.getvalue() and known.getvalue().endswith(" s")


def test_map_failing_fast_keeps_order_and_starts_nothing_after_a_failure():
    started = []

    def work(n):
        started.append(n)
        if n == 3:
            raise ValueError(n)
        return n * 10

    results = map_failing_fast(work, range(10), workers=1, ahead=2)
    assert [next(results) for _ in range(3)] == [0, 10, 20]
    with pytest.raises(ValueError):
        next(results)
    assert max(started) <= 4


def test_map_failing_fast_holds_at_most_ahead_items():
    drawn = []

    def items():
        for n in range(100):
            drawn.append(n)
            yield n

    results = map_failing_fast(lambda n: n, items(), workers=2, ahead=4)
    assert next(results) == 0
    assert len(drawn) <= 5
    assert list(results) == list(range(1, 100))


def test_run_collecting_failures_goes_on_after_an_item_and_stops_on_the_plan():
    done = []
    lock = threading.Lock()

    def work(item, cancel):
        if item == "bad":
            raise OSError("unreadable")
        with lock:
            done.append(item)
        return item != "skip"

    failures, skipped = run_collecting_failures(
        ["a", "bad", "skip", "b"], work, workers=2
    )
    assert sorted(done) == ["a", "b", "skip"]
    assert [(f.item, str(f.error)) for f in failures] == [("bad", "unreadable")]
    assert skipped == ["skip"]

    def plan():
        yield "a"
        raise OutOfOrder("a", "b")

    with pytest.raises(OutOfOrder):
        run_collecting_failures(plan(), work, workers=2)


# --- Against a server: its order is the walk's ------------------------------------


def test_a_no_change_run_over_names_that_sort_apart_uploads_nothing(
    s3_server, server_client, bucket_name, cli_env, tmp_path
):
    tree = make_tree(tmp_path / "src", {name: name.encode() for name in NAMES})
    location = f"{bucket_name}::p"
    endpoint = ["--endpoint-url", s3_server]
    first = run_script("backup.py", str(tree), location, *endpoint, env=cli_env)
    assert first.returncode == 0, first.stderr
    assert f"uploaded {len(NAMES)}, skipped 0" in first.stdout
    again = run_script(
        "backup.py", str(tree), location, "--delete", *endpoint, env=cli_env
    )
    assert again.returncode == 0, again.stderr
    assert f"uploaded 0, skipped {len(NAMES)}, failed 0" in again.stdout
    listed = [
        item["Key"]
        for item in server_client.list_objects_v2(Bucket=bucket_name)["Contents"]
    ]
    if TEST_SERVER == "seaweedfs":
        # It lists out of S3's order (s3common.UNORDERED_SERVERS): backup.py
        # sorted its listing, and only the keys can be compared here.
        listed = utf8_order(listed)
    assert listed == utf8_order(f"p/{n}" for n in NAMES)


def test_a_server_listing_out_of_order_stops_before_anything_changes(
    s3, tmp_path, monkeypatch, capsys
):
    tree = make_tree(tmp_path / "src", {"a": b"1", "b": b"2"})
    assert backup.main([str(tree), "order::p"]) == 0
    s3.put_object(Bucket="order", Key="p/c", Body=b"")
    listed = s3common.listed_objects

    def reversed_page(*args, **kwargs):
        return sorted(listed(*args, **kwargs), key=lambda o: o.key, reverse=True)

    monkeypatch.setattr(s3common, "listed_objects", reversed_page)
    capsys.readouterr()
    assert backup.main([str(tree), "order::p", "--delete"]) == 1
    err = capsys.readouterr().err
    assert "out of S3's key order" in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    assert {o["Key"] for o in s3.list_objects_v2(Bucket="order")["Contents"]} == {
        "p/a",
        "p/b",
        "p/c",
    }
