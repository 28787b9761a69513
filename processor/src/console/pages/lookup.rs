//! `/lookup`: a purchase by customer, payment intent or checkout session, with its status,
//! net revenue and access; and the access check for a user and a content id. The purchase
//! table is shared with the event page.

use axum::Extension;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use serde::Deserialize;
use sqlx::{AssertSqlSafe, FromRow, PgPool};
use uuid::Uuid;

use super::{Nav, layout, money, present, when};
use crate::console::AppState;
use crate::console::auth::Caller;

#[derive(Debug, FromRow)]
pub struct PurchaseRow {
    pub id: Uuid,
    pub status: String,
    pub customer_id: Uuid,
    pub content_id: Uuid,
    pub amount_paid_cents: i32,
    pub currency: String,
    pub net_cents: Option<i64>,
    pub stripe_payment_intent_id: Option<String>,
    pub stripe_checkout_session_id: Option<String>,
    pub stripe_event_id: String,
    pub purchased_at: DateTime<Utc>,
}

#[derive(Debug, FromRow)]
pub struct AccessRow {
    pub purchase_id: Uuid,
    pub user_id: Uuid,
    pub content_id: Uuid,
    pub granted_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

const PURCHASE_COLUMNS: &str = "p.id, p.status, p.customer_id, p.content_id, p.amount_paid_cents, \
     p.currency, r.net_cents, p.stripe_payment_intent_id, p.stripe_checkout_session_id, \
     p.stripe_event_id, p.purchased_at";

/// Purchases matching any of: the customer, these Stripe ids (payment intent or checkout
/// session), or created by this event.
pub async fn purchases(
    pool: &PgPool,
    customer: Option<Uuid>,
    stripe_ids: &[String],
    event_id: Option<&str>,
) -> Result<(Vec<PurchaseRow>, Vec<AccessRow>), sqlx::Error> {
    let rows: Vec<PurchaseRow> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {PURCHASE_COLUMNS}
           FROM purchases p LEFT JOIN purchase_revenue r ON r.purchase_id = p.id
          WHERE p.customer_id = $1
             OR p.stripe_payment_intent_id = ANY($2)
             OR p.stripe_checkout_session_id = ANY($2)
             OR p.stripe_event_id = $3
          ORDER BY p.purchased_at DESC
          LIMIT 100"
    )))
    .bind(customer)
    .bind(stripe_ids)
    .bind(event_id)
    .fetch_all(pool)
    .await?;
    let ids: Vec<Uuid> = rows.iter().map(|p| p.id).collect();
    let access = sqlx::query_as(
        "SELECT purchase_id, user_id, content_id, granted_at, revoked_at
           FROM content_access WHERE purchase_id = ANY($1) ORDER BY granted_at",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok((rows, access))
}

pub fn purchases_table(rows: &[PurchaseRow], access: &[AccessRow]) -> Markup {
    html! {
        @if rows.is_empty() { p.muted { "No purchase." } }
        @else {
            table.purchases {
                thead { tr {
                    th { "purchase" } th { "status" } th.num { "paid" } th.num { "net revenue" }
                    th { "customer" } th { "content" } th { "payment intent / session" } th { "access" }
                } }
                tbody {
                    @for p in rows {
                        tr {
                            td { code { (p.id) } br; span.muted { (when(p.purchased_at)) } }
                            td { strong { (p.status) } }
                            td.num { (money(i64::from(p.amount_paid_cents), &p.currency)) }
                            td.num { @if let Some(net) = p.net_cents { (money(net, &p.currency)) } @else { "-" } }
                            td { code { (p.customer_id) } }
                            td { code { (p.content_id) } }
                            td {
                                code { (p.stripe_payment_intent_id.as_deref().unwrap_or("-")) } br;
                                code { (p.stripe_checkout_session_id.as_deref().unwrap_or("-")) }
                            }
                            td {
                                @let grants: Vec<&AccessRow> = access.iter().filter(|a| a.purchase_id == p.id).collect();
                                @if grants.is_empty() { "none" }
                                @for a in grants {
                                    @if let Some(revoked) = a.revoked_at { span.error { "revoked " (when(revoked)) } }
                                    @else { span.ok { "granted " (when(a.granted_at)) } }
                                }
                            }
                        }
                        tr { td colspan="8" class="muted" {
                            "created by event " a href={ "/events/" (super::overview::urlencode(&p.stripe_event_id)) } { code { (p.stripe_event_id) } }
                        } }
                    }
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct LookupQuery {
    /// A customer id, a payment intent (`pi_…`) or a checkout session (`cs_…`).
    q: Option<String>,
    user: Option<String>,
    content: Option<String>,
}

pub async fn show(
    State(console): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<LookupQuery>,
) -> Response {
    let q = present(query.q);
    let found = match &q {
        Some(q) => {
            let customer = Uuid::parse_str(q).ok();
            let stripe_ids = if customer.is_none() {
                vec![q.clone()]
            } else {
                Vec::new()
            };
            match purchases(&console.pool, customer, &stripe_ids, None).await {
                Ok(f) => Some(f),
                Err(error) => return super::failure("look up purchases", &error),
            }
        }
        None => None,
    };
    let user = present(query.user);
    let content_id = present(query.content);
    let check = match (&user, &content_id) {
        (Some(u), Some(c)) => match (Uuid::parse_str(u), Uuid::parse_str(c)) {
            (Ok(u), Ok(c)) => {
                match sqlx::query_scalar::<_, bool>("SELECT has_access($1, $2)")
                    .bind(u)
                    .bind(c)
                    .fetch_one(&console.pool)
                    .await
                {
                    Ok(granted) => Some(Ok(granted)),
                    Err(error) => return super::failure("check access", &error),
                }
            }
            _ => Some(Err("user and content must both be UUIDs")),
        },
        _ => None,
    };
    let content = html! {
        section {
            h2 { "Purchases" }
            form method="get" action="/lookup" class="filters" {
                label { "customer id, payment intent or checkout session "
                    input name="q" value=[q.as_deref()] size="44" placeholder="pi_… / cs_… / customer UUID"; }
                button type="submit" { "Look up" }
            }
            @if let Some((rows, access)) = &found { (purchases_table(rows, access)) }
        }
        section {
            h2 { "Access check" }
            form method="get" action="/lookup" class="filters" {
                label { "user " input name="user" value=[user.as_deref()] size="38"; }
                label { "content " input name="content" value=[content_id.as_deref()] size="38"; }
                button type="submit" { "Check" }
            }
            @match check {
                Some(Ok(true)) => p.ok #access { strong { "granted" } ": the user may see this content." },
                Some(Ok(false)) => p.error #access { strong { "not granted" } },
                Some(Err(message)) => p.error { (message) },
                None => {},
            }
        }
    };
    layout("Lookup", Nav::Lookup, Some(&caller), None, content).into_response()
}
