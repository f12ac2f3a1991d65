"""The daemon process: the supervisor that assembles workers, cluster, listener and jobs.

``supervisor`` runs the main loop, reload, signals, scheduled jobs and systemd notify, and
builds the listener (``emailsync.web``) on the runtime it owns.

May import: everything except ``emailsync.cli``, ``emailsync.ops`` and ``emailsync.dev``.
"""
