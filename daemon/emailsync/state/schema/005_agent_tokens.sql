-- 005 (issue 19): every agent token issued, so that IT can list them and revoke one at a time
-- (emailsync.state.agenttoken). The token itself is never stored: its id, carried in it and covered
-- by its MAC, names the row. A token whose id has no row is refused.
-- Times are ISO 8601 UTC text, like the other tables.
CREATE TABLE agent_tokens (
    id           TEXT PRIMARY KEY CHECK (id <> ''),
    address      TEXT NOT NULL CHECK (address <> ''),   -- normalised
    issued_at    TEXT,           -- NULL: the row standing for a mailbox's es1 tokens
    issued_by    TEXT NOT NULL,  -- cli:USER, api, page, es1
    expires_at   TEXT,           -- NULL: no expiry
    last_used_at TEXT,           -- written at most once a minute per token and process
    revoked_at   TEXT
);

CREATE INDEX agent_tokens_by_address ON agent_tokens (address);
