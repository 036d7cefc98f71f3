//! The Raft state machine: applies committed entries to the change store and builds and
//! installs snapshots in the checkpoint format.
//!
//! Ordering rules:
//! 1. All entries of one `apply` call go into one change-store transaction together with the
//!    last applied log id and membership, so the state and "how far it got" never disagree.
//! 2. `_id`s are assigned inside the transaction, from the state alone, so every replica
//!    assigns the same ones.
//! 3. A snapshot first takes a RocksDB snapshot, then syncs the store's WAL, then exports
//!    from it, so the state it covers is durable before openraft purges the log behind it
//!    (syncing first would let entries applied in between into the snapshot undurable).
//! 4. An installed snapshot is imported into a new store generation with the snapshot's log
//!    id and membership, which replaces the old one whole (see the store's import rules).

use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::io::IoThread;
use super::snapshot_file;
use super::types::{
    Command, LogId, Op, Outcome, Response, Snapshot, SnapshotData, SnapshotMeta, StoredMembership,
    TypeConfig,
};
use changeagent_proto::Scope;
use changeagent_store::{Error as StoreError, Store, Txn};
use changeagent_store::{ExportOptions, ImportMode};
use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, RaftSnapshotBuilder};

use crate::stages::{Stage, STAGES};

const APPLIED: &str = "raft_applied";
const MEMBERSHIP: &str = "raft_membership";
/// Idempotency keys expired per applied command: bounded so one entry never stalls.
const EXPIRE_PER_COMMAND: usize = 64;

fn any(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// The state machine over the change store.
pub struct StateMachine {
    store: Arc<Store>,
    /// Where the newest snapshot is kept (see [`snapshot_file`]).
    snapshot_dir: PathBuf,
    /// Applies run here, never in the blocking pool client reads use.
    applier: IoThread,
    applied: AppliedIndex,
}

/// The log index applied to the change store (what reads see), updated before any client
/// is answered; ahead of openraft's metrics, which learn it after the answer.
#[derive(Clone, Debug, Default)]
pub struct AppliedIndex(Arc<AtomicU64>);

impl AppliedIndex {
    /// The applied index, if anything was applied.
    pub fn get(&self) -> Option<u64> {
        self.0.load(Ordering::Acquire).checked_sub(1)
    }

    fn set(&self, applied: Option<&LogId>) {
        self.0
            .store(applied.map_or(0, |l| l.index + 1), Ordering::Release);
    }
}

/// Builds snapshots concurrently with `apply`, from a RocksDB snapshot.
pub struct SnapshotBuilder {
    store: Arc<Store>,
    snapshot_dir: PathBuf,
}

impl StateMachine {
    /// A state machine over `store`, keeping snapshots in `snapshot_dir`.
    pub fn new(store: Arc<Store>, snapshot_dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&snapshot_dir)?;
        snapshot_file::remove_leftovers(&snapshot_dir)?;
        let applied = AppliedIndex::default();
        applied.set(
            read_owner::<Option<LogId>>(&store, APPLIED)?
                .flatten()
                .as_ref(),
        );
        Ok(StateMachine {
            store,
            snapshot_dir,
            applier: IoThread::spawn("raft-apply")?,
            applied,
        })
    }

    /// The applied index as reads see it (shared, updated by every apply and install).
    pub fn applied(&self) -> AppliedIndex {
        self.applied.clone()
    }

    /// The change store this machine applies to.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

fn read_owner<T: serde::de::DeserializeOwned>(store: &Store, name: &str) -> io::Result<Option<T>> {
    match store.owner_meta(name).map_err(any)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| any(format!("corrupt {name}: {e}"))),
    }
}

