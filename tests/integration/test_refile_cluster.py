"""Failed mail comes back in a cluster: the owners re-file their own mailboxes (issue 22).

Three daemons share nine mailboxes through a real PostgreSQL; ``groups add`` on any host logs
the link change in the database, ``NOTIFY emailsync_links`` wakes every instance, and each
re-files the mailboxes it holds the lease of, on their own connections.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from emailsync.dev.dovecot import Dovecot
from emailsync.state.postgres import PostgresStore

from .conftest import MailUser, new_user
from .daemonproc import run_cli, wait_until
from .test_cluster import Cluster, balanced
from .test_filing import build_message, folder_subjects, queue
from .test_refile import FILED_WITHIN_SECONDS, failed_for_no_group, log_events

pytestmark = pytest.mark.dovecot

MAILBOXES = 9
LATE = "late.buyer@clients.example"


@pytest.fixture
def cluster(tmp_path: Path, agents: list[MailUser], pg_url: str) -> Iterator[Cluster]:
    with Cluster(tmp_path, agents, pg_url) as made:
        yield made


@pytest.fixture
def agents(dovecot: Dovecot) -> list[MailUser]:
    return [new_user(dovecot, prefix="rf") for _ in range(MAILBOXES)]


def test_in_a_three_instance_cluster_the_owners_refile_their_own_mailboxes(
    cluster: Cluster, agents: list[MailUser], pg_url: str
) -> None:
    names = ["a", "b", "c"]
    cluster.start_all(names)
    wait_until(lambda: balanced(cluster, names, MAILBOXES), timeout=40, interval=0.5)
    owners = cluster.owners("a")
    raw = build_message(LATE, ", ".join(a.address for a in agents), "to every agent")
    for agent in agents:
        queue(agent, raw)
    for agent in agents:
        wait_until(lambda agent=agent: failed_for_no_group(agent, "to every agent"), 20)
    # The link, made from a fourth host's CLI: only the database tells the instances.
    result = run_cli(cluster.config("cli"), "groups", "add", "Buyers", LATE)
    assert result.returncode == 0, result.stderr
    for agent in agents:
        wait_until(
            lambda agent=agent: "to every agent" in folder_subjects(agent, "Received"),
            FILED_WITHIN_SECONDS,
            0.1,
        )
        assert folder_subjects(agent, "Failed") == {}
    store = PostgresStore(pg_url)
    try:
        [event] = store.list_events()
    finally:
        store.close()
    assert sorted(event.mailboxes) == sorted(a.address for a in agents)
    # Each instance re-filed exactly the mailboxes it owns, each once.
    refiled: Counter[str] = Counter()

    def logged_count() -> int:  # each pass logs its count just after its MOVEs
        return sum(
            e["count"]
            for name in names
            for e in log_events(cluster.daemons[name], "messages_refiled")
        )

    wait_until(lambda: logged_count() >= len(agents))
    for name in names:
        daemon = cluster.daemons[name]
        done = [e for e in log_events(daemon, "messages_refiled") if e["count"]]
        mine = {a for a, owner in owners.items() if owner == name}
        assert {e["mailbox"] for e in done} == mine, name
        for entry in done:
            refiled[entry["mailbox"]] += entry["count"]
        for address in mine:
            assert daemon.metric("emailsync_refiled_total", mailbox=address) == 1
        [seen] = [e for e in log_events(daemon, "links_changed") if e["mailboxes"]]
        assert sorted(seen["mailboxes"]) == sorted(mine)
    assert refiled == Counter({a.address: 1 for a in agents})
