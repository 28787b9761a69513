//! `processor reconcile`: recover the events webhooks never delivered, from Stripe's Events
//! API (docs/RECONCILE.md).
//!
//! Stripe retries a webhook for three days and keeps every event for 30. Reconcile pages
//! through the events of a window ([`window`]) with [`stripe_api`], and publishes each one
//! whose id is not in `stripe_events` to the work exchange exactly as ingest would: its JSON
//! as the API returned it, persistent, mandatory, confirmed, marked
//! [`EventSource::Api`](shared::contract::EventSource). The processor's handling is idempotent
//! per event id, so an event that also arrives by webhook meanwhile, or is published by two
//! reconciles, still has one effect. Events of the other mode than the endpoint's are skipped,
//! as the processor would ignore them.

pub mod rate;
pub mod stripe_api;
pub mod window;

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lapin::{Channel, Connection};
use serde::Serialize;
use serde_json::value::RawValue;
use shared::broker::{ConfirmError, publish_confirmed};
use shared::config::{BrokerArgs, EndpointModes};
use shared::contract::{ContractError, EventMessage, EventSource};
use shared::envelope::EventHead;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::ReconcileArgs;
use crate::db;
use stripe_api::{ApiError, ApiSettings, ListFilter, RetryPolicy, StripeApi};
use window::{Window, WindowSpec};

/// Exit code when Stripe refused `STRIPE_API_KEY` (401, 403).
pub const EXIT_AUTH: u8 = 3;
/// Exit code for settings that cannot work (as clap's own usage errors).
pub const EXIT_USAGE: u8 = 2;
/// Exit code for any other failure: Stripe unavailable, broker, database.
pub const EXIT_FAILURE: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("cannot read stripe_events: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot connect to RabbitMQ: {0}")]
    Broker(String),
    #[error("event {event_id} was not published: {source}")]
    Publish {
        event_id: String,
        #[source]
        source: PublishError,
    },
    #[error("Stripe said more events follow but sent none; stopping rather than looping")]
    EmptyPage,
    #[error("the last event of a page has no readable id, so the next page cannot be asked for")]
    NoCursor,
}

impl ReconcileError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Api(api) if api.is_auth() => EXIT_AUTH,
            _ => EXIT_FAILURE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Confirm(#[from] ConfirmError),
    #[error(transparent)]
    Contract(#[from] ContractError),
    #[error("RabbitMQ did not confirm within {0:?}")]
    Timeout(Duration),
}

/// What one round found and did. Printed at the end of every round, failed or not.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub endpoint: String,
    pub livemode: bool,
    pub dry_run: bool,
    pub pages: u64,
    /// Events Stripe listed.
    pub listed: u64,
    /// Listed, and already in `stripe_events` (whatever their status).
    pub already_known: u64,
    /// Not known, of the endpoint's mode: what should be published.
    pub missing: u64,
    /// Published and confirmed by RabbitMQ (0 in a dry run).
    pub published: u64,
    /// Listed but not published, by reason (`other_mode`, `unreadable`, `listed_twice`).
    pub skipped: BTreeMap<&'static str, u64>,
    /// Why the round stopped early, if it did.
    pub error: Option<String>,
}

impl Summary {
    fn new(window: &Window, endpoint: &str, livemode: bool, dry_run: bool) -> Self {
        Self {
            from: window.from,
            to: window.to,
            endpoint: endpoint.to_owned(),
            livemode,
            dry_run,
            pages: 0,
            listed: 0,
            already_known: 0,
            missing: 0,
            published: 0,
            skipped: BTreeMap::new(),
            error: None,
        }
    }

    fn skip(&mut self, reason: &'static str) {
        *self.skipped.entry(reason).or_default() += 1;
        metrics::counter!("reconcile_events_skipped_total", "reason" => reason).increment(1);
    }

