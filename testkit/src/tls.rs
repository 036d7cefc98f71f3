//! Certificates for tests, made by the repository's `scripts/make-certs` (a throwaway CA and
//! certificates it signs), so the tests also check the script operators use.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// A directory holding a throwaway CA (`ca.pem`) and the certificates made with it.
#[derive(Debug, Clone)]
pub struct Certs {
    dir: PathBuf,
}

/// One certificate and its key.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertPair {
    /// `--tls-cert CERT --tls-key KEY`.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}

impl Certs {
    /// Uses `dir` (created, with a new CA, at the first [`Certs::make`]).
    pub fn new(dir: impl Into<PathBuf>) -> Certs {
        Certs { dir: dir.into() }
    }

    /// The CA certificate every certificate of this directory is signed by.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Makes (or replaces) the pair `name` for `name`, localhost, 127.0.0.1 and `sans`.
    pub fn make(&self, name: &str, sans: &[String]) -> Result<CertPair> {
        let script = script();
        let out = Command::new(&script)
            .arg(&self.dir)
            .arg(name)
            .args(sans)
            .output()
            .map_err(Error::io("running", &script))?;
        if !out.status.success() {
            return Err(Error::Io {
                action: "making a certificate with",
                path: script,
                cause: std::io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()),
            });
        }
        Ok(CertPair {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        })
    }
}

/// `scripts/make-certs` of this repository.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("make-certs")
}
