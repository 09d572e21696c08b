//! secretd: a runtime secret broker.
//!
//! Where to look: who is calling — [`peer`]; may they — [`policy`]; what is the value —
//! [`store`]; what happened — [`audit`]. [`server::serve`] ties them together behind the
//! gRPC handlers in [`service`]. Unsafe code lives only in [`scrub`] (the start-up environment
//! wipe), [`alloc`] (the clearing allocator) and [`sys`] (raw syscalls).

pub mod admission;
pub mod alloc;
pub mod audit;
pub mod client;
pub mod config;
pub mod egress;
pub mod filewatch;
pub mod name;
pub mod openbao;
pub mod peer;
pub mod policy;
pub mod preflight;
pub mod procfs;
pub mod registry;
pub mod rejected;
pub mod scan;
pub mod scrub;
pub mod server;
pub mod service;
pub mod sources;
pub mod state;
pub mod store;
pub mod supervise;
pub mod sys;
pub mod upstream;

/// The broker binary installs [`alloc::ZeroizingAlloc`] as its global allocator (`main.rs`);
/// the library's own unit tests run under it too. Other users of the library (the benchmark)
/// choose their allocator themselves.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: alloc::ZeroizingAlloc = alloc::ZeroizingAlloc;
