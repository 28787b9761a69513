-- Purchases with their revenue-split snapshot, the access they grant, and the Stripe event log.

CREATE TABLE purchases (
    id                         uuid PRIMARY KEY,
    customer_id                uuid NOT NULL REFERENCES users (id),
    content_id                 uuid NOT NULL REFERENCES content (id),
    organization_id            uuid NOT NULL REFERENCES organizations (id),
    amount_paid_cents          integer NOT NULL CHECK (amount_paid_cents >= 0),
    currency                   text NOT NULL,
    status                     text NOT NULL
        CHECK (status IN ('pending', 'completed', 'failed', 'refunded', 'requires_refund')),
    stripe_payment_intent_id   text UNIQUE,
    stripe_checkout_session_id text UNIQUE,
    platform_fee_cents         integer NOT NULL CHECK (platform_fee_cents >= 0),
    organization_fee_cents     integer NOT NULL CHECK (organization_fee_cents >= 0),
    creator_payout_cents       integer NOT NULL CHECK (creator_payout_cents >= 0),
    platform_agreement_id      uuid NULL REFERENCES organization_platform_agreements (id),
    creator_org_agreement_id   uuid NULL REFERENCES creator_organization_agreements (id),
    platform_fee_bps           integer NOT NULL CHECK (platform_fee_bps BETWEEN 0 AND 10000),
    organization_fee_bps       integer NOT NULL CHECK (organization_fee_bps BETWEEN 0 AND 10000),
    stripe_event_id            text NOT NULL,
    purchased_at               timestamptz NOT NULL,
    refunded_at                timestamptz NULL,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    CHECK (platform_fee_cents + organization_fee_cents + creator_payout_cents = amount_paid_cents)
);
CREATE INDEX purchases_customer_id_idx ON purchases (customer_id);
CREATE INDEX purchases_content_id_idx ON purchases (content_id);
CREATE INDEX purchases_status_idx ON purchases (status);
-- A customer owns a piece of content through at most one completed purchase; a second payment
-- for it is kept as 'requires_refund' instead.
CREATE UNIQUE INDEX purchases_one_completed_per_customer_content
    ON purchases (customer_id, content_id) WHERE status = 'completed';

CREATE TABLE content_access (
    id          uuid PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES users (id),
    content_id  uuid NOT NULL REFERENCES content (id),
    purchase_id uuid NOT NULL REFERENCES purchases (id),
    access_type text NOT NULL DEFAULT 'purchase',
    granted_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz NULL,
    UNIQUE (user_id, content_id)
);
CREATE INDEX content_access_purchase_id_idx ON content_access (purchase_id);

-- One row per Stripe event id, whatever happened to it.
CREATE TABLE stripe_events (
    id           text PRIMARY KEY,
    type         text NOT NULL,
    endpoint     text NOT NULL,
    livemode     boolean NOT NULL DEFAULT false,
    payload      jsonb NOT NULL,
    status       text NOT NULL
        CHECK (status IN ('received', 'processed', 'ignored', 'failed', 'retrying', 'dead', 'purged')),
    attempts     integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error   text NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_events_status_idx ON stripe_events (status);
CREATE INDEX stripe_events_type_idx ON stripe_events (type);
