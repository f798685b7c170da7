//! What travels in a NOTIFY: the checks every post passes at the call, and
//! the payload format the bridge writes and reads (docs/postgres.md, "Posting
//! from SQL"). Pure Rust, tested without nginx.
//!
//! A notification payload is one of:
//! - `wbn <seq> <origin>\n<payload>`: posted by a node, not durable; `seq`
//!   only keeps identical payloads of one transaction apart (PostgreSQL
//!   folds identical channel+payload pairs within a transaction);
//! - `wbd <id> <origin>\n<payload>`: durable, `id` is the outbox row's id;
//! - anything else: a plain payload posted from SQL, origin unknown ("").

/// PostgreSQL refuses a payload of 8000 bytes or more.
pub const MAX_NOTIFY: usize = 7999;
/// Room kept for the header (`wbd `, a 20-digit id, a space, the origin, `\n`).
pub const HEADER_RESERVE: usize = 99;
/// Largest payload a caller may post.
pub const MAX_PAYLOAD: usize = MAX_NOTIFY - HEADER_RESERVE;
/// Longest origin (node id) carried; longer ones are cut.
pub const MAX_ORIGIN: usize = 64;
/// Channel (after the prefix) that carries cluster-wide worker events.
pub const EVENTS_CHANNEL: &str = "workerbus_events";
/// Ring source of bus notifications delivered to wait()/subscribe().
pub const RING_SOURCE: &[u8] = b"workerbus.pg";

fn text_check(what: &str, b: &[u8]) -> Result<(), String> {
    if b.contains(&0) {
        return Err(format!("{what} must not contain NUL bytes"));
    }
    if core::str::from_utf8(b).is_err() {
        return Err(format!("{what} must be valid UTF-8"));
    }
    Ok(())
}

/// A channel name as a caller gives it (without the prefix).
pub fn check_channel(ch: &[u8], max: usize) -> Result<(), String> {
    if ch.is_empty() || ch.len() > max {
        return Err(format!("channel must be 1 to {max} bytes (got {})", ch.len()));
    }
    text_check("channel", ch)?;
    if ch == EVENTS_CHANNEL.as_bytes() {
        return Err(format!("channel \"{EVENTS_CHANNEL}\" is reserved"));
    }
    Ok(())
}

pub fn check_payload(p: &[u8]) -> Result<(), String> {
    if p.len() > MAX_PAYLOAD {
        return Err(format!("payload too large ({} bytes, max {MAX_PAYLOAD})", p.len()));
    }
    text_check("payload", p)
}

/// The origin as carried: no spaces or newlines, at most MAX_ORIGIN bytes.
pub fn clean_origin(o: &str) -> String {
    o.chars().map(|c| if c.is_whitespace() { '_' } else { c }).take(MAX_ORIGIN).collect()
}

/// The notification payload of a non-durable post.
pub fn encode(seq: u64, origin: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = format!("wbn {seq} {origin}\n").into_bytes();
    v.extend_from_slice(payload);
    v
}

#[derive(Debug, PartialEq, Eq)]
pub struct Incoming<'a> {
    /// Outbox id of a durable post.
    pub durable_id: Option<u64>,
    pub origin: &'a [u8],
    pub payload: &'a [u8],
}

pub fn decode(msg: &[u8]) -> Incoming<'_> {
    let plain = Incoming { durable_id: None, origin: b"", payload: msg };
    let durable = msg.starts_with(b"wbd ");
    if !(durable || msg.starts_with(b"wbn ")) {
        return plain;
    }
    let Some(nl) = msg.iter().position(|&b| b == b'\n') else { return plain };
    let head = &msg[4..nl];
    let Some(sp) = head.iter().position(|&b| b == b' ') else { return plain };
    let Some(id) = core::str::from_utf8(&head[..sp]).ok().and_then(|s| s.parse::<u64>().ok()) else {
        return plain;
    };
    Incoming { durable_id: durable.then_some(id), origin: &head[sp + 1..], payload: &msg[nl + 1..] }
}

/// Body of a cluster-wide worker event: `<flags> <source len> <event len>\n<source><event><data>`.
pub fn encode_event(flags: u32, source: &[u8], event: &[u8], data: &[u8]) -> Vec<u8> {
    let mut v = format!("{flags} {} {}\n", source.len(), event.len()).into_bytes();
    v.extend_from_slice(source);
    v.extend_from_slice(event);
    v.extend_from_slice(data);
    v
}

pub struct Event<'a> {
    pub flags: u32,
    pub source: &'a [u8],
    pub event: &'a [u8],
    pub data: &'a [u8],
}

pub fn decode_event(body: &[u8]) -> Option<Event<'_>> {
    let nl = body.iter().position(|&b| b == b'\n')?;
    let head = core::str::from_utf8(&body[..nl]).ok()?;
    let mut it = head.split(' ').map(|s| s.parse::<usize>().ok());
    let (flags, sl, el) = (it.next()??, it.next()??, it.next()??);
    let rest = &body[nl + 1..];
    if sl + el > rest.len() || flags > u32::MAX as usize {
        return None;
    }
    Some(Event { flags: flags as u32, source: &rest[..sl], event: &rest[sl..sl + el], data: &rest[sl + el..] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_and_payload_errors() {
        assert_eq!(check_channel(b"", 63).unwrap_err(), "channel must be 1 to 63 bytes (got 0)");
        assert_eq!(check_channel(&[b'a'; 64], 63).unwrap_err(), "channel must be 1 to 63 bytes (got 64)");
        assert_eq!(check_channel(b"a\0b", 63).unwrap_err(), "channel must not contain NUL bytes");
        assert_eq!(check_channel(b"\xff", 63).unwrap_err(), "channel must be valid UTF-8");
        assert_eq!(check_channel(b"workerbus_events", 63).unwrap_err(), "channel \"workerbus_events\" is reserved");
        assert!(check_channel(b"a'; DROP TABLE x; --\"", 63).is_ok());
        assert_eq!(check_payload(&[b'x'; 8001]).unwrap_err(), "payload too large (8001 bytes, max 7900)");
        assert!(check_payload(&[b'x'; MAX_PAYLOAD]).is_ok());
        assert_eq!(check_payload(b"\0").unwrap_err(), "payload must not contain NUL bytes");
    }

    #[test]
    fn round_trips() {
        let m = encode(7, "host/1/2", b"hello\nworld");
        assert_eq!(decode(&m), Incoming { durable_id: None, origin: b"host/1/2", payload: b"hello\nworld" });
        let d = b"wbd 42 n1\nx";
        assert_eq!(decode(d), Incoming { durable_id: Some(42), origin: b"n1", payload: b"x" });
        assert_eq!(decode(b"plain"), Incoming { durable_id: None, origin: b"", payload: b"plain" });
        assert_eq!(decode(b"wbn x y\nz").payload, b"wbn x y\nz");
        let e = encode_event(5, b"src", b"ev", b"{\"a\":1}");
        let d = decode_event(&e).unwrap();
        assert_eq!((d.flags, d.source, d.event, d.data), (5, &b"src"[..], &b"ev"[..], &b"{\"a\":1}"[..]));
        assert!(decode_event(b"1 99 1\nab").is_none());
        // Header fits the reserve with the longest origin and id.
        let worst = format!("wbd {} {}\n", u64::MAX, "o".repeat(MAX_ORIGIN));
        assert!(worst.len() <= HEADER_RESERVE);
    }
}
