//! `workerbus_postgres URL [options];` parsed into typed settings. Pure
//! Rust (no nginx): `cargo test --no-default-features` checks every error.
//!
//! The connection string is a `postgresql://` (or `postgres://`) URL or a
//! libpq keyword string (`host=... port=... dbname=...`, with libpq's
//! quoting: `password = 'a b\'c'`).
//!
//! Messages never quote the connection string nor any value taken from it:
//! a missing quote or escape can move part of the password anywhere (into
//! the port, a parameter name, the next word). They name the parameter, by
//! its keyword, and say why. A parameter name or word that directly follows
//! the password's value is not quoted either, as it may be the password's
//! tail. Values of the other options (not secrets: the secrets are read from
//! files) are quoted.

use std::fmt;

/// `sslmode=`, libpq's table. Which attempts a connect makes is a policy
/// (`first_try_tls`, `accepts_plain`, `on_refusal`); what the server's
/// certificate must pass is another (`verifies_chain`, `verifies_host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Plain text first; TLS when the server refuses that.
    Allow,
    /// TLS first (the default); plain text when the server does not offer
    /// TLS or refuses the TLS session.
    Prefer,
    /// TLS only; the chain is checked when `sslrootcert` is given.
    Require,
    /// TLS only; the chain is checked against `sslrootcert` (required), the
    /// host name is not.
    VerifyCa,
    /// TLS only; the chain against `sslrootcert` (required) and the host name.
    VerifyFull,
}

/// Every mode, in libpq's order (for messages and tests).
pub const SSL_MODES: [SslMode; 6] =
    [SslMode::Disable, SslMode::Allow, SslMode::Prefer, SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull];

impl SslMode {
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    pub fn from_name(s: &str) -> Option<SslMode> {
        SSL_MODES.into_iter().find(|m| m.name() == s)
    }

    /// Whether a TLS context is needed at all (every mode but `disable`).
    pub fn may_use_tls(self) -> bool {
        self != SslMode::Disable
    }

    /// Whether the first attempt of a connect sends the SSLRequest (false:
    /// it starts the session in plain text).
    pub fn first_try_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Allow)
    }

    /// Whether a session may run in plain text: when the server answers the
    /// SSLRequest with 'N', it goes on without TLS on the same connection
    /// (true) or the attempt fails (false: `require` and the `verify-*`).
    pub fn accepts_plain(self) -> bool {
        matches!(self, SslMode::Disable | SslMode::Allow | SslMode::Prefer)
    }

    /// After an attempt the server refused (an ErrorResponse before
    /// ReadyForQuery, or the connection closed during start-up), or, with
    /// TLS, a failed handshake or certificate check: `Some(tls)` when libpq
    /// makes one more attempt at once, on a new connection, with TLS
    /// (`Some(true)`) or without (`Some(false)`); `None` when the connect
    /// fails (and the usual backoff follows). `allow` retries a refused
    /// plain-text attempt with TLS, `prefer` a refused TLS attempt without;
    /// nothing else retries, and the second attempt never does.
    pub fn on_refusal(self, tried_tls: bool) -> Option<bool> {
        match (self, tried_tls) {
            (SslMode::Allow, false) => Some(true),
            (SslMode::Prefer, true) => Some(false),
            _ => None,
        }
    }

    /// Whether `sslrootcert=` must be given (libpq would read
    /// ~/.postgresql/root.crt; here it is an error at `nginx -t`).
    pub fn needs_root_cert(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }

    /// Whether a TLS session checks the server's certificate chain: always
    /// in the `verify-*` modes, and, as libpq, in the others whenever a
    /// root certificate file is given.
    pub fn verifies_chain(self, has_root_cert: bool) -> bool {
        self.needs_root_cert() || (self.may_use_tls() && has_root_cert)
    }

    /// Whether a TLS session checks that the certificate names the host.
    pub fn verifies_host(self) -> bool {
        self == SslMode::VerifyFull
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct PgConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<String>,
    pub password_file: Option<String>,
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    pub connect_timeout_ms: u64,
    /// Idle this long, the holder probes the connection (an empty query).
    pub keepalive_ms: u64,
    /// Deadline of every request in flight, the probe's included.
    pub request_timeout_ms: u64,
    pub durable: bool,
    pub retention_ms: u64,
    pub prefix: String,
    pub unlisten_after_ms: u64,
    pub application_name: String,
    /// `secret_file=`: the cluster's shared secret (HMAC-SHA-256 key of the
    /// cluster events). Neither `describe` nor `Debug` shows it.
    pub secret: Option<Vec<u8>>,
}

// The password and the secret must never reach a log line, even through {:?}.
impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl PgConfig {
    /// What the status and log lines show: no password, no secret.
    pub fn describe(&self) -> String {
        format!(
            "postgresql://{}@{}:{}/{} sslmode={}",
            self.user,
            self.host,
            self.port,
            self.dbname,
            self.sslmode.name()
        )
    }

    /// Longest channel name a caller may use (the prefix counts against
    /// PostgreSQL's 63-byte identifier limit).
    pub fn max_channel(&self) -> usize {
        63usize.saturating_sub(self.prefix.len())
    }
}

