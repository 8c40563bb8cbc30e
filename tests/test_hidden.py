"""phitune/hidden.py: the hidden names of work in progress, and whose owner is alive."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from phitune import hidden


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_names_are_the_ones_outputs_made_before_carry(tmp_path):
    out = tmp_path / "o"
    pid = os.getpid()
    assert hidden.staging(out) == tmp_path / f".o.phitune-tmp-{pid}"
    assert hidden.moved_aside(out) == tmp_path / ".o.phitune-old-"
    assert hidden.checkpoint(out) == tmp_path / ".o.phitune-ckpt"
    assert hidden.link_staging(out) == tmp_path / f".o.phitune-link-{pid}"


def test_a_cache_dir_leftover_is_told_from_anything_else():
    assert hidden.leftover_kind(".quantize-0123456789abcdef.phitune-tmp-42") == "staging"
    assert hidden.leftover_kind(".ft.phitune-ckpt") == "checkpoint"
    for other in ("quantize-0123456789abcdef", ".o.phitune-tmp-x", ".phitune-tmp-42",
                  ".o.phitune-old-", ".phitune-outputs.json", "notes.phitune-ckpt"):
        assert hidden.leftover_kind(other) is None, other


def test_owner_alive_by_pid_or_by_a_process_working_inside(tmp_path):
    mine = hidden.staging(tmp_path / "o")
    mine.mkdir()
    assert hidden.owner_alive(mine)
    dead = tmp_path / f".o.phitune-tmp-{_dead_pid()}"
    dead.mkdir()
    assert not hidden.owner_alive(dead)
    if Path("/proc").is_dir():  # a dead pid's dir that a live process works in is kept
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=dead)
        try:
            assert hidden.owner_alive(dead)
        finally:
            child.kill()
            child.wait()
    assert sorted(p.name for p in hidden.stagings(tmp_path / "o")) == sorted([mine.name, dead.name])
