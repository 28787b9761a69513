//! The revenue split, in integer cents. Rounding is half up.
//!
//! ```text
//! platform_fee     = round(amount × platform_bps / 10000)
//! organization_fee = round((amount − platform_fee) × organization_bps / 10000)
//! creator_payout   = amount − platform_fee − organization_fee
//! ```
//! The three always add up to the amount, whatever the rounding.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub platform_fee_cents: i64,
    pub organization_fee_cents: i64,
    pub creator_payout_cents: i64,
}

const BPS_DENOMINATOR: i64 = 10_000;

/// `amount × bps / 10000`, rounded half up. `amount ≥ 0` and `0 ≤ bps ≤ 10000`.
fn share(amount: i64, bps: i64) -> i64 {
    (amount * bps + BPS_DENOMINATOR / 2) / BPS_DENOMINATOR
}

/// Splits `amount_cents`. Basis points outside 0..=10000 are clamped (the schema forbids
/// them anyway).
pub fn compute(amount_cents: i64, platform_bps: i32, organization_bps: i32) -> Split {
    let amount = amount_cents.max(0);
    let platform_bps = i64::from(platform_bps).clamp(0, BPS_DENOMINATOR);
    let organization_bps = i64::from(organization_bps).clamp(0, BPS_DENOMINATOR);
    let platform_fee_cents = share(amount, platform_bps);
    let organization_fee_cents = share(amount - platform_fee_cents, organization_bps);
    Split {
        platform_fee_cents,
        organization_fee_cents,
        creator_payout_cents: amount - platform_fee_cents - organization_fee_cents,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example() {
        assert_eq!(
            compute(1999, 1000, 0),
            Split {
                platform_fee_cents: 200,
                organization_fee_cents: 0,
                creator_payout_cents: 1799
            }
        );
    }

    #[test]
    fn rounds_half_up() {
        // 5 × 10% = 0.5 → 1; 4 × 10% = 0.4 → 0; 15 × 10% = 1.5 → 2.
        assert_eq!(compute(5, 1000, 0).platform_fee_cents, 1);
        assert_eq!(compute(4, 1000, 0).platform_fee_cents, 0);
        assert_eq!(compute(15, 1000, 0).platform_fee_cents, 2);
        // Organization share applies to what is left after the platform fee:
        // 1999 − 200 = 1799; 1799 × 25% = 449.75 → 450.
        assert_eq!(
            compute(1999, 1000, 2500),
            Split {
                platform_fee_cents: 200,
                organization_fee_cents: 450,
                creator_payout_cents: 1349
            }
        );
        // 1000 × 12.5% = 125; 875 × 0.5% = 4.375 → 4.
        assert_eq!(compute(1000, 1250, 50).organization_fee_cents, 4);
    }

    #[test]
    fn always_adds_up() {
        for amount in [0, 1, 2, 3, 99, 1999, 123_457, i64::from(i32::MAX)] {
            for platform in [0, 1, 333, 1000, 5000, 9999, 10_000] {
                for org in [0, 1, 2500, 7777, 10_000] {
                    let s = compute(amount, platform, org);
                    assert_eq!(
                        s.platform_fee_cents + s.organization_fee_cents + s.creator_payout_cents,
                        amount
                    );
                    assert!(s.platform_fee_cents >= 0 && s.organization_fee_cents >= 0);
                    assert!(s.creator_payout_cents >= 0);
                }
            }
        }
    }
}
