//! One TCP (optionally TLS) connection to PostgreSQL on nginx's event loop:
//! an `ngx_peer_connection_t` owned by `Conn`, closed in `Drop`. Its read
//! and write handlers do no protocol work: they only post the bridge's
//! drive event (a posted event, never a direct call, so no handler re-enters
//! the state machine). Reads and writes go through the connection's own
//! `recv`/`send`, which nginx swaps for its OpenSSL ones once TLS is up.

// As in src/module: these take the pointers nginx hands to its hooks, valid
// for the call by nginx's contract, so these lints would only repeat it.
#![allow(clippy::not_unsafe_ptr_arg_deref, clippy::missing_safety_doc)]

use core::ffi::c_void;
use core::ptr;
use std::net::SocketAddr;

use nginx_sys::{
    NGX_AGAIN, NGX_BUSY, NGX_DECLINED, NGX_ERROR, NGX_OK, NGX_SSL_BUFFER, NGX_SSL_CLIENT, NGX_SSL_TLSv1_2,
    NGX_SSL_TLSv1_3, ngx_connection_t, ngx_event_t, ngx_log_t, ngx_peer_connection_t, ngx_pool_t, ngx_ssl_t, ngx_str_t,
};

use super::config::SslMode;

/// What a read or write did.
pub enum Io {
    Done(usize),
    Again,
    Closed,
    Failed,
}

pub struct Conn {
    pc: Box<ngx_peer_connection_t>,
    // Kept alive for nginx, which keeps pointers to them in `pc`.
    _addr: Box<libc::sockaddr_storage>,
    _name: Box<ngx_str_t>,
    _name_bytes: Box<[u8]>,
    c: *mut ngx_connection_t,
    pub tls: bool,
    /// The TLS handshake finished and the server's certificate passed.
    tls_done: bool,
}

/// The event every I/O handler posts: the bridge's drive event.
pub type Wake = unsafe extern "C" fn(*mut ngx_event_t);

unsafe extern "C" fn on_io(ev: *mut ngx_event_t) {
    // SAFETY: ev is a read or write event of a connection Conn::connect made;
    // its data is the connection, whose `data` is the drive event to post.
    unsafe {
        let c = (*ev).data as *mut ngx_connection_t;
        let drive = (*c).data as *mut ngx_event_t;
        if !drive.is_null() && (*drive).posted() == 0 {
            nginx_sys::ngx_post_event(drive, &raw mut nginx_sys::ngx_posted_events);
        }
    }
}

unsafe extern "C" fn on_ssl_done(c: *mut ngx_connection_t) {
    // SAFETY: called by nginx for the connection whose handshake ended (well
    // or not); same data as on_io. Clearing the handler marks "ended".
    unsafe {
        (*(*c).ssl).handler = None;
        (*(*c).read).handler = Some(on_io);
        (*(*c).write).handler = Some(on_io);
        let drive = (*c).data as *mut ngx_event_t;
        if !drive.is_null() && (*drive).posted() == 0 {
            nginx_sys::ngx_post_event(drive, &raw mut nginx_sys::ngx_posted_events);
        }
    }
}

