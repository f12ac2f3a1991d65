-- 003: Start Sync requests are rows, NOTIFY only wakes the owner up (emailsync.cluster.membership).
-- A notification sent while an instance's LISTEN connection is down reaches nobody; the row
-- does: on every (re)connect each instance reads the requests it missed for the mailboxes
-- it owns. Publishers hold an advisory lock while they insert, so ids commit in order and
-- "every id above the last one seen" is exactly what a listener missed. Rows older than a
-- day are pruned by the publishers.
CREATE TABLE start_sync_requests (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mailbox       text CHECK (mailbox <> ''),   -- NULL: every mailbox
    include_stuck boolean NOT NULL,
    sender        text NOT NULL,                -- the publishing instance (it acts itself)
    requested_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX start_sync_requests_by_requested_at ON start_sync_requests (requested_at);
