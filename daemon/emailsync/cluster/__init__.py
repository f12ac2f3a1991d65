"""Several instances over one PostgreSQL: leases with fencing, and Start Sync across them.

``lease`` is the lease table and the ``LeaseKeeper``; ``membership`` is one daemon's part
of a cluster (its keeper, notifications, forwarding Start Sync to a lease holder).

May import: ``emailsync.state``, ``emailsync.telemetry`` and below.
"""
