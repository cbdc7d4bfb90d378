fn main() -> std::process::ExitCode {
    meshgate_runtime::run_main(
        "router",
        meshgate_runtime::service_main::default_listen(50053, 9103, None),
        meshgate_router::serve,
    )
}
