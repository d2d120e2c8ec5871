//! `cim-standalone` binary: a route and a connection server in this one process, state in
//! memory. Loads the configuration (defaults < `--config` file < `CIM_STANDALONE_*` < flags),
//! builds a tokio runtime of `[server] worker_threads` workers (one runtime runs both roles),
//! starts both, prints where they listen and how to connect on stdout, runs until ctrl-c or
//! SIGTERM, then stops the server and the route gracefully. Logs go to stderr.

use anyhow::Context;
use cim_common::config::ConfigError;
use clap::Parser;
use std::io::Write;

fn main() -> anyhow::Result<()> {
    let config = cim_standalone::Cli::parse()
        .load()
        .context("loading the configuration")?;
    // The runtime is sized before `start` checks the rest of the configuration.
    cim_common::cli::validate_worker_threads(config.server.worker_threads)
        .map_err(|m| ConfigError::invalid("standalone", "[server] worker_threads", m))?;
    cim_common::config::init_logging();
    cim_common::cli::raise_fd_limit();
    if config.route.worker_threads != 0 {
        tracing::warn!(
            "[route] worker_threads is ignored: both roles share one runtime, sized by \
             [server] worker_threads"
        );
    }
    let worker_threads = config.server.worker_threads;
    let runtime = cim_common::cli::runtime(worker_threads).context("building the tokio runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: cim_standalone::StandaloneConfig) -> anyhow::Result<()> {
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
