-- 002: branches and mailboxes registered at run time (the API and the self-service pages),
-- beside the read-only ones of the TOML config. A password is stored only AES-GCM encrypted
-- (emailsync.state.vault); Stop Email Sync sets it to NULL and the store runs with secure_delete,
-- so the ciphertext does not linger in free pages.

CREATE TABLE registered_branches (
    name       TEXT PRIMARY KEY CHECK (name <> ''),
    host       TEXT NOT NULL CHECK (host <> ''),
    port       INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    security   TEXT NOT NULL CHECK (security IN ('ssl', 'starttls', 'none')),
    ca_file    TEXT,
    updated_at TEXT NOT NULL
);

-- address is normalised (emailsync.mail.address.normalise_address). secret is NULL once stopped.
CREATE TABLE registered_mailboxes (
    address    TEXT PRIMARY KEY CHECK (address <> ''),
    branch     TEXT NOT NULL,
    auth       TEXT NOT NULL CHECK (auth IN ('password', 'office365')),
    username   TEXT NOT NULL,
    secret     BLOB,
    stopped    INTEGER NOT NULL DEFAULT 0 CHECK (stopped IN (0, 1)),
    updated_at TEXT NOT NULL
);
