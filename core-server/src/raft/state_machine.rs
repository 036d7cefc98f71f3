//! The Raft state machine: applies committed entries to the change store and builds and
//! installs snapshots in the checkpoint format.
//!
//! Ordering rules:
//! 1. All entries of one `apply` call go into one change-store transaction together with the
//!    last applied log id and membership, so the state and "how far it got" never disagree.
//! 2. `_id`s are assigned inside the transaction, from the state alone, so every replica
//!    assigns the same ones.
//! 3. A snapshot first syncs the store's WAL, then exports from one RocksDB snapshot, so the
//!    state it covers is durable before openraft purges the log behind it.
//! 4. An installed snapshot replaces the whole state in one write that also records the
//!    snapshot's log id and membership.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use changeagent_store::export::{ExportOptions, Header};
use changeagent_store::http::ApiError;
use changeagent_store::{Error as StoreError, Store, Txn};
use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};

use super::types::{
    Command, Entry, LogId, Op, Outcome, Response, Snapshot, SnapshotMeta, StorageError,
    StoredMembership, TypeConfig,
};

const APPLIED: &str = "raft_applied";
const MEMBERSHIP: &str = "raft_membership";
/// Idempotency keys expired per applied command: bounded so one entry never stalls.
const EXPIRE_PER_COMMAND: usize = 64;

fn any(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

/// The state machine over the change store.
pub struct StateMachine {
    store: Arc<Store>,
    /// Where the newest snapshot is kept (`current.snap`).
    snapshot_dir: PathBuf,
}

/// Builds snapshots concurrently with `apply`, from a RocksDB snapshot.
pub struct SnapshotBuilder {
    store: Arc<Store>,
    snapshot_dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct SavedMeta {
    meta: SnapshotMeta,
}

impl StateMachine {
    /// A state machine over `store`, keeping snapshots in `snapshot_dir`.
    pub fn new(store: Arc<Store>, snapshot_dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&snapshot_dir)?;
        Ok(StateMachine {
            store,
            snapshot_dir,
        })
    }

    /// The change store this machine applies to.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

fn read_owner<T: serde::de::DeserializeOwned>(
    store: &Store,
    name: &str,
) -> Result<Option<T>, AnyError> {
    match store.owner_meta(name).map_err(any)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| any(format!("corrupt {name}: {e}"))),
    }
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
            Op::CreateTenant { name } => txn
                .create_tenant(name)
                .map(|t| serde_json::to_string(&t).unwrap_or_default()),
            Op::CreateCollection { tenant, name } => txn
                .create_collection(tenant, name)
                .map(|c| serde_json::to_string(&c).unwrap_or_default()),
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
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) => {
                let api = ApiError::from(e);
                out.push(Outcome::Rejected {
                    status: api.status().as_u16(),
                    error: api.to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// Storage failures stop the state machine; input errors are answers.
fn is_fatal(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Db(_) | StoreError::Io(_) | StoreError::Corrupt { .. } | StoreError::Join(_)
    )
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied: Option<LogId> =
            read_owner(&self.store, APPLIED).map_err(StorageIOError::read_state_machine)?;
        let membership: Option<StoredMembership> =
            read_owner(&self.store, MEMBERSHIP).map_err(StorageIOError::read_state_machine)?;
        Ok((applied, membership.unwrap_or_default()))
    }

    // openraft's own error type is large; it is built once per failed batch, never per entry.
    #[allow(clippy::result_large_err)]
    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut txn = store.begin();
            let mut membership = None;
            let mut responses = Vec::with_capacity(entries.len());
            for e in &entries {
                match &e.payload {
                    EntryPayload::Blank => responses.push(Vec::new()),
                    EntryPayload::Normal(cmd) => responses.push(
                        apply_command(&mut txn, cmd)
                            .map_err(|err| StorageIOError::apply(e.log_id, any(err)))?,
                    ),
                    EntryPayload::Membership(m) => {
                        membership = Some(StoredMembership::new(Some(e.log_id), m.clone()));
                        responses.push(Vec::new());
                    }
                }
            }
            let put = |txn: &mut Txn<'_>, name: &str, v: &[u8]| {
                txn.put_owner_meta(name, v)
                    .map_err(|err| StorageIOError::apply(last, any(err)))
            };
            put(
                &mut txn,
                APPLIED,
                &serde_json::to_vec(&Some(last))
                    .map_err(|e| StorageIOError::apply(last, any(e)))?,
            )?;
            if let Some(m) = membership {
                put(
                    &mut txn,
                    MEMBERSHIP,
                    &serde_json::to_vec(&m).map_err(|e| StorageIOError::apply(last, any(e)))?,
                )?;
            }
            store
                .commit(txn)
                .map_err(|err| StorageIOError::apply(last, any(err)))?;
            Ok(responses)
        })
        .await
        .map_err(|e| StorageIOError::write_state_machine(any(e)))?
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let store = self.store.clone();
        let dir = self.snapshot_dir.clone();
        let meta = meta.clone();
        let sig = Some(meta.signature());
        tokio::task::spawn_blocking(move || {
            let data = snapshot.into_inner();
            let applied = serde_json::to_vec(&meta.last_log_id).map_err(any)?;
            let membership = serde_json::to_vec(&meta.last_membership).map_err(any)?;
            store
                .import(
                    Cursor::new(&data),
                    &[(APPLIED, &applied), (MEMBERSHIP, &membership)],
                )
                .map_err(any)?;
            save_snapshot(&dir, &meta, &data).map_err(any)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(sig.clone(), any(e)))?
        .map_err(|e| StorageIOError::write_snapshot(sig, e).into())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let dir = self.snapshot_dir.clone();
        tokio::task::spawn_blocking(move || load_snapshot(&dir))
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, any(e)))?
            .map_err(|e| StorageIOError::read_snapshot(None, any(e)).into())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let store = self.store.clone();
        let dir = self.snapshot_dir.clone();
        tokio::task::spawn_blocking(move || -> Result<Snapshot, AnyError> {
            store.sync().map_err(any)?;
            let mut data = Vec::new();
            let header: Header = store
                .export(
                    &mut data,
                    ExportOptions {
                        idempotency: true,
                        owner: true,
                    },
                )
                .map_err(any)?;
            let applied: Option<LogId> = header
                .owner
                .get(APPLIED)
                .map(|v| serde_json::from_str(v))
                .transpose()
                .map_err(any)?
                .flatten();
            let membership: StoredMembership = header
                .owner
                .get(MEMBERSHIP)
                .map(|v| serde_json::from_str(v))
                .transpose()
                .map_err(any)?
                .unwrap_or_default();
            let snapshot_id = match applied {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, header.created_ts),
                None => format!("0-0-{}", header.created_ts),
            };
            let meta = SnapshotMeta {
                last_log_id: applied,
                last_membership: membership,
                snapshot_id,
            };
            save_snapshot(&dir, &meta, &data)?;
            Ok(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            })
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, any(e)))?
        .map_err(|e| StorageIOError::write_snapshot(None, e).into())
    }
}

