-- 005: a Start Sync owed to a mailbox travels with its lease (issue 19 #17). The publisher
-- marks the lease rows of the mailboxes it asks for (the id of its start_sync_requests row,
-- include_stuck or-ed in); the owner that hands the request to its worker clears the mark,
-- and whoever claims the lease next serves a mark still there. So a request published while
-- the mailbox passes between owners (handed back, its owner dead or paused) is not lost, and
-- neither is its include_stuck.
ALTER TABLE mailbox_leases
    ADD COLUMN owed_request       bigint,                          -- NULL: nothing owed
    ADD COLUMN owed_include_stuck boolean NOT NULL DEFAULT false;
