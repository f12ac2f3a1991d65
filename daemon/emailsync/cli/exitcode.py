"""The exit codes every command returns (sysexits.h where one fits).

A usage error is 64 (EX_USAGE), not argparse's 2: the units list it in
RestartPreventExitStatus, since restarting cannot fix a command line.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 64  # EX_USAGE
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the server, the CRM or the daemon did not answer
EXIT_CONFIG = 78  # EX_CONFIG
