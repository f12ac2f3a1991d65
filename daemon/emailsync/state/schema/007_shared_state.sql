-- 007 (issue 20): the rest of emailsync's own state moves into the state database, so that
-- every instance of a cluster (schema_pg/008 has the same tables) and every restart sees it.
-- Times here are Unix seconds (REAL) and flags 0/1 INTEGERs, so that one statement serves
-- SQLite and PostgreSQL alike. Blobs marked "vault" are AES-GCM encrypted (emailsync.state.vault).

-- Stop Email Sync of a mailbox of the config file (a registered one has its own `stopped`):
-- it stays stopped, on every instance, until it is set up again.
CREATE TABLE mailbox_stops (
    address    TEXT PRIMARY KEY CHECK (address <> ''),   -- normalised
    stopped_at REAL NOT NULL
);

-- Logged-in page sessions. id: SHA-256 (hex) of the cookie's session id, never the id itself.
-- principal: '' for the admin, else the agent's normalised address. token: vault, what the
-- visitor logged in with (checked again on every request, so a revoked token ends it).
CREATE TABLE page_sessions (
    id         TEXT PRIMARY KEY CHECK (id <> ''),
    principal  TEXT NOT NULL,
    token      BLOB NOT NULL,
    csrf       TEXT NOT NULL,
    messages   TEXT NOT NULL DEFAULT '{}',               -- one-shot notices, JSON
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);

CREATE INDEX page_sessions_by_expiry ON page_sessions (expires_at);

-- Office 365 browser sign-ins under way, by OAuth state (single use, 10 minutes).
-- flow: vault, MSAL's flow (PKCE verifier, nonce) as JSON.
CREATE TABLE signin_flows (
    state      TEXT PRIMARY KEY CHECK (state <> ''),
    address    TEXT NOT NULL CHECK (address <> ''),
    flow       BLOB NOT NULL,
    expires_at REAL NOT NULL
);

-- MSAL token caches (refresh tokens) of delegated Office 365 mailboxes, when the state is
-- shared. cache: vault.
CREATE TABLE token_caches (
    address    TEXT PRIMARY KEY CHECK (address <> ''),
    cache      BLOB NOT NULL,
    updated_at REAL NOT NULL
);

-- Small named values of the state database. 'key_check': an AEAD of a constant under the
-- registry key's current generation, so an instance holding another key refuses to start.
CREATE TABLE state_meta (
    name  TEXT PRIMARY KEY CHECK (name <> ''),
    value BLOB NOT NULL
);

-- One row per mailbox ever set up, forgotten or signed in; set-up, forget and a sign-in's
-- finish of one mailbox lock its row, so they never interleave.
CREATE TABLE mailbox_locks (
    address TEXT PRIMARY KEY CHECK (address <> '')
);
