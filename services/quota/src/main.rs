use std::process::ExitCode;

fn main() -> ExitCode {
    meshgate_runtime::run_main(
        "quota",
        meshgate_runtime::service_main::default_listen(50054, 9104, None),
        |config: meshgate_quota::Config, listeners, shutdown| {
            meshgate_quota::serve(config.with_env_urls(), listeners, shutdown)
        },
    )
}
