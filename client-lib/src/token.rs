//! The bearer token a client sends, read from a file so it stays out of process listings.

use std::path::{Path, PathBuf};

/// The `--token-file` flag of the CLI and of the tiers that call upstream (edges,
/// checkpointers).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TokenFlags {
    /// File holding the bearer token sent upstream (servers started with an auth file need
    /// one); surrounding whitespace is ignored.
    #[arg(long, env = "CHANGEAGENT_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
}

impl TokenFlags {
    /// The token, `None` without a file.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        self.token_file
            .as_deref()
            .map(|p| {
                read_token_file(p).map_err(|e| anyhow::anyhow!("cannot use --token-file: {e}"))
            })
            .transpose()
    }
}

/// Reads a token from a file (surrounding whitespace ignored).
pub fn read_token_file(path: &Path) -> std::io::Result<String> {
    let token = std::fs::read_to_string(path)?.trim().to_owned();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: a token must be non-empty visible ASCII without spaces",
                path.display()
            ),
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "s3cret");
        std::fs::write(&path, "two words").unwrap();
        assert!(read_token_file(&path).is_err());
        std::fs::write(&path, "\n").unwrap();
        assert!(read_token_file(&path).is_err());
        let flags = TokenFlags {
            token_file: Some(dir.path().join("missing")),
        };
        assert!(flags
            .token()
            .unwrap_err()
            .to_string()
            .contains("--token-file"));
        assert_eq!(TokenFlags::default().token().unwrap(), None);
    }
}
