//! Trusting a private CA for `https://` endpoints (`--ca`). Without it, the system's root
//! certificates are trusted.

use std::path::{Path, PathBuf};

/// The `--ca` flag of the CLI and of the tiers that call upstream (edges, checkpointers).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CaFlags {
    /// PEM file of the CA certificate(s) to trust for `https://` endpoints instead of the
    /// system's roots (a private CA, such as the one the cluster's certificates come from).
    #[arg(long, env = "CHANGEAGENT_CA", global = true)]
    pub ca: Option<PathBuf>,
}

impl CaFlags {
    /// The certificates of `--ca`; `None` without it.
    pub fn certificates(&self) -> anyhow::Result<Option<Vec<reqwest::Certificate>>> {
        self.ca
            .as_deref()
            .map(|p| read_ca_file(p).map_err(|e| anyhow::anyhow!("cannot use --ca: {e}")))
            .transpose()
    }
}

/// `builder` trusting only `roots` when given (the system's roots otherwise).
pub fn trust(
    mut builder: reqwest::ClientBuilder,
    roots: Option<Vec<reqwest::Certificate>>,
) -> reqwest::ClientBuilder {
    if let Some(roots) = roots {
        builder = builder.tls_built_in_root_certs(false);
        for cert in roots {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
}

/// Reads every certificate of a PEM file.
pub fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no CERTIFICATE block", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "no pem here\n").unwrap();
        assert!(read_ca_file(&path).unwrap_err().contains("no CERTIFICATE"));
        let flags = CaFlags {
            ca: Some(dir.path().join("missing.pem")),
        };
        assert!(flags
            .certificates()
            .unwrap_err()
            .to_string()
            .contains("--ca"));
        assert!(CaFlags::default().certificates().unwrap().is_none());
    }
}
