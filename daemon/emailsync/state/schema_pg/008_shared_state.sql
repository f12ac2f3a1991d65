-- 008 (issue 20): the rest of emailsync's own state in the shared database, the same tables
-- as the built-in store's schema/002, 003 and 007: branches and mailboxes registered at run
-- time, Stop Email Sync, page sessions, Office 365 sign-ins under way, token caches, the key
-- check and the per-mailbox locks. Column types match the SQLite ones (times as Unix seconds
-- or ISO text, flags as 0/1), so that every statement is written once for both.

CREATE TABLE registered_branches (
    name       text PRIMARY KEY CHECK (name <> ''),
    host       text NOT NULL CHECK (host <> ''),
    port       integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    security   text NOT NULL CHECK (security IN ('ssl', 'starttls', 'none')),
    ca_file    text,
    updated_at text NOT NULL
);

-- address is normalised. secret (vault) is NULL once stopped.
CREATE TABLE registered_mailboxes (
    address    text PRIMARY KEY CHECK (address <> ''),
    branch     text NOT NULL,
    auth       text NOT NULL CHECK (auth IN ('password', 'office365')),
    username   text NOT NULL,
    secret     bytea,
    stopped    integer NOT NULL DEFAULT 0 CHECK (stopped IN (0, 1)),
    updated_at text NOT NULL,
    trigger    text NOT NULL DEFAULT 'auto' CHECK (trigger IN ('auto', 'manual'))
);

CREATE TABLE mailbox_stops (
    address    text PRIMARY KEY CHECK (address <> ''),
    stopped_at double precision NOT NULL
);

CREATE TABLE page_sessions (
    id         text PRIMARY KEY CHECK (id <> ''),
    principal  text NOT NULL,
    token      bytea NOT NULL,
    csrf       text NOT NULL,
    messages   text NOT NULL DEFAULT '{}',
    created_at double precision NOT NULL,
    expires_at double precision NOT NULL
);

CREATE INDEX page_sessions_by_expiry ON page_sessions (expires_at);

CREATE TABLE signin_flows (
    state      text PRIMARY KEY CHECK (state <> ''),
    address    text NOT NULL CHECK (address <> ''),
    flow       bytea NOT NULL,
    expires_at double precision NOT NULL
);

CREATE TABLE token_caches (
    address    text PRIMARY KEY CHECK (address <> ''),
    cache      bytea NOT NULL,
    updated_at double precision NOT NULL
);

CREATE TABLE state_meta (
    name  text PRIMARY KEY CHECK (name <> ''),
    value bytea NOT NULL
);

CREATE TABLE mailbox_locks (
    address text PRIMARY KEY CHECK (address <> '')
);
