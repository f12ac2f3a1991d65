-- 006 (issue 19): every agent token issued, so that IT can list them and revoke one at a time
-- (emailsync.state.agenttoken). The token itself is never stored: its id, carried in it and covered
-- by its MAC, names the row. A token whose id has no row is refused. In the shared database,
-- so a revocation made on any host (CLI, API, IT page) holds on every instance at once.
CREATE TABLE agent_tokens (
    id           text PRIMARY KEY CHECK (id <> ''),
    address      text NOT NULL CHECK (address <> ''),   -- normalised
    issued_at    timestamptz,           -- NULL: the row standing for a mailbox's es1 tokens
    issued_by    text NOT NULL,         -- cli:USER, api, page, es1
    expires_at   timestamptz,           -- NULL: no expiry
    last_used_at timestamptz,           -- written at most once a minute per token and instance
    revoked_at   timestamptz
);

CREATE INDEX agent_tokens_by_address ON agent_tokens (address);
