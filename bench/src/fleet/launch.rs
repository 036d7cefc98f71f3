//! Launch: the fleet's tasks — the watcher of the cores' index, the
//! reference consumer, the viewers, and the writers on a runtime of their
//! own — and the handles the end needs to stop and judge them.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use changeagent_client::{Client, ClientBuilder, Outbox};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::fleet::consumer::{self, Consumers, Ending, Phase, Role, Seat};
use crate::fleet::schedule::{is_occasional, Rng};
use crate::fleet::stats::Stats;
use crate::fleet::verify::Sightings;
use crate::fleet::writer::{self, WriterLog, Writers};
use crate::fleet::FleetArgs;

/// How often the cores' `lastIndex` is read: often enough for catch-up
/// targets and the progress line, rarely enough to cost the cores nothing.
const INDEX_POLL: Duration = Duration::from_secs(1);

/// Timeout of one `/health` read of a core: a core slower than this is
/// skipped for that round.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// What the fleet is launched with besides its flags.
pub struct Setting<'a> {
    pub cores: &'a [String],
    pub edges: &'a [String],
    /// The run's name, in every marker.
    pub run: &'a str,
    /// Where the outboxes live.
    pub data_dir: &'a Path,
    /// Where checkpoint downloads go.
    pub spool: &'a Path,
    pub access: Access,
    pub stats: &'a Arc<Stats>,
}

/// What every client of the fleet is built with besides its URLs.
#[derive(Clone, Default)]
pub struct Access {
    /// The cluster's secret, sent by the writers and the setup to the cores.
    pub secret: Option<String>,
    /// The CA trusted for `https://` URLs (`--ca`); the system's roots without it.
    pub roots: Option<Vec<reqwest::Certificate>>,
}

impl Access {
    /// A client builder for `urls` trusting [`Access::roots`].
    fn builder<I, S>(&self, urls: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        ClientBuilder::new(urls).root_certificates(self.roots.clone())
    }
}

/// Every task of the fleet, and what the end needs of them.
pub struct Fleet {
    /// The phase every consumer follows; the end moves it on, and dropping
    /// it ends every consumer still running.
    pub phase: watch::Sender<Phase>,
    /// The viewers' seats and tasks, by index.
    pub seats: Vec<Arc<Seat>>,
    pub viewers: Vec<JoinHandle<Ending>>,
    pub reference_seat: Arc<Seat>,
    pub reference: JoinHandle<Ending>,
    /// What the writers share (their stop and give-up tokens).
    pub writers: Arc<Writers>,
    /// Each writer's task, returning its log; on `writer_runtime`.
    pub writer_tasks: Vec<JoinHandle<WriterLog>>,
    pub writer_runtime: WriterRuntime,
    pub outboxes: Vec<Outbox>,
    /// One client per core, for `/health`.
    pub health: Arc<Vec<Client>>,
    /// Reads the cores' index every [`INDEX_POLL`]; aborted at the end.
    pub index_watch: JoinHandle<()>,
    /// How many viewers are occasionally connected.
    pub occasional: usize,
}

/// A client of the cores that sends each request once: the writers retry
/// (and count) failures themselves. Each runtime needs its own, as a
/// client's connections are driven by the runtime that opened them.
pub fn cores_client(cores: &[String], access: &Access) -> Result<Client> {
    access
        .builder(cores)
        .max_attempts(1)
        .cluster_secret(access.secret.clone())
        .build()
        .context("the cores' client")
}

