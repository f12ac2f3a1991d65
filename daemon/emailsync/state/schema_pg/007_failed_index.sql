-- 007 (issue 22): Failed mail comes back by itself when its group appears. The same tables
-- as the built-in store's schema/006 (emailsync.state.failedindex writes the SQL once).

-- Each message filed to Failed for want of a group, once per counterpart address; Failed's
-- uidvalidity and uid from COPYUID (0 and 0: not known, a scan finds it); due: the newest
-- link change of the address the message has not been looked at for (NULL: none).
CREATE TABLE failed_index (
    mailbox     text NOT NULL,
    uidvalidity bigint NOT NULL,
    uid         bigint NOT NULL,
    address     text NOT NULL,
    message_key text NOT NULL,
    due         bigint,
    PRIMARY KEY (mailbox, uidvalidity, uid, address, message_key)
);

CREATE INDEX failed_index_by_address ON failed_index (address, mailbox);
CREATE INDEX failed_index_due ON failed_index (mailbox, due) WHERE due IS NOT NULL;

-- The Failed folders whose no-group mail is all in the index, and the UIDVALIDITY scanned.
CREATE TABLE failed_folders (
    mailbox     text PRIMARY KEY,
    uidvalidity bigint NOT NULL,
    scanned_at  double precision NOT NULL   -- Unix time
);

-- Every change of an address's group links, kept a day. Writers hold an advisory lock while
-- they insert, so ids commit in order, and NOTIFY emailsync_links wakes every instance.
CREATE TABLE link_changes (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    address    text NOT NULL,
    trigger    text NOT NULL CHECK (trigger IN ('link_change', 'periodic')),
    changed_at double precision NOT NULL    -- Unix time
);

CREATE INDEX link_changes_by_address ON link_changes (address, id);
CREATE INDEX link_changes_by_changed_at ON link_changes (changed_at);
