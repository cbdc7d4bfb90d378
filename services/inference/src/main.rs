use std::process::ExitCode;

fn main() -> ExitCode {
    meshgate_runtime::run_main(
        "inference",
        meshgate_runtime::service_main::default_listen(50052, 9102, None),
        meshgate_inference::serve,
    )
}
