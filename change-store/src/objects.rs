//! Checkpoint objects in object storage, through `object_store`: store URLs, uploads that are
//! read back and checked before anything names them, streamed downloads, `latest.json`,
//! listing and deleting.
//!
//! Object paths are relative to the store's root (the bucket for `s3://`, the directory for
//! `file://`) and include the URL's prefix, as manifests name them
//! (`changeagent_proto::checkpoint::object_path`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use changeagent_proto::checkpoint::{index_of_object, latest_path, object_path, scope_dir};
use changeagent_proto::{Manifest, Scope};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::error::{Error, Result};

/// Parts of a multipart upload: S3 needs at least 5 MiB per part but the last; 8 MiB keeps
/// memory small (a few parts in flight) and the part count low (a 10 GB checkpoint is 1,250
/// parts, well under S3's 10,000).
pub const DEFAULT_PART_BYTES: usize = 8 * 1024 * 1024;
/// Parts uploaded at once.
const PARTS_IN_FLIGHT: usize = 4;
/// How often a long upload or read-back reports progress in the log.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// An object store and the prefix checkpoints live under.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects").field("url", &self.url).finish()
    }
}

fn bad_url(url: &str, why: impl std::fmt::Display) -> Error {
    Error::Objects(format!(
        "object store URL {url:?}: {why}; use file:///path, file://./relative/path, \
         s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or memory://"
    ))
}