    /// The text form, for a person.
    pub fn render(&self) -> String {
        let mode = if self.livemode { "live" } else { "test" };
        let mut out = format!(
            "reconcile {} .. {} (endpoint {}, {} mode){}\n",
            self.from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.endpoint,
            mode,
            if self.dry_run { ", dry run" } else { "" }
        );
        let mut line = |label: &str, n: u64| out.push_str(&format!("  {label:<22}{n:>8}\n"));
        line("pages", self.pages);
        line("listed", self.listed);
        line("already known", self.already_known);
        if self.dry_run {
            line("would publish", self.missing);
        } else {
            line("missing", self.missing);
            line("published", self.published);
        }
        let skipped: u64 = self.skipped.values().sum();
        line("skipped", skipped);
        for (reason, n) in &self.skipped {
            line(&format!("  {}", reason.replace('_', " ")), *n);
        }
        match &self.error {
            Some(error) => out.push_str(&format!("  stopped early: {error}\n")),
            None => out.push_str("  complete\n"),
        }
        out
    }
}

/// Everything a round needs, built once.
pub struct Reconciler {
    api: StripeApi,
    pool: PgPool,
    broker: BrokerArgs,
    endpoint: String,
    modes: EndpointModes,
    filter: ListFilter,
    dry_run: bool,
    confirm_timeout: Duration,
    progress: bool,
}

impl Reconciler {
    /// Lists the window and publishes what is missing. Counts go into `summary` as they
    /// happen, so a round that fails (or is cancelled) midway still reports what it did.
    pub async fn round(
        &self,
        window: &Window,
        summary: &mut Summary,
    ) -> Result<(), ReconcileError> {
        let publisher = if self.dry_run {
            None
        } else {
            Some(Publisher::connect(&self.broker, self.confirm_timeout).await?)
        };
        let bar = self.progress_bar();
        let mut seen = HashSet::new();
        let mut after: Option<String> = None;
        let outcome = loop {
            let page = match self
                .api
                .list_events(window, &self.filter, after.as_deref())
                .await
            {
                Ok(page) => page,
                Err(error) => break Err(error.into()),
            };
            summary.pages += 1;
            if page.events.is_empty() {
                break if page.has_more {
                    Err(ReconcileError::EmptyPage)
                } else {
                    Ok(())
                };
            }
            let cursor = page
                .events
                .last()
                .and_then(|raw| EventHead::parse(raw.get().as_bytes()).ok())
                .map(|head| head.id);
            if let Err(error) = self
                .page(page.events, &mut seen, publisher.as_ref(), summary)
                .await
            {
                break Err(error);
            }
            bar.set_message(format!(
                "page {}: listed {}, already known {}, published {}",
                summary.pages, summary.listed, summary.already_known, summary.published
            ));
            bar.tick();
            if !page.has_more {
                break Ok(());
            }
            match cursor {
                Some(id) => after = Some(id),
                None => break Err(ReconcileError::NoCursor),
            }
        };
        bar.finish_and_clear();
        if let Some(publisher) = publisher {
            publisher.close().await;
        }
        outcome
    }

