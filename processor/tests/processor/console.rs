//! The ops console's HTTP surface against a real database: access (401 without a token,
//! 403 for a read-only token's action and for a cross-origin POST), the login cookie,
//! masking on the event page, and keyset pagination over 100,000 indexed dead letters.
//! The browser tests (scripts/console-test.sh) cover the pages end to end with a broker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use processor::console::index::{self, ListFilter};
use processor::console::{Console, auth, jobs, router};
use reqwest::StatusCode;
use reqwest::redirect::Policy;
use secrecy::SecretString;
use shared::broker::AmqpUrls;
use shared::topology::Topology;
use sqlx::PgPool;

use crate::helpers::*;

const ACT: &str = "act-token-for-tests-0001";
const LOOK: &str = "look-token-for-tests-0001";

/// Serves the console's router on a free port; returns its base URL.
async fn serve(pool: PgPool) -> String {
    let console = Arc::new(Console {
        pool,
        urls: AmqpUrls::parse(&amqp_url()).unwrap(),
        topology: Topology::new(&test_prefix()),
        retry_delays: vec![Duration::from_secs(1)],
        tokens: auth::Tokens::new(
            Some(&SecretString::from(ACT)),
            Some(&SecretString::from(LOOK)),
        ),
        queue_lock: tokio::sync::Mutex::new(()),
        jobs: jobs::Jobs::default(),
        reindex: tokio::sync::Notify::new(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(console)).await });
    base
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn without_a_valid_token_every_page_is_401_with_the_login_form(pool: PgPool) {
    let base = serve(pool).await;
    for path in ["/", "/dead-letters", "/events/evt_1", "/audit", "/lookup"] {
        let response = client().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        let page = response.text().await.unwrap();
        assert!(page.contains(r#"name="token""#), "{path}: {page}");
    }
    let wrong = client()
        .get(format!("{base}/audit"))
        .bearer_auth("not-the-token-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let post = client()
        .post(format!("{base}/dead-letters/replay"))
        .header("origin", &base)
        .form(&[("expected", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::UNAUTHORIZED);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_read_only_token_may_look_but_not_act(pool: PgPool) {
    let base = serve(pool).await;
    let look = client()
        .get(format!("{base}/audit"))
        .bearer_auth(LOOK)
        .send()
        .await
        .unwrap();
    assert_eq!(look.status(), StatusCode::OK);
    for action in ["preview", "replay", "purge", "export"] {
        let response = client()
            .post(format!("{base}/dead-letters/{action}"))
            .bearer_auth(LOOK)
            .form(&[("op", "replay:matching"), ("downloaded", "yes")])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{action}");
    }
    // The acting token gets past the access checks (and then a 400 for a made-up action).
    let act = client()
        .post(format!("{base}/dead-letters/preview"))
        .bearer_auth(ACT)
        .form(&[("op", "nonsense")])
        .send()
        .await
        .unwrap();
    assert_eq!(act.status(), StatusCode::BAD_REQUEST);
}

#[sqlx::test(migrations = "../migrations")]
async fn login_sets_a_strict_http_only_cookie_and_cross_origin_posts_are_refused(pool: PgPool) {
    let base = serve(pool).await;
    let login = client()
        .post(format!("{base}/login"))
        .header("origin", &base)
        .form(&[("token", ACT)])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::SEE_OTHER);
    let set = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert!(
        !set.contains(ACT),
        "the cookie must not hold the token: {set}"
    );
    let cookie = set.split(';').next().unwrap().to_owned();

    let page = client()
        .get(format!("{base}/audit"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'self'")
    );

    let other_port = base.replace("127.0.0.1:", "127.0.0.1:1");
    for origin in [Some(other_port.as_str()), Some("http://evil.example"), None] {
        let mut request = client()
            .post(format!("{base}/dead-letters/preview"))
            .header("cookie", &cookie)
            .form(&[("op", "nonsense")]);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::FORBIDDEN,
            "origin {origin:?}"
        );
        assert!(response.text().await.unwrap().contains("cross-origin"));
    }
    let same = client()
        .post(format!("{base}/dead-letters/preview"))
        .header("cookie", &cookie)
        .header("origin", &base)
        .form(&[("op", "nonsense")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        same.status(),
        StatusCode::BAD_REQUEST,
        "same origin gets through"
    );

    // A login form posted from another origin is refused too.
    let foreign_login = client()
        .post(format!("{base}/login"))
        .header("origin", &other_port)
        .form(&[("token", ACT)])
        .send()
        .await
        .unwrap();
    assert_eq!(foreign_login.status(), StatusCode::FORBIDDEN);
}

#[sqlx::test(migrations = "../migrations")]
async fn the_event_page_masks_card_numbers_secrets_and_signatures(pool: PgPool) {
    let body = r#"{"id":"evt_mask","type":"checkout.session.completed","data":{"object":{
        "id":"cs_1","client_secret":"cs_1_secret_abcdef","metadata":{"note":"card 4242424242424242",
        "sig":"t=1,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd",
        "hook":"whsec_abcdef123456"}}}}"#;
    sqlx::query(
        "INSERT INTO stripe_events (id, type, endpoint, payload, body, status, attempts, last_error)
         VALUES ('evt_mask', 'checkout.session.completed', 'booking', $1::jsonb, $2, 'dead', 1,
                 'failed for card 4000056655665556 at postgres://app:hunter2@db/x')",
    )
    .bind(body)
    .bind(body.as_bytes())
    .execute(&pool)
    .await
    .unwrap();
    let base = serve(pool).await;
    let page = client()
        .get(format!("{base}/events/evt_mask"))
        .bearer_auth(LOOK)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let page = page.text().await.unwrap();
    for secret in [
        "4242424242424242",
        "4000056655665556",
        "cs_1_secret_abcdef",
        "5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd",
        "whsec_abcdef123456",
        "hunter2",
    ] {
        assert!(!page.contains(secret), "{secret} shown on the event page");
    }
    assert!(page.contains("••••••••••••4242"), "{page}");
    assert!(page.contains("exact bytes as received"));
}

/// 100,000 dead letters in the index, many sharing a timestamp: every page is quick, and
/// walking the pages of a filter visits each matching letter exactly once, newest first.
#[sqlx::test(migrations = "../migrations")]
async fn keyset_pages_stay_fast_and_complete_with_100000_dead_letters(pool: PgPool) {
    sqlx::query(
        "INSERT INTO ops_dead_letters
             (seq, event_id, event_type, class, endpoint, attempts, last_error, error_kind, dead_at)
         SELECT n, 'evt_' || n,
                CASE WHEN n % 10 = 0 THEN 'charge.refunded' ELSE 'checkout.session.completed' END,
                CASE WHEN n % 3 = 0 THEN 'transient' ELSE 'permanent' END,
                'booking', 1, 'unknown content', 'unknown content',
                timestamptz '2026-12-01 00:00:00+00' + (n / 7) * interval '1 second'
           FROM generate_series(0, 99999) AS n",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE ops_dead_letters")
        .execute(&pool)
        .await
        .unwrap();

    let filter = ListFilter {
        event_type: Some("charge.refunded".into()),
        class: Some("transient".into()),
        ..ListFilter::default()
    };
    let expected = index::count(&pool, &filter).await.unwrap();
    assert_eq!(expected, 3334);
    let (mut seen, mut after, mut slowest) = (Vec::new(), None, Duration::ZERO);
    loop {
        let started = Instant::now();
        let (rows, next) = index::page(&pool, &filter, after, 500).await.unwrap();
        slowest = slowest.max(started.elapsed());
        seen.extend(rows.iter().map(|r| (r.dead_at, r.seq)));
        match next {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
    }
    assert_eq!(seen.len() as i64, expected);
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "pages are newest first with no repeats"
    );
    // Deep pages of the unfiltered list cost the same as the first.
    let (_, deep) = index::page(&pool, &ListFilter::default(), None, 50)
        .await
        .unwrap();
    let mut cursor = deep;
    for _ in 0..100 {
        cursor = index::page(&pool, &ListFilter::default(), cursor, 50)
            .await
            .unwrap()
            .1;
    }
    let started = Instant::now();
    let (rows, _) = index::page(&pool, &ListFilter::default(), cursor, 50)
        .await
        .unwrap();
    slowest = slowest.max(started.elapsed());
    assert_eq!(rows.len(), 50);
    assert!(
        slowest < Duration::from_secs(1),
        "slowest page took {slowest:?}"
    );
    // What keeps them fast: every page is read from an index in order, never sorted.
    for (filter, after) in [
        (filter.clone(), None),
        (filter.clone(), after),
        (ListFilter::default(), cursor),
        (
            ListFilter {
                endpoint: Some("booking".into()),
                ..ListFilter::default()
            },
            cursor,
        ),
    ] {
        let plan = index::explain_page(&pool, &filter, after, 50)
            .await
            .unwrap();
        assert!(plan.contains("Index Scan"), "{filter:?}: {plan}");
        assert!(!plan.contains("Sort"), "{filter:?}: {plan}");
    }
}
