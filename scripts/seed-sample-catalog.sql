-- The catalog rows the sample events in fixtures/stripe/events/ refer to.
-- Safe to run more than once. Needs the migrations applied first (`processor migrate`).
--
--   psql postgres://postgres@127.0.0.1:5432/purchases -f scripts/seed-sample-catalog.sql
--
-- No agreements are inserted: the platform fee comes from the default row the migration
-- puts in platform_fee_config (1000 bps = 10 %), and the organization takes 0 %, so the
-- sample 1999-cent purchase splits into 200 platform / 0 organization / 1799 creator.

BEGIN;

INSERT INTO users (id, email) VALUES
    ('3f1c2a6e-8d4b-4c1e-9a57-2b6d0e4f8a10', 'buyer@example.com'),   -- the customer
    ('7a9e4b2c-1d3f-4e5a-8b6c-0f1e2d3c4b5a', 'creator@example.com')  -- the creator
ON CONFLICT DO NOTHING;

INSERT INTO organizations (id, name) VALUES
    ('c0ffee00-1234-4abc-8def-000000000001', 'Sample Organization')
ON CONFLICT DO NOTHING;

INSERT INTO content (id, organization_id, creator_id, title, price_cents, currency) VALUES
    ('5d2e8f14-6b3a-4c9d-a1e7-93f0b4c2d6e8',
     'c0ffee00-1234-4abc-8def-000000000001',
     '7a9e4b2c-1d3f-4e5a-8b6c-0f1e2d3c4b5a',
     'Sample Content', 1999, 'usd')
ON CONFLICT DO NOTHING;

COMMIT;
