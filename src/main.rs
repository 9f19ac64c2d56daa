//! The `edpo` command-line entry point.
fn main() {}
