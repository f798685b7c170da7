//! `workerbus_postgres URL [options];` parsed into typed settings. Pure
//! Rust (no nginx): `cargo test --no-default-features` checks every error.
//!
//! The connection string is a `postgresql://` (or `postgres://`) URL or a
//! libpq keyword string (`host=... port=... dbname=...`). Messages never
//! contain the password: a URL is shown with it replaced by `***`.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

impl SslMode {
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyFull => "verify-full",
        }
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
    pub durable: bool,
    pub retention_ms: u64,
    pub prefix: String,
    pub unlisten_after_ms: u64,
    pub application_name: String,
}

// The password must never reach a log line, even through {:?}.
impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl PgConfig {
    /// What the status and log lines show: no password.
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
        durable: false,
        retention_ms: 3_600_000,
        prefix: String::new(),
        unlisten_after_ms: 60_000,
        application_name: "workerbus".into(),
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
    num.parse::<u64>().ok().map(|n| n * mult)
}

fn pct_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| core::str::from_utf8(h).ok());
            let v = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or("bad percent-escape")?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 after percent-decoding".into())
}

/// The URL with its password replaced, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return redact_keywords(url) };
    let (auth_end, _) = rest.char_indices().find(|&(_, c)| c == '/' || c == '?').unwrap_or((rest.len(), ' '));
    let (auth, tail) = rest.split_at(auth_end);
    match auth.rsplit_once('@') {
        Some((cred, host)) => match cred.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

fn redact_keywords(s: &str) -> String {
    s.split_whitespace()
        .map(|w| if w.starts_with("password=") { "password=***".to_string() } else { w.to_string() })
        .collect::<Vec<_>>()
        .join(" ")
}

fn set_param(c: &mut PgConfig, key: &str, val: &str) -> Result<(), String> {
    match key {
        "host" | "hostaddr" => {
            if val.starts_with('/') {
                return Err(format!("unix socket host \"{val}\" is not supported; use a TCP address"));
            }
            c.host = val.to_string()
        }
        "port" => c.port = val.parse().ok().filter(|&p| p > 0).ok_or(format!("invalid port \"{val}\""))?,
        "user" => c.user = val.to_string(),
        "password" => c.password = Some(val.to_string()),
        "dbname" => c.dbname = val.to_string(),
        "sslmode" => {
            c.sslmode = match val {
                "disable" => SslMode::Disable,
                "prefer" | "allow" => SslMode::Prefer,
                "require" => SslMode::Require,
                "verify-full" => SslMode::VerifyFull,
                "verify-ca" => return Err("sslmode \"verify-ca\" is not supported; use \"verify-full\"".into()),
                _ => return Err(format!("invalid sslmode \"{val}\": use disable, prefer, require or verify-full")),
            }
        }
        "sslrootcert" => c.sslrootcert = Some(val.to_string()),
        "connect_timeout" => {
            c.connect_timeout_ms =
                parse_time(val).filter(|&t| t > 0).ok_or(format!("invalid connect_timeout \"{val}\""))?
        }
        "application_name" => c.application_name = val.to_string(),
        _ => return Err(format!("unknown connection parameter \"{key}\"")),
    }
    Ok(())
}

fn parse_url(c: &mut PgConfig, url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
        .ok_or("the URL must start with postgresql://")?;
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (auth_host, db) = main.split_once('/').unwrap_or((main, ""));
    let hostport = match auth_host.rsplit_once('@') {
        Some((cred, hp)) => {
            let (u, p) = cred.split_once(':').map_or((cred, None), |(u, p)| (u, Some(p)));
            if !u.is_empty() {
                c.user = pct_decode(u).map_err(|e| format!("user name: {e}"))?;
            }
            if let Some(p) = p {
                c.password = Some(pct_decode(p).map_err(|e| format!("password: {e}"))?);
            }
            hp
        }
        None => auth_host,
    };
    if hostport.contains(',') {
        return Err("several hosts are not supported".into());
    }
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, after) = h.split_once(']').ok_or("unclosed '[' in host")?;
        (h, after.strip_prefix(':'))
    } else {
        hostport.rsplit_once(':').map_or((hostport, None), |(h, p)| (h, Some(p)))
    };
    if !host.is_empty() {
        set_param(c, "host", &pct_decode(host)?)?;
    }
    if let Some(p) = port {
        set_param(c, "port", p)?;
    }
    if !db.is_empty() {
        c.dbname = pct_decode(db)?;
    }
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or(format!("parameter \"{kv}\" has no value"))?;
        set_param(c, k, &pct_decode(v)?)?;
    }
    Ok(())
}