/// Starts every task of the fleet.
pub async fn launch(args: &FleetArgs, setting: Setting<'_>, rng: &mut Rng) -> Result<Fleet> {
    let Setting {
        cores,
        edges,
        run,
        data_dir,
        spool,
        access,
        stats,
    } = setting;
    let keys = args.key_space();

    let health = Arc::new(
        cores
            .iter()
            .map(|core| {
                access
                    .builder([core])
                    .max_attempts(1)
                    .timeout(HEALTH_TIMEOUT)
                    .build()
            })
            .collect::<changeagent_client::Result<Vec<_>>>()?,
    );
    poll_index(&health, stats).await;
    let index_watch = {
        let stats = Arc::clone(stats);
        let health = Arc::clone(&health);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(INDEX_POLL).await;
                poll_index(&health, &stats).await;
            }
        })
    };

    // Consumers: the reference first, then the viewers.
    let (phase, phase_rx) = watch::channel(Phase::Run);
    let consumers = Arc::new(Consumers {
        stats: Arc::clone(stats),
        catch_up: Arc::new(Semaphore::new(args.catch_up)),
        phase: phase_rx,
        online_secs: args.online_secs,
        offline_secs: args.offline_secs,
    });
    let follow_client = |urls: Vec<String>| {
        access
            .builder(urls)
            .checkpoint_dir(spool)
            .follow_block_secs(args.block_secs)
            .build()
    };
    let reference_seat = Arc::new(Seat::default());
    let reference = tokio::spawn(consumer::consumer(
        Arc::clone(&consumers),
        "the reference (following the cores)".to_owned(),
        follow_client(cores.to_vec())?,
        Role::Reference(Box::new(Sightings::new(
            run,
            keys,
            args.writers + args.outbox_writers,
        ))),
        Arc::clone(&reference_seat),
        rng.fork(),
    ));
    let (via, via_word) = if edges.is_empty() {
        (cores, "core")
    } else {
        (edges, "edge")
    };
    let viewer_clients = (0..via.len())
        .map(|i| follow_client(rotated(via, i)))
        .collect::<changeagent_client::Result<Vec<_>>>()?;
    let occasional = args.occasional();
    let mut seats = Vec::with_capacity(args.consumers);
    let mut viewers = Vec::with_capacity(args.consumers);
    for i in 0..args.consumers {
        let seat = Arc::new(Seat::default());
        seats.push(Arc::clone(&seat));
        let offline = is_occasional(i, args.consumers, occasional);
        let who = format!(
            "consumer {i} ({via_word} {}{})",
            i % via.len(),
            if offline {
                ", occasionally connected"
            } else {
                ""
            }
        );
        viewers.push(tokio::spawn(consumer::consumer(
            Arc::clone(&consumers),
            who,
            viewer_clients[i % via.len()].clone(),
            Role::Viewer {
                occasional: offline,
            },
            seat,
            rng.fork(),
        )));
    }

    // Writers, on a runtime of their own: a thousand viewers keep the main
    // one busy, and a write's answer should not wait behind their pages.
    let writer_runtime = WriterRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fleet-writers")
            .enable_all()
            .build()
            .context("starting the writers' runtime")?,
    ));
    let client = cores_client(cores, &access)?;
    let writers_total = args.writers + args.outbox_writers;
    let writers = Arc::new(Writers {
        client: client.clone(),
        cores: cores.len(),
        stats: Arc::clone(stats),
        keys,
        run: run.to_owned(),
        per_writer_rate: args.rate / f64::from(writers_total.max(1)),
        online_writers: args.writers,
        stop: CancellationToken::new(),
        give_up: CancellationToken::new(),
    });
    let mut writer_tasks = Vec::new();
    for w in 0..args.writers {
        writer_tasks.push(writer_runtime.spawn(writer::online_writer(
            Arc::clone(&writers),
            w,
            rng.fork(),
        )));
    }
    let mut outboxes = Vec::new();
    for o in 0..args.outbox_writers {
        let dir = data_dir.join(format!("outbox-{o}"));
        let outbox = Outbox::open(&dir, client.clone())
            .await
            .with_context(|| format!("opening the outbox in {}", dir.display()))?;
        outboxes.push(outbox.clone());
        writer_tasks.push(writer_runtime.spawn(writer::outbox_writer(
            Arc::clone(&writers),
            args.writers + o,
            outbox,
            rng.fork(),
            args.online_secs,
            args.offline_secs,
        )));
    }
    Ok(Fleet {
        phase,
        seats,
        viewers,
        reference_seat,
        reference,
        writers,
        writer_tasks,
        writer_runtime,
        outboxes,
        health,
        index_watch,
        occasional,
    })
}

/// `urls` starting at the `first`-th: a client that prefers that one and
/// fails over to the others.
pub fn rotated(urls: &[String], first: usize) -> Vec<String> {
    let mut out = urls.to_vec();
    if !out.is_empty() {
        out.rotate_left(first % urls.len());
    }
    out
}

/// The writers' runtime, shut down without waiting when dropped (a
/// runtime may not be dropped, which blocks, inside another).
pub struct WriterRuntime(Option<tokio::runtime::Runtime>);

impl WriterRuntime {
    fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.0 {
            Some(runtime) => runtime.spawn(task),
            // Only `drop` empties it.
            None => tokio::spawn(task),
        }
    }
}

impl Drop for WriterRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Outbox entries waiting, over all outboxes.
pub fn pending(outboxes: &[Outbox]) -> u64 {
    outboxes.iter().map(|o| o.pending() as u64).sum()
}

/// Reads every core's `lastIndex` and keeps the highest in
/// `stats.core_last`; cores that do not answer are skipped.
pub async fn poll_index(cores: &[Client], stats: &Stats) {
    let answers = futures::future::join_all(cores.iter().map(|c| c.health())).await;
    if let Some(last) = answers
        .into_iter()
        .filter_map(|h| h.ok())
        .map(|h| h.last_index)
        .max()
    {
        stats.core_last.fetch_max(last, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_prefer_their_own_edge_and_fail_over_to_the_others() {
        let urls: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        assert_eq!(rotated(&urls, 0), ["a", "b", "c"]);
        assert_eq!(rotated(&urls, 1), ["b", "c", "a"]);
        assert_eq!(rotated(&urls, 5), ["c", "a", "b"]);
    }
}
