"""Time of `restore.py --history` over W1 (5,000 x 4 KiB) with three moments,
against `restore.py --at` over the same bucket (the same listing), by hand:

    python3 bench/history_time.py . [moto|rgw]

Three backup.py runs into a versioned bucket (W1's bytes between a tree one byte
shorter and one a byte longer, as bench/run.py's W7), 61 s apart: three moments.
Then in turn, 3 runs each: --history, --at (the middle moment) --dry-run, --at
into an empty folder. Medians; wall time and peak RSS as bench/run.py measures them.
"""

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

repo, kind = Path(sys.argv[1]), (sys.argv[2:] or ["moto"])[0]
spec = importlib.util.spec_from_file_location("bench_run", repo / "bench" / "run.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_run"] = bench
spec.loader.exec_module(bench)

with tempfile.TemporaryDirectory() as scratch:
    scratch = Path(scratch)
    env = bench.base_env(scratch)
    with bench.running_server(kind, scratch / "data") as (url, pids):
        client = bench.admin_client(url)
        client.create_bucket(Bucket="w1-history")
        client.put_bucket_versioning(
            Bucket="w1-history", VersioningConfiguration={"Status": "Enabled"}
        )
        shape = bench.shape_of("W1", False)
        script = [sys.executable, str(repo / "backup.py")]
        for step, size in enumerate((shape.size - 1, shape.size, shape.size + 1)):
            if step:
                time.sleep(61)
            tree = bench.build_tree(
                scratch / f"tree-{size}",
                bench.TreeShape(shape.files, size, shape.folders),
                seed=size,
            )
            subprocess.run(
                [*script, str(tree), "w1-history::backup", "--endpoint-url", url, "-q"],
                env=env,
                check=True,
            )
        restore = [sys.executable, str(repo / "restore.py"), "w1-history::backup"]
        shown = subprocess.run(
            [*restore, "--history", "--endpoint-url", url],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        print(shown, end="")
        middle = shown.splitlines()[1].split()[0]
        commands = {
            "--history": [*restore, "--history"],
            "--at --dry-run": [
                *restore,
                str(scratch / "dry"),
                "--at",
                middle,
                "--dry-run",
            ],
            "--at": [*restore, "RESTORE", "--at", middle, "-q"],
        }
        results = {name: [] for name in commands}
        for run in range(3):
            for name, argv in commands.items():
                argv = [scratch / f"at-{run}" if a == "RESTORE" else a for a in argv]
                argv = [str(a) for a in argv] + ["--endpoint-url", url]
                results[name].append(bench.measure(argv, env, pids))
        bench.verify_restored(scratch / f"tree-{shape.size}", scratch / "at-0")
        for name, runs in results.items():
            seconds = statistics.median(r.seconds for r in runs)
            rss = statistics.median(r.peak_rss_mib for r in runs)
            print(
                f"{kind} restore.py {name}: {seconds:.2f} s median of 3 "
                f"({', '.join(f'{r.seconds:.2f}' for r in runs)}), peak RSS {rss:.0f} MiB"
            )
