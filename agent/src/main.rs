//! `philotes` command line: run | check | maintain | demo | version.

#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use philotes::agent::{shutdown_signal, Agent};
use philotes::config::Config;
use philotes::telemetry::{self, Telemetry};

#[derive(Parser)]
#[command(
    name = "philotes",
    version,
    about = "PostgreSQL → Apache Iceberg change data capture, observable to the bone"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent until SIGINT/SIGTERM, then drain and exit.
    Run {
        /// Configuration file (TOML).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate the configuration and reach every source and the catalog.
    Check {
        /// Configuration file (TOML).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Maintain the pipelines' tables once: compaction, snapshot expiry, metadata clean-up,
    /// orphan removal (the actions the agent runs in the background), and print what was done.
    Maintain {
        /// Configuration file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// Only this pipeline's tables.
        #[arg(long)]
        pipeline: Option<String>,
        /// Only this table (`namespace.table` or `table`).
        #[arg(long)]
        table: Option<String>,
        /// Print what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Local demo: private PostgreSQL, generated changes, local Iceberg warehouse.
    Demo {
        /// Where the catalog and warehouse go.
        #[arg(long, default_value = "./philotes-demo")]
        dir: PathBuf,
        /// Stop after this long (e.g. "30s"); default: until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Changes per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// API and /metrics address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
    },
    /// Print the version.
    Version,
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("philotes: {e}");
        ExitCode::from(2)
    })
}

/// glibc gives threads that allocate at the same time arenas of their own (up to 8 per core)
/// and hands little of their freed memory back, so a long-running agent's RSS creeps up with
/// every metadata file it parses and writes. The soak benchmark measured the difference (see
/// docs/performance.md); two arenas and a fixed mmap threshold, set before any thread starts.
/// `MALLOC_ARENA_MAX` / `MALLOC_MMAP_THRESHOLD_` in the environment still win.
fn main() -> ExitCode {
    philotes::memory::tune_allocator();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("philotes: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        match cli.command {
            Cmd::Version => {
                println!("philotes {}", env!("CARGO_PKG_VERSION"));
                ExitCode::SUCCESS
            }
            Cmd::Check { config } => {
                let cfg = match load(&config) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                telemetry::init_basic_logging("warn", cfg.secrets());
                let report = philotes::check::check(&cfg).await;
                for w in &report.warnings {
                    eprintln!("warning: {w}");
                }
                if report.problems.is_empty() {
                    println!("ok: {} pipeline(s), catalog reachable", cfg.pipelines.len());
                    ExitCode::SUCCESS
                } else {
                    for p in report.problems {
                        eprintln!("philotes: {p}");
                    }
                    ExitCode::from(2)
                }
            }
            Cmd::Maintain {
                config,
                pipeline,
                table,
                dry_run,
            } => {
                let cfg = match load(&config) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                telemetry::init_basic_logging("warn", cfg.secrets());
                maintain(&cfg, pipeline.as_deref(), table.as_deref(), dry_run).await
            }
            Cmd::Run { config } => {
                let cfg = match load(&config) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                run(cfg).await
            }
            Cmd::Demo {
                dir,
                duration,
                rate,
                listen,
            } => {
                let opts = philotes::demo::DemoOptions {
                    dir,
                    duration,
                    rate,
                    listen,
                };
                match philotes::demo::run(opts).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("philotes demo: {e}");
                        ExitCode::from(1)
                    }
                }
            }
        }
    })
}

async fn maintain(
    cfg: &Config,
    pipeline: Option<&str>,
    table: Option<&str>,
    dry_run: bool,
) -> ExitCode {
    match philotes::maintenance::run_once(cfg, pipeline, table, dry_run, None).await {
        Ok(outcomes) => {
            let mut failed = false;
            for (table, o) in &outcomes {
                println!(
                    "{table}\t{}\t{}\t{}",
                    o.action.as_str(),
                    o.status.as_str(),
                    o.summary
                );
                failed |= o.status == philotes::sink::iceberg::maintenance::Status::Failed;
            }
            if outcomes.is_empty() {
                println!("no tables to maintain");
            }
            if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(philotes::maintenance::MaintainError::NotFound(e)) => {
            eprintln!("philotes: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("philotes: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(cfg: Config) -> ExitCode {
    let telemetry = match Telemetry::init(&cfg.telemetry) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("philotes: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry.init_logging(&cfg.telemetry, cfg.secrets());
    // Problems that no retry can cure (wal_level, missing tables) stop the start with status 2.
    let fatal = philotes::check::fatal_source_problems(&cfg).await;
    if !fatal.is_empty() {
        for p in fatal {
            eprintln!("philotes: {p}");
        }
        return ExitCode::from(2);
    }
    let agent = match Agent::start(cfg, telemetry).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("philotes: {e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(api = ?agent.api_addr, "philotes running");
    shutdown_signal().await;
    tracing::info!("shutting down: draining pipelines");
    agent.stop().await;
    ExitCode::SUCCESS
}
