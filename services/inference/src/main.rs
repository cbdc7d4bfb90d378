use std::process::ExitCode;

fn main() -> ExitCode {
    meshgate_runtime::run_main(
        "inference",
        meshgate_runtime::process::default_listen(50052, 9102, None),
        meshgate_inference::serve,
    )
}
