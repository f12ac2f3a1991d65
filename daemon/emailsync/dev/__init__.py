"""Throwaway servers and the demo: for ``make demo``, the tests and the benchmarks only.

``dovecot`` (a local Dovecot), ``postgres`` (a local PostgreSQL cluster), ``crm`` (the
reference CRM), ``net`` (free ports, waiting on one, stopping a process) and ``demo``.

May import: the daemon's layers. Nothing in the daemon imports it (only ``cli`` for
``emailsync demo``).
"""
