//! Threads of Raft's own for its blocking storage work. Log appends, vote writes and
//! applies never wait in the runtime's blocking pool behind client reads (thousands of woken
//! long-polls can fill it), and each kind of work keeps its order on its thread.

use std::sync::mpsc;
use std::thread;

type Job = Box<dyn FnOnce() + Send>;

/// One named OS thread running jobs in the order they are sent. It ends when the last
/// handle is dropped, after the jobs already sent.
pub struct IoThread {
    name: &'static str,
    jobs: mpsc::Sender<Job>,
}

/// The thread is gone (it panicked, or the process is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the {0} thread stopped")]
pub struct IoStopped(&'static str);

impl IoThread {
    /// Starts the thread.
    pub fn spawn(name: &'static str) -> std::io::Result<IoThread> {
        let (jobs, rx) = mpsc::channel::<Job>();
        thread::Builder::new().name(name.into()).spawn(move || {
            while let Ok(job) = rx.recv() {
                job();
            }
        })?;
        Ok(IoThread { name, jobs })
    }

    /// Queues `f` on the thread without waiting for it.
    pub fn send<F>(&self, f: F) -> Result<(), IoStopped>
    where
        F: FnOnce() + Send + 'static,
    {
        self.jobs
            .send(Box::new(f))
            .map_err(|_| IoStopped(self.name))
    }

    /// Runs `f` on the thread and waits for its result without blocking the caller's worker.
    pub async fn run<T, F>(&self, f: F) -> Result<T, IoStopped>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| IoStopped(self.name))?;
        rx.await.map_err(|_| IoStopped(self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_on_the_named_thread() {
        let io = IoThread::spawn("raft-test-io").unwrap();
        let name = io
            .run(|| thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("raft-test-io"));
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let runs: Vec<_> = (0..50)
            .map(|i| {
                let order = order.clone();
                io.run(move || order.lock().unwrap().push(i))
            })
            .collect();
        futures::future::join_all(runs).await;
        assert_eq!(*order.lock().unwrap(), (0..50).collect::<Vec<_>>());
    }
}
