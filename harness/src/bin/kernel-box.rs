//! The main job: see `docs/harness.md`.
fn main() {}
