//! What travels in a NOTIFY: the checks every post passes at the call, and
//! the payload format the bridge writes and reads (docs/postgres.md, "Posting
//! from SQL"). Pure Rust, tested without nginx.
//!
//! A notification payload is one of:
//! - `wbn <seq> <origin>\n<payload>`: posted by a node, not durable; `seq`
//!   only keeps identical payloads of one transaction apart (PostgreSQL
//!   folds identical channel+payload pairs within a transaction);
//! - `wbd <id> <xid> <origin>\n<payload>`: durable, `id` is the outbox
//!   row's id and `xid` its transaction's (`workerbus_post()` writes it);
//! - anything else: a plain payload posted from SQL, origin unknown ("").
//!
//! On the reserved channel the payload is a cluster event
//! (`encode_event`); with `secret_file=` it is signed (`sign_event`).

/// PostgreSQL refuses a payload of 8000 bytes or more.
pub const MAX_NOTIFY: usize = 7999;
/// Room kept for the header (`wbd `, a 20-digit id, a space, a 20-digit
/// xid, a space, the origin, `\n`).
pub const HEADER_RESERVE: usize = 99;
/// Room a signature takes in a signed cluster event (`s <seq> <64 hex>\n`).
pub const SIGNATURE_RESERVE: usize = 88;
/// Largest payload a caller may post.
pub const MAX_PAYLOAD: usize = MAX_NOTIFY - HEADER_RESERVE;
/// Longest origin (node id) carried, in bytes; longer ones are cut.
pub const MAX_ORIGIN: usize = 52;
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
    let mut s = String::new();
    for c in o.chars().map(|c| if c.is_whitespace() { '_' } else { c }) {
        if s.len() + c.len_utf8() > MAX_ORIGIN {
            break;
        }
        s.push(c);
    }
    s
}

/// The notification payload of a non-durable post.
pub fn encode(seq: u64, origin: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = format!("wbn {seq} {origin}\n").into_bytes();
    v.extend_from_slice(payload);
    v
}

#[derive(Debug, PartialEq, Eq)]
pub struct Incoming<'a> {
    /// Outbox id and transaction id of a durable post.
    pub durable: Option<(u64, u64)>,
    pub origin: &'a [u8],
    pub payload: &'a [u8],
}

fn number(b: &[u8]) -> Option<u64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    core::str::from_utf8(b).ok()?.parse().ok()
}

/// A notification's payload. A header that does not parse makes the
/// whole payload plain (as posted from SQL): it proves nothing.
pub fn decode(msg: &[u8]) -> Incoming<'_> {
    let plain = Incoming { durable: None, origin: b"", payload: msg };
    let durable = msg.starts_with(b"wbd ");
    if !(durable || msg.starts_with(b"wbn ")) {
        return plain;
    }
    let Some(nl) = msg.iter().position(|&b| b == b'\n') else { return plain };
    let mut head = msg[4..nl].splitn(if durable { 3 } else { 2 }, |&b| b == b' ');
    let Some(id) = head.next().and_then(number) else { return plain };
    let xid = if durable {
        match head.next().and_then(number) {
            Some(x) => Some(x),
            None => return plain,
        }
    } else {
        None
    };
    let Some(origin) = head.next() else { return plain };
    Incoming { durable: xid.map(|x| (id, x)), origin, payload: &msg[nl + 1..] }
}

/// Flags a node sends with a cluster event (lib/resty/workerbus/cluster.lua):
/// its data's encoding, raw, JSON or nil (never string.buffer across nodes),
/// plus resty.events' bit; no worker id and no other bit. Anything else did
/// not come from a node.
pub fn event_flags_ok(flags: u32) -> bool {
    use crate::abi::record::{FLAG_EVENTS, KIND_JSON, KIND_MASK, KIND_NIL, KIND_RAW};
    let kind = flags & KIND_MASK;
    flags & !(KIND_MASK | FLAG_EVENTS) == 0 && matches!(kind, KIND_RAW | KIND_JSON | KIND_NIL)
}