fn parse_keywords(c: &mut PgConfig, s: &str) -> Result<(), String> {
    for w in s.split_whitespace() {
        let (k, v) = w.split_once('=').ok_or(format!("\"{}\" is not key=value", redact_keywords(w)))?;
        let v = v.trim_matches('\'');
        set_param(c, k, v)?;
    }
    Ok(())
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

/// Parses the directive's arguments. `read_file` reads `password_file=`.
pub fn parse(args: &[&str], read_file: impl Fn(&str) -> Result<String, String>) -> Result<PgConfig, String> {
    let mut c = defaults();
    let (conn, opts) = args.split_first().ok_or("takes a connection URL and options")?;
    if conn.contains("://") {
        parse_url(&mut c, conn).map_err(|e| format!("{e} in \"{}\"", redact(conn)))?;
    } else if conn.contains('=') {
        parse_keywords(&mut c, conn).map_err(|e| format!("{e} in \"{}\"", redact_keywords(conn)))?;
    } else {
        return Err(format!(
            "invalid connection string \"{}\": use postgresql://user@host:port/db or \"host=... dbname=...\"",
            redact(conn)
        ));
    }
    for o in opts {
        let (k, v) = o.split_once('=').ok_or(format!("invalid option \"{o}\": use key=value"))?;
        match k {
            "password_file" => {
                let text = read_file(v).map_err(|e| format!("cannot read password_file \"{v}\": {e}"))?;
                let pw = text.lines().next().unwrap_or("").to_string();
                if pw.is_empty() {
                    return Err(format!("password_file \"{v}\" is empty"));
                }
                c.password = Some(pw);
                c.password_file = Some(v.to_string());
            }
            "backoff_min" => c.backoff_min_ms = time_opt(k, v, 10)?,
            "backoff_max" => c.backoff_max_ms = time_opt(k, v, 10)?,
            "connect_timeout" => c.connect_timeout_ms = time_opt(k, v, 100)?,
            "durable" => c.durable = on_off(k, v)?,
            "retention" => c.retention_ms = time_opt(k, v, 1000)?,
            "unlisten_after" => c.unlisten_after_ms = time_opt(k, v, 1000)?,
            "prefix" => {
                if v.len() > 32 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
                    return Err(format!("invalid prefix \"{v}\": at most 32 letters, digits, '_', '.' or '-'"));
                }
                c.prefix = v.to_string();
            }
            "sslmode" | "sslrootcert" => set_param(&mut c, k, v)?,
            _ => return Err(format!("unknown option \"{k}\"")),
        }
    }
    if c.backoff_min_ms > c.backoff_max_ms {
        return Err(format!("backoff_min ({}ms) is above backoff_max ({}ms)", c.backoff_min_ms, c.backoff_max_ms));
    }
    if c.sslmode == SslMode::VerifyFull && c.sslrootcert.is_none() {
        return Err("sslmode \"verify-full\" needs sslrootcert=<CA file>".into());
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
        parse(args, |f| if f == "/pw" { Ok("s3cret\n".into()) } else { Err("No such file or directory".into()) })
    }

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
    fn keywords_and_password_file() {
        let c = p(&["host=127.0.0.1 port=5432 dbname=test user=postgres", "password_file=/pw"]).unwrap();
        assert_eq!(c.password.as_deref(), Some("s3cret"));
        assert_eq!(c.dbname, "test");
    }

    #[test]
    fn errors_name_the_value_but_never_the_password() {
        assert_eq!(
            p(&["postgresql://u:hunter2@h:99999/db"]).unwrap_err(),
            "invalid port \"99999\" in \"postgresql://u:***@h:99999/db\""
        );
        assert_eq!(
            p(&["postgresql://h/db?sslmode=maybe"]).unwrap_err(),
            "invalid sslmode \"maybe\": use disable, prefer, require or verify-full in \"postgresql://h/db?sslmode=maybe\""
        );
        assert_eq!(p(&["postgresql://h/db", "backoff_min=fast"]).unwrap_err(), "invalid backoff_min \"fast\"");
        assert_eq!(
            p(&["postgresql://h/db", "backoff_min=10s", "backoff_max=1s"]).unwrap_err(),
            "backoff_min (10000ms) is above backoff_max (1000ms)"
        );
        assert_eq!(p(&["postgresql://h/db", "durable=yes"]).unwrap_err(), "invalid durable \"yes\": use on or off");
        assert_eq!(
            p(&["postgresql://h/db", "password_file=/nope"]).unwrap_err(),
            "cannot read password_file \"/nope\": No such file or directory"
        );
        assert_eq!(p(&["postgresql://h/db", "colour=blue"]).unwrap_err(), "unknown option \"colour\"");
        assert_eq!(
            p(&["host=h password=hunter2 bogus=1"]).unwrap_err(),
            "unknown connection parameter \"bogus\" in \"host=h password=*** bogus=1\""
        );
        assert_eq!(
            p(&["postgresql://h/db?sslmode=verify-full"]).unwrap_err(),
            "sslmode \"verify-full\" needs sslrootcert=<CA file>"
        );
        assert!(p(&["mysql"]).unwrap_err().starts_with("invalid connection string \"mysql\""));
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("250ms"), Some(250));
        assert_eq!(parse_time("5"), Some(5000));
        assert_eq!(parse_time("2m"), Some(120_000));
        assert_eq!(parse_time("x"), None);
        assert_eq!(parse_time("-1s"), None);
    }
}
