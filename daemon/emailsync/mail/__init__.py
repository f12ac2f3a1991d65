"""Mail as bytes and addresses: parsing, the text body, direction. No IMAP, no database.

``address`` normalises addresses; ``message`` turns raw bytes into a ``QueuedMessage``
(never raising on bad mail); ``htmltext`` renders HTML bodies as text; ``classify`` decides
a message's direction and counterparts as seen from the mailbox owner.

May import: ``emailsync.model`` and ``emailsync.errors`` only.
"""