impl Objects {
    /// Opens the store a URL names: `file:///abs/path` or `file://./rel/path` (created if
    /// missing), `s3://bucket/prefix` (credentials and endpoint from the `AWS_*` variables),
    /// `gs://bucket/prefix` (`GOOGLE_*`), `az://container/prefix` (`AZURE_*`), `memory://`.
    pub fn from_url(url: &str) -> Result<Objects> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad_url(url, "no scheme"))?;
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match scheme {
            "file" => {
                let dir = if rest.starts_with('/') {
                    PathBuf::from(rest)
                } else {
                    std::env::current_dir()?.join(rest)
                };
                std::fs::create_dir_all(&dir)
                    .map_err(|e| bad_url(url, format!("cannot create {}: {e}", dir.display())))?;
                let local = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad_url(url, e))?;
                (Arc::new(local), String::new())
            }
            "memory" => (
                Arc::new(object_store::memory::InMemory::new()),
                String::new(),
            ),
            "s3" | "gs" | "az" | "azure" => {
                let parsed = url::Url::parse(url).map_err(|e| bad_url(url, e))?;
                let prefix = parsed.path().trim_matches('/').to_owned();
                let store: Arc<dyn ObjectStore> = match scheme {
                    "s3" => Arc::new(
                        object_store::aws::AmazonS3Builder::from_env()
                            .with_url(url)
                            .build()
                            .map_err(|e| bad_url(url, e))?,
                    ),
                    "gs" => Arc::new(
                        object_store::gcp::GoogleCloudStorageBuilder::from_env()
                            .with_url(url)
                            .build()
                            .map_err(|e| bad_url(url, e))?,
                    ),
                    _ => Arc::new(
                        object_store::azure::MicrosoftAzureBuilder::from_env()
                            .with_url(url)
                            .build()
                            .map_err(|e| bad_url(url, e))?,
                    ),
                };
                (store, prefix)
            }
            other => return Err(bad_url(url, format!("unknown scheme {other:?}"))),
        };
        Ok(Objects {
            store,
            prefix,
            url: url.to_owned(),
        })
    }

    /// The URL this store was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where a checkpoint object goes.
    pub fn object_path(&self, cluster_id: &str, scope: &Scope, index: u64) -> String {
        object_path(&self.prefix, cluster_id, scope, index)
    }

    /// Uploads a local file of `size` bytes to `path`, in parts. Nothing may name the object
    /// before [`Objects::verify`] read it back. `on_sent` hears the bytes handed to the upload
    /// so far.
    pub async fn upload(
        &self,
        path: &str,
        file: &Path,
        size: u64,
        part_bytes: usize,
        mut on_sent: impl FnMut(u64) + Send,
    ) -> Result<()> {
        let target = ObjectPath::from(path);
        let started = Instant::now();
        let mut input = tokio::fs::File::open(file).await?;
        let upload = self.store.put_multipart(&target).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part_bytes.max(1));
        let mut buf = vec![0u8; part_bytes.clamp(64 * 1024, 8 * 1024 * 1024)];
        let mut sent = 0u64;
        let mut last_report = started;
        let result: Result<()> = async {
            loop {
                let n = input.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                writer.write(&buf[..n]);
                sent += n as u64;
                on_sent(sent);
                if last_report.elapsed() >= PROGRESS_EVERY {
                    last_report = Instant::now();
                    progress("uploading", path, sent, size, started);
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(%path, error = %abort, "cannot abort an interrupted upload");
            }
            return Err(e);
        }
        writer.finish().await?;
        tracing::info!(
            %path,
            bytes = sent,
            seconds = started.elapsed().as_secs_f64(),
            "uploaded a checkpoint"
        );
        Ok(())
    }

    /// Reads an object whole and checks its size and sha256.
    pub async fn verify(&self, path: &str, size: u64, sha256: &str) -> Result<()> {
        let started = Instant::now();
        let mut last_report = started;
        let mut stream = self.store.get(&ObjectPath::from(path)).await?.into_stream();
        let mut hasher = Sha256::new();
        let mut read = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            read += chunk.len() as u64;
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                progress("verifying", path, read, size, started);
            }
        }
        check(path, size, sha256, read, &hasher.finalize())
    }

    /// Downloads an object into a local file and checks its size and sha256 on the way.
    pub async fn download(&self, path: &str, dest: &Path, size: u64, sha256: &str) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let started = Instant::now();
        let mut last_report = started;
        let mut stream = self.store.get(&ObjectPath::from(path)).await?.into_stream();
        let mut out = tokio::fs::File::create(dest).await?;
        let mut hasher = Sha256::new();
        let mut read = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            out.write_all(&chunk).await?;
            read += chunk.len() as u64;
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                progress("downloading", path, read, size, started);
            }
        }
        out.flush().await?;
        check(path, size, sha256, read, &hasher.finalize())
    }

    /// Streams an object's bytes.
    pub async fn get(&self, path: &str) -> Result<BoxStream<'static, Result<Bytes>>> {
        let result = self.store.get(&ObjectPath::from(path)).await?;
        Ok(result.into_stream().map_err(Error::from).boxed())
    }

    /// Writes a scope's `latest.json` (atomically: a reader sees the old or the new one).
    pub async fn put_latest(&self, manifest: &Manifest) -> Result<()> {
        let path = latest_path(&self.prefix, &manifest.cluster_id, &manifest.scope);
        let body =
            serde_json::to_vec_pretty(manifest).map_err(|e| Error::Objects(e.to_string()))?;
        self.store
            .put(&ObjectPath::from(path), PutPayload::from(body))
            .await?;
        Ok(())
    }

    /// A cluster's `latest.json` of a scope; `None` when there is none.
    pub async fn latest(&self, cluster_id: &str, scope: &Scope) -> Result<Option<Manifest>> {
        self.read_manifest(&latest_path(&self.prefix, cluster_id, scope))
            .await
    }

    async fn read_manifest(&self, path: &str) -> Result<Option<Manifest>> {
        match self.store.get(&ObjectPath::from(path)).await {
            Ok(r) => {
                let bytes = r.bytes().await?;
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| Error::Objects(format!("{path} is not a manifest: {e}")))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The newest `latest.json` of a scope under this store's prefix, whatever the cluster
    /// (a restore does not know the old cluster's id).
    pub async fn newest_latest(&self, scope: &Scope) -> Result<Option<Manifest>> {
        let root = if self.prefix.is_empty() {
            None
        } else {
            Some(ObjectPath::from(self.prefix.as_str()))
        };
        let listed = self.store.list_with_delimiter(root.as_ref()).await?;
        let mut newest: Option<Manifest> = None;
        for dir in listed.common_prefixes {
            let Some(cluster) = dir.filename() else {
                continue;
            };
            if let Some(m) = self.latest(cluster, scope).await? {
                if newest.as_ref().is_none_or(|n| m.created_ts > n.created_ts) {
                    newest = Some(m);
                }
            }
        }
        Ok(newest)
    }

    /// Checkpoint objects of a cluster's scope, by index (objects of interrupted uploads
    /// included; `latest.json` and other names excluded).
    pub async fn list(&self, cluster_id: &str, scope: &Scope) -> Result<Vec<(u64, String)>> {
        let dir = scope_dir(&self.prefix, cluster_id, scope);
        let dir = ObjectPath::from(dir.trim_end_matches('/'));
        let mut out: Vec<(u64, String)> = self
            .store
            .list(Some(&dir))
            .map_ok(|meta| meta.location.to_string())
            .try_filter_map(|p| async move { Ok(index_of_object(&p).map(|i| (i, p))) })
            .try_collect()
            .await?;
        out.sort();
        Ok(out)
    }

    /// Deletes an object; a missing one is not an error.
    pub async fn delete(&self, path: &str) -> Result<()> {
        match self.store.delete(&ObjectPath::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Compares what was read with what a manifest promises.
fn check(path: &str, size: u64, sha256: &str, read: u64, digest: &[u8]) -> Result<()> {
    let found = hex(digest);
    if read != size || found != sha256 {
        return Err(Error::Verify {
            object: path.to_owned(),
            detail: format!(
                "expected {size} bytes with sha256 {sha256}, found {read} bytes with sha256 {found}"
            ),
        });
    }
    Ok(())
}

fn progress(what: &str, path: &str, done: u64, total: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64().max(0.001);
    tracing::info!(
        %path,
        bytes = done,
        total,
        mb_per_sec = format!("{:.1}", done as f64 / secs / 1e6),
        "{what} a checkpoint"
    );
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(index: u64, object: String) -> Manifest {
        Manifest {
            index,
            scope: Scope::All,
            object,
            size: 0,
            sha256: String::new(),
            records: 0,
            created_ts: index as i64,
            cluster_id: "c1".into(),
        }
    }

    #[tokio::test]
    async fn upload_verify_list_latest_delete() {
        let objects = Objects::from_url("memory://").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x");
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        std::fs::write(&file, &data).unwrap();
        let sha = hex(&Sha256::digest(&data));
        let path = objects.object_path("c1", &Scope::All, 42);
        objects
            .upload(&path, &file, data.len() as u64, 100_000, |_| {})
            .await
            .unwrap();
        objects
            .verify(&path, data.len() as u64, &sha)
            .await
            .unwrap();
        let chunks: Vec<Bytes> = objects
            .get(&path)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let read = chunks.concat();
        assert_eq!(read, data);
        // A wrong size or hash fails verification.
        assert!(matches!(
            objects.verify(&path, 1, &sha).await,
            Err(Error::Verify { .. })
        ));
        assert!(matches!(
            objects
                .verify(&path, data.len() as u64, &"0".repeat(64))
                .await,
            Err(Error::Verify { .. })
        ));
        objects
            .put_latest(&manifest(42, path.clone()))
            .await
            .unwrap();
        assert_eq!(
            objects
                .latest("c1", &Scope::All)
                .await
                .unwrap()
                .unwrap()
                .index,
            42
        );
        assert_eq!(
            objects
                .newest_latest(&Scope::All)
                .await
                .unwrap()
                .unwrap()
                .index,
            42
        );
        assert!(objects.latest("c2", &Scope::All).await.unwrap().is_none());
        assert_eq!(
            objects.list("c1", &Scope::All).await.unwrap(),
            vec![(42, path.clone())]
        );
        objects.delete(&path).await.unwrap();
        objects.delete(&path).await.unwrap();
        assert!(objects.list("c1", &Scope::All).await.unwrap().is_empty());
    }

    #[test]
    fn urls() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/sub", dir.path().display());
        Objects::from_url(&url).unwrap();
        assert!(dir.path().join("sub").is_dir());
        for bad in ["nothing", "ftp://x", "file:/x"] {
            assert!(Objects::from_url(bad).is_err(), "{bad}");
        }
    }
}
