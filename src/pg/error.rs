//! What can end a session, typed: the driver and the session decide on the
//! kind (retry, drop one post, count a timeout), never on a message's text.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A system call on the socket failed (errno when known).
    Io { what: String, errno: Option<i32> },
    /// The server closed the connection.
    Closed,
    /// Nothing within a deadline: `what` is the deadline's name.
    Timeout { what: &'static str, ms: u64 },
    /// The server's ErrorResponse, while doing `during` (empty: the session itself).
    Server { during: &'static str, severity: String, code: String, message: String },
    /// Authentication cannot go on (no password, an unsupported method, SCRAM).
    Auth(String),
    /// TLS could not be set up or the server's certificate was refused.
    Tls(String),
    /// The server sent something this client cannot read.
    Protocol(String),
}

impl Error {
    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// A server error that concerns one post's values (class 22, data
    /// exception: a character the database encoding cannot hold, a value
    /// too long; 54000, program limit: a payload PostgreSQL refuses): that
    /// post is dropped alone, the others are sent again.
    pub fn is_bad_post(&self) -> bool {
        self.sqlstate().is_some_and(|c| c.starts_with("22") || c == "54000")
    }

    pub fn during(self, what: &'static str) -> Error {
        match self {
            Error::Server { severity, code, message, .. } => Error::Server { during: what, severity, code, message },
            e => e,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { what, errno: Some(e) } => {
                write!(f, "{what}: {}", std::io::Error::from_raw_os_error(*e).kind_text())
            }
            Error::Io { what, errno: None } => write!(f, "{what}"),
            Error::Closed => write!(f, "the server closed the connection"),
            Error::Timeout { what, ms } => write!(f, "no reply within {what} ({ms}ms)"),
            Error::Server { during, severity, code, message } => {
                if !during.is_empty() {
                    write!(f, "{during}: ")?;
                }
                write!(f, "{severity}: {message} (SQLSTATE {code})")
            }
            Error::Auth(s) | Error::Tls(s) => write!(f, "{s}"),
            Error::Protocol(s) => write!(f, "protocol error: {s}"),
        }
    }
}

trait KindText {
    fn kind_text(&self) -> String;
}

impl KindText for std::io::Error {
    /// The OS's text without Rust's " (os error N)" suffix.
    fn kind_text(&self) -> String {
        let s = self.to_string();
        match s.find(" (os error") {
            Some(i) => s[..i].to_string(),
            None => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_and_kinds() {
        let e = Error::Server {
            during: "",
            severity: "ERROR".into(),
            code: "22P05".into(),
            message: "character with byte sequence 0xe2 0x82 0xac in encoding \"UTF8\" has no equivalent in encoding \"LATIN1\"".into(),
        };
        assert!(e.is_bad_post());
        let e = e.during("posting");
        assert!(e.to_string().starts_with("posting: ERROR: character with"), "{e}");
        assert!(e.to_string().ends_with("(SQLSTATE 22P05)"));
        let priv_err =
            Error::Server { during: "", severity: "ERROR".into(), code: "42501".into(), message: "x".into() };
        assert!(!priv_err.is_bad_post());
        assert_eq!(
            Error::Io { what: "cannot connect to 127.0.0.1:1".into(), errno: Some(libc::ECONNREFUSED) }.to_string(),
            "cannot connect to 127.0.0.1:1: Connection refused"
        );
        assert_eq!(
            Error::Timeout { what: "request_timeout", ms: 2000 }.to_string(),
            "no reply within request_timeout (2000ms)"
        );
    }
}
