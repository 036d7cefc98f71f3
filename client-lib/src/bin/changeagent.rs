//! `changeagent`: post, get and follow changes from the command line. All
//! logic lives in [`changeagent_client::cli`].

use std::io::IsTerminal;
use std::process::ExitCode;

use changeagent_client::cli::{self, Cli};
use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => match cli::describe(&error) {
            // The reader closed stdout (`changeagent tail -f | head`): done.
            None => ExitCode::SUCCESS,
            Some(message) => {
                eprintln!("changeagent: {message}");
                ExitCode::FAILURE
            }
        },
    }
}
