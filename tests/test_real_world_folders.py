"""Real-world runs: two runs on one output folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from MLPipeline.Common import LOCK_NAME, UserError, output_lock
from tests.conftest import ENGINE, FAST, ROOT
from tests.test_bad_input import assert_user_error


def run_cli(*args) -> subprocess.CompletedProcess:
    """`python engine.py ARGS`, its output decoded as the OS decodes file names, so that any bytes survive."""
    result = subprocess.run([sys.executable, str(ENGINE), *map(str, args)], cwd=ROOT, capture_output=True,
                            timeout=300)
    return subprocess.CompletedProcess(result.args, result.returncode, os.fsdecode(result.stdout),
                                       os.fsdecode(result.stderr))


# --- two runs on one output folder ----------------------------------------------------------------------------

def test_a_second_run_on_a_held_output_folder_stops_at_once_naming_the_first(tmp_path, tiny_data):
    out = tmp_path / "out"
    with output_lock(out):
        result = run_cli("train", "--data-dir", tiny_data, "--output-dir", out, *FAST)
        assert (out / LOCK_NAME).read_text() == f"PID {os.getpid()} on {os.uname().nodename}\n"
    assert_user_error(result, str(out), f"PID {os.getpid()}", "in use")
    assert "epoch" not in result.stdout
    assert not out.exists()  # released on leaving, and the folder it made for the lock removed


def test_the_lock_is_released_on_errors_and_a_folder_it_made_is_removed(tmp_path):
    made, kept = tmp_path / "new", tmp_path / "kept"
    kept.mkdir()
    for out in (made, kept):
        with pytest.raises(RuntimeError), output_lock(out):
            raise RuntimeError("a run that fails")
    assert not made.exists() and list(kept.iterdir()) == []
    with output_lock(kept), pytest.raises(UserError, match=f"PID {os.getpid()}"), output_lock(kept):
        pass  # the kernel's lock holds within one process too (each open is its own lock)
