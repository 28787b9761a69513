//! The bench's own world: database, catalog, AMQP names, and the two services.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use lapin::Channel;
use serde::Serialize;
use shared::broker::AmqpUrls;
use shared::topology::{QueueSettings, Topology};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::Options;
use crate::catalog::Catalog;
use crate::children::{self, Service};
use crate::resources::{self, CpuSample, PhaseCost};

/// The webhook secret ingest is given for `/webhooks/stripe/booking`.
pub const SECRET: &str = "whsec_bench_0123456789abcdef";
/// The processor's delivery limit and retry delays: the bench declares the work queue
/// itself (before ingest runs without a processor), with the same arguments.
pub const DELIVERY_LIMIT: u32 = 5;
pub const RETRY_DELAYS: &str = "1s";

pub struct World {
    /// `b<unix time><hex>`: part of every id the run makes.
    pub tag: String,
    pub db_name: String,
    pub prefix: String,
    admin: PgConnectOptions,
    db_url: String,
    pool: Option<PgPool>,
    db_created: bool,
    keep: bool,
    pub catalog: Catalog,
    amqp_url: String,
    bin_dir: PathBuf,
    log_dir: PathBuf,
    /// Topologies to delete at the end.
    topologies: Vec<Topology>,
    broker: Option<(lapin::Connection, Channel)>,
    ingest: Option<Service>,
    ingest_port: u16,
    processor: Option<Service>,
    processor_port: u16,
    reference: Option<Service>,
    reference_port: u16,
    /// The reference consumer of `ref-e2e` (`bench ref-consumer`).
    ref_consumer: Option<Service>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Rss {
    pub ingest_mb: Option<f64>,
    pub processor_mb: Option<f64>,
}

impl World {
    pub fn new(options: &Options) -> anyhow::Result<Self> {
        let unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let random = uuid::Uuid::new_v4().simple().to_string();
        let hex = &random[..6];
        let tag = format!("b{unix}{hex}");
        let db_name = format!("bench_{unix}_{hex}");
        let admin = PgConnectOptions::from_str(&options.postgres_url)
            .context("--postgres-url is not a PostgreSQL URL")?;
        let db_url = with_database(&options.postgres_url, &db_name)?;
        let log_dir = PathBuf::from("target").join("bench").join(&tag);
        Ok(Self {
            catalog: Catalog::new(&tag)?,
            prefix: format!("bench.{tag}"),
            tag,
            db_name,
            admin,
            db_url,
            pool: None,
            db_created: false,
            keep: options.keep,
            amqp_url: options.amqp_url.clone(),
            bin_dir: options.bin_dir.clone(),
            log_dir,
            topologies: Vec::new(),
            broker: None,
            ingest: None,
            ingest_port: 0,
            processor: None,
            processor_port: 0,
            reference: None,
            reference_port: 0,
            ref_consumer: None,
        })
    }

    pub fn pool(&self) -> anyhow::Result<&PgPool> {
        self.pool.as_ref().context("the database is not set up")
    }

    /// New events for a phase (see [`Catalog::events`]).
    pub async fn events(
        &mut self,
        phase: &str,
        count: u64,
    ) -> anyhow::Result<Vec<crate::catalog::Event>> {
        let pool = self.pool()?.clone();
        self.catalog.events(phase, count, &pool).await
    }

    pub fn database_url(&self) -> &str {
        &self.db_url
    }

    pub fn amqp_url(&self) -> &str {
        &self.amqp_url
    }

    pub fn queue_settings() -> QueueSettings {
        QueueSettings {
            delivery_limit: DELIVERY_LIMIT,
            retry_delays: vec![Duration::from_secs(1)],
        }
    }

