//! Whether a process still exists: the liveness test behind dead-holder
//! lock takeover, crash detection and lease takeover.

/// `kill(pid, 0)`: false only when the process certainly does not exist
/// (a zombie still exists; a pid we may not signal exists too).
pub fn alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 performs only the existence and permission check.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}
