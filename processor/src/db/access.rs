//! Who has access to what: the grants in `content_access`, the lock that serialises every
//! change of "which purchase gives this customer this content", and the twin that takes
//! over when the purchase giving access is refunded or charged back.

use std::sync::LazyLock;

use sqlx::PgConnection;
use uuid::Uuid;

/// Serialises, until the transaction ends, every change to which purchase of `customer`
/// for `content` gives access. Without it, a refund of the purchase giving access and a
/// second payment for the same content, committed at the same time, could each decide from
/// the other's old state and leave the customer with no access although they paid once.
/// Taken before the purchase row is locked, always in that order.
pub async fn lock_ownership(
    conn: &mut PgConnection,
    customer: Uuid,
    content: Uuid,
) -> Result<(), sqlx::Error> {
    lock_ownerships(conn, &[(customer, content)]).await
}

/// [`lock_ownership`] for many (customer, content) pairs in one round trip.
pub async fn lock_ownerships(
    conn: &mut PgConnection,
    pairs: &[(Uuid, Uuid)],
) -> Result<(), sqlx::Error> {
    // Built once, from constants only.
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("SELECT taken FROM {}", ownership_locks("$1", "$2")));
    sqlx::query(sqlx::AssertSqlSafe(SQL.as_str()))
        .bind(pairs.iter().map(|p| p.0).collect::<Vec<_>>())
        .bind(pairs.iter().map(|p| p.1).collect::<Vec<_>>())
        .execute(conn)
        .await
        .map(|_| ())
}

/// A one-row subquery (`taken`: how many locks) that takes the ownership lock of each pair
/// of the `uuid[]` parameters `customers` and `contents`, for statements that lock as part
/// of their work. The locks are taken in the order of their keys, so two transactions
/// locking overlapping sets never wait for each other in a circle. Taking a lock the
/// transaction holds already costs nothing.
pub(crate) fn ownership_locks(customers: &str, contents: &str) -> String {
    format!(
        "(SELECT count(pg_advisory_xact_lock(key)) AS taken
            FROM (SELECT DISTINCT hashtextextended(customer::text || content::text, 0) AS key
                    FROM unnest({customers}::uuid[], {contents}::uuid[]) AS p(customer, content)
                   ORDER BY key) keys) locks"
    )
}

/// What granting does when the customer has a grant for the content already: a revoked one
/// is made active again for the granting purchase; an active one is left as it is.
pub(crate) const GRANT_ON_CONFLICT: &str = "ON CONFLICT (user_id, content_id) DO UPDATE
            SET purchase_id = EXCLUDED.purchase_id, granted_at = now(), revoked_at = NULL
          WHERE content_access.revoked_at IS NOT NULL";

/// Whether the customer has access to the content through another purchase.
pub async fn owned_elsewhere(
    conn: &mut PgConnection,
    customer: Uuid,
    content: Uuid,
    purchase: Uuid,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM purchases
                         WHERE customer_id = $1 AND content_id = $2 AND status = 'completed' AND id <> $3)",
    )
    .bind(customer)
    .bind(content)
    .bind(purchase)
    .fetch_one(conn)
    .await
}

/// The oldest twin that may take over from `leaving` (a second payment kept as
/// `requires_refund`, still paid in full), locked. Every candidate is locked, not only the
/// first: `FOR UPDATE ... LIMIT 1` returns nothing when the row it found was changed
/// meanwhile, even if another candidate is there.
pub async fn twin_for(
    conn: &mut PgConnection,
    customer: Uuid,
    content: Uuid,
    leaving: Uuid,
) -> Result<Option<Uuid>, sqlx::Error> {
    let twins: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM purchases
          WHERE customer_id = $1 AND content_id = $2 AND id <> $3
            AND status = 'requires_refund' AND refunded_amount_cents = 0
          ORDER BY purchased_at, id
          FOR UPDATE",
    )
    .bind(customer)
    .bind(content)
    .bind(leaving)
    .fetch_all(conn)
    .await?;
    Ok(twins.into_iter().next())
}

/// Moves the customer's grant from one purchase to another, active: access continues.
pub async fn transfer(
    conn: &mut PgConnection,
    customer: Uuid,
    content: Uuid,
    to_purchase: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO content_access (id, user_id, content_id, purchase_id, access_type)
         VALUES ($1, $2, $3, $4, 'purchase')
         ON CONFLICT (user_id, content_id) DO UPDATE
            SET purchase_id = EXCLUDED.purchase_id, revoked_at = NULL",
    )
    .bind(Uuid::new_v4())
    .bind(customer)
    .bind(content)
    .bind(to_purchase)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Makes the customer's access match what this purchase grants. Granting re-activates a
/// revoked grant; revoking touches only a grant that came from this purchase, so a refunded
/// double payment never takes away the access the customer paid for once.
pub async fn sync(
    conn: &mut PgConnection,
    purchase_id: Uuid,
    customer_id: Uuid,
    content_id: Uuid,
    grant: bool,
) -> Result<(), sqlx::Error> {
    if grant {
        grant_many(
            conn,
            &[Grant {
                purchase_id,
                customer_id,
                content_id,
            }],
        )
        .await?;
    } else {
        sqlx::query("UPDATE content_access SET revoked_at = now() WHERE purchase_id = $1 AND revoked_at IS NULL")
            .bind(purchase_id)
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// Access a purchase gives.
#[derive(Debug, Clone, Copy)]
pub struct Grant {
    pub purchase_id: Uuid,
    pub customer_id: Uuid,
    pub content_id: Uuid,
}

/// Grants access for each purchase, in one statement (see [`GRANT_ON_CONFLICT`]).
pub async fn grant_many(conn: &mut PgConnection, grants: &[Grant]) -> Result<(), sqlx::Error> {
    // Built once, from constants only.
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "INSERT INTO content_access (id, user_id, content_id, purchase_id, access_type)
             SELECT g.id, g.user_id, g.content_id, g.purchase_id, 'purchase'
               FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[])
                    AS g(id, user_id, content_id, purchase_id)
             {GRANT_ON_CONFLICT}"
        )
    });
    sqlx::query(sqlx::AssertSqlSafe(SQL.as_str()))
        .bind(grants.iter().map(|_| Uuid::new_v4()).collect::<Vec<_>>())
        .bind(grants.iter().map(|g| g.customer_id).collect::<Vec<_>>())
        .bind(grants.iter().map(|g| g.content_id).collect::<Vec<_>>())
        .bind(grants.iter().map(|g| g.purchase_id).collect::<Vec<_>>())
        .execute(conn)
        .await
        .map(|_| ())
}
