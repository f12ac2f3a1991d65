"""IMAP adapters: the only package that imports imapclient.

``session`` is one logged-in connection (select, fetch, move, IDLE) and ``pipeline`` the rule
for what may be sent behind an unanswered MOVE; ``fetch`` reads pipelined FETCH answers;
``structure`` reads BODYSTRUCTURE; ``folders`` creates and finds the Rezi-Imported folders;
``idle`` is RFC 2177 IDLE; ``auth`` logs in (password, XOAUTH2 via MSAL, whose caches live in
``tokencache``); ``translate`` maps library errors onto ``emailsync.errors``.

May import: ``emailsync.mail``, ``emailsync.config`` and below.
"""
