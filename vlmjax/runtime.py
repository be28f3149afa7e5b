"""Process settings that must be in place before the interpreter starts: the `vlmjax` command and the benchmarks in
tools/ re-execute themselves with them.

Huge pages for XLA's CPU buffers. Each execution of a compiled program allocates its temporaries in one block
(130 MB per device for the shapes_tiny training step); glibc's malloc maps a block that large afresh and unmaps it
when freed, so every step faults every page of it in again, 4 KiB at a time: 63,000 page faults and 0.1 s of
kernel time per step on the 2-core development machine. With the glibc tunable `glibc.malloc.hugetlb=1` malloc
asks for transparent huge pages on such mappings (in `madvise` mode, this host's, Linux gives them only when asked) and
a step faults in 2 MiB at a time: 1,000 page faults, and the step took 0.122 s instead of 0.173 s
(tools/bench_train.py at the bench shape). glibc reads its tunables only when a process starts, hence the re-exec.
"""

import os
import platform
import sys

HUGE_PAGES = "glibc.malloc.hugetlb"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_on_request() -> bool:
  """Whether malloc must ask for huge pages to get them, and can: Linux with glibc 2.35 or later (the tunable's
  first release) and transparent huge pages in `madvise` mode (in `always` mode large mappings get them anyway, in
  `never` mode not at all)."""
  libc, version = platform.libc_ver()
  if sys.platform != "linux" or libc != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35):
    return False
  try:
    with open(_THP_MODE) as mode:
      return "[madvise]" in mode.read()
  except OSError:
    return False


def exec_with_huge_pages() -> None:
  """Re-executes this process (same PID, same command line) with `GLIBC_TUNABLES` asking malloc for huge pages.

  Returns without re-executing where that would change nothing (`huge_pages_on_request` is False) or where
  GLIBC_TUNABLES already sets the tunable, e.g. `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` to keep 4 KiB pages.
  Call it first thing in a program's entry point: what the process did before is lost.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if HUGE_PAGES in tunables or not huge_pages_on_request():
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{HUGE_PAGES}=1"]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
