//! The machine's floor for a wake-up, measured the way the module wakes a
//! worker: one process writes to the eventfd of another that sleeps in
//! epoll_wait (as an idle nginx worker does, src/module/wake_fd.rs), which
//! takes the time it woke; with `datagram` as the mechanism, a datagram on
//! an abstract unix socket instead (the module's way to wake a worker of
//! another generation, and its only way before eventfds). The gaps between
//! wake-ups are spread uniformly over `gap_ms` ± half (a poster in a
//! timer); the first tenth is warm-up. With `receivers` > 1 the sender
//! wakes that many processes each time, as a poster wakes every other idle
//! worker (the module's fan-out: one write() each, or one sendmmsg() for
//! datagrams; on 2 cores, 3 woken processes share them), and every
//! receiver's latency counts. bench/run runs it in the same run as its
//! latency scenarios and prints each latency as a ratio to this floor.
//!
//! Usage: wake_floor [count] [gap_ms] [receivers] [eventfd|datagram]
//!   → `floor p50_us=.. p99_us=.. n=.. cpu_per_wake_us=..` (the receivers'
//!   CPU time, start-up included, per wake-up)

use std::time::Duration;

fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn address(name: &str) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain data; all zero is a valid empty address.
    let mut a: libc::sockaddr_un = unsafe { core::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let full = format!("\0{name}");
    for (d, s) in a.sun_path.iter_mut().zip(full.bytes()) {
        *d = s as libc::c_char;
    }
    let len = core::mem::offset_of!(libc::sockaddr_un, sun_path) + full.len();
    (a, len as libc::socklen_t)
}

fn socket() -> i32 {
    // SAFETY: no memory preconditions.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    fd
}

fn eventfd() -> i32 {
    // SAFETY: no memory preconditions.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    fd
}

/// The receiving side: epoll on the descriptor, one latency per wake-up
/// (the send time is the datagram, or what was added to the eventfd's
/// counter), then the latencies (ns) written to `out` as text.
fn receive(fd: i32, datagram: bool, count: usize, out: i32) -> ! {
    // SAFETY: no memory preconditions.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 0 };
    // SAFETY: ep and fd are ours; ev is valid for the call.
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    let mut lat = Vec::with_capacity(count);
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
    while lat.len() < count {
        // SAFETY: evs has room for 4 events.
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 4, 5000) };
        if n <= 0 {
            break;
        }
        let now = mono_ns();
        let mut b = [0u8; 8];
        if datagram {
            // SAFETY: reads at most 8 bytes into b; non-blocking socket.
            while unsafe { libc::recv(fd, b.as_mut_ptr().cast(), 8, 0) } == 8 {
                lat.push(now.saturating_sub(u64::from_le_bytes(b)));
            }
        // SAFETY: reads the 8-byte counter into b (back to zero); non-blocking.
        } else if unsafe { libc::read(fd, b.as_mut_ptr().cast(), 8) } == 8 {
            lat.push(now.saturating_sub(u64::from_ne_bytes(b)));
        }
    }
    // This receiver's CPU time (user and system) over all its wake-ups,
    // first, as `cpu <ns>`: what a wake-up costs a process that does nothing
    // else (bench/hops sets a worker's beside it).
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    let cpu = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    let text: String = format!("cpu {cpu}\n") + &lat.iter().map(|l| format!("{l}\n")).collect::<String>();
    // SAFETY: writes the buffer to our pipe end.
    unsafe { libc::write(out, text.as_ptr().cast(), text.len()) };
    // SAFETY: ends this child at once, as a forked child should.
    unsafe { libc::_exit(0) }
}

