//! Finding the binaries the harness starts: `$CHANGEAGENT_<NAME>_BIN`, else
//! next to the running executable (a test in `target/<profile>/deps/`, the
//! benchmark in `target/<profile>/`), else an error saying how to build them.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::error::{Error, OrPanic, Result};

/// The core node binary, which most tests and the benchmark start.
pub const SERVER: &str = "changeagent-server";

/// Which executable to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binary {
    /// A workspace binary by name (`changeagent-server`,
    /// `changeagent-checkpointer`, `changeagent-edge`), found by
    /// [`locate`](Binary::locate).
    Named(String),
    /// This file, e.g. from a benchmark's `--server-bin`.
    Path(PathBuf),
}

impl Default for Binary {
    /// The core node, [`SERVER`].
    fn default() -> Self {
        Binary::server()
    }
}

impl Binary {
    /// The core node, [`SERVER`].
    pub fn server() -> Self {
        Binary::Named(SERVER.to_string())
    }

    /// A workspace binary by name.
    pub fn named(name: impl Into<String>) -> Self {
        Binary::Named(name.into())
    }

    /// The binary's file name, for messages.
    pub fn name(&self) -> String {
        match self {
            Binary::Named(name) => name.clone(),
            Binary::Path(path) => path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
        }
    }

    /// The path to run: a [`Binary::Path`] as given; a [`Binary::Named`]
    /// from its environment variable ([`env_var`]), else next to the running
    /// executable, or in its parent when that is cargo's `deps/` directory.
    /// Fails, saying how to build it, when the file is not there.
    pub fn locate(&self) -> Result<PathBuf> {
        let looked = match self {
            Binary::Path(path) => vec![path.clone()],
            Binary::Named(name) => match std::env::var_os(env_var(name)) {
                Some(path) => vec![PathBuf::from(path)],
                None => beside_current_exe(name)?,
            },
        };
        match looked.iter().find(|p| p.is_file()) {
            Some(found) => Ok(found.clone()),
            None => Err(Error::BinaryNotFound {
                name: self.name(),
                looked,
                env: env_var(&self.name()),
            }),
        }
    }
}

/// The environment variable naming the path of binary `name`:
/// `changeagent-server` → `CHANGEAGENT_SERVER_BIN`, `changeagent-edge` →
/// `CHANGEAGENT_EDGE_BIN`.
pub fn env_var(name: &str) -> String {
    let stem = name.strip_prefix("changeagent-").unwrap_or(name);
    format!(
        "CHANGEAGENT_{}_BIN",
        stem.to_ascii_uppercase().replace('-', "_")
    )
}

/// Where binary `name` would be next to the running executable: its own
/// directory, then (for a test executable in `deps/`) the profile directory.
fn beside_current_exe(name: &str) -> Result<Vec<PathBuf>> {
    let exe = std::env::current_exe().map_err(Error::io("locating", "the running executable"))?;
    let Some(dir) = exe.parent() else {
        return Ok(Vec::new());
    };
    let mut places = vec![dir.join(name)];
    if dir.file_name() == Some(OsStr::new("deps")) {
        places.extend(dir.parent().map(|profile: &Path| profile.join(name)));
    }
    Ok(places)
}

/// The path of the `changeagent-server` binary; panics, saying how to build
/// it, when it is not there.
#[track_caller]
pub fn server_bin() -> PathBuf {
    Binary::server().locate().or_panic()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_var_names_follow_the_binary() {
        assert_eq!(env_var("changeagent-server"), "CHANGEAGENT_SERVER_BIN");
        assert_eq!(
            env_var("changeagent-checkpointer"),
            "CHANGEAGENT_CHECKPOINTER_BIN"
        );
        assert_eq!(env_var("changeagent-edge"), "CHANGEAGENT_EDGE_BIN");
        assert_eq!(env_var("some-tool"), "CHANGEAGENT_SOME_TOOL_BIN");
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let bin = Binary::Path(PathBuf::from("/nonexistent/changeagent-server"));
        assert_eq!(bin.name(), "changeagent-server");
        let text = bin.locate().unwrap_err().to_string();
        assert!(text.contains("cargo build --workspace --bins"), "{text}");
        assert!(
            text.contains("cargo build --release --workspace --bins"),
            "{text}"
        );
        assert!(text.contains("CHANGEAGENT_SERVER_BIN"), "{text}");
        assert!(text.contains("/nonexistent/changeagent-server"), "{text}");
    }

    #[test]
    fn a_named_binary_is_looked_for_beside_the_test_executable() {
        let places = beside_current_exe("changeagent-nothing").unwrap();
        // This test runs from target/<profile>/deps/: both places are tried.
        assert_eq!(places.len(), 2, "{places:?}");
        assert!(places.iter().all(|p| p.ends_with("changeagent-nothing")));
        let err = Binary::named("changeagent-nothing").locate().unwrap_err();
        assert!(err.to_string().contains("CHANGEAGENT_NOTHING_BIN"), "{err}");
    }
}
