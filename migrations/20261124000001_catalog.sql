-- The catalog a purchase is checked against, and the agreements its revenue split comes from.

CREATE TABLE users (
    id         uuid PRIMARY KEY,
    email      text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE organizations (
    id         uuid PRIMARY KEY,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE content (
    id              uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    creator_id      uuid NOT NULL REFERENCES users (id),
    title           text NOT NULL,
    price_cents     integer NOT NULL CHECK (price_cents >= 0),
    currency        text NOT NULL DEFAULT 'usd',
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX content_organization_id_idx ON content (organization_id);
CREATE INDEX content_creator_id_idx ON content (creator_id);

-- Basis points: 10000 = 100 %.
CREATE TABLE platform_fee_config (
    id              uuid PRIMARY KEY,
    fee_bps         integer NOT NULL CHECK (fee_bps BETWEEN 0 AND 10000),
    effective_from  timestamptz NOT NULL,
    effective_until timestamptz NULL,
    CHECK (effective_until IS NULL OR effective_until > effective_from)
);

INSERT INTO platform_fee_config (id, fee_bps, effective_from)
VALUES ('00000000-0000-4000-8000-000000000001', 1000, 'epoch');

CREATE TABLE organization_platform_agreements (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id),
    platform_fee_bps integer NOT NULL CHECK (platform_fee_bps BETWEEN 0 AND 10000),
    effective_from   timestamptz NOT NULL,
    effective_until  timestamptz NULL,
    CHECK (effective_until IS NULL OR effective_until > effective_from)
);
CREATE INDEX organization_platform_agreements_org_idx
    ON organization_platform_agreements (organization_id, effective_from DESC);

CREATE TABLE creator_organization_agreements (
    id                   uuid PRIMARY KEY,
    creator_id           uuid NOT NULL REFERENCES users (id),
    organization_id      uuid NOT NULL REFERENCES organizations (id),
    organization_fee_bps integer NOT NULL CHECK (organization_fee_bps BETWEEN 0 AND 10000),
    effective_from       timestamptz NOT NULL,
    effective_until      timestamptz NULL,
    CHECK (effective_until IS NULL OR effective_until > effective_from)
);
CREATE INDEX creator_organization_agreements_idx
    ON creator_organization_agreements (creator_id, organization_id, effective_from DESC);
