//! The whole pipeline of one process, assembled in one place: dispatch, delivery, retention and the
//! admin endpoint, started together and stopped together.
//!
//! `fhir-outbox run`, the demo, the benchmark's worker and an embedding application all start it the
//! same way:
//!
//! ```no_run
//! # async fn example(url: &str) -> Result<(), Box<dyn std::error::Error>> {
//! use fhir_outbox::{db, delivery::DeliveryConfig, dispatch::DispatchConfig, pipeline::Pipeline};
//! let (dispatch, delivery) = (DispatchConfig::default(), DeliveryConfig::default());
//! let pool = db::connect(url, Pipeline::connections(&dispatch, &delivery)).await?;
//! let running = Pipeline::builder(pool).dispatch(dispatch).delivery(delivery).start().await?;
//! // … until the application stops:
//! running.shutdown().await;
//! # Ok(()) }
//! ```

use crate::bots::BotRegistry;
use crate::db;
use crate::delivery::{DeliveryConfig, DeliveryError, DeliveryWorker};
use crate::dispatch::{DispatchConfig, Dispatcher};
use crate::operations::admin::{self, AdminError};
use crate::operations::console::{self, ConsoleError};
use crate::operations::retention::{self, Retention};
use crate::operations::statistics;
use sqlx::PgPool;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Why the pipeline did not start.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The database schema lacks migrations this build has.
    #[error("{}", db::SCHEMA_OUTDATED)]
    SchemaOutdated,
    /// The schema's migrations could not be read (the database is unreachable, say).
    #[error(transparent)]
    Db(db::DbError),
    /// The delivery worker's configuration is unusable.
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// The admin endpoint could not start.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The console could not start.
    #[error(transparent)]
    Console(#[from] ConsoleError),
}

/// Namespace of the pipeline's entry points.
pub struct Pipeline;

impl Pipeline {
    /// A builder for the stages to run on `pool`. Nothing runs until [`PipelineBuilder::start`].
    pub fn builder(pool: PgPool) -> PipelineBuilder {
        PipelineBuilder {
            pool,
            dispatch: None,
            delivery: None,
            retention: None,
            admin: None,
            console: None,
            bots: None,
        }
    }

    /// The connections a pool needs for these stages: one per dispatch loop and one for queueing
    /// heartbeats, and for delivery the
    /// claimer, the recorder, lease renewal, a bot's reads and the LISTEN connections, plus
    /// retention and the gauges. A request in flight holds none, so this does not grow with the
    /// delivery concurrency.
    pub fn connections(dispatch: &DispatchConfig, _delivery: &DeliveryConfig) -> u32 {
        dispatch.workers as u32 + 9
    }
}

/// Chooses the stages of a [`Pipeline`] and their settings.
pub struct PipelineBuilder {
    pool: PgPool,
    dispatch: Option<DispatchConfig>,
    delivery: Option<DeliveryConfig>,
    retention: Option<(Retention, Duration)>,
    admin: Option<SocketAddr>,
    console: Option<SocketAddr>,
    bots: Option<BotRegistry>,
}

impl PipelineBuilder {
    /// Run dispatch loops (outbox rows → deliveries).
    pub fn dispatch(mut self, config: DispatchConfig) -> Self {
        self.dispatch = Some(config);
        self
    }

    /// Run the delivery worker (deliveries → webhooks and bots).
    pub fn delivery(mut self, config: DeliveryConfig) -> Self {
        self.delivery = Some(config);
        self
    }

    /// Prune finished work past `retention` every `every` (see [`retention`]; a process that
    /// dispatches or delivers keeps the history partitions ready in any case).
    pub fn retention(mut self, retention: Retention, every: Duration) -> Self {
        self.retention = Some((retention, every));
        self
    }

    /// Serve `/metrics`, `/healthz` and `/readyz` on `address` (port 0 picks a free one; see
    /// [`RunningPipeline::admin_address`]).
    pub fn admin(mut self, address: SocketAddr) -> Self {
        self.admin = Some(address);
        self
    }

