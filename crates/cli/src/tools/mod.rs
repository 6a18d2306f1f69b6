//! Tools built on the runtime rather than part of it: the demo's exact-match evaluation (`iapt eval`,
//! `iapt demo`) and the side-by-side throughput benchmark (`iapt bench`).

pub mod bench;
pub mod eval;