fn defaults() -> PgConfig {
    PgConfig {
        host: "127.0.0.1".into(),
        port: 5432,
        user: "postgres".into(),
        password: None,
        dbname: String::new(),
        sslmode: SslMode::Prefer,
        sslrootcert: None,
        password_file: None,
        backoff_min_ms: 100,
        backoff_max_ms: 30_000,
        connect_timeout_ms: 5_000,
        keepalive_ms: 10_000,
        request_timeout_ms: 10_000,
        durable: false,
        retention_ms: 3_600_000,
        prefix: String::new(),
        unlisten_after_ms: 60_000,
        application_name: "workerbus".into(),
        secret: None,
    }
}

/// `100ms`, `5s`, `2m`, `1h`, `1d`; a bare number is seconds (as nginx).
pub fn parse_time(s: &str) -> Option<u64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else if let Some(n) = s.strip_suffix('d') {
        (n, 86_400_000)
    } else {
        (s, 1000)
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) || num.len() > 12 {
        return None;
    }
    num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult))
}

/// Where a connection parameter was written, for messages.
const IN_URL: &str = "the URL";
const IN_KEYWORDS: &str = "the connection string";

/// Why the URL's authority must not be followed by an '@'.
const AT_AFTER_HOST: &str = "\"@\" after the host part of the URL: percent-encode \"/\" and \"?\" in the user name \
     and password (%2F, %3F) and \"@\" anywhere else (%40)";

/// A connection parameter of a URL's query or of a keyword string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Param {
    Host,
    Port,
    User,
    Password,
    DbName,
    SslMode,
    SslRootCert,
    ConnectTimeout,
    ApplicationName,
}

impl Param {
    fn from_name(key: &str) -> Option<Param> {
        Some(match key {
            "host" | "hostaddr" => Param::Host,
            "port" => Param::Port,
            "user" => Param::User,
            "password" => Param::Password,
            "dbname" => Param::DbName,
            "sslmode" => Param::SslMode,
            "sslrootcert" => Param::SslRootCert,
            "connect_timeout" => Param::ConnectTimeout,
            "application_name" => Param::ApplicationName,
            _ => return None,
        })
    }
}

/// Sets one parameter. The error says why the value is refused without
/// quoting it: the caller decides whether the value may be shown.
fn set_param(c: &mut PgConfig, p: Param, val: &str) -> Result<(), &'static str> {
    match p {
        Param::Host => {
            if val.starts_with('/') {
                return Err("Unix sockets are not supported; use a TCP address");
            }
            c.host = val.to_string();
        }
        Param::Port => {
            let port = Some(val)
                .filter(|v| !v.is_empty() && v.len() <= 5 && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u16>().ok())
                .filter(|&p| p > 0);
            c.port = port.ok_or("use a number from 1 to 65535")?;
        }
        Param::User => c.user = val.to_string(),
        Param::Password => c.password = Some(val.to_string()),
        Param::DbName => c.dbname = val.to_string(),
        Param::SslMode => {
            c.sslmode =
                SslMode::from_name(val).ok_or("use disable, allow, prefer, require, verify-ca or verify-full")?
        }
        Param::SslRootCert => c.sslrootcert = Some(val.to_string()),
        Param::ConnectTimeout => {
            c.connect_timeout_ms =
                parse_time(val).filter(|&t| t > 0).ok_or("use a time above zero, such as 5s or 500ms")?
        }
        Param::ApplicationName => c.application_name = val.to_string(),
    }
    Ok(())
}

/// `set_param` for the connection string: the message names the keyword
/// (as written: `hostaddr` stays `hostaddr`), never the value.
fn set_conn_param(c: &mut PgConfig, key: &str, p: Param, val: &str, place: &str) -> Result<(), String> {
    set_param(c, p, val).map_err(|why| format!("invalid value of \"{key}\" in {place}: {why}"))
}

/// Percent-decoding of one part of the URL; `what` names the part.
fn pct_decode(s: &str, what: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&x) = b.get(i) {
        if x == b'%' {
            let hex = |j: usize| b.get(j).and_then(|&h| char::from(h).to_digit(16));
            let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                return Err(format!("{what} in the URL: bad percent-escape (use % and two hex digits)"));
            };
            // Two hex digits: at most 0xff.
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(x);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{what} in the URL: not UTF-8 after percent-decoding"))
}

