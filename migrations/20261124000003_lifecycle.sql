-- The rest of the purchase lifecycle: refunds, disputes, and the access check.

ALTER TABLE purchases
    ADD COLUMN refunded_amount_cents integer NOT NULL DEFAULT 0 CHECK (refunded_amount_cents >= 0),
    -- Stripe's own dispute status: needs_response, under_review, won, lost, ...
    ADD COLUMN dispute_status        text NULL,
    -- When Stripe created the event that set dispute_status (orders dispute updates).
    ADD COLUMN dispute_updated_at    timestamptz NULL;

CREATE INDEX purchases_checkout_session_idx ON purchases (stripe_checkout_session_id);

-- What the platform asks before serving content: a grant that is not revoked.
CREATE FUNCTION has_access(p_user_id uuid, p_content_id uuid) RETURNS boolean
    LANGUAGE sql STABLE
AS $$
    SELECT EXISTS (
        SELECT 1 FROM content_access
         WHERE user_id = p_user_id AND content_id = p_content_id AND revoked_at IS NULL
    )
$$;
