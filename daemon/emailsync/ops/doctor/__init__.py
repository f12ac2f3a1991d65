"""`emailsync doctor ADDRESS`: log in as the daemon would and report what matters, one line each.

Every line that is not ``ok`` names its fix. The IDLE probe needs a scratch folder in the
mailbox (``emailsync-doctor-<UTC start>-<random>``); doctor deletes it when done, on SIGTERM
and SIGINT too (from a fresh connection: the old one may be halfway through a command), and
each run deletes the scratch folders earlier runs left (SIGKILL, a lost connection).

``run`` is one run (``diagnose``) and calls the rest: ``finding`` (a report line, the exit
code), ``connection`` (what answers on the port, TLS), ``login`` (refused logins, failures
after), ``server`` (which server, its capabilities), ``scratch`` (the probe's folder and
leftovers), ``idle`` (the IDLE probe) and ``stop`` (SIGTERM and SIGINT). The verdicts are pure
functions, unit-tested without a server.
"""

from emailsync.ops.doctor.connection import (
    CERT_WARN_DAYS,
    PortAnswer,
    connection_verdict,
    knock,
    tls_verdict,
)
from emailsync.ops.doctor.finding import NOTE, OK, PROBLEM, Finding, exit_code
from emailsync.ops.doctor.idle import (
    IDLE_PROBE_TIMEOUT_SECONDS,
    IDLE_PROBES,
    SLOW_IDLE_SECONDS,
    idle_delays,
    idle_verdict,
)
from emailsync.ops.doctor.login import login_verdict, midway_verdict
from emailsync.ops.doctor.run import diagnose
from emailsync.ops.doctor.scratch import (
    SCRATCH_PREFIX,
    SCRATCH_STALE_SECONDS,
    leftovers_finding,
    scratch_leaf,
    sort_scratch_folders,
    stopped_finding,
)
from emailsync.ops.doctor.server import capability_findings, server_software
from emailsync.ops.doctor.stop import STOP_SIGNALS

__all__ = [
    "CERT_WARN_DAYS",
    "IDLE_PROBES",
    "IDLE_PROBE_TIMEOUT_SECONDS",
    "NOTE",
    "OK",
    "PROBLEM",
    "SCRATCH_PREFIX",
    "SCRATCH_STALE_SECONDS",
    "SLOW_IDLE_SECONDS",
    "STOP_SIGNALS",
    "Finding",
    "PortAnswer",
    "capability_findings",
    "connection_verdict",
    "diagnose",
    "exit_code",
    "idle_delays",
    "idle_verdict",
    "knock",
    "leftovers_finding",
    "login_verdict",
    "midway_verdict",
    "scratch_leaf",
    "server_software",
    "sort_scratch_folders",
    "stopped_finding",
    "tls_verdict",
]
