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
    NGX_SSL_TLSv1_3, ngx_connection_t, ngx_event_t, ngx_log_t, ngx_peer_connection_t, ngx_ssl_t, ngx_str_t,
};

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
        let conn = Conn { pc, _addr: ss, _name: name, _name_bytes: name_bytes, c, tls: false };
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

    /// Starts (or continues) the TLS handshake: Ok(true) when done.
    pub fn tls_handshake(&mut self, ssl: &mut ngx_ssl_t, sni: Option<&str>) -> Result<bool, String> {
        // SAFETY: c is live; ssl is a context ngx_ssl_create set up.
        unsafe {
            if (*self.c).ssl.is_null() {
                let rc = nginx_sys::ngx_ssl_create_connection(ssl, self.c, (NGX_SSL_BUFFER | NGX_SSL_CLIENT) as _);
                if rc != NGX_OK as isize {
                    return Err("cannot create the TLS connection".into());
                }
                if let Some(name) = sni.filter(|n| n.parse::<std::net::IpAddr>().is_err()) {
                    let cname = std::ffi::CString::new(name).map_err(|_| "bad host name")?;
                    nginx_sys::SSL_ctrl(
                        (*(*self.c).ssl).connection,
                        nginx_sys::SSL_CTRL_SET_TLSEXT_HOSTNAME as _,
                        0,
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

    /// Checks the server certificate (verify-full): chain and host name.
    pub fn verify_peer(&mut self, host: &str) -> Result<(), String> {
        // SAFETY: c is live with a finished TLS handshake.
        unsafe {
            let s = (*(*self.c).ssl).connection;
            let rc = nginx_sys::SSL_get_verify_result(s);
            if rc != nginx_sys::X509_V_OK as core::ffi::c_long {
                let why = nginx_sys::X509_verify_cert_error_string(rc);
                let why = if why.is_null() {
                    format!("error {rc}")
                } else {
                    core::ffi::CStr::from_ptr(why).to_string_lossy().into_owned()
                };
                return Err(format!("server certificate not trusted: {why}"));
            }
            let mut bytes = host.as_bytes().to_vec();
            let mut name = ngx_str_t { len: bytes.len(), data: bytes.as_mut_ptr() };
            if nginx_sys::ngx_ssl_check_host(self.c, &mut name) != NGX_OK as isize {
                return Err(format!("server certificate does not match host \"{host}\""));
            }
        }
        Ok(())
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

/// A client TLS context from nginx's OpenSSL (TLS 1.2 and 1.3); with a CA
/// file the server's certificate is verified against it.
pub fn tls_context(log: *mut ngx_log_t, ca_file: Option<&str>) -> Result<Box<ngx_ssl_t>, String> {
    let mut ssl = Box::new(ngx_ssl_t { ctx: ptr::null_mut(), log, buffer_size: 0 });
    // SAFETY: ssl is a fresh struct; ngx_ssl_create fills ctx.
    let rc = unsafe { nginx_sys::ngx_ssl_create(&mut *ssl, (NGX_SSL_TLSv1_2 | NGX_SSL_TLSv1_3) as _, ptr::null_mut()) };
    if rc != NGX_OK as isize {
        return Err("cannot create a TLS context".into());
    }
    if let Some(ca) = ca_file {
        let cca = std::ffi::CString::new(ca).map_err(|_| "bad CA file name")?;
        // SAFETY: ctx was just created; the file name is NUL-terminated.
        let ok = unsafe { nginx_sys::SSL_CTX_load_verify_locations(ssl.ctx, cca.as_ptr(), ptr::null()) };
        if ok != 1 {
            return Err(format!("cannot load CA file \"{ca}\""));
        }
        // SAFETY: ctx is live; the default verify callback.
        unsafe { nginx_sys::SSL_CTX_set_verify(ssl.ctx, nginx_sys::SSL_VERIFY_PEER as _, None) };
    }
    Ok(ssl)
}
