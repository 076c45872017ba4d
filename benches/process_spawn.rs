//! Placeholder, replaced by the criterion bench below in this series.
fn main() {}
