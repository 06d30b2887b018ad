//! The kernel's socket table, read the way `ss` reads it: sock_diag over netlink
//! ([`proto`]), in any network namespace ([`netns`]). Blocking calls, made from the
//! [`crate::workers`] threads, never from the event path.

pub mod netns;
pub mod proto;

pub use self::{
    netns::{Namespaces, current_netns},
    proto::{ALL_STATES, Diag, DiagSocket, MINI_STATES},
};
