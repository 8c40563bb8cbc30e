"""hugepages.environ: when the CLI asks glibc for huge pages, and how it keeps the user's own
tunables (the re-executed command line itself is tested in test_infer.py)."""

from __future__ import annotations

import pytest

from phitune import hugepages

GLIBC = (2, 36)


def test_madvise_mode_gets_the_tunable():
    env = hugepages.environ({"PATH": "/bin"}, "madvise", GLIBC)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_other_tunables_are_kept():
    env = hugepages.environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("env, mode, glibc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC),  # the user's choice
    ({"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=1"}, "madvise", GLIBC),  # already re-executed
    ({}, "always", GLIBC),  # every allocation gets huge pages already
    ({}, "never", GLIBC),  # none can
    ({}, None, GLIBC),  # not Linux
    ({}, "madvise", (2, 34)),  # glibc before the tunable
    ({}, "madvise", None),  # musl, macOS
])
def test_nothing_to_change(env, mode, glibc):
    assert hugepages.environ(env, mode, glibc) is None


def test_this_machine_answers_without_error():
    assert hugepages.thp_mode() in (None, "always", "madvise", "never")
    assert "transparent huge pages" in hugepages.describe()
