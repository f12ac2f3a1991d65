-- 002: several instances share the mailboxes (issue 11). All times come from the database's
-- clock (now()), so instances on hosts whose clocks disagree still agree on expiry.

-- Live instances: each renews its row on every heartbeat; one past expires_at is gone.
CREATE TABLE cluster_instances (
    instance_id  text PRIMARY KEY CHECK (instance_id <> ''),
    heartbeat_at timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL
);

-- One row per mailbox any instance was configured with. owner NULL: free. generation is
-- the fencing token: it grows whenever the mailbox changes hands (or is re-claimed), and
-- every write for the mailbox must carry the current one (emailsync.cluster.lease).
CREATE TABLE mailbox_leases (
    mailbox     text PRIMARY KEY CHECK (mailbox <> ''),
    owner       text,
    generation  bigint NOT NULL DEFAULT 0,
    expires_at  timestamptz NOT NULL DEFAULT '-infinity',
    acquired_at timestamptz
);

CREATE INDEX mailbox_leases_by_owner ON mailbox_leases (owner, mailbox);
