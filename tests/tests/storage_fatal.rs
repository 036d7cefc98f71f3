//! A node whose storage cannot be written (its disk is full: the Raft log or the change
//! store, whichever fails first) stops the whole process with a non-zero exit and says why,
//! so a supervisor restarts it, rather than answering 503 forever. The disk is a
//! loop-mounted 48 MiB ext4 file system, which needs root and loop devices: without them
//! the test says so and skips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use changeagent_testkit::{ServerOptions, ServerProcess};

/// Size of the file system the node's data dir lives on.
const DISK_BYTES: u64 = 48 << 20;
/// Each post carries this much data, so the disk fills in a few dozen posts.
const CHANGE_BYTES: usize = 900 << 10;
/// More posts than can fit on the disk.
const MAX_POSTS: usize = 200;

/// Unmounts the file system when the test ends, passed or not.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs `cmd`; `Err` with what it said when it cannot run or fails.
fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {} {}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Makes a small ext4 file system in `image` and mounts it on `at`.
fn mount_small_disk(image: &Path, at: &Path) -> Result<Mounted, String> {
    std::fs::File::create(image)
        .and_then(|f| f.set_len(DISK_BYTES))
        .map_err(|e| format!("{}: {e}", image.display()))?;
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image))?;
    std::fs::create_dir_all(at).map_err(|e| format!("{}: {e}", at.display()))?;
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(image)
        .arg(at))?;
    Ok(Mounted(at.to_path_buf()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_disk_is_full_exits_non_zero_and_says_why() {
    let tmp = tempfile::tempdir().expect("temp dir");
    // The node's directory stays on the real disk (its log is written there); only its
    // data dir is the small file system.
    let node_dir = tmp.path().join("node");
    let _mounted = match mount_small_disk(&tmp.path().join("disk.img"), &node_dir.join("data")) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: cannot mount a small file system ({why})");
            return;
        }
    };
    let mut node = ServerProcess::start(ServerOptions::default().dir(&node_dir)).await;
    let api = node.api();
    let body = format!(r#"{{"data":"{}"}}"#, "x".repeat(CHANGE_BYTES));
    let mut accepted = 0;
    let refused = loop {
        assert!(
            accepted < MAX_POSTS,
            "{MAX_POSTS} posts of {CHANGE_BYTES} B fit on a {DISK_BYTES} B disk"
        );
        match api.try_post_json("/changes", &body).await {
            Ok(r) if r.status == 201 || r.status == 200 => accepted += 1,
            Ok(r) => break format!("{} {}", r.status, r.text()),
            Err(e) => break e.to_string(),
        }
    };
    let status = node.wait_exit(Duration::from_secs(60)).await;
    let log = node.log();
    assert!(
        !status.success(),
        "the node exited with {status} after {accepted} posts and then {refused}:\n{log}"
    );
    assert!(
        log.contains("Raft stopped; shutting the node down"),
        "the node did not say why it stopped:\n{log}"
    );
}