    /// One page: which events are new, then publish those, oldest first (the order they
    /// happened in; the processor copes with any order, as it must for webhooks).
    async fn page(
        &self,
        events: Vec<Box<RawValue>>,
        seen: &mut HashSet<String>,
        publisher: Option<&Publisher>,
        summary: &mut Summary,
    ) -> Result<(), ReconcileError> {
        let mut heads = Vec::with_capacity(events.len());
        for raw in events {
            summary.listed += 1;
            metrics::counter!("reconcile_events_listed_total").increment(1);
            match EventHead::parse(raw.get().as_bytes()) {
                Ok(head) if !seen.insert(head.id.clone()) => summary.skip("listed_twice"),
                Ok(head) => heads.push((head, raw)),
                Err(error) => {
                    tracing::warn!(%error, "Stripe listed something that is not an event; skipped");
                    summary.skip("unreadable");
                }
            }
        }
        let ids: Vec<String> = heads.iter().map(|(head, _)| head.id.clone()).collect();
        let known: HashSet<String> =
            sqlx::query_scalar("SELECT id FROM stripe_events WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .collect();

        let mut missing = Vec::new();
        for (head, raw) in heads.into_iter().rev() {
            if known.contains(&head.id) {
                summary.already_known += 1;
            } else if let Some(reason) = self.modes.mismatch(&self.endpoint, head.livemode) {
                tracing::debug!(event_id = %head.id, reason, "other mode; skipped");
                summary.skip("other_mode");
            } else {
                summary.missing += 1;
                metrics::counter!("reconcile_events_missing_total").increment(1);
                tracing::info!(event_id = %head.id, event_type = %head.event_type, created = ?head.created,
                               dry_run = self.dry_run, "missing event");
                missing.push(EventMessage {
                    event_id: head.id,
                    event_type: head.event_type,
                    endpoint: self.endpoint.clone(),
                    received_at: Utc::now(),
                    attempt: 1,
                    body: raw.get().as_bytes().to_vec(),
                });
            }
        }
        let Some(publisher) = publisher else {
            return Ok(());
        };
        // All of a page's confirms are awaited together: one round trip, not one per event.
        let results =
            futures_util::future::join_all(missing.iter().map(|m| publisher.publish(m))).await;
        let mut first_failure = None;
        for (message, result) in missing.iter().zip(results) {
            match result {
                Ok(()) => {
                    summary.published += 1;
                    metrics::counter!("reconcile_events_published_total").increment(1);
                }
                Err(source) => {
                    tracing::error!(event_id = %message.event_id, error = %source, "publish failed");
                    first_failure.get_or_insert(ReconcileError::Publish {
                        event_id: message.event_id.clone(),
                        source,
                    });
                }
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    fn progress_bar(&self) -> ProgressBar {
        if !self.progress {
            return ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed} {msg}") {
            bar.set_style(style);
        }
        bar.set_message("listing events from Stripe");
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }
}

/// A confirm-mode channel to the work exchange, for one round.
struct Publisher {
    connection: Connection,
    channel: Channel,
    exchange: String,
    confirm_timeout: Duration,
}

impl Publisher {
    async fn connect(
        broker: &BrokerArgs,
        confirm_timeout: Duration,
    ) -> Result<Self, ReconcileError> {
        let fail = |e: &dyn std::fmt::Display| ReconcileError::Broker(e.to_string());
        let (connection, _) = broker
            .amqp_url
            .connect(0, "processor reconcile")
            .await
            .map_err(|e| fail(&e))?;
        let channel = crate::ops::confirm_channel(&connection)
            .await
            .map_err(|e| fail(&e))?;
        let topology = broker.topology();
        topology
            .declare_exchange(&channel)
            .await
            .map_err(|e| fail(&e))?;
        Ok(Self {
            connection,
            channel,
            exchange: topology.exchange,
            confirm_timeout,
        })
    }

    /// As ingest publishes: to the exchange, routed by event type, persistent, mandatory,
    /// confirmed; marked as coming from the API.
    async fn publish(&self, message: &EventMessage) -> Result<(), PublishError> {
        let properties = message.properties_from(EventSource::Api)?;
        let confirmed = publish_confirmed(
            &self.channel,
            &self.exchange,
            &message.event_type,
            &message.body,
            properties,
        );
        tokio::time::timeout(self.confirm_timeout, confirmed)
            .await
            .map_err(|_| PublishError::Timeout(self.confirm_timeout))??;
        Ok(())
    }

    async fn close(self) {
        let _ = self.connection.close(200, "reconcile done".into()).await;
    }
}

/// The command: one round, or one every `--every` until SIGTERM. The summary goes to
/// stdout, logs and the progress bar to stderr.
pub async fn run(args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    let spec = match WindowSpec::from_flags(args.since, args.from, args.to) {
        Ok(spec) => spec,
        Err(error) => return Ok(usage(&error)),
    };
    // Checked now, so a refused window fails before anything is asked of Stripe.
    if let Err(error) = spec.resolve(Utc::now()) {
        return Ok(usage(&error));
    }
    if args.types.len() > stripe_api::MAX_TYPES {
        return Ok(usage(&format!(
            "--type is given {} times; Stripe filters on at most {}",
            args.types.len(),
            stripe_api::MAX_TYPES
        )));
    }
    let modes = args.modes.modes();
    let livemode = modes.is_live(&args.endpoint);
    warn_on_key_mode(&args.api_key, livemode, &args.endpoint);
    tracing::info!(?args, "starting reconcile");

    let api = StripeApi::new(&ApiSettings {
        base: args.api_base.clone(),
        key: args.api_key.clone(),
        rate: args.api_rate,
        retry: RetryPolicy::default(),
        timeout: args.api_timeout,
    })?;
    let reconciler = Reconciler {
        api,
        pool: db::pool(&args.database)?,
        broker: args.broker.clone(),
        endpoint: args.endpoint.clone(),
        modes,
        filter: ListFilter {
            types: args.types.clone(),
            only_undelivered: args.only_undelivered,
        },
        dry_run: args.dry_run,
        confirm_timeout: args.confirm_timeout,
        progress: std::io::stderr().is_terminal(),
    };

    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shared::shutdown::signal().await;
        trigger.cancel();
    });
    if let (Some(addr), Some(_)) = (args.metrics_addr, args.every) {
        let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let server = crate::http::serve(addr, ready, shutdown.clone());
        tokio::spawn(async move {
            if let Err(error) = server.await {
                tracing::error!(%error, "metrics server failed");
            }
        });
    }

    loop {
        let window = match spec.resolve(Utc::now()) {
            Ok(window) => window,
            Err(error) => return Ok(usage(&error)),
        };
        let mut summary = Summary::new(&window, &args.endpoint, livemode, args.dry_run);
        let result = tokio::select! {
            result = reconciler.round(&window, &mut summary) => Some(result),
            () = shutdown.cancelled() => None,
        };
        let code = match &result {
            Some(Ok(())) => 0,
            Some(Err(error)) => {
                summary.error = Some(error.to_string());
                error.exit_code()
            }
            None => {
                summary.error = Some("stopped by a signal".into());
                EXIT_FAILURE
            }
        };
        let outcome = if code == 0 { "complete" } else { "failed" };
        metrics::counter!("reconcile_runs_total", "outcome" => outcome).increment(1);
        print_summary(&summary, args.json)?;
        if let Some(Err(error)) = &result {
            // The summary above says it too, on stdout; this is for the logs.
            tracing::error!(%error, "reconcile failed");
        }
        let Some(every) = args.every else {
            return Ok(ExitCode::from(code));
        };
        if result.is_none() {
            return Ok(ExitCode::SUCCESS);
        }
        if code == EXIT_AUTH {
            // A refused key will be refused every round: stop, so the operator notices.
            return Ok(ExitCode::from(code));
        }
        tracing::info!(next_in = ?every, "waiting for the next round");
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
        }
    }
}

fn print_summary(summary: &Summary, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if json {
        writeln!(stdout, "{}", serde_json::to_string(summary)?)?;
    } else {
        write!(stdout, "{}", summary.render())?;
    }
    stdout.flush()?;
    Ok(())
}

fn usage(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(EXIT_USAGE)
}

/// A test key lists only test events, a live key only live ones: with the other mode than
/// the endpoint's, every event would be skipped. Said once, at start, without the key.
fn warn_on_key_mode(key: &secrecy::SecretString, endpoint_live: bool, endpoint: &str) {
    use secrecy::ExposeSecret;
    let key = key.expose_secret();
    let key_live = if key.starts_with("sk_live_") || key.starts_with("rk_live_") {
        Some(true)
    } else if key.starts_with("sk_test_") || key.starts_with("rk_test_") {
        Some(false)
    } else {
        None
    };
    if let Some(key_live) = key_live
        && key_live != endpoint_live
    {
        tracing::warn!(
            endpoint,
            endpoint_mode = if endpoint_live { "live" } else { "test" },
            key_mode = if key_live { "live" } else { "test" },
            "STRIPE_API_KEY is of the other mode than the endpoint: its events will all be skipped"
        );
    }
}
