//! The machine's floor for an idle node: what `procs` processes that do
//! nothing but wake once per `period_ms` (an idle nginx worker wakes once
//! per `workerbus_heartbeat`, 1 s by default, and for nothing else) spend
//! on the CPU over `seconds`. bench/run prints the idle workers' CPU beside
//! it: on a VM a timer wake-up after a long sleep costs far more than one
//! after a short one, and that cost differs from machine to machine.
//!
//! Each process's time on the CPU is read from /proc/self/schedstat (as
//! bench/run reads the workers'), from its first sleep to its last wake-up:
//! start-up does not count.
//!
//! Usage: idle_floor [procs] [period_ms] [seconds]
//!   → `idle_floor cpu_ms=.. wakes=..` (all processes together)

fn on_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One idle process: sleeps in epoll_wait with nothing to watch, `wakes`
/// times, then writes `<ns on the CPU> <wakes>` to `out`.
fn idle(period_ms: i32, wakes: usize, out: i32) -> ! {
    // SAFETY: no memory preconditions.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 1];
    let start = on_cpu_ns();
    for _ in 0..wakes {
        // SAFETY: evs has room for one event; nothing is registered, so
        // each call returns at its timeout.
        unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 1, period_ms) };
    }
    let text = format!("{} {wakes}\n", on_cpu_ns().saturating_sub(start));
    // SAFETY: writes the buffer to our pipe end.
    unsafe { libc::write(out, text.as_ptr().cast(), text.len()) };
    // SAFETY: ends this child at once, as a forked child should.
    unsafe { libc::_exit(0) }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let procs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4).max(1);
    let period_ms: i32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000).max(1);
    let seconds: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let wakes = ((seconds * 1000.0) / period_ms as f64).round().max(1.0) as usize;
    let mut children = Vec::new();
    for _ in 0..procs {
        let mut pipe = [0i32; 2];
        // SAFETY: pipe writes two descriptors.
        unsafe { libc::pipe(pipe.as_mut_ptr()) };
        // SAFETY: this program has one thread; the child only runs `idle`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            idle(period_ms, wakes, pipe[1]);
        }
        // SAFETY: closes our copy of the child's pipe end.
        unsafe { libc::close(pipe[1]) };
        children.push((pid, pipe[0]));
    }
    let (mut ns, mut total) = (0u64, 0usize);
    for (pid, fd) in children {
        let mut buf = [0u8; 128];
        // SAFETY: reads into buf from our pipe end (one short line, written
        // in one call before the child exits).
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let mut status = 0;
        // SAFETY: reaps our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let line = String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned();
        let mut f = line.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
        ns += f.next().unwrap_or(0);
        total += f.next().unwrap_or(0) as usize;
    }
    println!("idle_floor cpu_ms={:.2} wakes={total}", ns as f64 / 1e6);
}
