-- Every failed attempt at an event, for its timeline (the ops console's event page): when,
-- which attempt, what went wrong, and where the message went next. `stripe_events` keeps
-- only an event's latest state.
CREATE TABLE stripe_event_attempts (
    id           bigserial PRIMARY KEY,
    event_id     text NOT NULL,
    attempt      integer NOT NULL CHECK (attempt >= 1),
    -- `retrying` (a copy waits in a delay queue until retry_due_at) or `dead`.
    outcome      text NOT NULL CHECK (outcome IN ('retrying', 'dead')),
    error        text NOT NULL,
    retry_due_at timestamptz NULL,
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_event_attempts_event_idx ON stripe_event_attempts (event_id, at);
