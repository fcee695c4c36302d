"""Run `pacsnode` under cProfile in every thread, timed by each thread's own CPU time.

    .venv/bin/python bench/profile_node.py OUT.pstats start --data-dir D --http-port P ...

Everything after OUT.pstats is `pacsnode`'s own command line. Each thread gets its own
cProfile.Profile (timer `time.thread_time`, so waiting costs nothing and a thread's
share is its CPU); when the node stops (SIGTERM or SIGINT), the profiles are merged into
OUT.pstats. Read it with `python -m pstats OUT.pstats` or `bench/profile_node.py --show
OUT.pstats [--top 30]`, which prints the functions by own and by cumulative CPU time.
Profiling slows Python code roughly twofold: compare shares, not absolute times.
With PROFILE_TIMER=wall in the environment the timer is wall time instead (where threads wait).
"""

from __future__ import annotations

import cProfile
import os
import pstats
import signal
import sys
import threading
import time
from typing import Any

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _start_thread_profile(*_args: Any) -> None:
    """threading.setprofile hook: the first event of a new thread starts its profiler
    (whose C hook then replaces this one for that thread)."""
    profile = cProfile.Profile(time.perf_counter if os.environ.get("PROFILE_TIMER") == "wall" else time.thread_time)
    with _lock:
        _profiles.append(profile)
    profile.enable()


def _dump(path: str) -> None:
    with _lock:
        profiles = list(_profiles)
    stats: pstats.Stats | None = None
    for profile in profiles:
        profile.disable()
        try:
            if stats is None:
                stats = pstats.Stats(profile)
            else:
                stats.add(profile)
        except TypeError:  # A thread that never recorded a call.
            continue
    if stats is not None:
        stats.dump_stats(path)
        print(f"# wrote {path} ({len(profiles)} threads)", file=sys.stderr)


def show(path: str, top: int) -> None:
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--show":
        top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 30
        show(sys.argv[2], top)
        return 0
    out, arguments = sys.argv[1], sys.argv[2:]
    from pacsnode.cli.main import main as pacsnode_main

    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    threading.setprofile(_start_thread_profile)
    _start_thread_profile()
    try:
        return int(pacsnode_main(arguments) or 0)
    except KeyboardInterrupt:
        return 0
    finally:
        _dump(out)


if __name__ == "__main__":
    sys.exit(main())
