//! `meshgate`: the standalone binary and operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "meshgate", version, about = "meshgate AI gateway: standalone mesh and operator commands")]
struct Cli {
    /// Configuration file (TOML, one section per service); `MESHGATE_CONFIG` when unset.
    #[arg(long, global = true, env = "MESHGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run all six services in this process, each on its own loopback port.
    Up,
    /// Apply the database migrations of every service (needs `DATABASE_URL`).
    Migrate,
    /// Validate the configuration and exit.
    CheckConfig,
    /// Make a development mesh CA and a certificate per service for mTLS between services.
    Certs(meshgate::commands::CertsArgs),
    /// Organizations (needs `DATABASE_URL`).
    #[command(subcommand)]
    Orgs(meshgate::tenancy::OrgCommand),
    /// Projects (needs `DATABASE_URL`).
    #[command(subcommand)]
    Projects(meshgate::tenancy::ProjectCommand),
    /// Users and their roles (needs `DATABASE_URL`).
    #[command(subcommand)]
    Users(meshgate::tenancy::UserCommand),
    /// API keys (needs `DATABASE_URL`; revocations reach the gateways through `REDIS_URL`).
    #[command(subcommand)]
    Keys(meshgate::tenancy::KeyCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(&format!("cannot start the async runtime: {err}")),
    };
    let result = runtime.block_on(async {
        meshgate_runtime::telemetry::init("meshgate");
        match cli.command {
            Command::Up => meshgate::commands::up(cli.config.as_deref()).await,
            Command::Migrate => meshgate::commands::migrate().await,
            Command::CheckConfig => meshgate::commands::check_config(cli.config.as_deref()),
            Command::Certs(args) => meshgate::commands::certs(args),
            Command::Orgs(command) => meshgate::tenancy::orgs(command).await,
            Command::Projects(command) => meshgate::tenancy::projects(command).await,
            Command::Users(command) => meshgate::tenancy::users(command).await,
            Command::Keys(command) => meshgate::tenancy::keys(command).await,
        }
    });
    meshgate_runtime::telemetry::shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("meshgate: {message}");
    ExitCode::FAILURE
}