/// The JSON body of an answer; our answer types always serialize.
fn to_body<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Applies one command's requests, each all-or-nothing, and answers each.
fn apply_command(txn: &mut Txn<'_>, cmd: &Command) -> Result<Vec<Outcome>, StoreError> {
    txn.expire_idempotency(cmd.ts, EXPIRE_PER_COMMAND)?;
    let mut out = Vec::with_capacity(cmd.requests.len());
    for req in &cmd.requests {
        if let Some(key) = &req.idempotency_key {
            if let Some(answer) = txn.idempotent_answer(key)? {
                out.push(Outcome::Ok {
                    body: String::from_utf8_lossy(&answer).into_owned(),
                });
                continue;
            }
        }
        let result = match &req.op {
            Op::Append { changes, batch } => txn.append(cmd.ts, changes).map(|ids| {
                let items: Vec<String> = ids.iter().map(|id| format!("{{\"_id\":{id}}}")).collect();
                if *batch {
                    format!("[{}]", items.join(","))
                } else {
                    items.join(",")
                }
            }),
            Op::CreateTenant { name } => txn.create_tenant(cmd.ts, name).map(|t| to_body(&t)),
            Op::CreateCollection { tenant, name } => txn
                .create_collection(cmd.ts, tenant, name)
                .map(|c| to_body(&c)),
            Op::CheckpointStart {
                start,
                stale_after_nanos,
            } => txn
                .checkpoint_start(cmd.ts, start, *stale_after_nanos)
                .map(|a| to_body(&a)),
            Op::CheckpointEnd { end } => txn.checkpoint_end(cmd.ts, end).map(|a| to_body(&a)),
            Op::Truncate { before } => txn.truncate(cmd.ts, *before).map(|a| to_body(&a)),
            Op::SetClusterId { id } => {
                let current = txn.state().cluster_id.clone();
                match current {
                    Some(existing) => Ok(format!("{{\"clusterId\":{existing:?}}}")),
                    None => txn
                        .set_cluster_id(id)
                        .map(|()| format!("{{\"clusterId\":{id:?}}}")),
                }
            }
        };
        match result {
            Ok(body) => {
                if let Some(key) = &req.idempotency_key {
                    txn.remember_idempotent(key, cmd.ts, body.clone().into_bytes())?;
                }
                out.push(Outcome::Ok { body });
            }
            Err(StoreError::Rejected(rejection)) => out.push(Outcome::Rejected { rejection }),
            // Storage failures stop the state machine.
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let applied: Option<LogId> = read_owner(&self.store, APPLIED)?;
        let membership: Option<StoredMembership> = read_owner(&self.store, MEMBERSHIP)?;
        Ok((applied, membership.unwrap_or_default()))
    }

    /// Applies what openraft hands over in one transaction (rule 1), then answers each
    /// waiting client, only once the transaction is committed.
    async fn apply<S>(&mut self, entries: S) -> io::Result<()>
    where
        S: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + Send,
    {
        let entries: Vec<EntryResponder<TypeConfig>> = entries
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<io::Result<_>>()?;
        let Some(last) = entries.last().map(|(e, _)| e.log_id) else {
            return Ok(());
        };
        let store = self.store.clone();
        let applied = self.applied.clone();
        self.applier
            .run(move || {
                let started = std::time::Instant::now();
                let failed = |at: &LogId, e: &dyn std::fmt::Display| {
                    io::Error::other(format!("cannot apply the Raft entry at {at}: {e}"))
                };
                let mut txn = store.begin();
                let mut membership = None;
                let mut answers = Vec::with_capacity(entries.len());
                for (e, responder) in entries {
                    let response: Response = match &e.payload {
                        EntryPayload::Blank => Vec::new(),
                        EntryPayload::Normal(cmd) => {
                            apply_command(&mut txn, cmd).map_err(|err| failed(&e.log_id, &err))?
                        }
                        EntryPayload::Membership(m) => {
                            membership = Some(StoredMembership::new(Some(e.log_id), m.clone()));
                            Vec::new()
                        }
                    };
                    answers.extend(responder.map(|r| (r, response)));
                }
                let applied_id = serde_json::to_vec(&Some(&last)).map_err(|e| failed(&last, &e))?;
                txn.put_owner_meta(APPLIED, &applied_id)
                    .map_err(|e| failed(&last, &e))?;
                if let Some(m) = membership {
                    let m = serde_json::to_vec(&m).map_err(|e| failed(&last, &e))?;
                    txn.put_owner_meta(MEMBERSHIP, &m)
                        .map_err(|e| failed(&last, &e))?;
                }
                store.commit(txn).map_err(|e| failed(&last, &e))?;
                applied.set(Some(&last));
                STAGES.since(Stage::Apply, started);
                for (responder, response) in answers {
                    responder.send(response);
                }
                Ok(())
            })
            .await
            .map_err(any)?
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> io::Result<()> {
        let store = self.store.clone();
        let dir = self.snapshot_dir.clone();
        let meta = meta.clone();
        let file = snapshot.into_std().await;
        let applied = self.applied.clone();
        self.applier
            .run(move || {
                install(&store, &dir, &meta, file)?;
                applied.set(meta.last_log_id.as_ref());
                Ok(())
            })
            .await
            .map_err(any)?
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let dir = self.snapshot_dir.clone();
        let current = tokio::task::spawn_blocking(move || snapshot_file::open_current(&dir))
            .await
            .map_err(any)??;
        Ok(current.map(|(trailer, file)| Snapshot {
            meta: trailer.meta,
            snapshot: tokio::fs::File::from_std(file),
        }))
    }
}

/// Installs a received snapshot: imports its checkpoint (replacing the whole state together
/// with the snapshot's log id and membership), then keeps the file as the current snapshot.
fn install(
    store: &Store,
    dir: &Path,
    meta: &SnapshotMeta,
    mut file: std::fs::File,
) -> io::Result<()> {
    let data_len = match snapshot_file::read_trailer(&mut file).map_err(any)? {
        Some(t) => t.data_len,
        None => file.metadata().map_err(any)?.len(),
    };
    let applied = serde_json::to_vec(&meta.last_log_id).map_err(any)?;
    let membership = serde_json::to_vec(&meta.last_membership).map_err(any)?;
    file.seek(SeekFrom::Start(0)).map_err(any)?;
    store
        .import(
            (&mut file).take(data_len),
            ImportMode::Raft,
            &[(APPLIED, &applied), (MEMBERSHIP, &membership)],
        )
        .map_err(any)?;
    file.seek(SeekFrom::Start(0)).map_err(any)?;
    let tmp = snapshot_file::temp_in(dir).map_err(any)?;
    let mut out = tmp.reopen().map_err(any)?;
    std::io::copy(&mut (&mut file).take(data_len), &mut out).map_err(any)?;
    snapshot_file::write_trailer(&mut out, meta).map_err(any)?;
    snapshot_file::publish(tmp, dir).map_err(any)?;
    tracing::info!(
        snapshot = %meta,
        bytes = data_len,
        "installed a snapshot from the leader"
    );
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let store = self.store.clone();
        let dir = self.snapshot_dir.clone();
        tokio::task::spawn_blocking(move || build(&store, &dir))
            .await
            .map_err(any)?
    }
}

/// Exports the state into a new snapshot file and publishes it as the current one. The
/// export takes its RocksDB snapshot before it syncs the WAL (rule 3).
fn build(store: &Store, dir: &Path) -> io::Result<Snapshot> {
    let tmp = snapshot_file::temp_in(dir).map_err(any)?;
    let mut file = tmp.reopen().map_err(any)?;
    let exported = {
        let mut out = BufWriter::with_capacity(1 << 16, &mut file);
        let opts = ExportOptions {
            scope: Scope::All,
            raft: true,
        };
        let exported = store
            .export(&mut out, &opts, |_| true)
            .map_err(any)?
            .ok_or_else(|| any("the export stopped without writing"))?;
        out.flush().map_err(any)?;
        exported
    };
    let owner = &exported.trailer.owner;
    let applied: Option<LogId> = owner
        .get(APPLIED)
        .map(|v| serde_json::from_value(v.clone()))
        .transpose()
        .map_err(any)?
        .flatten();
    let membership: StoredMembership = owner
        .get(MEMBERSHIP)
        .map(|v| serde_json::from_value(v.clone()))
        .transpose()
        .map_err(any)?
        .unwrap_or_default();
    let meta = SnapshotMeta {
        last_log_id: applied,
        last_membership: membership,
    };
    snapshot_file::write_trailer(&mut file, &meta).map_err(any)?;
    drop(file);
    let file = snapshot_file::publish(tmp, dir).map_err(any)?;
    tracing::info!(snapshot = %meta, "built a snapshot");
    Ok(Snapshot {
        meta,
        snapshot: tokio::fs::File::from_std(file),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use changeagent_store::{parse_post_body, Filter};

    fn store(dir: &Path) -> Arc<Store> {
        Store::open(dir.join("changes")).unwrap()
    }

    fn page(s: &Store) -> Vec<u8> {
        let mut out = Vec::new();
        s.read_page(0, 1000, &Filter::default(), &mut out).unwrap();
        out
    }

    #[test]
    fn a_built_snapshot_installs_into_another_store_and_is_kept_as_a_file() {
        let a = tempfile::tempdir().unwrap();
        let leader = store(a.path());
        let mut txn = leader.begin();
        txn.create_tenant(1, "acme").unwrap();
        txn.remember_idempotent("k", 1, b"{\"_id\":1}".to_vec())
            .unwrap();
        let changes = parse_post_body(br#"[{"data":{"z":1,"a":2}},{"data":"two","tags":["t"]}]"#)
            .unwrap()
            .into_changes();
        txn.append(5, &changes).unwrap();
        use openraft::vote::RaftLeaderId;
        let applied = Some(LogId::new(crate::raft::types::LeaderId::new(3, 1), 42));
        txn.put_owner_meta(APPLIED, &serde_json::to_vec(&applied).unwrap())
            .unwrap();
        leader.commit(txn).unwrap();
        let snaps_a = a.path().join("snapshots");
        std::fs::create_dir_all(&snaps_a).unwrap();
        let built = build(&leader, &snaps_a).unwrap();
        assert_eq!(built.meta.last_log_id, applied);

        let b = tempfile::tempdir().unwrap();
        let follower = store(b.path());
        let snaps_b = b.path().join("snapshots");
        std::fs::create_dir_all(&snaps_b).unwrap();
        // What the receiver gets: the data without trailer (it adds its own before install).
        let (trailer, mut file) = snapshot_file::open_current(&snaps_a).unwrap().unwrap();
        let mut received = tempfile::tempfile_in(&snaps_b).unwrap();
        std::io::copy(&mut (&mut file).take(trailer.data_len), &mut received).unwrap();
        install(&follower, &snaps_b, &built.meta, received).unwrap();

        assert_eq!(page(&follower), page(&leader));
        assert_eq!(follower.tenant("acme").map(|t| t.name), Some("acme".into()));
        assert!(follower.begin().idempotent_answer("k").unwrap().is_some());
        let (kept, _) = snapshot_file::open_current(&snaps_b).unwrap().unwrap();
        assert_eq!(kept.meta, built.meta);
        assert_eq!(kept.data_len, trailer.data_len);
        let owner: Option<LogId> =
            serde_json::from_slice(&follower.owner_meta(APPLIED).unwrap().unwrap()).unwrap();
        assert_eq!(owner, applied);
    }
}
