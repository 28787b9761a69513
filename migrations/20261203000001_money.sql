-- Money right in every case: chargebacks as a status, an append-only history of money
-- movements, net revenue per purchase, and events stored byte for byte.

-- A dispute closed `lost` (a chargeback) is final: the purchase never grants access again.
ALTER TABLE purchases DROP CONSTRAINT purchases_status_check;
ALTER TABLE purchases ADD CONSTRAINT purchases_status_check
    CHECK (status IN ('pending', 'completed', 'failed', 'refunded', 'requires_refund', 'charged_back'));
ALTER TABLE purchases ADD COLUMN charged_back_at timestamptz NULL;

-- Every refund and chargeback, as it happened. Rows are only ever added: the view below
-- explains each purchase's net revenue row by row.
CREATE TABLE purchase_adjustments (
    id              uuid PRIMARY KEY,
    purchase_id     uuid NOT NULL REFERENCES purchases (id),
    kind            text NOT NULL CHECK (kind IN ('refund', 'chargeback')),
    amount_cents    integer NOT NULL CHECK (amount_cents > 0),
    stripe_event_id text NOT NULL,
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX purchase_adjustments_purchase_idx ON purchase_adjustments (purchase_id);
-- A charge has at most one dispute, so a purchase is charged back at most once.
CREATE UNIQUE INDEX purchase_adjustments_one_chargeback
    ON purchase_adjustments (purchase_id) WHERE kind = 'chargeback';

CREATE FUNCTION purchase_adjustments_append_only() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'purchase_adjustments is append-only (% refused)', TG_OP;
END
$$;
CREATE TRIGGER purchase_adjustments_append_only
    BEFORE UPDATE OR DELETE ON purchase_adjustments
    FOR EACH ROW EXECUTE FUNCTION purchase_adjustments_append_only();

-- What was there before this migration: refunds as one row each, lost disputes as full
-- chargebacks (the disputed amount was not kept).
INSERT INTO purchase_adjustments (id, purchase_id, kind, amount_cents, stripe_event_id, occurred_at)
SELECT gen_random_uuid(), id, 'refund', refunded_amount_cents, '(before adjustments)',
       COALESCE(refunded_at, updated_at)
  FROM purchases WHERE refunded_amount_cents > 0;
UPDATE purchases SET status = 'charged_back', charged_back_at = dispute_updated_at
 WHERE dispute_status = 'lost' AND status IN ('completed', 'requires_refund', 'refunded', 'pending');
INSERT INTO purchase_adjustments (id, purchase_id, kind, amount_cents, stripe_event_id, occurred_at)
SELECT gen_random_uuid(), id, 'chargeback', amount_paid_cents, '(before adjustments)',
       COALESCE(dispute_updated_at, updated_at)
  FROM purchases WHERE status = 'charged_back' AND amount_paid_cents > 0;

-- Net revenue per purchase. Gross is what the customer paid: 0 while a payment is pending
-- or after it failed (no money moved). The shares apply the purchase's own split rule
-- (lib: processor/src/split.rs) to the net, so they always add up to it.
CREATE VIEW purchase_revenue AS
WITH totals AS (
    SELECT p.id,
           CASE WHEN p.status IN ('pending', 'failed') THEN 0
                ELSE p.amount_paid_cents::bigint END                                AS gross,
           COALESCE(SUM(a.amount_cents) FILTER (WHERE a.kind = 'refund'), 0)::bigint     AS refunded,
           COALESCE(SUM(a.amount_cents) FILTER (WHERE a.kind = 'chargeback'), 0)::bigint AS charged_back,
           p.platform_fee_bps::bigint     AS platform_bps,
           p.organization_fee_bps::bigint AS organization_bps
      FROM purchases p
      LEFT JOIN purchase_adjustments a ON a.purchase_id = p.id
     GROUP BY p.id
), net AS (
    SELECT *, GREATEST(gross - refunded - charged_back, 0) AS net FROM totals
), platform AS (
    SELECT *, (net * platform_bps + 5000) / 10000 AS platform FROM net
), organization AS (
    SELECT *, ((net - platform) * organization_bps + 5000) / 10000 AS organization FROM platform
)
SELECT id           AS purchase_id,
       gross        AS gross_cents,
       refunded     AS refunded_cents,
       charged_back AS charged_back_cents,
       net          AS net_cents,
       platform     AS platform_net_cents,
       organization AS organization_net_cents,
       net - platform - organization AS creator_net_cents
  FROM organization;

-- Events: the body exactly as Stripe signed it (replays republish these bytes; `payload` is
-- a queryable copy in which characters jsonb refuses, such as \u0000, are replaced), the
-- API version Stripe rendered it with, and how often a delivery of it was started and
-- never finished (the processor died holding it).
ALTER TABLE stripe_events
    ADD COLUMN body          bytea NULL,
    ADD COLUMN api_version   text NULL,
    ADD COLUMN crash_strikes integer NOT NULL DEFAULT 0 CHECK (crash_strikes >= 0);