    /// Serve the operator console and its API on `address` (see [`crate::operations::console`];
    /// [`RunningPipeline::console_address`] gives the bound address).
    pub fn console(mut self, address: SocketAddr) -> Self {
        self.console = Some(address);
        self
    }

    /// The handlers that `Bot/<id>` endpoints run (delivery only).
    pub fn bots(mut self, bots: BotRegistry) -> Self {
        self.bots = Some(bots);
        self
    }

    /// Checks the schema, then starts every chosen stage.
    pub async fn start(self) -> Result<RunningPipeline, PipelineError> {
        match db::require_migrated(&self.pool).await {
            Ok(()) => {}
            Err(db::DbError::SchemaOutdated) => return Err(PipelineError::SchemaOutdated),
            Err(error) => return Err(PipelineError::Db(error)),
        }
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        // Delivery's configuration is checked before anything starts, so an error leaves nothing
        // running behind.
        let fhir_base_url = self.delivery.as_ref().map_or_else(
            || crate::delivery::DEFAULT_FHIR_BASE_URL.to_owned(),
            |config| config.fhir_base_url.clone(),
        );
        let worker = match self.delivery {
            Some(config) => {
                let worker = DeliveryWorker::new(self.pool.clone(), config)?;
                Some(Arc::new(match self.bots {
                    Some(bots) => worker.with_bots(bots),
                    None => worker,
                }))
            }
            None => None,
        };
        let admin_address = match self.admin {
            Some(address) => {
                let (bound, task) =
                    admin::serve(self.pool.clone(), address, shutdown.clone()).await?;
                tasks.push(task);
                Some(bound)
            }
            None => None,
        };
        let console_address = match self.console {
            Some(address) => {
                let (bound, task) =
                    console::serve(self.pool.clone(), address, fhir_base_url, shutdown.clone())
                        .await?;
                tasks.push(task);
                Some(bound)
            }
            None => None,
        };
        let writes_history = self.dispatch.is_some() || worker.is_some();
        if let Some(config) = self.dispatch {
            let dispatcher = Dispatcher::new(self.pool.clone(), config);
            let dispatcher = Arc::new(match &worker {
                Some(worker) => dispatcher.with_local_delivery(worker.local_wake()),
                None => dispatcher,
            });
            tasks.push(tokio::spawn(dispatcher.run(shutdown.clone())));
        }
        if let Some(worker) = worker {
            tasks.push(tokio::spawn(worker.run(shutdown.clone())));
        }
        // The plans of the dispatcher's and the worker's statements follow their tables' sizes.
        if writes_history {
            tasks.push(tokio::spawn(statistics::keep_current(
                self.pool.clone(),
                shutdown.clone(),
            )));
        }
        // Every process that writes deliveries keeps the history's days ahead ready; with
        // retention it prunes too.
        if writes_history || self.retention.is_some() {
            let (retention, every) = match self.retention {
                Some((retention, every)) => (
                    Some(retention),
                    every.min(retention::PARTITION_UPKEEP_EVERY),
                ),
                None => (None, retention::PARTITION_UPKEEP_EVERY),
            };
            tasks.push(tokio::spawn(retention::upkeep_continuously(
                self.pool.clone(),
                retention,
                every,
                shutdown.clone(),
            )));
        }
        Ok(RunningPipeline {
            shutdown,
            tasks,
            admin_address,
            console_address,
        })
    }
}

/// A started pipeline. Dropping it does not stop it: call [`RunningPipeline::shutdown`].
pub struct RunningPipeline {
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    admin_address: Option<SocketAddr>,
    console_address: Option<SocketAddr>,
}

impl RunningPipeline {
    /// The address the admin endpoint listens on, when it runs.
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin_address
    }

    /// The address the console listens on, when it runs.
    pub fn console_address(&self) -> Option<SocketAddr> {
        self.console_address
    }

    /// Stops every stage: no new claims; requests in flight finish and are recorded, the rest is
    /// released for other workers. Returns when everything has stopped.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::error!(%error, "a pipeline task ended abnormally");
            }
        }
    }
}
