"""Tools for the operator beside the daemon: doctor, generated docs, completion, progress.

``doctor`` logs in as the daemon would and reports each problem with its fix; ``docgen``
writes docs/configuration.md and docs/metrics.md from the code; ``completion`` generates
shell completions and the man page from a parser it is given; ``progress`` draws long runs.

May import: the daemon's layers (not ``emailsync.cli`` or ``emailsync.dev``).
"""
