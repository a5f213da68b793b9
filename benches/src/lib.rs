//! Criterion benchmarks for tower-degrade live in `benches/`; this crate has no library code.
