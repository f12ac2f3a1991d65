-- 001: groups, their addresses, timeline events and the mailboxes that filed each event.
-- The PostgreSQL twin of schema/001_initial.sql: the same tables, keys and meaning, with
-- native types (timestamptz, jsonb). Applied by emailsync.state.postgres in one transaction
-- under an advisory lock; the runner records the version in emailsync_schema.

CREATE TABLE groups (
    id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE CHECK (name <> '')
);

-- Addresses are stored normalised (emailsync.mail.address.normalise_address).
CREATE TABLE group_addresses (
    group_id bigint NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    address  text NOT NULL CHECK (address <> ''),
    PRIMARY KEY (group_id, address)
);

CREATE INDEX group_addresses_by_address ON group_addresses (address, group_id);

-- One row per (group, message key): the idempotency key of DESIGN.md §1.
CREATE TABLE timeline_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    group_id    bigint NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    message_key text NOT NULL,
    direction   text NOT NULL CHECK (direction IN ('outbound', 'inbound')),
    mailbox     text NOT NULL,          -- the mailbox that filed it first
    message_id  text,
    subject     text NOT NULL,
    from_       text NOT NULL,
    to_         text NOT NULL,
    cc          text NOT NULL,
    date        timestamptz,            -- Date header (else INTERNALDATE)
    body_text   text NOT NULL,
    attachments jsonb NOT NULL DEFAULT '[]',  -- list of {filename, content_type, size}
    size        bigint NOT NULL,
    filed_at    timestamptz NOT NULL,
    UNIQUE (group_id, message_key)
);

CREATE INDEX timeline_events_by_filed_at ON timeline_events (filed_at, id);
CREATE INDEX timeline_events_by_group_filed_at ON timeline_events (group_id, filed_at, id);

-- Every mailbox that queued the message (the same mail in two agents' Queues: one event).
CREATE TABLE event_mailboxes (
    event_id bigint NOT NULL REFERENCES timeline_events (id) ON DELETE CASCADE,
    mailbox  text NOT NULL,
    PRIMARY KEY (event_id, mailbox)
);

CREATE INDEX event_mailboxes_by_mailbox ON event_mailboxes (mailbox, event_id);
