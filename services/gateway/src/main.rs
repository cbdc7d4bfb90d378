fn main() -> std::process::ExitCode {
    meshgate_runtime::run_main(
        "gateway",
        meshgate_runtime::service_main::default_listen(50051, 9101, Some(8080)),
        |config: meshgate_gateway::Config, listeners, shutdown| {
            meshgate_gateway::serve(config.with_env_urls(), listeners, shutdown)
        },
    )
}
