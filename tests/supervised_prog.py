"""PROGRAM for the supervisor-mode tests (`secretd serve -- python3 supervised_prog.py ...`).

Runs as the broker's child with the environment the broker passed on. Reports go to the file
given as the first argument, one line per event, so the test can read them from outside.

    supervised_prog.py REPORT wait [CODE]   report "started", wait for SIGTERM/SIGINT, report
                                            the signal, exit CODE (default 0)
    supervised_prog.py REPORT exit CODE     exit CODE at once
    supervised_prog.py REPORT die SIGNAL    kill itself with SIGNAL (a number)
    supervised_prog.py REPORT orphan        leave a grandchild orphaned (it reports its pid,
                                            lives 0.3 s, exits), then wait as `wait` does
"""

from __future__ import annotations

import os
import signal
import sys
import time


def report(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def wait_for_stop(path: str, code: int) -> None:
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    report(path, f"started {os.getpid()}")
    got = signal.sigwait(stops)
    report(path, f"signal {signal.Signals(got).name}")
    sys.exit(code)


def orphan(path: str) -> None:
    middle = os.fork()
    if middle == 0:
        if os.fork() == 0:
            # The grandchild: orphaned as soon as its parent exits below.
            time.sleep(0.3)
            report(path, f"grandchild {os.getpid()} ppid {os.getppid()}")
            os._exit(0)
        os._exit(0)
    os.waitpid(middle, 0)


def main() -> None:
    path, action, *args = sys.argv[1:]
    if action == "wait":
        wait_for_stop(path, int(args[0]) if args else 0)
    elif action == "exit":
        sys.exit(int(args[0]))
    elif action == "die":
        os.kill(os.getpid(), int(args[0]))
        time.sleep(10)
    elif action == "orphan":
        orphan(path)
        wait_for_stop(path, 0)
    else:
        raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    main()
