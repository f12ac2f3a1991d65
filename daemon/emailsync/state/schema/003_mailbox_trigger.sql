-- 003: a registered mailbox's trigger, chosen at First Time Setup (the page or the API):
-- auto files mail as soon as it lands in Queue, manual only on Start Sync. Mailboxes
-- registered before this ran as auto, so that is the default.

ALTER TABLE registered_mailboxes
    ADD COLUMN trigger TEXT NOT NULL DEFAULT 'auto' CHECK (trigger IN ('auto', 'manual'));
