//! `meshgate-sync`: the sync service as its own process.

use std::process::ExitCode;

fn main() -> ExitCode {
    meshgate_runtime::run_main(
        "sync",
        meshgate_sync::default_listen(),
        |config: meshgate_sync::Config, listeners, shutdown| {
            meshgate_sync::serve(config.with_env_urls(), listeners, shutdown)
        },
    )
}
