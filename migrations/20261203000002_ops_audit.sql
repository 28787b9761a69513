-- The ops console: what operators did (replays, purges), and an index of the dead-letter
-- queue so that its pages stay fast with 100,000 dead letters.

-- Every console action, started and finished.
CREATE TABLE ops_audit (
    id          uuid PRIMARY KEY,
    token_name  text NOT NULL,
    action      text NOT NULL CHECK (action IN ('replay', 'purge')),
    filter      jsonb NOT NULL,
    matched     integer NULL CHECK (matched >= 0),
    count       integer NULL CHECK (count >= 0),
    failed      integer NULL CHECK (failed >= 0),
    outcome     text NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz NULL
);
CREATE INDEX ops_audit_started_idx ON ops_audit (started_at DESC, id DESC);

-- The dead letters an action replayed or purged, as they were: an event's page shows that
-- it was dead-lettered, why, and who replayed or purged it, after the message is gone.
CREATE TABLE ops_audit_events (
    audit_id   uuid NOT NULL REFERENCES ops_audit (id),
    event_id   text NOT NULL,
    class      text NOT NULL,
    attempts   integer NOT NULL,
    last_error text NOT NULL,
    dead_at    timestamptz NULL,
    PRIMARY KEY (audit_id, event_id)
);
CREATE INDEX ops_audit_events_event_idx ON ops_audit_events (event_id);

-- A copy of the dead-letter queue's summaries, rebuilt by the console from a snapshot of the
-- queue (RabbitMQ cannot page through a queue). The queue stays the truth: replay and purge
-- act on what is in the queue when they run. `seq` is the position in the queue.
CREATE TABLE ops_dead_letters (
    seq          bigint PRIMARY KEY,
    event_id     text NOT NULL,
    event_type   text NOT NULL,
    class        text NOT NULL,
    endpoint     text NULL,
    attempts     integer NOT NULL,
    last_error   text NOT NULL,
    error_kind   text NOT NULL,
    dead_at      timestamptz NOT NULL,
    received_at  timestamptz NULL
);
-- Keyset pagination, newest first, unfiltered and by each filter column.
CREATE INDEX ops_dead_letters_dead_idx ON ops_dead_letters (dead_at DESC, seq DESC);
CREATE INDEX ops_dead_letters_type_idx ON ops_dead_letters (event_type, dead_at DESC, seq DESC);
CREATE INDEX ops_dead_letters_class_idx ON ops_dead_letters (class, dead_at DESC, seq DESC);
CREATE INDEX ops_dead_letters_endpoint_idx ON ops_dead_letters (endpoint, dead_at DESC, seq DESC);
CREATE INDEX ops_dead_letters_event_idx ON ops_dead_letters (event_id);

-- When the index was last rebuilt, and from how many messages (one row).
CREATE TABLE ops_dead_letter_index (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    depth      integer NOT NULL,
    head       text NULL,
    rebuilt_at timestamptz NOT NULL
);

-- The overview's per-minute chart reads the last hour of the event log.
CREATE INDEX stripe_events_processed_at_idx ON stripe_events (processed_at)
    WHERE processed_at IS NOT NULL;
CREATE INDEX stripe_events_failed_at_idx ON stripe_events (updated_at)
    WHERE status IN ('retrying', 'dead');