/// Writes the snapshot as one file, `[meta length: u32][meta JSON][data]`, to a temp file,
/// synced, then renamed over the previous one, so meta and data never disagree.
fn save_snapshot(dir: &std::path::Path, meta: &SnapshotMeta, data: &[u8]) -> Result<(), AnyError> {
    use std::io::Write;
    let meta_bytes = serde_json::to_vec(&SavedMeta { meta: meta.clone() }).map_err(any)?;
    let tmp = dir.join("current.snap.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(any)?;
    f.write_all(&(meta_bytes.len() as u32).to_be_bytes())
        .map_err(any)?;
    f.write_all(&meta_bytes).map_err(any)?;
    f.write_all(data).map_err(any)?;
    f.sync_all().map_err(any)?;
    std::fs::rename(&tmp, dir.join("current.snap")).map_err(any)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(any)
}

fn load_snapshot(dir: &std::path::Path) -> Result<Option<Snapshot>, AnyError> {
    let path = dir.join("current.snap");
    let mut bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(any(e)),
    };
    let corrupt = |what: &str| any(format!("corrupt snapshot {}: {what}", path.display()));
    let len = bytes
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| corrupt("short file"))?;
    let meta_bytes = bytes.get(4..4 + len).ok_or_else(|| corrupt("short meta"))?;
    let saved: SavedMeta =
        serde_json::from_slice(meta_bytes).map_err(|e| corrupt(&e.to_string()))?;
    let data = bytes.split_off(4 + len);
    Ok(Some(Snapshot {
        meta: saved.meta,
        snapshot: Box::new(Cursor::new(data)),
    }))
}
