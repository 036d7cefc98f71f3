//! Reading what a child process logs while it runs: the complete lines added
//! to its log file since the last look, and the `key=value` fields of a
//! `tracing` line (`… INFO target: message a=1 b=2.5`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, Context, Result};

/// Follows one log file: each [`poll`](Self::poll) returns the lines
/// completed since the previous one.
pub struct LogTail {
    path: PathBuf,
    /// Bytes of the file already read, `partial` included.
    offset: u64,
    /// The start of a line whose end has not been written yet.
    partial: Vec<u8>,
}

impl LogTail {
    /// Follows `path` from its start (it need not exist yet).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// The lines completed since the last call, without their newlines;
    /// none while the file does not exist.
    pub fn poll(&mut self) -> Result<Vec<String>> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(e).with_context(|| format!("opening {}", self.path.display()));
            }
        };
        let read = file
            .seek(SeekFrom::Start(self.offset))
            .and_then(|_| file.read_to_end(&mut self.partial))
            .with_context(|| format!("reading {}", self.path.display()))?;
        self.offset += read as u64;
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let rest = self.partial.split_off(end + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        Ok(String::from_utf8_lossy(&complete)
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

/// The `key=value` fields of a `tracing` line after `message`, e.g.
/// `checkpoint written index=5 bytes=120 seconds=0.5 object=a/b`. Values
/// with spaces are not expected in the lines read here.
pub struct Fields<'a> {
    line: &'a str,
    values: HashMap<&'a str, &'a str>,
}

impl<'a> Fields<'a> {
    /// The fields after `message` in `line`; `None` when the line does not
    /// hold `message`.
    pub fn after(line: &'a str, message: &str) -> Option<Self> {
        let pos = line.find(message)?;
        let values = line[pos + message.len()..]
            .split_whitespace()
            .filter_map(|token| token.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        Some(Self { line, values })
    }

    /// Field `key` parsed as `T`; an error quoting the line when it is
    /// missing or does not parse.
    pub fn get<T: FromStr>(&self, key: &str) -> Result<T> {
        let raw = self
            .values
            .get(key)
            .ok_or_else(|| anyhow!("no field {key}= in the log line {:?}", self.line))?;
        raw.parse().map_err(|_| {
            anyhow!(
                "field {key}={raw} in the log line {:?} is not a number",
                self.line
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn fields_of_a_tracing_line() {
        let line = "2025-01-01T00:00:00.123456Z  INFO changeagent_checkpointer::cycle: \
                    checkpoint written index=1000004 records=1000004 bytes=31234567 \
                    raw_bytes=190000000 export_secs=3.5 upload_secs=0.25 verify_secs=0.125 \
                    seconds=4.0 object=c1/checkpoints/all/00000000001000004.ckpt.zst";
        let f = Fields::after(line, "checkpoint written").unwrap();
        assert_eq!(f.get::<u64>("index").unwrap(), 1_000_004);
        assert_eq!(f.get::<u64>("raw_bytes").unwrap(), 190_000_000);
        assert_eq!(f.get::<f64>("verify_secs").unwrap(), 0.125);
        let missing = f.get::<u64>("nothing").unwrap_err().to_string();
        assert!(missing.contains("no field nothing="), "{missing}");
        let bad = f.get::<u64>("seconds").unwrap_err().to_string();
        assert!(bad.contains("is not a number"), "{bad}");
        assert!(Fields::after(line, "checkpoint started").is_none());
        let quoted = r#"INFO x: restoring from a checkpoint index=7 from_cluster="c""#;
        let f = Fields::after(quoted, "restoring from a checkpoint").unwrap();
        assert_eq!(f.get::<String>("from_cluster").unwrap(), "c");
    }

    #[test]
    fn a_tail_returns_each_complete_line_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let mut tail = LogTail::new(&path);
        assert!(tail.poll().unwrap().is_empty(), "no file yet");
        let mut f = File::create(&path).unwrap();
        f.write_all(b"one\ntw").unwrap();
        assert_eq!(tail.poll().unwrap(), ["one"]);
        assert!(tail.poll().unwrap().is_empty());
        f.write_all(b"o\nthree\n").unwrap();
        assert_eq!(tail.poll().unwrap(), ["two", "three"]);
        f.write_all(b"four\n").unwrap();
        assert_eq!(tail.poll().unwrap(), ["four"]);
    }
}
