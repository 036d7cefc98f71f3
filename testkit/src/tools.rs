//! Tools the tests run that the repository's own scripts install (`scripts/install-garage`,
//! `scripts/install-cargo-fuzz`): where each script puts its tool, and how a test finds it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Overrides the directory the install scripts put tools into.
pub const TOOLS_DIR_ENV: &str = "CHANGEAGENT_TOOLS_DIR";

/// A tool installed by `scripts/<script>` as `<tools dir>/<name>-<version>/bin/<name>`.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub name: &'static str,
    pub version: &'static str,
    /// The variable that names another binary to use instead.
    pub bin_env: &'static str,
    /// The script that installs it, e.g. `install-garage`.
    pub script: &'static str,
}

impl Tool {
    /// Where the script installs the tool: `$CHANGEAGENT_TOOLS_DIR` (default
    /// `$HOME/.cache/changeagent-tools`, the temp dir standing in for an unset `HOME`)
    /// `/NAME-VERSION/bin/NAME`.
    pub fn default_bin(&self) -> PathBuf {
        let tools = match std::env::var_os(TOOLS_DIR_ENV) {
            Some(dir) => PathBuf::from(dir),
            None => std::env::var_os("HOME")
                .map_or_else(std::env::temp_dir, PathBuf::from)
                .join(".cache")
                .join("changeagent-tools"),
        };
        tools
            .join(format!("{}-{}", self.name, self.version))
            .join("bin")
            .join(self.name)
    }

    /// The binary to run: the one [`Tool::bin_env`] names when set, else
    /// [`Tool::default_bin`]; an error saying how to install it when that file is missing.
    pub fn locate(&self) -> Result<PathBuf, String> {
        self.locate_in(std::env::var_os(self.bin_env), &self.default_bin())
    }

    /// [`Tool::locate`] with the variable's value `from_env` and the default path given.
    pub fn locate_in(&self, from_env: Option<OsString>, default: &Path) -> Result<PathBuf, String> {
        let (path, how) = match from_env {
            Some(path) => (
                PathBuf::from(path),
                format!(
                    "{} names a missing file; unset it to use the one scripts/{} installs",
                    self.bin_env, self.script
                ),
            ),
            None => (
                default.to_path_buf(),
                format!(
                    "run scripts/{} to install {} {} there, or set {} to a {} binary",
                    self.script, self.name, self.version, self.bin_env, self.name
                ),
            ),
        };
        if path.is_file() {
            return Ok(path);
        }
        Err(format!("{} is not at {}: {how}", self.name, path.display()))
    }
}
