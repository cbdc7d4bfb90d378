//! Prints the `ModelRoute` CRD generated from the router's Rust types:
//! `cargo run -p meshgate-router --bin modelroute-crd > services/router/crd/modelroute.yaml`.

fn main() {
    print!("{}", meshgate_router::discovery::crd_yaml());
}
