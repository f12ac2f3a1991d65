"""A real Prometheus scrapes a real daemon and evaluates our alerts, rules and dashboard on it.

The daemon runs against the session Dovecot and the reference CRM (emailsync.dev.crm) with two
mailboxes: an automatic one whose mail was filed to Sent, Received and Failed, and a manual one
with a message left in its Queue.
Prometheus (Debian's /usr/bin/prometheus, on 127.0.0.1 only, data in a temporary directory)
scrapes it every second and loads alerts.yml and rules.yml. Every recording-rule, alert and
dashboard expression must then evaluate without error over series that really exist, and the
scraped values must match the mail the daemon filed.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emailsync.dev.crm import DevCrm
from emailsync.dev.dovecot import Dovecot
from emailsync.dev.net import free_port

from .conftest import MailUser, new_user, write_config
from .daemonproc import RunningDaemon, daemon_config_extra, wait_until
from .test_filing import build_message, folder_subjects, queue
from .test_ops_assets import (
    ALERTS,
    DASHBOARD,
    RULES,
    dashboard_exprs,
    referenced_metric_names,
    rule_file_entries,
)

pytestmark = pytest.mark.dovecot

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
READY_TIMEOUT_SECONDS = 20.0
LOG_TAIL_LINES = 40
CLIENT = "john@clients.example"
CRM_SECRET = "prometheus-scenario-crm-secret"
# Series that only exist for some setups: the token expiry is set only for Office 365
# mailboxes (TokenExpiringSoon treats "absent" as "no token"), and this daemon has none.
ABSENT_WITHOUT_OFFICE365 = frozenset({"emailsync_token_expiry_timestamp_seconds"})
_GRAFANA_INTERVAL = re.compile(r"\$\{?__(?:rate_interval|interval|range)\b\}?")
_GRAFANA_MATCH_ALL = re.compile(r'=~\s*"\$(?:\{\w+\}|\w+)"')
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<metric>.*),\s*\w+\s*\)\s*$")


@dataclass
class Scenario:
    """The daemon, its two mailboxes and the Prometheus scraping it."""

    daemon: RunningDaemon
    auto: MailUser
    manual: MailUser
    prometheus: Prometheus


class Prometheus:
    """`/usr/bin/prometheus` on a free loopback port, scraping one target as job `emailsync`."""

    def __init__(self, target: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        config = workdir / "prometheus.yml"
        # JSON is YAML: no YAML library needed.
        config.write_text(
            json.dumps(
                {
                    "global": {
                        "scrape_interval": "1s",
                        "scrape_timeout": "1s",
                        "evaluation_interval": "1s",
                    },
                    "rule_files": [str(ALERTS), str(RULES)],
                    "scrape_configs": [
                        {"job_name": "emailsync", "static_configs": [{"targets": [target]}]}
                    ],
                }
            ),
            encoding="utf-8",
        )
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def log_tail(self) -> str:
        """The last lines Prometheus logged."""
        self._log.flush()
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def _http(self, path: str, data: dict[str, str] | None = None) -> tuple[int, bytes]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        try:
            with urllib.request.urlopen(f"{self.url}{path}", data=body, timeout=10) as response:  # noqa: S310
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    def wait_ready(self) -> None:
        """Wait for /-/ready; fail the test with the log tail when it does not come."""
        with contextlib.suppress(AssertionError):  # judged just below, with the log tail
            wait_until(
                lambda: self.process.poll() is not None or self._http("/-/ready")[0] == 200,
                READY_TIMEOUT_SECONDS,
            )
        if self.process.poll() is not None or self._http("/-/ready")[0] != 200:
            pytest.fail(f"Prometheus did not become ready; log tail:\n{self.log_tail()}")

    def api(self, path: str, data: dict[str, str] | None = None) -> Any:
        """The `data` of a successful API answer; fails with Prometheus' error otherwise."""
        status, body = self._http(path, data)
        answer = json.loads(body) if body else {}
        problem = f"{path} {data}: HTTP {status}: {body.decode(errors='replace')}"
        assert status == 200, problem
        assert answer.get("status") == "success", problem
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector result (scalars come back as one unlabelled sample)."""
        data = self.api("/api/v1/query", {"query": expr})
        if data["resultType"] == "vector":
            return list(data["result"])
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        pytest.fail(f"{expr}: unexpected result type {data['resultType']}")

    def value(self, expr: str) -> float:
        """The value of a query that must return exactly one sample."""
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def series_count(self, name: str) -> int:
        """How many series of this name Prometheus holds right now."""
        result = self.query(f'count({{__name__="{name}"}})')
        return int(float(result[0]["value"][1])) if result else 0

    def stop(self) -> None:
        """Terminate and wait; kill when it does not stop."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


