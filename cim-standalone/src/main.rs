//! `cim-standalone` binary: a route and a connection server in this one process, state in
//! memory. Loads the configuration (defaults < `--config` file < `CIM_STANDALONE_*` < flags),
//! starts both, prints where they listen and how to connect on stdout, runs until ctrl-c or
//! SIGTERM, then stops the server and the route gracefully. Logs go to stderr.

use clap::Parser;
use std::io::Write;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = cim_standalone::Cli::parse().load()?;
    cim_common::config::init_logging();
    cim_common::cli::raise_fd_limit();
    let running = cim_standalone::start(&config).await?;
    // Plain stdout, flushed: people read it, and so do scripts and tests (port 0 binds).
    let mut out = std::io::stdout().lock();
    out.write_all(running.banner().as_bytes())?;
    out.flush()?;
    drop(out);
    cim_common::cli::shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}
