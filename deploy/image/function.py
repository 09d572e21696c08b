"""The example function of the secretd-example image (deploy/Dockerfile).

It stands for a function worker: it reads its connection string through the broker, says
whether it got it — never the value — checks that a secret outside its scope is refused, and
then waits for work until it is stopped (SIGTERM/SIGINT: a clean exit 0).

    /app/function.py                  report, then wait until stopped
    /app/function.py --once           report, exit 0 (1 when ORDERS_DB was not there)
    /app/function.py --exit N         report, exit N
    /app/function.py --orphan         also leave an orphaned grandchild behind (PID 1 reaps it)
    /app/function.py --from-environ   read ORDERS_DB from os.environ instead (the platform
                                      default; the benchmark's baseline), no broker involved
    /app/function.py --from-environ --import-client
                                      the same, but also import the client (grpcio, protobuf):
                                      the benchmark's split of import cost from broker cost
"""

from __future__ import annotations

import argparse
import os
import pwd
import signal
import sys
import time

SECRET = "ORDERS_DB"
OUT_OF_SCOPE = "BILLING_DB"


def say(line: str) -> None:
    print(line, flush=True)


def read_through_broker() -> bool:
    import secretd

    try:
        value = secretd.get(SECRET)
    except secretd.NotFound:
        say(f"{SECRET}: not found in the broker (docker run -e {SECRET}=...)")
        got = False
    else:
        say(f"{SECRET}: received via secretd.get ({len(value.encode())} bytes)")
        got = True
    try:
        secretd.get(OUT_OF_SCOPE)
    except secretd.PermissionDenied:
        say(f"{OUT_OF_SCOPE}: denied (out of scope)")
    else:
        say(f"{OUT_OF_SCOPE}: NOT denied")
    return got


def read_from_environ() -> bool:
    value = os.environ.get(SECRET)
    got = "missing" if value is None else f"received via os.environ ({len(value.encode())} bytes)"
    say(f"{SECRET}: {got}")
    return value is not None


def leave_orphan() -> None:
    middle = os.fork()
    if middle == 0:
        if os.fork() == 0:
            time.sleep(0.3)  # outlives its parent: re-parented to PID 1, which must reap it
            os._exit(0)
        os._exit(0)
    os.waitpid(middle, 0)
    say("orphan: left a grandchild behind")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true")
    parser.add_argument("--exit", type=int, default=None, metavar="N")
    parser.add_argument("--orphan", action="store_true")
    parser.add_argument("--from-environ", action="store_true")
    parser.add_argument("--import-client", action="store_true")
    args = parser.parse_args()

    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    user = pwd.getpwuid(os.getuid()).pw_name
    say(f"orders function: pid {os.getpid()}, uid {os.getuid()} ({user})")
    if args.from_environ:
        if args.import_client:
            import secretd  # noqa: F401
        got = read_from_environ()
    else:
        got = read_through_broker()
    if args.orphan:
        leave_orphan()
    if args.exit is not None:
        return int(args.exit)
    if args.once:
        return 0 if got else 1
    say("waiting for work; stop with SIGTERM")
    stop = signal.sigwait(stops)
    say(f"{signal.Signals(stop).name}: stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
