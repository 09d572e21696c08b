"""Interpreter mode, the deployment the project starts from: the shim installed under the
interpreter's name (`python3`), the real interpreter moved aside, a shim config that names it.
The host runs `python3 worker.py` as before, with secrets in its environment; what runs is the
real interpreter as the function's uid, registered, with a fresh environment."""

from __future__ import annotations

import json
import shutil

from harness import (
    WORKER_UID,
    Binaries,
    Broker,
    HostSecrets,
    Launcher,
    Sandbox,
    StagedLib,
    cmdline_of,
    environ_names,
    environ_of,
    leaked_values,
    needs_root,
    proc_uid,
)

pytestmark = needs_root


def test_shim_installed_as_python3_runs_the_real_interpreter_registered(
    bins: Binaries,
    broker: Broker,
    launcher: Launcher,
    sandbox: Sandbox,
    staged: StagedLib,
    host_secrets: HostSecrets,
) -> None:
    bin_dir = sandbox.root / "usr-bin"
    bin_dir.mkdir(mode=0o755)
    python3 = bin_dir / "python3"
    shutil.copy2(bins.shim, python3)  # what `cp secretd-shim /usr/bin/python3` does
    config = sandbox.root / "shim.toml"
    config.write_text(
        "[program.python3]\n"
        f"exec = {json.dumps(str(staged.python))}\n"
        f'user = "{WORKER_UID}"\n'
        f'group = "{WORKER_UID}"\n'
        'keep = ["LANG", "FUNCTIONS_WORKER_RUNTIME"]\n'
        'set = { PYTHONUNBUFFERED = "1" }\n'
        'function = "orders"\n'
        f"socket = {json.dumps(str(broker.socket))}\n"
    )

    # The host's command line, unchanged: `python3 -s -E worker.py`.
    argv = [str(python3), "-s", "-E", str(staged.program("worker_prog.py"))]
    worker = launcher.worker_via(argv, {"SECRETD_SHIM_CONFIG": str(config)})

    assert proc_uid(worker.pid) == WORKER_UID
    me = worker.whoami()
    assert (me["function"], me["scopes"]) == ("orders", ["orders"]), me
    got = worker.get("ORDERS_DB")
    assert got.get("sha256") == host_secrets.sha256("ORDERS_DB"), got

    environ = environ_of(worker.pid)
    assert environ_names(environ) == [
        "FUNCTIONS_WORKER_RUNTIME",
        "LANG",
        "PATH",
        "PYTHONUNBUFFERED",
        "SECRETD_SOCKET",
    ]
    everything = [*host_secrets.all_values(), broker.env["UNBROKERED_TOKEN"].encode()]
    assert leaked_values(environ, everything) == []
    assert leaked_values(cmdline_of(worker.pid), everything) == []
    # The real interpreter runs, with the host's arguments.
    assert cmdline_of(worker.pid).split(b"\0")[1:4] == [b"-s", b"-E", argv[3].encode()]
    worker.exit()
