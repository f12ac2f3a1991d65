-- 006 (issue 22): Failed mail comes back by itself when its group appears.

-- Each message filed to Failed for want of a group ($EmailSyncNoGroup), once per counterpart
-- address. uidvalidity and uid are Failed's, from the MOVE's COPYUID (RFC 4315); both 0 when
-- the server gave none (a scan of that Failed finds the message). due: the id of the newest
-- link change of the address that the message has not been looked at for; NULL: none.
CREATE TABLE failed_index (
    mailbox     TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid         INTEGER NOT NULL,
    address     TEXT NOT NULL,
    message_key TEXT NOT NULL,
    due         INTEGER,
    PRIMARY KEY (mailbox, uidvalidity, uid, address, message_key)
) WITHOUT ROWID;

-- A link change touches only the rows of its addresses; owners look for their due rows.
CREATE INDEX failed_index_by_address ON failed_index (address, mailbox);
CREATE INDEX failed_index_due ON failed_index (mailbox, due) WHERE due IS NOT NULL;

-- The Failed folders whose no-group mail is all in the index, with the UIDVALIDITY it was
-- scanned under. A mailbox without a row (never scanned, or its Failed was replaced) is
-- scanned (SEARCH KEYWORD $EmailSyncNoGroup) the next time it is due or logs in.
CREATE TABLE failed_folders (
    mailbox     TEXT PRIMARY KEY,
    uidvalidity INTEGER NOT NULL,
    scanned_at  REAL NOT NULL             -- Unix time
);

-- Every change of an address's group links (groups add/import, a CRM's groups:changed call,
-- the periodic check), kept a day. AUTOINCREMENT: an id is never used twice, even after
-- pruning, so "every change after id n" stays true for a reader that saw n.
CREATE TABLE link_changes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    address    TEXT NOT NULL,
    trigger    TEXT NOT NULL CHECK (trigger IN ('link_change', 'periodic')),
    changed_at REAL NOT NULL              -- Unix time
);

CREATE INDEX link_changes_by_address ON link_changes (address, id);
CREATE INDEX link_changes_by_changed_at ON link_changes (changed_at);
