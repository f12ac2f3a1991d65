"""IMAP adapters: the only package that imports imapclient.

``session`` is one logged-in connection (select, fetch, move, IDLE), ``bodyfetch`` plans and
reads the FETCHes of message bodies, ``moves`` the COPY fallback and COPYUID of filing, and
``pipeline`` the rule for what may be sent behind an unanswered MOVE; ``fetch`` reads
pipelined FETCH answers; ``structure`` reads BODYSTRUCTURE; ``folders`` creates and finds the
Rezi-Imported folders; ``idle`` is RFC 2177 IDLE; ``auth`` logs in (a password, or
``office365``: XOAUTH2 via MSAL, over ``idpsession``'s HTTP session, with caches in
``tokencache``; ``loginerror`` sorts refusals); ``translate`` maps library errors onto
``emailsync.errors``.

May import: ``emailsync.mail``, ``emailsync.config`` and below.
"""
