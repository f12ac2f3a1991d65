-- 004 (issue 19): what an event says about its text and about each mailbox that filed it.

-- body_truncated: body_text is not the whole text (cut at 100,000 characters, or a fetch
-- brought only part of it). Events recorded before ended body_text with the mark
-- "\n[… truncated]" instead: they are flagged, and their text is left as it was.
ALTER TABLE timeline_events ADD COLUMN body_truncated boolean NOT NULL DEFAULT false;
UPDATE timeline_events SET body_truncated = true
    WHERE right(body_text, 14) = E'\n[… truncated]';

-- The direction seen from each mailbox that filed the event: one message is outbound in
-- its sender's mailbox and inbound in its recipient's. For rows recorded before, it is
-- known only for the mailbox that filed first (timeline_events.direction); the others stay
-- NULL until they file the message again.
ALTER TABLE event_mailboxes
    ADD COLUMN direction text CHECK (direction IN ('outbound', 'inbound'));
UPDATE event_mailboxes AS m SET direction = e.direction
    FROM timeline_events AS e
    WHERE e.id = m.event_id AND e.mailbox = m.mailbox;
