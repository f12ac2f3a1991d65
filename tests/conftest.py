"""Fixtures shared by unit and integration tests: a throwaway PostgreSQL cluster, and each
test's logging configuration undone after it; and the order of the long tests under xdist."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import pytest
import structlog

from emailsync.dev.postgres import Postgres


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL cluster for the session; start-up errors fail the tests that use it."""
    server = Postgres()
    server.start()  # raises PostgresStartError with the log tail when it cannot start
    yield server
    server.close()


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """A fresh, empty database in the session's cluster."""
    return postgres.create_database()


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """A test that runs the CLI in-process configures structlog for the process (a level, a
    stream): the next test on the same xdist worker must not inherit it (a ``warning`` level
    there hid the INFO lines test_office365 looks for)."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


# The tests that take 10 s or more (seconds from --durations on a shared 2-core machine; a
# rough figure is enough). Under ``--dist worksteal`` each worker first gets one contiguous
# slice of the collection and takes half of another's queue (from its end) when it runs dry,
# so a long test reached late ends the run alone. ``pytest_collection_modifyitems`` puts these
# at the heads of the slices, longest first, each on the slice with the fewest seconds so far:
# they start at once, and the short tests fill in around them. Adding a test here changes
# only the order. Keep it to the long ones (``--durations=30`` lists them) that share no
# module-scoped fixture with others (moved away from its module, it would set that up again).
LONG_TESTS: dict[str, float] = {
    "tests/integration/test_selfservice_everywhere.py::"
    "test_a_mailbox_set_up_on_one_instance_runs_on_its_owner_and_stops_from_another": 64,
    "tests/integration/test_cluster.py::"
    "test_every_mailbox_is_served_again_after_each_of_repeated_short_postgresql_outages": 68,
    "tests/integration/test_chaos.py::test_cluster_chaos_files_everything_once": 35,
    "tests/integration/test_production_shape.py::"
    "test_agents_set_up_sync_sign_in_and_stop_through_any_of_three_crm_instances": 57,
    "tests/integration/test_cluster.py::"
    "test_a_killed_instance_s_mailboxes_are_taken_over_and_mail_queued_meanwhile_filed_once": 35,
    "tests/integration/test_cluster.py::"
    "test_three_instances_run_each_mailbox_once_and_start_sync_reaches_the_owner": 24,
    "tests/integration/test_soak.py::test_soak_under_random_faults_loses_and_doubles_nothing": 27,
    "tests/integration/test_chaos.py::test_crm_chaos_delivers_each_event_exactly_once": 26,
    "tests/integration/test_faults.py::"
    "test_a_fault_that_recurs_after_every_login_backs_off_exponentially": 27,
    "tests/integration/test_cluster_crm.py::"
    "test_a_crm_cluster_files_each_message_once_and_fails_over_within_the_lease": 25,
    "tests/integration/test_cluster.py::"
    "test_a_paused_instance_records_nothing_and_moves_nothing_after_its_lease_expired": 31,
    "tests/integration/test_cluster_crm.py::"
    "test_a_paused_crm_instance_delivers_nothing_and_moves_nothing_after_its_lease_moved": 33,
    "tests/integration/test_cluster.py::"
    "test_a_start_sync_with_include_stuck_sent_while_the_mailbox_changes_hands_is_not_lost": 21,
    "tests/integration/test_cluster.py::"
    "test_an_owner_paused_between_recording_and_moving_sends_no_move_once_its_lease_moved": 27,
    "tests/integration/test_cluster_shared_state.py::"
    "test_an_office_365_sign_in_started_on_one_instance_completes_on_another_once": 13,
    "tests/integration/test_cluster.py::"
    "test_a_worker_parked_while_its_renewal_was_slow_is_restarted_once_the_lease_is_renewed": 19,
    "tests/integration/test_refile_cluster.py::"
    "test_in_a_three_instance_cluster_the_owners_refile_their_own_mailboxes": 19,
    "tests/integration/test_cluster.py::"
    "test_instances_ride_out_a_postgresql_restart_without_a_double_owner": 20,
    "tests/integration/test_cluster.py::"
    "test_a_start_sync_published_while_the_owner_s_listener_reconnects_is_not_lost": 15,
    "tests/integration/test_keycheck_cli.py::"
    "test_an_instance_with_another_key_refuses_to_run_and_check_config_says_why": 13,
    "tests/integration/test_control_api.py::"
    "test_schemathesis_finds_no_5xx_hang_or_undocumented_response": 13,
    "tests/integration/test_selfservice_api.py::"
    "test_a_set_up_outwaits_the_servers_failure_delay_and_takes_the_right_password_after": 11,
    "tests/unit/test_supervisor.py::test_a_slow_worker_stop_does_not_freeze_the_lease_keeper": 10,
}


@pytest.hookimpl(trylast=True)  # after -k / -m deselected what they do
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the long tests first on each worker (see ``LONG_TESTS``)."""
    workerinput = getattr(config, "workerinput", None)
    workers = int(workerinput["workercount"]) if workerinput else 1
    if workers < 2:
        return
    long = sorted(
        (item for item in items if item.nodeid in LONG_TESTS),
        key=lambda item: -LONG_TESTS[item.nodeid],
    )
    heads: list[list[pytest.Item]] = [[] for _ in range(workers)]
    seconds = [0.0] * workers
    for item in long:
        slot = seconds.index(min(seconds))
        heads[slot].append(item)
        seconds[slot] += LONG_TESTS[item.nodeid]
    rest = iter([item for item in items if item.nodeid not in LONG_TESTS])
    ordered: list[pytest.Item] = []
    left = len(items)
    for slot in range(workers):
        # worksteal's first split: each idle worker in turn gets len(pending) // (idle left)
        size = left // (workers - slot)
        ordered += heads[slot] + list(islice(rest, max(0, size - len(heads[slot]))))
        left -= size
    ordered += list(rest)
    assert len(ordered) == len(items)
    items[:] = ordered
