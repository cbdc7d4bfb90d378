use std::process::ExitCode;

fn main() -> ExitCode {
    meshgate_runtime::run_main(
        "analytics",
        meshgate_runtime::service_main::default_listen(50055, 9105, None),
        |config: meshgate_analytics::Config, listeners, shutdown| {
            meshgate_analytics::serve(config.with_env_urls(), listeners, shutdown)
        },
    )
}
