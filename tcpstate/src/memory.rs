//! Giving freed heap back to the kernel after a large, short-lived allocation.
//!
//! A dump of a million TIME_WAIT sockets is built on a worker thread and freed on the engine
//! thread. glibc keeps the freed pages of each thread's arena resident, so the next dump on
//! the other worker thread lands on top of them and the peak stacks up (issue 21.10: 412 MB
//! for a 46 MB table). `malloc_trim` returns them; it walks every arena, so it is called
//! only after a dump big enough to matter, or one that let namespaces go (2,000 namespaces
//! made and destroyed left 48 MB resident that nothing would use again).

/// Sockets in a dump from which trimming is worth its cost (a few ms at 1M).
pub const TRIM_AFTER: usize = 64 * 1024;

/// Returns free heap pages of every arena to the kernel.
pub fn give_back() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}