/// Parses what follows `postgresql://`. Returns whether the last parameter
/// written was the password (then the next argument is not quoted either).
fn parse_url(c: &mut PgConfig, rest: &str) -> Result<bool, String> {
    // The authority ends at the first '/' or '?': an '@' after it means a
    // password (or user name) with an unescaped '/' or '?', whose pieces
    // would otherwise be taken for the host, port or database.
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (auth, tail) = rest.split_at(auth_end);
    if tail.contains('@') {
        return Err(AT_AFTER_HOST.into());
    }
    let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
    let hostport = match auth.rsplit_once('@') {
        Some((cred, hp)) => {
            let (u, p) = cred.split_once(':').map_or((cred, None), |(u, p)| (u, Some(p)));
            if !u.is_empty() {
                c.user = pct_decode(u, "the user name")?;
            }
            if let Some(p) = p {
                c.password = Some(pct_decode(p, "the password")?);
            }
            hp
        }
        None => auth,
    };
    if hostport.contains(',') {
        return Err("several hosts are not supported (in the URL)".into());
    }
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, after) = h.split_once(']').ok_or("unclosed \"[\" in the host part of the URL")?;
        match after {
            "" => (h, None),
            _ => (h, Some(after.strip_prefix(':').ok_or("only \":port\" may follow \"]\" in the URL")?)),
        }
    } else {
        hostport.rsplit_once(':').map_or((hostport, None), |(h, p)| (h, Some(p)))
    };
    if !host.is_empty() {
        set_conn_param(c, "host", Param::Host, &pct_decode(host, "the host")?, IN_URL)?;
    }
    // An empty port (`host:/db`) is the default one, as in libpq.
    if let Some(p) = port.filter(|p| !p.is_empty()) {
        set_conn_param(c, "port", Param::Port, p, IN_URL)?;
    }
    let db = path.strip_prefix('/').unwrap_or(path);
    if !db.is_empty() {
        c.dbname = pct_decode(db, "the database name")?;
    }
    let mut after_password = false;
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(if after_password {
                "a URL parameter without \"=\" follows the value of \"password\" (not shown: percent-encode \"&\" \
                 in a password as %26)"
                    .into()
            } else {
                format!("URL parameter \"{}\" has no \"=\"", pct_decode(kv, "a parameter name")?)
            });
        };
        let k = pct_decode(k, "a parameter name")?;
        let Some(p) = Param::from_name(&k) else {
            return Err(if after_password {
                "unknown connection parameter after the value of \"password\" in the URL (not shown: \
                 percent-encode \"&\" in a password as %26)"
                    .into()
            } else {
                format!("unknown connection parameter \"{k}\" in the URL")
            });
        };
        let v = pct_decode(v, &format!("the value of \"{k}\""))?;
        set_conn_param(c, &k, p, &v, IN_URL)?;
        after_password = p == Param::Password;
    }
    Ok(after_password)
}

/// Blanks between keyword-string words, as libpq's `isspace`.
fn is_blank(ch: char) -> bool {
    matches!(ch, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// Parses a libpq keyword string as libpq does: blanks allowed around '=',
/// a value is either a word or a single-quoted string, and a backslash
/// takes the next character literally in both (`\'`, `\\`). Returns whether
/// the last parameter was the password.
fn parse_keywords(c: &mut PgConfig, s: &str) -> Result<bool, String> {
    const HINT: &str = "(not shown: a value with spaces must be quoted, as in password='a b')";
    let mut it = s.chars().peekable();
    let skip_blanks = |it: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while it.next_if(|&ch| is_blank(ch)).is_some() {}
    };
    let mut after_password = false;
    loop {
        skip_blanks(&mut it);
        if it.peek().is_none() {
            return Ok(after_password);
        }
        let mut key = String::new();
        while let Some(ch) = it.next_if(|&ch| ch != '=' && !is_blank(ch)) {
            key.push(ch);
        }
        skip_blanks(&mut it);
        if it.next_if_eq(&'=').is_none() {
            return Err(if after_password {
                format!("a word without \"=\" follows the value of \"password\" in the connection string {HINT}")
            } else {
                format!("missing \"=\" after \"{key}\" in the connection string")
            });
        }
        if key.is_empty() {
            return Err("a \"=\" without a parameter name in the connection string".into());
        }
        let Some(p) = Param::from_name(&key) else {
            return Err(if after_password {
                format!("unknown connection parameter after the value of \"password\" in the connection string {HINT}")
            } else {
                format!("unknown connection parameter \"{key}\" in the connection string")
            });
        };
        skip_blanks(&mut it);
        let mut val = String::new();
        if it.next_if_eq(&'\'').is_some() {
            loop {
                match it.next() {
                    None => return Err(format!("unterminated quoted value of \"{key}\" in the connection string")),
                    Some('\'') => break,
                    Some('\\') => val.extend(it.next()),
                    Some(ch) => val.push(ch),
                }
            }
        } else {
            while let Some(ch) = it.next_if(|&ch| !is_blank(ch)) {
                if ch == '\\' {
                    // As libpq: `\ ` is a blank kept in the value.
                    val.extend(it.next());
                } else {
                    val.push(ch);
                }
            }
        }
        set_conn_param(c, &key, p, &val, IN_KEYWORDS)?;
        after_password = p == Param::Password;
    }
}

/// `mysql` for `mysql://...`: a URL scheme is a letter, then letters,
/// digits, '+', '-' or '.' (none of which a keyword string starts with).
fn url_scheme(s: &str) -> Option<&str> {
    let (scheme, _) = s.split_once("://")?;
    let mut b = scheme.bytes();
    let first = b.next()?;
    (first.is_ascii_alphabetic() && b.all(|x| x.is_ascii_alphanumeric() || matches!(x, b'+' | b'-' | b'.')))
        .then_some(scheme)
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("invalid {key} \"{v}\": use on or off")),
    }
}

fn time_opt(key: &str, v: &str, min_ms: u64) -> Result<u64, String> {
    match parse_time(v) {
        Some(t) if t >= min_ms => Ok(t),
        Some(_) => Err(format!("{key} \"{v}\" is below the minimum of {min_ms}ms")),
        None => Err(format!("invalid {key} \"{v}\"")),
    }
}

/// A password or secret file's first line, without its line end.
fn first_line(text: &str) -> &str {
    text.split('\n').next().unwrap_or("").trim_end_matches('\r')
}

