//! The `ModelRoute` CRD kept in the repository must be the one the Rust types generate.

#[test]
fn the_checked_in_crd_is_up_to_date() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crd/modelroute.yaml");
    let kept = std::fs::read_to_string(path).expect("services/router/crd/modelroute.yaml exists");
    assert!(
        kept == meshgate_router::discovery::crd_yaml(),
        "{path} is stale: regenerate it with `cargo run -p meshgate-router --bin modelroute-crd > {path}`"
    );
}