/// The signed form of a cluster event's body: `s <hex HMAC-SHA-256>\n<body>`,
/// the MAC over the channel, the origin, the node's post sequence and the
/// body (a signature cannot be moved to another channel, node or post).
pub fn sign_event(key: &[u8], channel: &[u8], origin: &str, seq: u64, body: &[u8]) -> Vec<u8> {
    let mac = event_mac(key, channel, origin.as_bytes(), seq, body);
    let mut v = format!("s {seq} ").into_bytes();
    for b in mac {
        v.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    v.push(b'\n');
    v.extend_from_slice(body);
    v
}

fn event_mac(key: &[u8], channel: &[u8], origin: &[u8], seq: u64, body: &[u8]) -> [u8; 32] {
    use hmac::{KeyInit, Mac};
    let Ok(mut m) = hmac::Hmac::<sha2::Sha256>::new_from_slice(key) else { return [0; 32] };
    for part in [channel, b"\0", origin, b"\0", seq.to_string().as_bytes(), b"\0", body] {
        m.update(part);
    }
    m.finalize().into_bytes().into()
}

/// The body of a signed cluster event, if its signature is right.
pub fn verify_event<'a>(key: &[u8], channel: &[u8], origin: &[u8], signed: &'a [u8]) -> Result<&'a [u8], &'static str> {
    use hmac::{KeyInit, Mac};
    let unsigned = "an unsigned cluster event (every node needs the same secret_file)";
    if !signed.starts_with(b"s ") {
        return Err(unsigned);
    }
    let nl = signed.iter().position(|&b| b == b'\n').ok_or(unsigned)?;
    let mut head = signed[2..nl].split(|&b| b == b' ');
    let seq = head.next().and_then(number).ok_or(unsigned)?;
    let hex = head.next().ok_or(unsigned)?;
    if hex.len() != 64 {
        return Err(unsigned);
    }
    let mut tag = [0u8; 32];
    for (i, t) in tag.iter_mut().enumerate() {
        let pair = core::str::from_utf8(&hex[2 * i..2 * i + 2]).map_err(|_| unsigned)?;
        *t = u8::from_str_radix(pair, 16).map_err(|_| unsigned)?;
    }
    let body = &signed[nl + 1..];
    let Ok(mut m) = hmac::Hmac::<sha2::Sha256>::new_from_slice(key) else { return Err(unsigned) };
    for part in [channel, b"\0", origin, b"\0", seq.to_string().as_bytes(), b"\0", body] {
        m.update(part);
    }
    m.verify_slice(&tag).map_err(|_| "a cluster event with a wrong signature (another secret_file?)")?;
    Ok(body)
}

/// The body of a signed event already verified.
pub fn strip_signature(signed: &[u8]) -> Option<&[u8]> {
    let nl = signed.iter().position(|&b| b == b'\n')?;
    Some(&signed[nl + 1..])
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
        assert_eq!(decode(&m), Incoming { durable: None, origin: b"host/1/2", payload: b"hello\nworld" });
        let d = b"wbd 42 777 n1\nx";
        assert_eq!(decode(d), Incoming { durable: Some((42, 777)), origin: b"n1", payload: b"x" });
        assert_eq!(decode(b"plain"), Incoming { durable: None, origin: b"", payload: b"plain" });
        // The old header (no xid), a forged one with words for numbers: plain.
        assert_eq!(decode(b"wbd 1000000000000 x\nforged").durable, None);
        assert_eq!(decode(b"wbd 1000000000000 x\nforged").payload, b"wbd 1000000000000 x\nforged");
        assert_eq!(decode(b"wbd +5 6 o\np").durable, None);
        assert_eq!(decode(b"wbn x y\nz").payload, b"wbn x y\nz");
        let e = encode_event(5, b"src", b"ev", b"{\"a\":1}");
        let d = decode_event(&e).unwrap();
        assert_eq!((d.flags, d.source, d.event, d.data), (5, &b"src"[..], &b"ev"[..], &b"{\"a\":1}"[..]));
        assert!(decode_event(b"1 99 1\nab").is_none());
        // Header fits the reserve with the longest origin, id and xid.
        let worst = format!("wbd {} {} {}\n", u64::MAX, u64::MAX, "o".repeat(MAX_ORIGIN));
        assert!(worst.len() <= HEADER_RESERVE, "{}", worst.len());
    }

    #[test]
    fn signed_events() {
        let key = b"0123456789abcdef";
        let s = sign_event(key, b"workerbus_events", "node/1/2", 9, b"0 1 1\nse");
        assert_eq!(verify_event(key, b"workerbus_events", b"node/1/2", &s), Ok(&b"0 1 1\nse"[..]));
        assert!(
            verify_event(b"another secret!!", b"workerbus_events", b"node/1/2", &s)
                .unwrap_err()
                .contains("wrong signature")
        );
        assert!(verify_event(key, b"workerbus_events", b"node/9/9", &s).is_err());
        assert!(verify_event(key, b"workerbus_events", b"node/1/2", b"0 1 1\nse").unwrap_err().contains("unsigned"));
        assert_eq!(strip_signature(&s), Some(&b"0 1 1\nse"[..]));
        assert!(event_flags_ok(5) && event_flags_ok(6) && !event_flags_ok(3) && !event_flags_ok(u32::MAX));
    }

    #[test]
    fn cluster_events_carry_exactly_the_record_kinds_a_node_sends() {
        use crate::abi::record::*;
        for api in [0, FLAG_EVENTS] {
            for kind in [KIND_RAW, KIND_JSON, KIND_NIL] {
                assert!(event_flags_ok(kind | api), "{kind} {api}");
            }
            // resty.workerbus.cluster encodes tables as JSON, never with string.buffer
            assert!(!event_flags_ok(KIND_SBUF | api));
            assert!(!event_flags_ok(KIND_RAW | api | (1 << WID_SHIFT)));
        }
    }
}