impl Conn {
    /// Starts a non-blocking connect. `drive` is posted on every I/O event.
    pub fn connect(addr: SocketAddr, log: *mut ngx_log_t, drive: *mut ngx_event_t) -> Result<Conn, String> {
        // SAFETY: a zeroed sockaddr_storage is valid; filled below for the address family.
        let mut ss: Box<libc::sockaddr_storage> = Box::new(unsafe { core::mem::zeroed() });
        let socklen = match addr {
            SocketAddr::V4(a) => {
                // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
                let sin = unsafe { &mut *(&raw mut *ss as *mut libc::sockaddr_in) };
                sin.sin_family = libc::AF_INET as _;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                // SAFETY: as above, for sockaddr_in6.
                let sin6 = unsafe { &mut *(&raw mut *ss as *mut libc::sockaddr_in6) };
                sin6.sin6_family = libc::AF_INET6 as _;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                size_of::<libc::sockaddr_in6>()
            }
        };
        let mut name_bytes: Box<[u8]> = addr.to_string().into_bytes().into_boxed_slice();
        let mut name = Box::new(ngx_str_t { len: name_bytes.len(), data: name_bytes.as_mut_ptr() });
        // SAFETY: an all-zero peer connection is nginx's initial state (as ngx_pcalloc gives).
        let mut pc: Box<ngx_peer_connection_t> = Box::new(unsafe { core::mem::zeroed() });
        pc.sockaddr = (&raw mut *ss).cast();
        pc.socklen = socklen as _;
        pc.name = &raw mut *name;
        pc.get = Some(nginx_sys::ngx_event_get_peer);
        pc.log = log;
        pc.tries = 1;
        pc.set_log_error(1); // NGX_ERROR_ERR: connect errors at "error"
        // SAFETY: pc is fully set up for a single fixed peer; nginx fills pc.connection.
        let rc = unsafe { nginx_sys::ngx_event_connect_peer(&raw mut *pc) } as i32;
        if rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED || pc.connection.is_null() {
            if !pc.connection.is_null() {
                // SAFETY: nginx made the connection and did not close it.
                unsafe { nginx_sys::ngx_close_connection(pc.connection) };
            }
            return Err(format!("cannot connect to {addr}"));
        }
        let c = pc.connection;
        // SAFETY: a pool for the connection (nginx's TLS code allocates from
        // c->pool); destroyed in Drop after the connection is closed.
        let pool = unsafe { nginx_sys::ngx_create_pool(1024, log) };
        if pool.is_null() {
            // SAFETY: nginx made the connection and did not close it.
            unsafe { nginx_sys::ngx_close_connection(c) };
            return Err("no memory for the connection's pool".into());
        }
        // Small messages both ways: no Nagle delay (libpq does the same).
        let one: libc::c_int = 1;
        // SAFETY: c->fd is the socket nginx just connected; the option value is a valid int.
        unsafe {
            libc::setsockopt(
                (*c).fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // SAFETY: c is the live connection nginx just made for us.
        unsafe {
            (*c).pool = pool;
            (*c).data = drive.cast::<c_void>();
            (*(*c).read).handler = Some(on_io);
            (*(*c).write).handler = Some(on_io);
            (*c).log = log;
            (*(*c).read).log = log;
            (*(*c).write).log = log;
        }
        let conn = Conn { pc, _addr: ss, _name: name, _name_bytes: name_bytes, c, tls: false, tls_done: false };
        if rc == NGX_OK as i32 {
            // Connected at once (loopback): make sure the state machine runs.
            // SAFETY: drive is the bridge's process-static event.
            unsafe { on_io((*c).write) };
        }
        Ok(conn)
    }

    /// TCP keepalive (as libpq's keepalives_idle): the kernel probes the
    /// peer after `idle_s` seconds of silence, every third of that, and
    /// gives up after 3 unanswered probes. The session's own probe finds
    /// a silent server sooner; this also covers a request in flight.
    pub fn set_keepalive(&self, idle_s: u32) {
        let idle = idle_s.max(1) as libc::c_int;
        let opts = [
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle),
            (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, (idle / 3).max(1)),
            (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
        ];
        for (level, name, value) in opts {
            // SAFETY: c->fd is our connected socket; the value is a valid int.
            unsafe {
                libc::setsockopt(
                    (*self.c).fd,
                    level,
                    name,
                    (&raw const value).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
    }

    pub fn connection(&self) -> *mut ngx_connection_t {
        self.c
    }

    /// After the first write event: did the connect succeed?
    pub fn connect_error(&self) -> Option<std::io::Error> {
        let mut err: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: fd is our socket; err/len are valid out-parameters.
        let rc = unsafe {
            libc::getsockopt((*self.c).fd, libc::SOL_SOCKET, libc::SO_ERROR, (&raw mut err).cast(), &mut len)
        };
        if rc == -1 {
            return Some(std::io::Error::last_os_error());
        }
        (err != 0).then(|| std::io::Error::from_raw_os_error(err))
    }

    pub fn recv(&mut self, buf: &mut [u8]) -> Io {
        // SAFETY: c is live; recv is nginx's (plain or OpenSSL) reader for it.
        let n = unsafe {
            let Some(recv) = (*self.c).recv else { return Io::Failed };
            recv(self.c, buf.as_mut_ptr(), buf.len())
        };
        match n {
            n if n > 0 => Io::Done(n as usize),
            0 => Io::Closed,
            n if n == NGX_AGAIN as isize => {
                // SAFETY: re-arms the read event of our live connection.
                if unsafe { nginx_sys::ngx_handle_read_event((*self.c).read, 0) } != NGX_OK as isize {
                    return Io::Failed;
                }
                Io::Again
            }
            _ => Io::Failed,
        }
    }

    pub fn send(&mut self, buf: &[u8]) -> Io {
        // SAFETY: c is live; send is nginx's (plain or OpenSSL) writer for it.
        let n = unsafe {
            let Some(send) = (*self.c).send else { return Io::Failed };
            send(self.c, buf.as_ptr() as *mut u8, buf.len())
        };
        match n {
            n if n >= 0 => Io::Done(n as usize),
            n if n == NGX_AGAIN as isize => {
                // SAFETY: re-arms the write event of our live connection.
                if unsafe { nginx_sys::ngx_handle_write_event((*self.c).write, 0) } != NGX_OK as isize {
                    return Io::Failed;
                }
                Io::Again
            }
            _ => Io::Failed,
        }
    }

    /// The TLS step of a connect, after the server answered 'S' to the
    /// SSLRequest: starts or continues the handshake with the context made
    /// when the configuration was read, then checks the server's certificate
    /// as the sslmode says (`TlsSetup`). Ok(false): under way, call again
    /// when the drive event runs; Ok(true): the handshake finished and the
    /// certificate passed (again Ok(true) on later calls); Err: the reason,
    /// for the log line (the session is then to be closed).
    pub fn tls_step(&mut self, tls: &TlsSetup, host: &str) -> Result<bool, String> {
        if self.tls_done {
            return Ok(true);
        }
        if !self.handshake(tls.ssl, host)? {
            return Ok(false);
        }
        // SAFETY: c is live and its TLS handshake has finished.
        unsafe { tls.check_peer(self.c, host)? };
        self.tls_done = true;
        Ok(true)
    }

    /// Starts (or continues) the TLS handshake: Ok(true) when done.
    fn handshake(&mut self, ssl: *mut ngx_ssl_t, host: &str) -> Result<bool, String> {
        // SAFETY: c is live; ssl is the context TlsSetup::new made, which
        // lives in the cycle's pool as long as this worker runs.
        unsafe {
            if (*self.c).ssl.is_null() {
                let rc = nginx_sys::ngx_ssl_create_connection(ssl, self.c, (NGX_SSL_BUFFER | NGX_SSL_CLIENT) as _);
                if rc != NGX_OK as isize {
                    return Err("cannot create the TLS connection".into());
                }
                // SNI for a host name (never for an address, as RFC 6066 says).
                if host.parse::<std::net::IpAddr>().is_err() {
                    let cname = std::ffi::CString::new(host).map_err(|_| "bad host name")?;
                    nginx_sys::SSL_ctrl(
                        (*(*self.c).ssl).connection,
                        nginx_sys::SSL_CTRL_SET_TLSEXT_HOSTNAME as _,
                        nginx_sys::TLSEXT_NAMETYPE_host_name as _,
                        cname.as_ptr() as *mut c_void,
                    );
                }
                self.tls = true;
            } else if (*(*self.c).ssl).handler.is_some() {
                // Under way: on_ssl_done clears the handler when it ends.
                return Ok(false);
            } else if (*(*self.c).ssl).handshaked() != 0 {
                return Ok(true);
            } else {
                return Err("TLS handshake failed".into());
            }
            let rc = nginx_sys::ngx_ssl_handshake(self.c);
            if rc == NGX_AGAIN as isize {
                (*(*self.c).ssl).handler = Some(on_ssl_done);
                return Ok(false);
            }
            // The handshake finished synchronously (or failed): restore our handlers.
            (*(*self.c).read).handler = Some(on_io);
            (*(*self.c).write).handler = Some(on_io);
            if rc == NGX_OK as isize && (*(*self.c).ssl).handshaked() != 0 {
                return Ok(true);
            }
            Err("TLS handshake failed".into())
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.c.is_null() {
            return;
        }
        // SAFETY: c is our live connection; it is closed exactly once, here.
        unsafe {
            (*self.c).data = ptr::null_mut();
            if !(*self.c).ssl.is_null() {
                (*(*self.c).ssl).set_no_wait_shutdown(1);
                (*(*self.c).ssl).set_no_send_shutdown(1);
                nginx_sys::ngx_ssl_shutdown(self.c);
            }
            let pool = (*self.c).pool;
            nginx_sys::ngx_close_connection(self.c);
            if !pool.is_null() {
                nginx_sys::ngx_destroy_pool(pool);
            }
        }
        self.c = ptr::null_mut();
        self.pc.connection = ptr::null_mut();
    }
}

/// The bridge's client TLS context (nginx's OpenSSL, TLS 1.2 and 1.3, as
/// libpq's default minimum) and what a session checks of the server's
/// certificate. Made once when the configuration is read (`set_postgres`,
/// in the master, so the CA file is read there and by `nginx -t`), in the
/// cycle's pool, whose cleanup frees the OpenSSL context with the cycle:
/// nothing per session, nothing left over by a reload.
pub struct TlsSetup {
    /// In the cycle's pool; its context freed by the pool's cleanup.
    ssl: *mut ngx_ssl_t,
    /// The chain is checked against `sslrootcert` (SslMode::verifies_chain).
    verify_chain: bool,
    /// The certificate must name the host (SslMode::verifies_host).
    verify_host: bool,
}

unsafe extern "C" fn free_tls(data: *mut c_void) {
    let ssl = data as *mut ngx_ssl_t;
    // SAFETY: data is the pool-allocated ngx_ssl_t of TlsSetup::new, and
    // this is its pool's cleanup, run once. nginx's ngx_ssl_cleanup_ctx
    // reads the context's data before freeing it, so only a context that
    // was made.
    unsafe {
        if !(*ssl).ctx.is_null() {
            nginx_sys::ngx_ssl_cleanup_ctx(data);
            (*ssl).ctx = ptr::null_mut();
        }
    }
}

/// OpenSSL's verify callback: never stops the handshake, so that the
/// session reports the chain's fault itself (`check_peer`) with its reason.
unsafe extern "C" fn keep_going(_ok: core::ffi::c_int, _ctx: *mut nginx_sys::X509_STORE_CTX) -> core::ffi::c_int {
    1
}

/// The reason of OpenSSL's last error, and the error queue cleared.
fn openssl_reason() -> String {
    // SAFETY: OpenSSL's per-thread error queue; the reason strings are static.
    unsafe {
        let e = nginx_sys::ERR_peek_last_error();
        nginx_sys::ERR_clear_error();
        let r = nginx_sys::ERR_reason_error_string(e);
        if r.is_null() {
            format!("OpenSSL error {e:#x}")
        } else {
            core::ffi::CStr::from_ptr(r).to_string_lossy().into_owned()
        }
    }
}

impl TlsSetup {
    /// The context for `mode` (not `disable`), with `root_cert` (a PEM file
    /// of CA certificates, already known to be readable) loaded when the
    /// mode checks the chain. `pool` is the cycle's pool: it frees the
    /// context. The error is the directive's message.
    pub fn new(
        pool: *mut ngx_pool_t,
        log: *mut ngx_log_t,
        mode: SslMode,
        root_cert: Option<&str>,
    ) -> Result<TlsSetup, String> {
        let verify_chain = mode.verifies_chain(root_cert.is_some());
        let verify_host = mode.verifies_host();
        // SAFETY: pool is the live cycle pool; zeroed memory is ngx_ssl_t's
        // initial state (ngx_ssl_create fills it).
        let ssl = unsafe { nginx_sys::ngx_pcalloc(pool, size_of::<ngx_ssl_t>()) } as *mut ngx_ssl_t;
        if ssl.is_null() {
            return Err("no memory for the TLS context".into());
        }
        // The cleanup first, so that a context is freed whatever fails next.
        // SAFETY: pool is live; the cleanup runs once, when it is destroyed.
        unsafe {
            let cln = nginx_sys::ngx_pool_cleanup_add(pool, 0);
            if cln.is_null() {
                return Err("no memory for the TLS context".into());
            }
            (*cln).handler = Some(free_tls);
            (*cln).data = ssl.cast();
            (*ssl).log = log;
        }
        // SAFETY: ssl is zeroed with its log set, as ngx_ssl_create expects.
        let rc = unsafe { nginx_sys::ngx_ssl_create(ssl, (NGX_SSL_TLSv1_2 | NGX_SSL_TLSv1_3) as _, ptr::null_mut()) };
        if rc != NGX_OK as isize {
            return Err(format!("cannot create a TLS context: {}", openssl_reason()));
        }
        if verify_chain {
            let Some(ca) = root_cert else {
                return Err(format!("sslmode \"{}\" needs sslrootcert=<CA file>", mode.name()));
            };
            let cca = std::ffi::CString::new(ca).map_err(|_| "the value of \"sslrootcert\" contains a NUL byte")?;
            // SAFETY: ctx was just made; the file name is NUL-terminated.
            let ok = unsafe { nginx_sys::SSL_CTX_load_verify_locations((*ssl).ctx, cca.as_ptr(), ptr::null()) };
            if ok != 1 {
                return Err(format!(
                    "cannot load sslrootcert \"{ca}\": {} (a PEM file of CA certificates is expected)",
                    openssl_reason()
                ));
            }
            // SAFETY: ctx is live; the callback only lets the handshake end.
            unsafe { nginx_sys::SSL_CTX_set_verify((*ssl).ctx, nginx_sys::SSL_VERIFY_PEER as _, Some(keep_going)) };
        }
        Ok(TlsSetup { ssl, verify_chain, verify_host })
    }

    /// Checks the server's certificate after the handshake: its chain
    /// against the CA file (as OpenSSL verified it during the handshake)
    /// and that it names `host`: for a host name its DNS names (or, without
    /// any, its common name), wildcards only as a whole first label; for an
    /// IP address its IP addresses (or the address written as a name).
    ///
    /// # Safety
    /// `c` is a live connection whose TLS handshake finished.
    unsafe fn check_peer(&self, c: *mut ngx_connection_t, host: &str) -> Result<(), String> {
        if !self.verify_chain && !self.verify_host {
            return Ok(());
        }
        // SAFETY: guaranteed by the caller.
        let s = unsafe { (*(*c).ssl).connection };
        // SAFETY: s is the connection's live SSL; a reference we free below.
        let cert = unsafe { nginx_sys::SSL_get1_peer_certificate(s) };
        if cert.is_null() {
            return Err("the server sent no certificate".into());
        }
        let r = (|| {
            if self.verify_chain {
                // SAFETY: s is live; the strings OpenSSL returns are static.
                let rc = unsafe { nginx_sys::SSL_get_verify_result(s) };
                if rc != nginx_sys::X509_V_OK as core::ffi::c_long {
                    // SAFETY: as above.
                    let why = unsafe { nginx_sys::X509_verify_cert_error_string(rc) };
                    let why = if why.is_null() {
                        format!("verify error {rc}")
                    } else {
                        // SAFETY: a NUL-terminated static string.
                        unsafe { core::ffi::CStr::from_ptr(why) }.to_string_lossy().into_owned()
                    };
                    return Err(format!("server certificate not trusted: {why}"));
                }
            }
            if self.verify_host {
                let chost = std::ffi::CString::new(host).map_err(|_| "bad host name".to_string())?;
                let flags = nginx_sys::X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS as core::ffi::c_uint;
                // SAFETY: cert is live; the name is NUL-terminated and its length given.
                let matches = unsafe {
                    (host.parse::<std::net::IpAddr>().is_ok()
                        && nginx_sys::X509_check_ip_asc(cert, chost.as_ptr(), 0) == 1)
                        || nginx_sys::X509_check_host(cert, chost.as_ptr(), host.len(), flags, ptr::null_mut()) == 1
                };
                if !matches {
                    return Err(format!("server certificate does not match host \"{host}\""));
                }
            }
            Ok(())
        })();
        // SAFETY: the reference SSL_get1_peer_certificate took.
        unsafe { nginx_sys::X509_free(cert) };
        r
    }
}