    /// Creates the database, applies the migrations with `processor migrate`, seeds the
    /// catalog and, if asked, the stored purchases.
    pub async fn setup_database(&mut self, options: &Options) -> anyhow::Result<()> {
        let mut admin = self
            .admin
            .connect()
            .await
            .context("cannot connect to PostgreSQL (--postgres-url)")?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{}\"",
            self.db_name
        )))
        .execute(&mut admin)
        .await
        .with_context(|| format!("cannot create database {}", self.db_name))?;
        self.db_created = true;
        admin.close().await?;

        crate::progress("applying migrations (processor migrate)");
        let processor = self.bin_dir.join("processor");
        children::run_to_end(
            &processor,
            &["migrate"],
            &[
                ("DATABASE_URL", self.db_url.clone()),
                ("RUST_LOG", "warn".into()),
            ],
        )
        .await?;

        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(self.admin.clone().database(&self.db_name))
            .await?;
        crate::progress("seeding the catalog");
        self.catalog.seed(&pool, 0).await?;
        if options.seed_purchases > 0 {
            crate::progress(&format!(
                "storing {} purchases first (--seed-purchases)",
                options.seed_purchases
            ));
            self.catalog
                .seed_purchases(&pool, options.seed_purchases)
                .await?;
        }
        // Statistics for the planner, and no checkpoint of the seeding landing mid-measure.
        // Only for the tables the bench filled: statistics saying that `purchases` is empty
        // make every connection cache plans for an empty table (the foreign-key checks of
        // `content_access` became sequential scans that grew with every purchase), a state
        // a new deployment is never in (its tables were never analyzed), so it would
        // measure a trap of the bench's own making.
        let analyze = if options.seed_purchases > 0 {
            "VACUUM ANALYZE"
        } else {
            "VACUUM ANALYZE users, organizations, content, platform_fee_config,
                            organization_platform_agreements, creator_organization_agreements"
        };
        sqlx::raw_sql(analyze).execute(&pool).await?;
        sqlx::raw_sql("CHECKPOINT").execute(&pool).await?;
        self.pool = Some(pool);
        Ok(())
    }

    /// One connection and channel for declaring and deleting the bench's topologies.
    async fn channel(&mut self) -> anyhow::Result<&Channel> {
        if self.broker.is_none() {
            let urls = AmqpUrls::parse(&self.amqp_url)?;
            let (connection, _) = urls.connect(0, "bench").await?;
            let channel = connection.create_channel().await?;
            self.broker = Some((connection, channel));
        }
        match &self.broker {
            Some((_, channel)) => Ok(channel),
            None => bail!("no broker channel"),
        }
    }

    /// Declares a topology the processor's way and remembers to delete it.
    pub async fn declare(&mut self, prefix: &str) -> anyhow::Result<Topology> {
        let topology = Topology::new(prefix);
        self.topologies.push(topology.clone());
        let channel = self.channel().await?.clone();
        topology
            .declare(&channel, &Self::queue_settings())
            .await
            .with_context(|| format!("cannot declare the topology {prefix}"))?;
        Ok(topology)
    }

    /// Deletes a topology now rather than at the end, so that the messages a phase left
    /// do not weigh on the broker during the next one.
    pub async fn delete_topology(&mut self, topology: &Topology) {
        let delays = Self::queue_settings().retry_delays;
        let outcome = match self.channel().await {
            Ok(channel) => {
                let channel = channel.clone();
                topology
                    .delete(&channel, &delays)
                    .await
                    .map_err(anyhow::Error::from)
            }
            Err(error) => Err(error),
        };
        match outcome {
            Ok(()) => self.topologies.retain(|t| t != topology),
            // Left in the list: teardown tries again.
            Err(error) => crate::progress(&format!(
                "cannot delete the queues of {} yet: {error:#}",
                topology.exchange
            )),
        }
    }

    /// The pipeline's queues, declared up front so that ingest can run without a processor.
    pub async fn declare_topology(&mut self) -> anyhow::Result<Topology> {
        let prefix = self.prefix.clone();
        self.declare(&prefix).await
    }

    fn log(&self, name: &str) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(&self.log_dir)
            .with_context(|| format!("cannot create {}", self.log_dir.display()))?;
        Ok(self.log_dir.join(format!("{name}.log")))
    }

    pub async fn start_ingest(&mut self) -> anyhow::Result<()> {
        if self.ingest.is_some() {
            return Ok(());
        }
        self.ingest_port = children::free_port()?;
        // Probes are on ingest's internal listener.
        let probe_port = children::free_port()?;
        let env = [
            ("AMQP_URL", self.amqp_url.clone()),
            ("AMQP_PREFIX", self.prefix.clone()),
            ("INGEST_ADDR", format!("127.0.0.1:{}", self.ingest_port)),
            ("INGEST_METRICS_ADDR", format!("127.0.0.1:{probe_port}")),
            ("STRIPE_WEBHOOK_SECRET_BOOKING", SECRET.to_owned()),
            ("INGEST_RATE_LIMIT_PER_MINUTE", "0".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ];
        let mut service = Service::start(
            "ingest",
            &self.bin_dir.join("ingest"),
            &[],
            &env,
            self.log("ingest")?,
        )?;
        let url = format!("http://127.0.0.1:{probe_port}/readyz");
        let ready = service.wait_ready(&url, Duration::from_secs(30)).await;
        self.ingest = Some(service);
        ready
    }

    pub async fn start_processor(&mut self) -> anyhow::Result<()> {
        if self.processor.is_some() {
            return Ok(());
        }
        self.processor_port = children::free_port()?;
        let env = [
            ("DATABASE_URL", self.db_url.clone()),
            ("AMQP_URL", self.amqp_url.clone()),
            ("AMQP_PREFIX", self.prefix.clone()),
            (
                "PROCESSOR_METRICS_ADDR",
                format!("127.0.0.1:{}", self.processor_port),
            ),
            ("PROCESSOR_RETRY_DELAYS", RETRY_DELAYS.to_owned()),
            ("PROCESSOR_DELIVERY_LIMIT", DELIVERY_LIMIT.to_string()),
            ("RUST_LOG", "warn".to_owned()),
        ];
        let mut service = Service::start(
            "processor",
            &self.bin_dir.join("processor"),
            &["run"],
            &env,
            self.log("processor")?,
        )?;
        let url = format!("http://127.0.0.1:{}/readyz", self.processor_port);
        let ready = service.wait_ready(&url, Duration::from_secs(60)).await;
        self.processor = Some(service);
        ready
    }

    /// Starts the reference receiver (`bench ref-server`, this very binary) publishing to
    /// `exchange` over `channels` channels; ready when its `/healthz` answers, which it
    /// does only once connected to the broker.
    pub async fn start_reference(&mut self, exchange: &str, channels: u16) -> anyhow::Result<()> {
        if self.reference.is_some() {
            return Ok(());
        }
        self.reference_port = children::free_port()?;
        let exe = std::env::current_exe().context("cannot find the bench binary itself")?;
        let listen = format!("127.0.0.1:{}", self.reference_port);
        let channels = channels.to_string();
        let args = [
            "ref-server",
            "--listen",
            &listen,
            "--exchange",
            exchange,
            "--channels",
            &channels,
            "--amqp-url",
            &self.amqp_url,
        ];
        let mut service = Service::start("reference", &exe, &args, &[], self.log("reference")?)?;
        let url = format!("http://127.0.0.1:{}/healthz", self.reference_port);
        let ready = service.wait_ready(&url, Duration::from_secs(30)).await;
        self.reference = Some(service);
        ready
    }

    /// Starts the reference consumer (`bench ref-consumer`) on `queue`, writing to the
    /// bench database. It has no probe: it is ready once its consumer is registered on the
    /// queue, which the broker tells.
    pub async fn start_ref_consumer(&mut self, queue: &str) -> anyhow::Result<()> {
        if self.ref_consumer.is_some() {
            return Ok(());
        }
        let exe = std::env::current_exe().context("cannot find the bench binary itself")?;
        let args = [
            "ref-consumer",
            "--queue",
            queue,
            "--database-url",
            &self.db_url,
            "--amqp-url",
            &self.amqp_url,
        ];
        let service = Service::start(
            "reference consumer",
            &exe,
            &args,
            &[],
            self.log("reference-consumer")?,
        )?;
        self.ref_consumer = Some(service);
        let channel = self.channel().await?.clone();
        let started = std::time::Instant::now();
        loop {
            let declared = channel
                .queue_declare(
                    queue.into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await
                .with_context(|| format!("cannot inspect the queue {queue}"))?;
            if declared.consumer_count() > 0 {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the reference consumer did not start consuming {queue} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the reference (and its consumer) so that it takes nothing from the phases
    /// after its own, and forgets them, so that a later phase can start them afresh.
    pub async fn stop_reference(&mut self) {
        for service in [self.reference.as_mut(), self.ref_consumer.as_mut()]
            .into_iter()
            .flatten()
        {
            if let Err(error) = service.stop(Duration::from_secs(30)).await {
                crate::progress(&format!("cannot stop the {}: {error:#}", service.name));
            }
        }
        self.reference = None;
        self.ref_consumer = None;
    }

    pub fn reference_url(&self) -> anyhow::Result<String> {
        if self.reference.is_none() {
            bail!("the reference receiver is not running");
        }
        Ok(format!(
            "http://127.0.0.1:{}/webhooks/stripe/booking",
            self.reference_port
        ))
    }

    pub fn webhook_url(&self) -> anyhow::Result<String> {
        if self.ingest.is_none() {
            bail!("ingest is not running");
        }
        Ok(format!(
            "http://127.0.0.1:{}/webhooks/stripe/booking",
            self.ingest_port
        ))
    }

    /// Starts measuring a phase: CPU counters now, and the services' peak RSS reset.
    pub fn begin_phase(&mut self) -> CpuSample {
        for service in [
            self.ingest.as_mut(),
            self.processor.as_mut(),
            self.reference.as_mut(),
            self.ref_consumer.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            service.read_peak_rss();
            resources::reset_peak_rss(service.pid());
        }
        self.cpu_sample()
    }

    fn cpu_sample(&self) -> CpuSample {
        let reference: Vec<u32> = [self.reference.as_ref(), self.ref_consumer.as_ref()]
            .into_iter()
            .flatten()
            .map(Service::pid)
            .collect();
        CpuSample::take(
            self.ingest.as_ref().map(Service::pid),
            self.processor.as_ref().map(Service::pid),
            &reference,
        )
    }

    /// What the phase begun at `start` cost.
    pub fn end_phase(&mut self, start: CpuSample, phase: &str) -> PhaseCost {
        let mut cost = start.cost(&self.cpu_sample(), phase);
        let mb = |kb: u64| kb as f64 / 1024.0;
        cost.ingest_peak_rss_mb = self
            .ingest
            .as_mut()
            .and_then(Service::read_peak_rss)
            .map(mb);
        cost.processor_peak_rss_mb = self
            .processor
            .as_mut()
            .and_then(Service::read_peak_rss)
            .map(mb);
        cost.reference_peak_rss_mb = self
            .reference
            .as_mut()
            .and_then(Service::read_peak_rss)
            .map(mb);
        cost
    }

    /// Peak RSS of the services over the whole run (the largest of the phases' peaks).
    pub fn peak_rss(&mut self) -> Option<Rss> {
        let mb = |kb: u64| kb as f64 / 1024.0;
        let peak = |service: Option<&mut Service>| {
            let service = service?;
            service.read_peak_rss();
            service.peak_rss_kb
        };
        let ingest = peak(self.ingest.as_mut());
        let processor = peak(self.processor.as_mut());
        (ingest.is_some() || processor.is_some()).then(|| Rss {
            ingest_mb: ingest.map(mb),
            processor_mb: processor.map(mb),
        })
    }

    /// Stops the services, deletes the queues and exchanges, drops the database (unless
    /// `--keep`). Best effort: reports what it could not undo.
    pub async fn teardown(&mut self) {
        for service in [
            self.ingest.as_mut(),
            self.processor.as_mut(),
            self.reference.as_mut(),
            self.ref_consumer.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            if let Err(error) = service.stop(Duration::from_secs(30)).await {
                crate::progress(&format!("cannot stop {}: {error:#}", service.name));
            }
            let lines = service.log_lines();
            if lines > 0 {
                crate::progress(&format!(
                    "{} logged {lines} warning/error line(s): {}",
                    service.name,
                    service.log.display()
                ));
            }
        }
        // Logs that stayed empty are not worth keeping.
        for service in [
            self.ingest.as_ref(),
            self.processor.as_ref(),
            self.reference.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if service.log_lines() == 0 {
                let _ = std::fs::remove_file(&service.log);
            }
        }
        let _ = std::fs::remove_dir(&self.log_dir);
        let topologies = std::mem::take(&mut self.topologies);
        if !topologies.is_empty() {
            let delays = Self::queue_settings().retry_delays;
            match self.channel().await {
                Ok(channel) => {
                    let channel = channel.clone();
                    for topology in &topologies {
                        if let Err(error) = topology.delete(&channel, &delays).await {
                            crate::progress(&format!(
                                "cannot delete the queues of {}: {error}",
                                topology.exchange
                            ));
                        }
                    }
                }
                Err(error) => crate::progress(&format!(
                    "cannot delete the bench's queues ({}): {error:#}",
                    topologies
                        .iter()
                        .map(|t| t.exchange.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            }
        }
        if let Some((connection, _)) = self.broker.take() {
            let _ = connection.close(200, "bench done".into()).await;
        }
        if let Some(pool) = self.pool.take() {
            pool.close().await;
        }
        if self.db_created {
            if self.keep {
                crate::progress(&format!(
                    "kept database {} (--keep): {}",
                    self.db_name, self.db_url
                ));
            } else if let Err(error) = self.drop_database().await {
                crate::progress(&format!("cannot drop database {}: {error:#}", self.db_name));
            }
        }
    }

    async fn drop_database(&self) -> anyhow::Result<()> {
        let mut admin = self.admin.connect().await?;
        // The name is the bench's own (letters, digits, underscores).
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.db_name
        )))
        .execute(&mut admin)
        .await?;
        admin.close().await?;
        Ok(())
    }
}

/// `postgres://u@h:5432/postgres?x=y` with the database replaced by `name`.
fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let Some((scheme, rest)) = base.split_once("://") else {
        bail!("--postgres-url must start with postgres://");
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let mut out = format!("{scheme}://{authority}/{name}");
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "bench_1").ok(),
            Some("postgres://postgres@127.0.0.1:5432/bench_1".to_owned())
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "b").ok(),
            Some("postgres://u:p@h/b?sslmode=disable".to_owned())
        );
        assert_eq!(
            with_database("postgres://h:5432", "b").ok(),
            Some("postgres://h:5432/b".to_owned())
        );
    }
}