/// One datagram with the time in it to each address, in one sendmmsg() call.
fn send_to_all(tx: i32, to: &[(libc::sockaddr_un, libc::socklen_t)]) {
    let mut b = mono_ns().to_le_bytes();
    let mut iov = libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: 8 };
    // SAFETY: plain data; all zero is an empty message header.
    let mut msgs: Vec<libc::mmsghdr> = to.iter().map(|_| unsafe { core::mem::zeroed() }).collect();
    for (m, (a, len)) in msgs.iter_mut().zip(to) {
        m.msg_hdr.msg_name = (a as *const libc::sockaddr_un).cast_mut().cast();
        m.msg_hdr.msg_namelen = *len;
        m.msg_hdr.msg_iov = &raw mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: each header points at a live address and the 8-byte buffer above.
    unsafe { libc::sendmmsg(tx, msgs.as_mut_ptr(), msgs.len() as libc::c_uint, 0) };
}

/// The send time added to each receiver's eventfd, one write() each.
fn write_to_all(fds: &[i32]) {
    let t = mono_ns();
    for &fd in fds {
        // SAFETY: writes the 8 bytes of t; non-blocking.
        unsafe { libc::write(fd, (&raw const t).cast(), 8) };
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(300);
    let gap_ms: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let receivers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1).max(1);
    let datagram = match args.next().as_deref() {
        None | Some("eventfd") => false,
        Some("datagram") => true,
        Some(other) => {
            eprintln!("wake_floor: unknown mechanism {other:?} (eventfd or datagram)");
            std::process::exit(2);
        }
    };
    let mut addrs = Vec::new();
    let mut efds = Vec::new();
    let mut children = Vec::new();
    for r in 0..receivers {
        let (addr, len) = address(&format!("workerbus-floor/{}/{r}", std::process::id()));
        let rx = if datagram { socket() } else { eventfd() };
        // SAFETY: addr is a valid abstract address of `len` bytes.
        let rc = if datagram { unsafe { libc::bind(rx, (&raw const addr).cast(), len) } } else { 0 };
        assert!(rc == 0, "bind: {}", std::io::Error::last_os_error());
        let mut pipe = [0i32; 2];
        // SAFETY: pipe writes two descriptors.
        unsafe { libc::pipe(pipe.as_mut_ptr()) };
        // SAFETY: this program has one thread; the child only runs `receive`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            receive(rx, datagram, count, pipe[1]);
        }
        // SAFETY: closes our copy of the child's pipe end (and of its socket;
        // an eventfd is kept: it is what the sender writes to).
        unsafe {
            if datagram {
                libc::close(rx);
            }
            libc::close(pipe[1]);
        }
        if datagram {
            addrs.push((addr, len));
        } else {
            efds.push(rx);
        }
        children.push((pid, pipe[0]));
    }
    let tx = socket();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64;
    for _ in 0..count {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let gap = gap_ms * (0.5 + (rng % 1000) as f64 / 1000.0);
        std::thread::sleep(Duration::from_secs_f64(gap / 1000.0));
        if datagram {
            send_to_all(tx, &addrs);
        } else {
            write_to_all(&efds);
        }
    }
    let mut lat: Vec<u64> = Vec::new();
    let (mut cpu, mut wakes) = (0u64, 0usize);
    for (pid, fd) in children {
        let mut text = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            // SAFETY: reads into buf from our pipe end.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            text.extend_from_slice(&buf[..n as usize]);
        }
        let mut status = 0;
        // SAFETY: reaps our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let text = String::from_utf8_lossy(&text);
        cpu += text.lines().find_map(|l| l.strip_prefix("cpu ")?.parse::<u64>().ok()).unwrap_or(0);
        let mine: Vec<u64> = text.lines().filter_map(|l| l.parse().ok()).collect();
        wakes += mine.len();
        // Each receiver's first tenth is warm-up.
        lat.extend(mine.iter().skip(mine.len() / 10));
    }
    lat.sort_unstable();
    if lat.is_empty() {
        println!("floor p50_us=0 p99_us=0 n=0 cpu_per_wake_us=0");
        return;
    }
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "floor p50_us={:.1} p99_us={:.1} n={} cpu_per_wake_us={:.1}",
        q(0.5),
        q(0.99),
        lat.len(),
        cpu as f64 / 1000.0 / wakes.max(1) as f64
    );
}
