"""Contract §8 "Dynamic credentials", end to end against real servers: a throwaway PostgreSQL
(tests/postgres.py), a real `bao server -dev -dev-tls` with the database secrets engine
(`postgresql-database-plugin` is built into `bao`) and a role of a few seconds' TTL, the real
broker, and the Python client's `secretd.watch`.

Asserted: the connection string logs in; it is renewed and rotated before the max TTL and a
watcher sees the new one; the old credentials keep working during `revoke_grace` and stop
afterwards; `secretd refresh NAME` gives a new user at once; SIGTERM revokes everything (no
generated role left in `pg_roles`); a restarted broker never reuses a lease; a required secret
that cannot be read, or a template naming a key the lease lacks, stops start-up with the path;
no connection string, password or lease id in the broker's output, audit log or status.

The broker's scope and admin list name the uid running the tests, so this runs unprivileged
too (PostgreSQL then runs as that uid; as root it runs as `nobody`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from harness import (
    Binaries,
    Broker,
    BrokerError,
    Processes,
    Sandbox,
    missing,
    write_openbao_config,
)
from postgres import Postgres, find_pg_bin
from test_openbao import Bao, next_in_thread, start_bao

import secretd

ROLE = "orders"
# OpenBao's default username template for PostgreSQL: v-<display name>-<role>-<random>-<time>.
GENERATED = "v-"


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    bindir = find_pg_bin()
    if bindir is None:
        missing(
            "no PostgreSQL server binaries (Debian's `postgresql` package; `.ci/run` installs it)"
        )
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="secretd-pg-"))
    root.chmod(0o755)
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(  # type: ignore[call-overload]
            argv, start_new_session=True, stdin=subprocess.DEVNULL, **kwargs
        )
        started.append(proc)
        return proc  # type: ignore[no-any-return]

    server: Postgres | None = None
    try:
        server = Postgres(bindir, root / "pg", start)
        yield server
    finally:
        if server is not None:
            server.stop()
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
def bao(sandbox: Sandbox, processes: Processes) -> Bao:
    return start_bao(sandbox, processes)


@pytest.fixture(autouse=True)
def no_leftover_roles(pg: Postgres) -> Iterator[None]:
    """Each test starts with no generated role (a failed one may leave some behind)."""
    yield
    for role in pg.roles(GENERATED):
        pg.admin(f'drop role if exists "{role}"')


def database_engine(bao: Bao, pg: Postgres, ttl: str, max_ttl: str) -> None:
    """The database engine pointed at `pg`, and role `orders` with the given TTLs. The admin
    password goes on stdin, never argv."""
    bao.ok("secrets", "enable", "database")
    bao.ok(
        "write",
        "database/config/pg",
        "-",
        stdin=json.dumps(
            {
                "plugin_name": "postgresql-database-plugin",
                "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{pg.port}/postgres",
                "username": "postgres",
                "password": pg.password,
                "allowed_roles": ROLE,
                "verify_connection": True,
            }
        ),
    )
    bao.ok(
        "write",
        f"database/roles/{ROLE}",
        "db_name=pg",
        "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
        "VALID UNTIL '{{expiration}}';",
        f"default_ttl={ttl}",
        f"max_ttl={max_ttl}",
    )


POLICY = """
path "database/creds/orders" { capabilities = ["read"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"""


def start_broker(
    bins: Binaries,
    sandbox: Sandbox,
    processes: Processes,
    bao: Bao,
    pg: Postgres,
    *,
    path: str = f"database/creds/{ROLE}",
    template: str | None = None,
    rotate_before: str = "2s",
    revoke_grace: str = "3s",
    revoke_on_shutdown: bool = True,
    configure: bool = True,
    extra_config: str = "",
) -> Broker:
    secret_id = sandbox.root / "secret-id"
    if configure:
        role_id = bao.approle(secret_id, policy=POLICY)
        (sandbox.root / "role-id").write_text(role_id)
    role_id = (sandbox.root / "role-id").read_text()
    if template is None:
        template = f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{pg.port}/postgres"
    write_openbao_config(
        sandbox,
        address=bao.address,
        ca=bao.ca,
        refresh="1h",
        role_id=role_id,
        secret_id=secret_id,
        sources=f"""[sources.openbao.dynamic.ORDERS_DB]
path = "{path}"
template = "{template}"
rotate_before = "{rotate_before}"
revoke_grace = "{revoke_grace}"
revoke_on_shutdown = {str(revoke_on_shutdown).lower()}
""",
        extra=extra_config,
    )
    broker = Broker(bins, sandbox, processes, {})
    broker.start()
    return broker


def user_of(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    assert parts.username, "not a connection string with a user"
    assert parts.password, "not a connection string with a password"
    return parts.username, parts.password


def logs_in(pg: Postgres, url: str) -> bool:
    user, password = user_of(url)
    return pg.query(user, password, "select current_user", check=False) == user


def lease_ids(bao: Bao) -> list[str]:
    """The ids of the leases OpenBao holds for the role (to prove none leaks)."""
    out = bao.run("list", "-format=json", f"sys/leases/lookup/database/creds/{ROLE}")
    if out.returncode != 0:
        return []
    return [f"database/creds/{ROLE}/{suffix}" for suffix in json.loads(out.stdout)]


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out after {timeout}s: {what}"
        time.sleep(0.2)


def assert_nothing_leaked(broker: Broker, secrets_: list[str]) -> None:
    status = broker.cli("status", "--json")
    text = status.stdout + status.stderr
    for blob, where in [
        (broker.log(), "broker output"),
        (broker.audit_bytes().decode(errors="replace"), "audit log"),
        (text, "status"),
    ]:
        for s in secrets_:
            assert s not in blob, f"a secret appears in the {where}"
        assert "postgresql://" not in blob, f"a connection string appears in the {where}"


def test_the_connection_string_logs_in_and_shutdown_revokes_it(
    bins: Binaries, sandbox: Sandbox, processes: Processes, bao: Bao, pg: Postgres
) -> None:
    database_engine(bao, pg, ttl="1h", max_ttl="2h")
    broker = start_broker(bins, sandbox, processes, bao, pg)
    url = secretd.Client(socket_path=broker.socket).get("ORDERS_DB")
    user, password = user_of(url)
    assert user.startswith(GENERATED)
    assert logs_in(pg, url)
    assert pg.roles(GENERATED) == [user]

    status = broker.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    dynamic = json.loads(status.stdout)["dynamic"]
    assert [d["name"] for d in dynamic] == ["ORDERS_DB"]
    assert dynamic[0]["path"] == f"database/creds/{ROLE}"
    assert 3000 < dynamic[0]["ttl_seconds"] <= 3600
    text = broker.cli("status")
    assert f"ORDERS_DB  database/creds/{ROLE}  ttl " in text.stdout, text.stdout

    leases = lease_ids(bao)
    assert len(leases) == 1
    assert broker.stop() == 0
    # SIGTERM revoked the lease: OpenBao dropped the role.
    assert pg.roles(GENERATED) == []
    assert not logs_in(pg, url)
    assert lease_ids(bao) == []
    assert_nothing_leaked(
        broker, [password, user, *leases, *(lid.rsplit("/", 1)[1] for lid in leases)]
    )


def test_renewed_then_rotated_before_the_max_ttl_and_the_old_user_revoked_after_the_grace(
    bins: Binaries,
    sandbox: Sandbox,
    processes: Processes,
    bao: Bao,
    pg: Postgres,
) -> None:
    # 4 s leases renewed every ~3 s up to a 12 s max TTL; new credentials 3 s before it;
    # the previous user survives 4 s more.
    database_engine(bao, pg, ttl="4s", max_ttl="12s")
    broker = start_broker(bins, sandbox, processes, bao, pg, rotate_before="3s", revoke_grace="4s")
    with secretd.Client(socket_path=broker.socket) as client:
        it = client.watch("ORDERS_DB")
        try:
            first = next_in_thread(it, 30)
            issued = time.monotonic()
            assert logs_in(pg, first)
            second = next_in_thread(it, 60)
            rotated = time.monotonic()
            assert user_of(second)[0] != user_of(first)[0]
            # Beyond the 4 s TTL: the first lease was renewed, or its user would be gone.
            assert rotated - issued > 4
            # Before the max TTL (and within the grace): both users log in.
            assert logs_in(pg, second)
            assert logs_in(pg, first), "the old credentials died before revoke_grace"
            # After the grace the old user is revoked.
            wait_for(lambda: not logs_in(pg, first), 30, "the old user to be revoked")
            assert user_of(first)[0] not in pg.roles(GENERATED)
            assert logs_in(pg, second)
        finally:
            it.close()
    passwords = [user_of(first)[1], user_of(second)[1]]
    assert broker.stop() == 0
    assert pg.roles(GENERATED) == []
    assert_nothing_leaked(broker, passwords)


def test_secretd_refresh_gives_a_new_user_at_once(
    bins: Binaries, sandbox: Sandbox, processes: Processes, bao: Bao, pg: Postgres
) -> None:
    database_engine(bao, pg, ttl="1h", max_ttl="2h")
    broker = start_broker(bins, sandbox, processes, bao, pg, revoke_grace="1s")
    with secretd.Client(socket_path=broker.socket) as client:
        it = client.watch("ORDERS_DB")
        try:
            first = next_in_thread(it, 30)
            result = broker.cli("refresh", "ORDERS_DB")
            assert result.returncode == 0, result.stderr
            assert result.stdout == "refreshed 1 secrets\n"
            second = next_in_thread(it, 30)
            assert user_of(second)[0] != user_of(first)[0]
            assert logs_in(pg, second)
            wait_for(lambda: not logs_in(pg, first), 30, "the old user to be revoked")
        finally:
            it.close()
    assert broker.stop() == 0
    assert pg.roles(GENERATED) == []


def test_a_restarted_broker_never_reuses_a_lease_and_a_killed_one_leaves_them_to_their_ttl(
    bins: Binaries, sandbox: Sandbox, processes: Processes, bao: Bao, pg: Postgres
) -> None:
    database_engine(bao, pg, ttl="1h", max_ttl="2h")
    broker = start_broker(bins, sandbox, processes, bao, pg)
    first = secretd.Client(socket_path=broker.socket).get("ORDERS_DB")
    broker.kill()
    # SIGKILL: nothing could revoke; the lease (and its user) live on until their TTL.
    assert logs_in(pg, first)
    broker.start()
    second = secretd.Client(socket_path=broker.socket).get("ORDERS_DB")
    assert user_of(second)[0] != user_of(first)[0]
    assert broker.stop() == 0
    # The second broker revoked its own lease only.
    assert pg.roles(GENERATED) == [user_of(first)[0]]
    bao.ok("lease", "revoke", "-prefix", f"database/creds/{ROLE}")


def test_revoke_on_shutdown_false_leaves_the_lease(
    bins: Binaries, sandbox: Sandbox, processes: Processes, bao: Bao, pg: Postgres
) -> None:
    database_engine(bao, pg, ttl="1h", max_ttl="2h")
    broker = start_broker(bins, sandbox, processes, bao, pg, revoke_on_shutdown=False)
    url = secretd.Client(socket_path=broker.socket).get("ORDERS_DB")
    assert broker.stop() == 0
    assert logs_in(pg, url)
    bao.ok("lease", "revoke", "-prefix", f"database/creds/{ROLE}")


@pytest.mark.parametrize(
    ("path", "template", "want"),
    [
        (
            "database/creds/nosuchrole",
            None,
            "dynamic secret ORDERS_DB: reading database/creds/nosuchrole failed",
        ),
        (
            f"database/creds/{ROLE}",
            "postgresql://{{user}}:{{password}}@127.0.0.1/postgres",
            "dynamic secret ORDERS_DB: `template` uses {{user}} but the lease from "
            f'database/creds/{ROLE} has no data key "user" (it has: password, username)',
        ),
    ],
)
def test_a_required_dynamic_secret_that_cannot_be_read_stops_start_up_naming_the_path(
    bins: Binaries,
    sandbox: Sandbox,
    processes: Processes,
    bao: Bao,
    pg: Postgres,
    path: str,
    template: str | None,
    want: str,
) -> None:
    database_engine(bao, pg, ttl="1h", max_ttl="2h")
    with pytest.raises(BrokerError) as e:
        start_broker(bins, sandbox, processes, bao, pg, path=path, template=template)
    assert want in str(e.value)
    assert "postgresql://v-" not in str(e.value)
    # The lease read for the bad template was revoked, not left behind.
    wait_for(lambda: pg.roles(GENERATED) == [], 30, "no generated role left")
    assert not re.search(r"password=|[0-9A-Za-z]{20,}-[0-9]{10}", str(e.value))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