/// The shortest `secret_file=` secret.
pub const SECRET_MIN: usize = 16;

/// Parses the directive's arguments. `read_file` reads `password_file=` and
/// `secret_file=`.
pub fn parse(args: &[&str], read_file: impl Fn(&str) -> Result<String, String>) -> Result<PgConfig, String> {
    let mut c = defaults();
    let (conn, opts) = args.split_first().ok_or("takes a connection URL and options")?;
    let mut after_password =
        if let Some(rest) = conn.strip_prefix("postgresql://").or_else(|| conn.strip_prefix("postgres://")) {
            parse_url(&mut c, rest)?
        } else if let Some(scheme) = url_scheme(conn) {
            return Err(format!("unsupported URL scheme \"{scheme}\": use postgresql:// or postgres://"));
        } else if conn.contains('=') {
            parse_keywords(&mut c, conn)?
        } else {
            return Err(
                "invalid connection string (not shown): use postgresql://user@host:port/db or \"host=... dbname=...\""
                    .into(),
            );
        };
    for (i, o) in opts.iter().enumerate() {
        // nginx's numbering: the connection string is argument 1.
        let n = i + 2;
        let Some((k, v)) = o.split_once('=') else {
            return Err(format!("argument {n} is not key=value (not shown: it may hold a secret)"));
        };
        match k {
            "password_file" => {
                let text = read_file(v).map_err(|e| format!("cannot read password_file \"{v}\": {e}"))?;
                let pw = first_line(&text);
                if pw.is_empty() {
                    return Err(format!("password_file \"{v}\" is empty"));
                }
                c.password = Some(pw.to_string());
                c.password_file = Some(v.to_string());
            }
            "secret_file" => {
                let text = read_file(v).map_err(|e| format!("cannot read secret_file \"{v}\": {e}"))?;
                let secret = first_line(&text);
                if secret.is_empty() {
                    return Err(format!("secret_file \"{v}\" is empty"));
                }
                if secret.len() < SECRET_MIN {
                    return Err(format!("secret_file \"{v}\": the secret must be at least {SECRET_MIN} bytes"));
                }
                c.secret = Some(secret.as_bytes().to_vec());
            }
            "backoff_min" => c.backoff_min_ms = time_opt(k, v, 10)?,
            "backoff_max" => c.backoff_max_ms = time_opt(k, v, 10)?,
            "connect_timeout" => c.connect_timeout_ms = time_opt(k, v, 100)?,
            "durable" => c.durable = on_off(k, v)?,
            "retention" => c.retention_ms = time_opt(k, v, 1000)?,
            "unlisten_after" => c.unlisten_after_ms = time_opt(k, v, 1000)?,
            "keepalive" => c.keepalive_ms = time_opt(k, v, 100)?,
            "request_timeout" => c.request_timeout_ms = time_opt(k, v, 100)?,
            "prefix" => {
                if v.len() > 32 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
                    return Err(format!("invalid prefix \"{v}\": at most 32 letters, digits, '_', '.' or '-'"));
                }
                c.prefix = v.to_string();
            }
            "sslmode" => {
                set_param(&mut c, Param::SslMode, v).map_err(|why| format!("invalid sslmode \"{v}\": {why}"))?
            }
            "sslrootcert" => c.sslrootcert = Some(v.to_string()),
            _ if after_password => {
                return Err(format!(
                    "unknown option in argument {n} (not shown: it follows the password and may be part of it)"
                ));
            }
            _ => return Err(format!("unknown option \"{k}\"")),
        }
        after_password = false;
    }
    // The wire protocol ends strings with NUL: one inside would cut them
    // (or smuggle in more startup parameters).
    let texts = [
        ("host", Some(&c.host)),
        ("user", Some(&c.user)),
        ("password", c.password.as_ref()),
        ("dbname", Some(&c.dbname)),
        ("sslrootcert", c.sslrootcert.as_ref()),
        ("application_name", Some(&c.application_name)),
    ];
    if let Some((name, _)) = texts.iter().find(|(_, v)| v.is_some_and(|v| v.contains('\0'))) {
        return Err(format!("the value of \"{name}\" contains a NUL byte"));
    }
    if c.backoff_min_ms > c.backoff_max_ms {
        return Err(format!("backoff_min ({}ms) is above backoff_max ({}ms)", c.backoff_min_ms, c.backoff_max_ms));
    }
    if c.sslmode.needs_root_cert() && c.sslrootcert.is_none() {
        return Err(format!("sslmode \"{}\" needs sslrootcert=<CA file>", c.sslmode.name()));
    }
    if c.sslrootcert.as_deref() == Some("") {
        return Err("sslrootcert is empty: give the CA file's path".into());
    }
    if c.dbname.is_empty() {
        c.dbname = c.user.clone();
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<PgConfig, String> {
        parse(args, |f| match f {
            "/pw" => Ok("s3cret\n".into()),
            "/empty" => Ok("\nsecond line\n".into()),
            "/secret" => Ok("0123456789abcdef\r\nsecond line\n".into()),
            "/short" => Ok("hunter-123456\n".into()),
            "/fifteen" => Ok("hunter2-0123456\r\n".into()),
            _ => Err("No such file or directory".into()),
        })
    }

    /// The exact message, which never holds any piece of "hunter2".
    fn err(args: &[&str]) -> String {
        let e = p(args).unwrap_err();
        assert!(!e.contains("hunter") && !e.contains("nter2"), "password in {e:?}");
        e
    }

    const SSLMODES: &str = "use disable, allow, prefer, require, verify-ca or verify-full";

    #[test]
    fn url_with_everything() {
        let c =
            p(&["postgresql://bob:p%40ss@db.example:6543/app?sslmode=require", "durable=on", "prefix=app_"]).unwrap();
        assert_eq!((c.host.as_str(), c.port, c.user.as_str(), c.dbname.as_str()), ("db.example", 6543, "bob", "app"));
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert_eq!(c.sslmode, SslMode::Require);
        assert!(c.durable);
        assert_eq!(c.max_channel(), 59);
        assert!(!format!("{c:?}").contains("p@ss"));
    }

    #[test]
    fn url_forms() {
        let c = p(&["postgres://[::1]:6543/db?application_name=a%20b&connect_timeout=2&hostaddr=10.0.0.1"]).unwrap();
        assert_eq!((c.host.as_str(), c.port, c.dbname.as_str()), ("10.0.0.1", 6543, "db"));
        assert_eq!((c.application_name.as_str(), c.connect_timeout_ms), ("a b", 2000));
        let c = p(&["postgresql://[::1]/db"]).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 5432));
        // An empty port is the default one; no database: the user's name.
        let c = p(&["postgresql://u:pw:with:colons@h:/"]).unwrap();
        assert_eq!((c.port, c.dbname.as_str(), c.password.as_deref()), (5432, "u", Some("pw:with:colons")));
        // The last '@' of the authority ends the credentials; '#' is plain.
        let c = p(&["postgresql://u:a@b#c@h/db"]).unwrap();
        assert_eq!((c.host.as_str(), c.password.as_deref()), ("h", Some("a@b#c")));
        let c = p(&["postgresql://u:a%2Fb%3Fc@h?password=x%26y"]).unwrap();
        assert_eq!(c.password.as_deref(), Some("x&y"));
    }

    #[test]
    fn keywords_and_password_file() {
        let c = p(&["host=127.0.0.1 port=5432 dbname=test user=postgres", "password_file=/pw"]).unwrap();
        assert_eq!(c.password.as_deref(), Some("s3cret"));
        assert_eq!(c.dbname, "test");
        assert_eq!(c.password_file.as_deref(), Some("/pw"));
    }

    #[test]
    fn keyword_quoting_as_libpq() {
        let pw = |s: &str| p(&[s]).unwrap().password;
        assert_eq!(pw("password = 'x y'"), Some("x y".into()));
        assert_eq!(pw("password\t=\n'x y' host=h"), Some("x y".into()));
        assert_eq!(pw(r"password='it\'s \\ ok'"), Some(r"it's \ ok".into()));
        assert_eq!(pw(r"password=a\ b\\c\'d"), Some(r"a b\c'd".into()));
        assert_eq!(pw("password=a'b"), Some("a'b".into()));
        assert_eq!(pw("password=''"), Some(String::new()));
        assert_eq!(pw("password="), Some(String::new()));
        assert_eq!(pw("password=a=b"), Some("a=b".into()));
        // As libpq, a quoted value may be followed by the next name at once.
        let c = p(&["password='x'host=h"]).unwrap();
        assert_eq!((c.password.as_deref(), c.host.as_str()), (Some("x"), "h"));
        // A trailing backslash is dropped, as libpq does.
        assert_eq!(pw(r"password=ab\"), Some("ab".into()));
        assert_eq!(p(&["  hostaddr=10.0.0.2  "]).unwrap().host, "10.0.0.2");
    }

    #[test]
    fn form1_url_with_password_parameter_and_bad_sslmode() {
        assert_eq!(
            err(&["postgresql://u@h/db?password=hunter2&sslmode=maybe"]),
            format!("invalid value of \"sslmode\" in the URL: {SSLMODES}")
        );
    }

    #[test]
    fn form2_blank_after_equals() {
        let c = p(&["host=h password= hunter2"]).unwrap();
        assert_eq!(c.password.as_deref(), Some("hunter2"));
        assert_eq!(
            err(&["host=h password= hunter2 sslmode=maybe"]),
            format!("invalid value of \"sslmode\" in the connection string: {SSLMODES}")
        );
        assert_eq!(
            err(&["host=h password= hunter2 bogus=1"]),
            "unknown connection parameter after the value of \"password\" in the connection string \
             (not shown: a value with spaces must be quoted, as in password='a b')"
        );
    }

    #[test]
    fn form3_quoted_value_with_a_blank() {
        let c = p(&["host=h password='hunter 2' dbname=d"]).unwrap();
        assert_eq!((c.password.as_deref(), c.dbname.as_str()), (Some("hunter 2"), "d"));
        let hint = "(not shown: a value with spaces must be quoted, as in password='a b')";
        assert_eq!(
            err(&["host=h password=hunter 2'"]),
            format!("a word without \"=\" follows the value of \"password\" in the connection string {hint}")
        );
        assert_eq!(
            err(&["host=h password='hunter' 2'"]),
            format!("a word without \"=\" follows the value of \"password\" in the connection string {hint}")
        );
        assert_eq!(
            err(&["host=h password='hunter 2"]),
            "unterminated quoted value of \"password\" in the connection string"
        );
    }

    #[test]
    fn form4_unescaped_slash_or_question_mark_in_the_password() {
        let msg = "\"@\" after the host part of the URL: percent-encode \"/\" and \"?\" in the user name and password \
                   (%2F, %3F) and \"@\" anywhere else (%40)";
        assert_eq!(err(&["postgresql://u:hun/ter@h/db"]), msg);
        assert_eq!(err(&["postgresql://u:hunter2/x@h/db"]), msg);
        assert_eq!(err(&["postgresql://u:hun?ter2@h/db"]), msg);
        assert_eq!(err(&["postgresql://h/db?application_name=a@b"]), msg);
        // No '@' at all: the password is taken for a port, which is not shown.
        assert_eq!(
            err(&["postgresql://u:hunter2/db"]),
            "invalid value of \"port\" in the URL: use a number from 1 to 65535"
        );
    }

    #[test]
    fn every_connection_string_error() {
        let port = "use a number from 1 to 65535";
        let unix = "Unix sockets are not supported; use a TCP address";
        let timeout = "use a time above zero, such as 5s or 500ms";
        let bad_pct = "in the URL: bad percent-escape (use % and two hex digits)";
        let not_utf8 = "in the URL: not UTF-8 after percent-decoding";
        let url_hint = "(not shown: percent-encode \"&\" in a password as %26)";
        let cases: &[(&[&str], String)] = &[
            (&[], "takes a connection URL and options".into()),
            (&["mysql://u:hunter2@h/db"], "unsupported URL scheme \"mysql\": use postgresql:// or postgres://".into()),
            (
                &["hunter2"],
                "invalid connection string (not shown): use postgresql://user@host:port/db or \"host=... dbname=...\""
                    .into(),
            ),
            (&["postgresql://u%zz:hunter2@h/db"], format!("the user name {bad_pct}")),
            (&["postgresql://u%ff:hunter2@h/db"], format!("the user name {not_utf8}")),
            (&["postgresql://u:hunter2%4@h/db"], format!("the password {bad_pct}")),
            (&["postgresql://u:hunter2%+1@h/db"], format!("the password {bad_pct}")),
            (&["postgresql://u:hunter2%c3@h/db"], format!("the password {not_utf8}")),
            (&["postgresql://u:hunter2@h1,h2/db"], "several hosts are not supported (in the URL)".into()),
            (&["postgresql://u:hunter2@[::1/db"], "unclosed \"[\" in the host part of the URL".into()),
            (&["postgresql://u:hunter2@[::1]5432/db"], "only \":port\" may follow \"]\" in the URL".into()),
            (&["postgresql://u:hunter2@h%2/db"], format!("the host {bad_pct}")),
            (&["postgresql://u:hunter2@%2Ftmp/db"], format!("invalid value of \"host\" in the URL: {unix}")),
            (&["postgresql://u:hunter2@h:99999/db"], format!("invalid value of \"port\" in the URL: {port}")),
            (&["postgresql://u:hunter2@h:0/db"], format!("invalid value of \"port\" in the URL: {port}")),
            (&["postgresql://u:hunter2@h:+5432/db"], format!("invalid value of \"port\" in the URL: {port}")),
            (&["postgresql://u:hunter2@h/d%b"], format!("the database name {bad_pct}")),
            (&["postgresql://u:hunter2@h/db?durable"], "URL parameter \"durable\" has no \"=\"".into()),
            (
                &["postgresql://h/db?password=hunter&2"],
                format!("a URL parameter without \"=\" follows the value of \"password\" {url_hint}"),
            ),
            (&["postgresql://u:hunter2@h/db?ssl%mode=x"], format!("a parameter name {bad_pct}")),
            (&["postgresql://u:hunter2@h/db?ssl%m"], format!("a parameter name {bad_pct}")),
            (&["postgresql://u:hunter2@h/db?bogus=1"], "unknown connection parameter \"bogus\" in the URL".into()),
            (
                &["postgresql://h/db?password=hunter&2=x"],
                format!("unknown connection parameter after the value of \"password\" in the URL {url_hint}"),
            ),
            (&["postgresql://u:hunter2@h/db?sslmode=%"], format!("the value of \"sslmode\" {bad_pct}")),
            (&["postgresql://h/db?password=hunter2%e2%82"], format!("the value of \"password\" {not_utf8}")),
            (
                &["postgresql://u:hunter2@h/db?sslmode=verify-ca"],
                "sslmode \"verify-ca\" needs sslrootcert=<CA file>".into(),
            ),
            (
                &["postgresql://u:hunter2@h/db?sslmode=Require"],
                format!("invalid value of \"sslmode\" in the URL: {SSLMODES}"),
            ),
            (
                &["postgresql://u:hunter2@h/db?connect_timeout=0"],
                format!("invalid value of \"connect_timeout\" in the URL: {timeout}"),
            ),
            (
                &["postgresql://u:hunter2@h/db?hostaddr=/tmp"],
                format!("invalid value of \"hostaddr\" in the URL: {unix}"),
            ),
            (&["postgresql://h/db?port=hunter2"], format!("invalid value of \"port\" in the URL: {port}")),
            (&["host=h dbname"], "missing \"=\" after \"dbname\" in the connection string".into()),
            (&["password=hunter2 =x"], "a \"=\" without a parameter name in the connection string".into()),
            (
                &["host=h bogus = 1 password=hunter2"],
                "unknown connection parameter \"bogus\" in the connection string".into(),
            ),
            (&["host='h password=hunter2"], "unterminated quoted value of \"host\" in the connection string".into()),
            (&["port=x password=hunter2"], format!("invalid value of \"port\" in the connection string: {port}")),
            (&["password=hunter2 sslmode='verify-ca'"], "sslmode \"verify-ca\" needs sslrootcert=<CA file>".into()),
            (
                &["password=hunter2 connect_timeout=soon"],
                format!("invalid value of \"connect_timeout\" in the connection string: {timeout}"),
            ),
            (&["host=/run/pg password=hunter2"], format!("invalid value of \"host\" in the connection string: {unix}")),
            (&["postgresql://u%00:hunter2@h/db"], "the value of \"user\" contains a NUL byte".into()),
            (&["host=h password=hunter2\0"], "the value of \"password\" contains a NUL byte".into()),
            (&["postgresql://h/db%00"], "the value of \"dbname\" contains a NUL byte".into()),
        ];
        for (args, want) in cases {
            assert_eq!(&err(args), want, "for {args:?}");
        }
    }

    #[test]
    fn every_option_error() {
        let u = "postgresql://u:hunter2@h/db";
        let cases: &[(&[&str], &str)] = &[
            (&[u, "durable"], "argument 2 is not key=value (not shown: it may hold a secret)"),
            (&[u, "durable=on", "hunter2"], "argument 3 is not key=value (not shown: it may hold a secret)"),
            (&[u, "password_file=/nope"], "cannot read password_file \"/nope\": No such file or directory"),
            (&[u, "password_file=/empty"], "password_file \"/empty\" is empty"),
            (&[u, "secret_file=/nope"], "cannot read secret_file \"/nope\": No such file or directory"),
            (&[u, "secret_file=/empty"], "secret_file \"/empty\" is empty"),
            (&[u, "secret_file=/short"], "secret_file \"/short\": the secret must be at least 16 bytes"),
            (&[u, "secret_file=/fifteen"], "secret_file \"/fifteen\": the secret must be at least 16 bytes"),
            (&[u, "backoff_min=fast"], "invalid backoff_min \"fast\""),
            (&[u, "backoff_min=5ms"], "backoff_min \"5ms\" is below the minimum of 10ms"),
            (&[u, "backoff_max=x"], "invalid backoff_max \"x\""),
            (&[u, "backoff_max=1ms"], "backoff_max \"1ms\" is below the minimum of 10ms"),
            (&[u, "connect_timeout=x"], "invalid connect_timeout \"x\""),
            (&[u, "connect_timeout=99ms"], "connect_timeout \"99ms\" is below the minimum of 100ms"),
            (&[u, "durable=yes"], "invalid durable \"yes\": use on or off"),
            (&[u, "retention=0s"], "retention \"0s\" is below the minimum of 1000ms"),
            (&[u, "retention=999999999999d"], "invalid retention \"999999999999d\""),
            (&[u, "unlisten_after=x"], "invalid unlisten_after \"x\""),
            (&[u, "unlisten_after=1ms"], "unlisten_after \"1ms\" is below the minimum of 1000ms"),
            (&[u, "keepalive=x"], "invalid keepalive \"x\""),
            (&[u, "keepalive=99ms"], "keepalive \"99ms\" is below the minimum of 100ms"),
            (&[u, "request_timeout=x"], "invalid request_timeout \"x\""),
            (&[u, "request_timeout=99ms"], "request_timeout \"99ms\" is below the minimum of 100ms"),
            (&[u, "prefix=a b"], "invalid prefix \"a b\": at most 32 letters, digits, '_', '.' or '-'"),
            (
                &[u, "prefix=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"],
                "invalid prefix \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\": at most 32 letters, digits, '_', '.' or '-'",
            ),
            (
                &[u, "sslmode=maybe"],
                "invalid sslmode \"maybe\": use disable, allow, prefer, require, verify-ca or verify-full",
            ),
            (&[u, "sslmode=verify-ca"], "sslmode \"verify-ca\" needs sslrootcert=<CA file>"),
            (&["postgresql://h/db?sslmode=verify-ca"], "sslmode \"verify-ca\" needs sslrootcert=<CA file>"),
            (&[u, "sslmode=verify-ca", "sslrootcert="], "sslrootcert is empty: give the CA file's path"),
            (&[u, "sslrootcert="], "sslrootcert is empty: give the CA file's path"),
            (&[u, "colour=blue"], "unknown option \"colour\""),
            (
                &["host=h password=hunter", "2=x"],
                "unknown option in argument 2 (not shown: it follows the password and may be part of it)",
            ),
            (
                &["postgresql://h/db?password=hunter", "2=x"],
                "unknown option in argument 2 (not shown: it follows the password and may be part of it)",
            ),
            // Only the argument right after the password is hidden.
            (&["host=h password=hunter2", "durable=on", "colour=blue"], "unknown option \"colour\""),
            (&["password=hunter2 host=h", "colour=blue"], "unknown option \"colour\""),
            (&[u, "backoff_min=10s", "backoff_max=1s"], "backoff_min (10000ms) is above backoff_max (1000ms)"),
            (&[u, "sslmode=verify-full"], "sslmode \"verify-full\" needs sslrootcert=<CA file>"),
            (&["postgresql://h/db?sslmode=verify-full"], "sslmode \"verify-full\" needs sslrootcert=<CA file>"),
            (&[u, "application_name=x"], "unknown option \"application_name\""),
        ];
        for (args, want) in cases {
            assert_eq!(&err(args), want, "for {args:?}");
        }
    }

    /// libpq's sslmode table: what each mode tries and what it checks.
    #[test]
    fn sslmode_table() {
        use SslMode::*;
        // (mode, first try TLS, plain text allowed, needs sslrootcert,
        //  chain checked without / with sslrootcert, host name checked)
        let table = [
            (Disable, false, true, false, (false, false), false),
            (Allow, false, true, false, (false, true), false),
            (Prefer, true, true, false, (false, true), false),
            (Require, true, false, false, (false, true), false),
            (VerifyCa, true, false, true, (true, true), false),
            (VerifyFull, true, false, true, (true, true), true),
        ];
        assert_eq!(table.map(|t| t.0), SSL_MODES);
        for (m, first_tls, plain, needs, (chain_no_root, chain_root), host) in table {
            assert_eq!(SslMode::from_name(m.name()), Some(m));
            assert_eq!(m.first_try_tls(), first_tls, "{m:?} first_try_tls");
            assert_eq!(m.accepts_plain(), plain, "{m:?} accepts_plain");
            assert_eq!(m.needs_root_cert(), needs, "{m:?} needs_root_cert");
            assert_eq!(m.verifies_chain(false), chain_no_root, "{m:?} verifies_chain without sslrootcert");
            assert_eq!(m.verifies_chain(true), chain_root, "{m:?} verifies_chain with sslrootcert");
            assert_eq!(m.verifies_host(), host, "{m:?} verifies_host");
            assert_eq!(m.may_use_tls(), m != Disable);
        }
        assert_eq!(SslMode::from_name("Require"), None);
        assert_eq!(SslMode::from_name(""), None);
    }

    /// libpq's second attempt: `allow` after a refused plain-text attempt
    /// tries TLS, `prefer` after a refused TLS attempt tries plain text.
    #[test]
    fn sslmode_second_attempt() {
        use SslMode::*;
        for m in SSL_MODES {
            let want = match m {
                Allow => (Some(true), None),
                Prefer => (None, Some(false)),
                _ => (None, None),
            };
            assert_eq!((m.on_refusal(false), m.on_refusal(true)), want, "{m:?}");
            // A retry always switches: the first try then its opposite, once.
            if let Some(tls) = m.on_refusal(m.first_try_tls()) {
                assert_eq!(tls, !m.first_try_tls(), "{m:?}");
                assert_eq!(m.on_refusal(tls), None, "{m:?} retries once");
            }
        }
    }

    #[test]
    fn sslmode_and_sslrootcert_parse() {
        let c = p(&["postgresql://h/db?sslmode=allow"]).unwrap();
        assert_eq!((c.sslmode, c.sslrootcert.as_deref()), (SslMode::Allow, None));
        assert_eq!(p(&["postgresql://h/db"]).unwrap().sslmode, SslMode::Prefer);
        let c = p(&["host=h sslmode=verify-ca sslrootcert=/ca.pem"]).unwrap();
        assert_eq!((c.sslmode, c.sslrootcert.as_deref()), (SslMode::VerifyCa, Some("/ca.pem")));
        let c = p(&["postgresql://h/db", "sslmode=verify-full", "sslrootcert=/ca.pem"]).unwrap();
        assert_eq!((c.sslmode, c.sslrootcert.as_deref()), (SslMode::VerifyFull, Some("/ca.pem")));
        let c = p(&["postgresql://h/db?sslmode=require&sslrootcert=/ca.pem"]).unwrap();
        assert!(c.sslmode.verifies_chain(c.sslrootcert.is_some()) && !c.sslmode.verifies_host());
        assert!(c.describe().ends_with(" sslmode=require"));
    }

    #[test]
    fn secret_file() {
        let c = p(&["postgresql://u:hunter2@h/db", "secret_file=/secret", "password_file=/pw"]).unwrap();
        assert_eq!(c.secret.as_deref(), Some(&b"0123456789abcdef"[..]));
        let shown = format!("{c:?} {}", c.describe());
        assert!(!shown.contains("0123456789abcdef") && !shown.contains("s3cret") && !shown.contains("hunter"));
        assert_eq!(p(&["postgresql://h/db"]).unwrap().secret, None);
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("250ms"), Some(250));
        assert_eq!(parse_time("5"), Some(5000));
        assert_eq!(parse_time("2m"), Some(120_000));
        assert_eq!(parse_time("1h"), Some(3_600_000));
        assert_eq!(parse_time("1d"), Some(86_400_000));
        assert_eq!(parse_time("x"), None);
        assert_eq!(parse_time("-1s"), None);
        assert_eq!(parse_time("1234567890123"), None);
        // Would overflow u64 milliseconds.
        assert_eq!(parse_time("999999999999d"), None);
    }
}
