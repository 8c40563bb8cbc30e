"""Child processes that die with phitune.

The model builder runs for minutes at full CPU in a subprocess writing into the step's
temporary directory. If phitune is killed (SIGKILL, OOM killer) the child must not keep
running as an orphan, writing into a directory the next run's recovery removes: on Linux the
kernel sends it SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG, set between fork and
exec), and a child whose parent is already gone by then exits at once. Ctrl-C and Python
exceptions are covered by subprocess.run, which kills the child before re-raising.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1


def _prctl():
    """libc's prctl, looked up in the parent: the child between fork and exec should only
    call it, not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _tie_to(parent: int, prctl):
    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)
    return preexec


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run, with a child that the kernel kills when this process dies."""
    prctl = _prctl()
    if prctl is not None:
        kwargs["preexec_fn"] = _tie_to(os.getpid(), prctl)
    return subprocess.run(cmd, **kwargs)
