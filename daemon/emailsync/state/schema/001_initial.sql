-- 001: groups, their addresses, timeline events and the mailboxes that filed each event.
-- Applied by emailsync.state.sqlite inside one transaction; PRAGMA user_version is set by the
-- runner, not here. Datetimes are ISO 8601 text in UTC with microseconds, so text order is
-- time order.

CREATE TABLE groups (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE CHECK (name <> '')
);

-- Addresses are stored normalised (emailsync.mail.address.normalise_address). One address may be
-- linked to several groups.
CREATE TABLE group_addresses (
    group_id INTEGER NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    address  TEXT NOT NULL CHECK (address <> ''),
    PRIMARY KEY (group_id, address)
) WITHOUT ROWID;

-- groups_for_addresses looks up by address on every filed message.
CREATE INDEX group_addresses_by_address ON group_addresses (address, group_id);

-- One row per (group, message key): the idempotency key of DESIGN.md §1.
CREATE TABLE timeline_events (
    id          INTEGER PRIMARY KEY,
    group_id    INTEGER NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    message_key TEXT NOT NULL,
    direction   TEXT NOT NULL CHECK (direction IN ('outbound', 'inbound')),
    mailbox     TEXT NOT NULL,          -- the mailbox that filed it first
    message_id  TEXT,
    subject     TEXT NOT NULL,
    from_       TEXT NOT NULL,
    to_         TEXT NOT NULL,
    cc          TEXT NOT NULL,
    date        TEXT,                   -- Date header (else INTERNALDATE), UTC
    body_text   TEXT NOT NULL,
    attachments TEXT NOT NULL DEFAULT '[]',  -- JSON list of {filename, content_type, size}
    size        INTEGER NOT NULL,
    filed_at    TEXT NOT NULL,          -- UTC
    UNIQUE (group_id, message_key)
);

-- The timeline is read newest filed first, overall or per group.
CREATE INDEX timeline_events_by_filed_at ON timeline_events (filed_at, id);
CREATE INDEX timeline_events_by_group_filed_at ON timeline_events (group_id, filed_at, id);

-- Every mailbox that queued the message (the same mail in two agents' Queues: one event).
CREATE TABLE event_mailboxes (
    event_id INTEGER NOT NULL REFERENCES timeline_events (id) ON DELETE CASCADE,
    mailbox  TEXT NOT NULL,
    PRIMARY KEY (event_id, mailbox)
) WITHOUT ROWID;

CREATE INDEX event_mailboxes_by_mailbox ON event_mailboxes (mailbox, event_id);
