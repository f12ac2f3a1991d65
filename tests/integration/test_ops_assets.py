"""The ops assets (systemd units, Prometheus rules, Grafana dashboard) pass their tools' checks.

Needs Debian's `prometheus` (promtool) and `systemd` (systemd-analyze, systemd-sysusers,
systemd-tmpfiles); a check is skipped only when its binary is not installed. Nothing here needs
a running systemd or Prometheus.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from emailsync.telemetry.metrics import ClusterMetrics, CrmMetrics, Metrics

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO / "systemd"
UNITS = (SYSTEMD_DIR / "emailsync.service", SYSTEMD_DIR / "emailsync@.service")
PROMETHEUS_DIR = REPO / "metrics" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
RULES = PROMETHEUS_DIR / "rules.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
DASHBOARD = REPO / "metrics" / "grafana" / "emailsync.json"

MAX_EXPOSURE = 2.0


def registry_series() -> dict[str, frozenset[str]]:
    """Every metric family of the daemon's real registry → the series names it exposes.

    Built from `emailsync.telemetry.metrics.Metrics` (and `CrmMetrics`, which daemons with a `[crm]`
    register, and `ClusterMetrics`, which daemons with a PostgreSQL store register) with one
    mailbox initialised, so the names cannot drift from the code. Labelled metrics with no
    child yet (sync pass histogram, last sync, token expiry) expose no samples, so each
    family's type adds the names Prometheus would see once it has one: counters
    `_total`/`_created`, histograms `_bucket`/`_sum`/`_count`/`_created`.
    """
    metrics = Metrics(CollectorRegistry())
    CrmMetrics(metrics.registry)  # registered by daemons with a [crm]
    ClusterMetrics(metrics.registry)  # registered by daemons with a postgresql:// store
    metrics.init_mailbox("x@example.com")
    metrics.set_state("x@example.com", "idle")
    return {
        family.name: frozenset(
            {sample.name for sample in family.samples} | series_names(family.name, family.type)
        )
        for family in metrics.registry.collect()
    }


# Series from Prometheus itself that the assets may use.
STANDARD_SERIES = frozenset({"up"})

_PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
# What `referenced_metric_names` blanks, in order, before it reads identifiers: strings,
# Grafana variables, label matchers, ranges and grouping clauses.
_BLANKED = (
    (_STRING, '""'),
    (_GRAFANA_VARIABLE, ""),
    (re.compile(r"\{[^{}]*\}"), ""),
    (re.compile(r"\[[^\[\]]*\]"), ""),
    (re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)"), ""),
)
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<metric>.*),)?\s*(?P<label>\w+)\s*\)\s*$")


def series_names(name: str, metric_type: str) -> set[str]:
    """The series names a metric family exposes in the text format, as Prometheus stores them."""
    base = name.removesuffix("_total")
    if metric_type == "counter":
        return {f"{base}_total", f"{base}_created"}
    if metric_type == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
    if metric_type == "summary":
        return {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
    return {name}


# Metric family → series names, straight from the daemon's registry.
DOCUMENTED_METRICS: dict[str, frozenset[str]] = registry_series()


def documented_series_names() -> set[str]:
    """Every series name the daemon's registry exposes, plus Prometheus' standard `up`."""
    return set(STANDARD_SERIES).union(*DOCUMENTED_METRICS.values())


def referenced_metric_names(expr: str) -> set[str]:
    """Metric (and recording-rule) names a PromQL expression selects.

    Strips strings, Grafana variables, label matchers, ranges and grouping clauses; what is
    left as a bare identifier (not a function call, not a keyword) is a metric name.
    """
    text = expr
    for pattern, replacement in _BLANKED:
        text = pattern.sub(replacement, text)
    return {
        match.group(1)
        for match in _IDENTIFIER.finditer(text)
        if match.group(2) is None and match.group(1).lower() not in _PROMQL_KEYWORDS
    }


def rule_file_entries(path: Path, key: str) -> list[str]:
    """The values of `key:` (`expr`, `record`, `alert`) in a rule file, in order.

    A small reader for the subset of YAML our rule files use (plain one-line values and `|`
    blocks), so the tests need no YAML library; anything else fails loudly, and the expr
    count is cross-checked against promtool's own rule count.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    pattern = re.compile(rf"^(?P<indent>\s*)(?:- )?{key}:\s*(?P<value>.*)$")
    values = []
    for number, line in enumerate(lines):
        match = pattern.match(line)
        if not match:
            continue
        value = match.group("value").strip()
        if value in {"|", "|-"}:
            key_indent = len(match.group("indent"))
            block = []
            for following in lines[number + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= key_indent:
                    break
                block.append(following.strip())
            values.append(" ".join(part for part in block if part))
        elif value[:1] in {">", "'", '"', "&", "*", "!"}:
            pytest.fail(f"{path.name}:{number + 1}: unsupported YAML form for {key}: {value}")
        else:
            values.append(value)
    return values


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_exprs() -> list[str]:
    """The `expr` of every dashboard panel target."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        target["expr"]
        for panel in dashboard_panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def run(*argv: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run a tool and capture its output as text."""
    return subprocess.run(
        [str(arg) for arg in argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
    )


def require(binary: str) -> str:
    """The path of an installed binary; skip the test when it is not installed."""
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed")
    return path


def unit_settings(path: Path, section: str) -> list[tuple[str, str]]:
    """The (key, value) assignments of one section of a unit file, in order."""
    settings, current = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            settings.append((key.strip(), value.strip()))
    return settings


def verifiable_copy(unit: Path, directory: Path) -> Path:
    """A copy of `unit` whose ExecStart binary exists, for `systemd-analyze verify`.

    verify insists that ExecStart's binary exists and is executable, and /usr/bin/emailsync is
    not installed on a build host, so the copy points at an executable stub instead; every
    other line is untouched.
    """
    stub = directory / "emailsync"
    stub.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stub.chmod(0o755)
    text, count = re.subn(
        r"^ExecStart=/usr/bin/emailsync ",
        f"ExecStart={stub} ",
        unit.read_text(encoding="utf-8"),
        flags=re.MULTILINE,
    )
    assert count == 1, f"{unit.name} must have one ExecStart=/usr/bin/emailsync line"
    copy = directory / unit.name
    copy.write_text(text, encoding="utf-8")
    return copy


# --- Prometheus -----------------------------------------------------------------------------


def test_alert_and_recording_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts alerts.yml and rules.yml (syntax, PromQL, lint)."""
    promtool = require("promtool")
    result = run(promtool, "check", "rules", ALERTS, RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass_promtool_test() -> None:
    """`promtool test rules` passes every case in alerts_test.yml."""
    promtool = require("promtool")
    result = run(promtool, "test", "rules", ALERTS_TEST)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_file_reader_finds_every_rule_promtool_counts() -> None:
    """The expressions the name checks read are all of them: as many as promtool counts."""
    promtool = require("promtool")
    for path in (ALERTS, RULES):
        result = run(promtool, "check", "rules", path)
        counted = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
        assert counted, result.stdout + result.stderr
        assert len(rule_file_entries(path, "expr")) == int(counted.group(1))


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    """alerts_test.yml shows each alert both firing and not firing."""
    tests = ALERTS_TEST.read_text(encoding="utf-8")
    for alert in rule_file_entries(ALERTS, "alert"):
        silent = re.search(rf"alertname: {alert}\n\s*exp_alerts: \[\]", tests)
        firing = re.search(rf"alertname: {alert}\n\s*exp_alerts:\n\s*- exp_labels:", tests)
        assert silent, f"no case where {alert} stays silent"
        assert firing, f"no case where {alert} fires"


def test_every_alert_has_severity_summary_and_description() -> None:
    """Each alert carries a severity label and summary/description annotations."""
    text = ALERTS.read_text(encoding="utf-8")
    chunks = re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]
    assert chunks
    for chunk in chunks:
        name = chunk.split("\n", 1)[0]
        assert re.search(r"^\s*severity: (critical|warning)$", chunk, re.MULTILINE), name
        assert re.search(r"^\s*summary: ", chunk, re.MULTILINE), name
        assert re.search(r"^\s*description: ", chunk, re.MULTILINE), name


def test_documented_series_are_the_registrys_with_prometheus_suffixes() -> None:
    """The allowed names come from the real registry, suffixed as Prometheus stores them."""
    names = documented_series_names()
    assert {
        "up",
        "emailsync_messages_synced_total",
        "emailsync_messages_synced_created",
        "emailsync_sync_pass_seconds_bucket",
        "emailsync_sync_pass_seconds_sum",
        "emailsync_sync_pass_seconds_count",
        "emailsync_mailbox_state",
        "emailsync_last_sync_timestamp_seconds",
        "emailsync_token_expiry_timestamp_seconds",
    } <= names
    # A counter's family name is not a series; neither is a histogram's.
    assert not {"emailsync_messages_synced", "emailsync_sync_pass_seconds"} & names


def test_rules_reference_only_documented_metrics_and_defined_recording_rules() -> None:
    """Alert and recording expressions use documented metrics or our own recorded series."""
    allowed = documented_series_names() | set(rule_file_entries(RULES, "record"))
    for path in (ALERTS, RULES):
        for expr in rule_file_entries(path, "expr"):
            unknown = referenced_metric_names(expr) - allowed
            assert not unknown, f"{path.name}: {sorted(unknown)} in {expr!r}"


def test_referenced_metric_names_ignores_functions_labels_and_variables() -> None:
    """The name parser returns metrics only, not functions, labels, keywords or durations."""
    expr = (
        "histogram_quantile(0.95, sum by (le, mailbox) (rate(emailsync_sync_pass_seconds_bucket"
        '{instance=~"$instance", mailbox=~"a{b}"}[$__rate_interval]))) > 1e3 '
        "unless on (mailbox) emailsync:queue_messages:sum offset 5m "
        "and time() - up{job='emailsync'} * Inf"
    )
    assert referenced_metric_names(expr) == {
        "emailsync_sync_pass_seconds_bucket",
        "emailsync:queue_messages:sum",
        "up",
    }


# --- Grafana --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    """The parsed Grafana dashboard."""
    parsed: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return parsed


def test_dashboard_has_datasource_and_mailbox_variables(dashboard: dict[str, Any]) -> None:
    """The dashboard picks its Prometheus data source and mailboxes by variables."""
    assert dashboard["schemaVersion"] >= 39
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    mailbox = variables["mailbox"]
    match = _LABEL_VALUES.match(mailbox["definition"])
    assert match
    assert match.group("label") == "mailbox"
    assert referenced_metric_names(match.group("metric")) == {"emailsync_mailbox_state"}


def test_dashboard_panels_use_the_datasource_variable_and_do_not_overlap(
    dashboard: dict[str, Any],
) -> None:
    """Every panel queries ${DS_PROMETHEUS}, has a unique id, and sits in its own grid cells."""
    panels = list(dashboard_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells


def test_dashboard_references_only_documented_metrics(dashboard: dict[str, Any]) -> None:
    """Panel and variable queries use documented metrics, `up` or our recording rules."""
    allowed = documented_series_names() | set(rule_file_entries(RULES, "record"))
    queries = list(dashboard_exprs())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = _LABEL_VALUES.match(variable["definition"])
            assert match, variable["definition"]
            queries.append(match.group("metric") or "")
    for expr in queries:
        unknown = referenced_metric_names(expr) - allowed
        assert not unknown, f"{sorted(unknown)} in {expr!r}"


def test_dashboard_shows_every_documented_metric() -> None:
    """No documented metric is left off the dashboard."""
    shown: set[str] = set()
    for expr in dashboard_exprs():
        shown |= referenced_metric_names(expr)
    for name, series in DOCUMENTED_METRICS.items():
        assert series & shown, f"{name} has no panel"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every panel query parses, checked by promtool as recording rules.

    Grafana's variables are replaced by what they expand to: intervals by a duration,
    others by a match-all regex (they only appear in `=~` matchers).
    """
    promtool = require("promtool")
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for number, expr in enumerate(dashboard_exprs()):
        concrete = re.sub(r"\$__\w*interval", "5m", expr)
        concrete = _GRAFANA_VARIABLE.sub(".*", concrete)
        lines.append(f"      - record: dashboard:query_{number}")
        lines.append(f"        expr: {json.dumps(concrete)}")
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run(promtool, "check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr


# --- systemd --------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a single warning."""
    analyze = require("systemd-analyze")
    result = run(analyze, "verify", verifiable_copy(unit, tmp_path))
    # verify exits 0 on unknown keys and bad values, only warning about them: demand silence.
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_unit_security_exposure_is_at_most_two(unit: Path) -> None:
    """`systemd-analyze security --offline=yes` rates the unit's exposure 2.0 or lower."""
    analyze = require("systemd-analyze")
    result = run(analyze, "security", "--offline=yes", "--no-pager", unit)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_instance_unit_has_the_same_hardening_as_the_main_unit() -> None:
    """emailsync@.service differs from emailsync.service only in its per-instance paths."""
    per_instance = {"ExecStart", "StateDirectory", "RuntimeDirectory", "LoadCredential"}
    main, instance = (
        [item for item in unit_settings(unit, "Service") if item[0] not in per_instance]
        for unit in UNITS
    )
    assert main == instance


def test_units_keep_the_daemon_contract() -> None:
    """Both units run the daemon as DESIGN §2 expects: notify, watchdog, reload, stop, 64, 78."""
    for unit in UNITS:
        settings = dict(unit_settings(unit, "Service"))
        assert settings["Type"] == "notify", unit.name
        assert settings["NotifyAccess"] == "main", unit.name
        assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID", unit.name
        assert settings["RestartPreventExitStatus"] == "64 78", unit.name
        # The daemon exits within 10 s of SIGTERM; systemd must wait longer than that.
        assert int(settings["TimeoutStopSec"]) > 10, unit.name
        assert settings["User"] == "emailsync", unit.name
        exec_start = settings["ExecStart"]
        assert exec_start.startswith("/usr/bin/emailsync --config /etc/emailsync/"), unit.name
        assert exec_start.endswith(".toml run"), unit.name
        # A thread per mailbox: 2,000 mailboxes, doubled while a reload overlaps old and new.
        assert int(settings["TasksMax"]) >= 2 * 2000, unit.name
        assert settings["MemoryMax"].endswith("G"), unit.name
        assert int(settings["MemoryHigh"][:-1]) < int(settings["MemoryMax"][:-1]), unit.name


def test_sysusers_and_tmpfiles_create_the_user_and_directories(tmp_path: Path) -> None:
    """systemd-sysusers and systemd-tmpfiles accept their files and create what the unit uses."""
    sysusers = require("systemd-sysusers")
    tmpfiles = require("systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    result = run(sysusers, f"--root={tmp_path}", SYSTEMD_DIR / "emailsync.sysusers")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^emailsync:x:\d+:\d+:", (tmp_path / "etc/passwd").read_text(), re.M)

    result = run(tmpfiles, f"--root={tmp_path}", "--create", SYSTEMD_DIR / "emailsync.tmpfiles")
    if os.geteuid() == 0:
        assert result.returncode == 0, result.stderr
    else:
        # Only root may chown; the files are still parsed and the directories made.
        problems = [
            line for line in result.stderr.splitlines() if "Operation not permitted" not in line
        ]
        assert not problems, result.stderr
    for directory, mode in (("var/lib/emailsync", 0o700), ("etc/emailsync", 0o750)):
        assert (tmp_path / directory).stat().st_mode & 0o777 == mode, directory
