"""Accidents that leave a run half done: Ctrl-C in the first instant on a busy
machine, a kill -9 while backup sets up its bucket or uploads a large file, a
wrong secret key, and the counters of a run that did not get every file in."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from conftest import ROOT
from rgwserver import free_port


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