def start_daemon(workdir: Path, auto: MailUser, manual: MailUser, crm: DevCrm) -> RunningDaemon:
    """`emailsync run` with both mailboxes against the reference CRM (so the CRM metrics
    exist too); only `manual` has trigger = "manual"."""
    port = free_port()
    token = secrets.token_urlsafe(16)
    token_file = workdir / "control-token"
    token_file.write_text(token + "\n", encoding="utf-8")
    secret_file = workdir / "crm-secret"
    secret_file.write_text(CRM_SECRET + "\n", encoding="utf-8")
    crm_table = f'\n[crm]\nurl = "{crm.url}"\nsecret_file = "{secret_file}"\n'
    config = write_config(
        workdir,
        [auto, manual],
        extra=daemon_config_extra(port, token_file, metrics_detail="summary") + crm_table,
    )
    marker = f'password_file = "secrets/{manual.address}"\n'
    text = config.read_text(encoding="utf-8")
    assert marker in text
    config.write_text(text.replace(marker, marker + 'trigger = "manual"\n'), encoding="utf-8")
    crm.link("g-smith", "Smith", [CLIENT])
    daemon = RunningDaemon(config, port, token, workdir)
    try:
        daemon.wait_ready()
    except BaseException:
        daemon.stop()
        raise
    return daemon


def wait_filed(user: MailUser, folder: str, subject: str) -> None:
    """Wait until a message with this subject is in the folder."""
    wait_until(lambda: subject in folder_subjects(user, folder), 10)


@pytest.fixture(scope="module")
def scenario(dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """Mail filed by a running daemon, and a Prometheus that has scraped it a few times."""
    if not PROMETHEUS.exists():
        # make test promises these checks ran: a missing Prometheus is a failure, not a skip.
        pytest.fail(f"{PROMETHEUS} is not installed (Debian package prometheus; make system-deps)")
    workdir = tmp_path_factory.mktemp("prometheus")
    auto, manual = new_user(dovecot, "auto"), new_user(dovecot, "manual")
    crm = DevCrm(CRM_SECRET.encode()).start()
    try:
        daemon = start_daemon(workdir, auto, manual, crm)
    except BaseException:
        crm.close()
        raise
    prometheus: Prometheus | None = None
    try:
        wait_until(
            lambda: all(
                daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="idle") == 1
                for user in (auto, manual)
            )
        )
        queue(auto, build_message(auto.address, CLIENT, "to sent"))
        queue(auto, build_message(CLIENT, auto.address, "to received"))
        queue(auto, build_message("stranger@else.example", auto.address, "to failed"))
        queue(manual, build_message(CLIENT, manual.address, "waits for start sync"))
        wait_filed(auto, "Sent", "to sent")
        wait_filed(auto, "Received", "to received")
        wait_filed(auto, "Failed", "to failed")
        wait_until(lambda: daemon.metric("emailsync_queue_messages", mailbox=manual.address) == 1)

        prometheus = Prometheus(f"127.0.0.1:{daemon.port}", workdir)
        prometheus.wait_ready()
        scraped = 'count_over_time(up{job="emailsync"}[1m])'
        wait_until(lambda: prometheus.query(scraped), 10, 0.25)
        # One more message after the first scrape, so rates and latency quantiles see an increase.
        queue(auto, build_message(CLIENT, auto.address, "while scraped"))
        wait_filed(auto, "Received", "while scraped")
        wait_until(
            lambda: prometheus.query(
                f'emailsync_messages_received_total{{mailbox="{auto.address}"}} == 2'
            ),
            10,
            0.25,
        )
        wait_until(lambda: prometheus.value(scraped) >= 4, 10, 0.25)
        wait_until(lambda: all_rules_evaluated(prometheus), 10, 0.25)
        yield Scenario(daemon, auto, manual, prometheus)
    finally:
        if prometheus is not None:
            prometheus.stop()
        code = daemon.stop()
        crm.close()
    assert code == 0, f"the daemon exited {code} at shutdown"


