"""The running daemon's moving parts: a worker per mailbox and the services around them.

``worker`` (one thread and one IMAP connection a mailbox; ``backoff``, ``clock``, ``wakeup``,
``report`` and ``connectgate`` serve it), ``workerpool`` (their lifecycle), ``registrar``
(self-service set-up and Stop), ``signins`` (Office 365 browser sign-ins), ``throttle``
(refused-login budget) and ``linkwatch`` (re-file wake-ups after link changes).

May import: ``emailsync.cluster``, ``emailsync.filing`` and below. Not ``web`` or ``service``.
"""
