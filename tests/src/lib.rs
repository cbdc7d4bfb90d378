//! Test harness for booting the whole mesh.
