"""Filing a mailbox's Queue: the pass that records events then moves, and re-filing Failed.

``queuepass`` is one sync pass over Queue (the batch pipeline: decide, record idempotently,
move); ``decision`` what it decides and counts for each message; ``sessions`` the protocols of
what it asks of a connection (it imports no IMAP library); ``refile`` brings
Failed-for-no-group mail back when its group appears.

May import: ``emailsync.imap``, ``emailsync.state``, ``emailsync.timeline``, ``emailsync.mail``
and below. The runtime calls it; its only threads are the shared recorders a backlog's
batches are recorded on (``queuepass.RECORDER_THREADS``).
"""