def all_rules_evaluated(prometheus: Prometheus) -> bool:
    """True once Prometheus has evaluated every loaded rule at least once."""
    groups = prometheus.api("/api/v1/rules")["groups"]
    return bool(groups) and all(
        rule["health"] != "unknown" for group in groups for rule in group["rules"]
    )


def grafana_concrete(expr: str) -> str:
    """A dashboard query as Grafana sends it with every variable at "All" and a 1m interval."""
    concrete = _GRAFANA_INTERVAL.sub("1m", expr)
    concrete = _GRAFANA_MATCH_ALL.sub('=~".*"', concrete)
    assert "$" not in concrete, f"unexpanded Grafana variable in {expr!r}"
    return concrete


def dashboard_variable_queries() -> list[str]:
    """The series selectors of the dashboard's `label_values(...)` variables."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = _LABEL_VALUES.match(variable["definition"])
            assert match, variable["definition"]
            queries.append(match.group("metric"))
    return queries


def assert_evaluates_over_existing_series(prometheus: Prometheus, expr: str) -> None:
    """The expression evaluates without error, and every metric it names has a series."""
    prometheus.query(expr)
    for name in sorted(referenced_metric_names(expr) - ABSENT_WITHOUT_OFFICE365):
        assert prometheus.series_count(name) > 0, f"no series {name} for {expr!r}"


def test_prometheus_loads_every_rule_group_and_evaluates_each_rule_without_error(
    scenario: Scenario,
) -> None:
    groups = scenario.prometheus.api("/api/v1/rules")["groups"]
    assert {group["name"] for group in groups} == {"emailsync.alerts", "emailsync.rules"}
    rules = [rule for group in groups for rule in group["rules"]]
    expected = len(rule_file_entries(ALERTS, "expr")) + len(rule_file_entries(RULES, "expr"))
    assert len(rules) == expected
    for rule in rules:
        assert rule["health"] == "ok", rule
        assert not rule.get("lastError"), rule


@pytest.mark.parametrize(
    "expr", rule_file_entries(RULES, "expr"), ids=rule_file_entries(RULES, "record")
)
def test_recording_rule_expression_evaluates_over_scraped_series(
    scenario: Scenario, expr: str
) -> None:
    assert_evaluates_over_existing_series(scenario.prometheus, expr)


@pytest.mark.parametrize(
    "expr", rule_file_entries(ALERTS, "expr"), ids=rule_file_entries(ALERTS, "alert")
)
def test_alert_expression_evaluates_over_scraped_series(scenario: Scenario, expr: str) -> None:
    assert_evaluates_over_existing_series(scenario.prometheus, expr)


# This scenario's daemon has a CRM, so it cannot have the PostgreSQL store that the cluster
# metrics come with; test_cluster.py reads both from real cluster daemons.
CLUSTER_METRICS = ("emailsync_owned_mailboxes", "emailsync_lease_losses_total")


@pytest.mark.parametrize(
    "expr",
    [
        expr
        for expr in [*dashboard_exprs(), *dashboard_variable_queries()]
        if not any(name in expr for name in CLUSTER_METRICS)
    ],
)
def test_dashboard_query_evaluates_over_scraped_series(scenario: Scenario, expr: str) -> None:
    assert_evaluates_over_existing_series(scenario.prometheus, grafana_concrete(expr))


def test_the_only_metric_without_series_is_the_office365_token_expiry(scenario: Scenario) -> None:
    for name in ABSENT_WITHOUT_OFFICE365:
        assert scenario.prometheus.series_count(name) == 0, (
            f"{name} exists now: drop it from the list"
        )


def test_scraped_values_match_the_mail_the_daemon_filed(scenario: Scenario) -> None:
    prometheus, auto, manual = scenario.prometheus, scenario.auto.address, scenario.manual.address
    job = 'job="emailsync"'
    assert prometheus.value(f"up{{{job}}}") == 1
    assert prometheus.value(f'emailsync_messages_synced_total{{mailbox="{auto}"}}') == 1
    assert prometheus.value(f'emailsync_messages_received_total{{mailbox="{auto}"}}') == 2
    # The default metrics_detail ("summary"): Failed reasons folded per mailbox, passes by
    # trigger summed over the mailboxes, the state gauge only for the current state.
    assert prometheus.value(f'emailsync_messages_failed_total{{mailbox="{auto}"}}') == 1
    assert prometheus.value(f'emailsync_queue_messages{{mailbox="{manual}"}}') == 1
    assert prometheus.value(f'emailsync_queue_messages{{mailbox="{auto}"}}') == 0
    assert prometheus.value(f'emailsync_messages_received_total{{mailbox="{manual}"}}') == 0
    for mailbox in (auto, manual):
        assert (
            prometheus.value(f'emailsync_mailbox_state{{mailbox="{mailbox}", state="idle"}}') == 1
        )
        assert prometheus.value(f'count(emailsync_mailbox_state{{mailbox="{mailbox}"}})') == 1
    # Only auto's: a mailbox with trigger = "manual" runs no pass at start.
    assert prometheus.value(f'emailsync_sync_passes_total{{{job}, trigger="startup"}}') == 1
    assert prometheus.query('emailsync_sync_pass_seconds_count{mailbox!=""}') == []
    # What issue 23 asked: at most 12 series a mailbox (62 at the "mailbox" detail).
    per_mailbox = 'max(count by (mailbox) ({__name__=~"emailsync_.+", mailbox!=""}))'
    assert prometheus.value(per_mailbox) <= 12
    assert prometheus.value(f"emailsync_filing_latency_seconds_count{{{job}}}") == 4
    assert prometheus.value(f"emailsync_build_info{{{job}}}") == 1
    assert prometheus.value(f"emailsync_crm_up{{{job}}}") == 1
    assert prometheus.value(f'emailsync_crm_cache_total{{{job}, result="miss"}}') >= 1
    # The recording rules, evaluated by Prometheus itself.
    assert prometheus.value(f"emailsync:queue_messages:sum{{{job}}}") == 1
    assert prometheus.value(f'emailsync:mailbox_state:sum{{{job}, state="idle"}}') == 2
    received_rate = f'emailsync:messages_filed:rate5m{{mailbox="{auto}", outcome="received"}}'
    assert prometheus.value(received_rate) > 0
    # A healthy daemon trips no alert, not even as pending.
    assert prometheus.query("ALERTS") == []


def test_promtool_check_metrics_accepts_the_daemons_exposition(scenario: Scenario) -> None:
    status, body = scenario.daemon.get("/metrics", token=None)
    assert status == 200
    result = subprocess.run(
        [str(PROMTOOL), "check", "metrics"], input=body, capture_output=True, check=False
    )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    assert output.strip() == "", output
