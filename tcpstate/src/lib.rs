//! tcpstate: every TCP state transition the kernel makes, which sockets are
//! stuck, for how long, and which process must fix them.
//!
//! Data flows one way: kernel (`tcpstate-ebpf`, loaded by [`program`]) ->
//! ring buffer -> [`decode`] -> [`tracker`] -> [`output`]. [`snapshot`]
//! reads the kernel's socket table (via [`sockdiag`] and [`owner`]) to seed,
//! reconcile and verify the tracker.

pub mod btf;
pub mod cli;
pub mod clock;
pub mod decode;
pub mod output;
pub mod owner;
pub mod program;
pub mod record;
pub mod reorder;
pub mod ring;
pub mod run;
pub mod snapshot;
pub mod sockdiag;
pub mod state;
pub mod status;
pub mod tail;
pub mod tracker;
