//! `consistent=true` reads: the node asks the leader for a read index (the leader confirms
//! its leadership with a quorum first), then waits until it has applied that far, so the
//! read reflects every write acknowledged before it began.

use std::sync::Arc;
use std::time::Duration;

use changeagent_api::{ApiError, BarrierFuture, ReadBarrier};
use tokio::time::Instant;

use super::forward::{leader, LeaderIs};
use super::raft::ReadIndex;
use crate::identity::Identity;
use crate::raft::Raft;

/// The core's read barrier.
pub struct LeaderBarrier {
    pub raft: Raft,
    pub identity: Arc<Identity>,
    pub client: reqwest::Client,
    pub timeout: Duration,
}

fn unavailable(message: String) -> ApiError {
    ApiError::Unavailable {
        message,
        retry_after_secs: 1,
    }
}

impl LeaderBarrier {
    async fn wait_for_leader(&self) -> Result<(), ApiError> {
        let deadline = Instant::now() + self.timeout;
        let me = self.identity.node_id;
        let mut exclude = None;
        loop {
            let index = match leader(&self.raft, me, deadline, exclude).await {
                None => {
                    return Err(unavailable(format!(
                        "no leader confirmed a consistent read within {} ms; retry, or read \
                         without consistent=true",
                        self.timeout.as_millis()
                    )))
                }
                Some(LeaderIs::Me) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    return match tokio::time::timeout(
                        left,
                        self.raft
                            .ensure_linearizable(openraft::ReadPolicy::ReadIndex),
                    )
                    .await
                    {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(unavailable(format!(
                            "cannot confirm leadership for a consistent read: {e}"
                        ))),
                        Err(_) => Err(unavailable(
                            "leadership not confirmed in time (no quorum?)".into(),
                        )),
                    };
                }
                Some(LeaderIs::Other { id, addr }) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let req = self
                        .client
                        .post(format!("{}/raft/read-index", self.identity.base_url(&addr)))
                        .timeout(left);
                    match self.identity.sign(req).send().await {
                        Err(e) if e.is_connect() => {
                            exclude = Some(id);
                            continue;
                        }
                        Err(e) => {
                            return Err(unavailable(format!(
                                "the leader at {addr} did not answer a read index: {e}"
                            )))
                        }
                        Ok(resp) if resp.status().is_success() => {
                            resp.json::<ReadIndex>()
                                .await
                                .map_err(|e| unavailable(format!("bad read index answer: {e}")))?
                                .index
                        }
                        Ok(resp) => {
                            return Err(unavailable(format!(
                                "the leader at {addr} refused a read index ({})",
                                resp.status()
                            )))
                        }
                    }
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            return self
                .raft
                .wait(Some(left))
                .applied_index_at_least(Some(index), "consistent read")
                .await
                .map(|_| ())
                .map_err(|e| {
                    unavailable(format!(
                        "this node did not catch up to the leader in time ({e}); retry"
                    ))
                });
        }
    }
}

impl ReadBarrier for LeaderBarrier {
    fn wait(&self) -> BarrierFuture<'_> {
        Box::pin(self.wait_for_leader())
    }
}
