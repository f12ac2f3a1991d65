"""Filing a mailbox's Queue: the pass that records events then moves, and re-filing Failed.

``queuepass`` is one sync pass over Queue (decide, record idempotently, move);
``refile`` brings Failed-for-no-group mail back when its group appears.

May import: ``emailsync.imap``, ``emailsync.state``, ``emailsync.timeline``, ``emailsync.mail``
and below. Nothing here starts threads: the runtime calls it.
"""
