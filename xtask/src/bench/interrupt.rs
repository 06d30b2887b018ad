//! Ctrl-C: the first SIGINT only sets a flag; the bench's loops check it and
//! return an error, so the Drop guards still kill the tracers, delete the
//! namespace and restore the sysctls. (The tracers, in our process group,
//! get the SIGINT from the terminal as well and stop on their own.)

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::Relaxed) {
        // A second Ctrl-C: give up on cleaning up.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

pub fn install() {
    let handler: extern "C" fn(libc::c_int) = on_sigint;
    // SAFETY: the handler only touches an atomic and calls _exit.
    unsafe { libc::signal(libc::SIGINT, handler as libc::sighandler_t) };
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

pub fn check() -> Result<()> {
    if interrupted() {
        bail!("interrupted (Ctrl-C); cleaned up");
    }
    Ok(())
}
