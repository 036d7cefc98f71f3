//! openraft's storage conformance suite on our RocksDB log store and the state machine over
//! the change store.

use changeagent_server::raft::log_store::LogStore;
use changeagent_server::raft::state_machine::StateMachine;
use changeagent_server::raft::types::{StorageError, TypeConfig};
use changeagent_store::Store;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::{ErrorSubject, ErrorVerb};

struct RocksBuilder;

fn setup_error(e: impl std::fmt::Display) -> StorageError {
    StorageError::from_io_error(
        ErrorSubject::Store,
        ErrorVerb::Write,
        std::io::Error::other(e.to_string()),
    )
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(setup_error)?;
        let log =
            LogStore::open(&dir.path().join("raft")).map_err(|e| setup_error(format!("{e:#}")))?;
        let store = Store::open(dir.path().join("changes")).map_err(setup_error)?;
        let sm = StateMachine::new(store, dir.path().join("snapshots")).map_err(setup_error)?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::test_all(RocksBuilder)
        .await
        .expect("storage conformance suite");
}
