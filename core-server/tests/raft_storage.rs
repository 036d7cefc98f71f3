//! openraft's storage conformance suite on our RocksDB log store and the state machine over
//! the change store.

use changeagent_server::raft::log_store::LogStore;
use changeagent_server::raft::state_machine::StateMachine;
use changeagent_server::raft::types::{StorageError, TypeConfig};
use changeagent_store::Store;
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageIOError;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let log = LogStore::open(&dir.path().join("raft"))
            .map_err(|e| StorageIOError::write(&std::io::Error::other(format!("{e:#}"))))?;
        let store =
            Store::open(dir.path().join("changes")).map_err(|e| StorageIOError::write(&e))?;
        let sm = StateMachine::new(store, dir.path().join("snapshots"))
            .map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(RocksBuilder).expect("storage conformance suite");
}
