//! The on-disk record format of the embedded store.
//!
//! A small hand-written, length-prefixed binary format: every record starts
//! with a format byte ([`FORMAT`]); integers are fixed-width little-endian;
//! byte strings are a `u32` length followed by the bytes. Decoding rejects
//! unknown formats, truncated input and trailing bytes, so corruption shows
//! up as an error instead of a wrong value.
//!
//! - KV record (value of the `kv` table; the key is the table key):
//!   `FORMAT, value, create_revision, mod_revision, version`.
//! - Event record (value of the `log` table):
//!   `FORMAT, kind, key, value, create_revision, mod_revision, version,
//!   has_prev, [prev value, prev create_revision, prev mod_revision, prev version]`.
//!   The previous key-value shares the event's key.

use crate::{Error, Event, EventKind, KeyValue, Result};

/// Version of the record layout, first byte of every record.
const FORMAT: u8 = 1;

const KIND_PUT: u8 = 1;
const KIND_DELETE: u8 = 2;

/// Encodes a key's stored record (everything but the key itself).
pub(super) fn encode_kv(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 4 + kv.value.len() + 24);
    out.push(FORMAT);
    put_revisions(&mut out, kv);
    out
}

/// Decodes a record written by [`encode_kv`] for `key`.
pub(super) fn decode_kv(key: &str, bytes: &[u8]) -> Result<KeyValue> {
    let mut r = Reader::new(bytes);
    r.format()?;
    let kv = r.revisions(key.to_owned())?;
    r.finish()?;
    Ok(kv)
}

/// Encodes one event of the log.
pub(super) fn encode_event(event: &Event) -> Vec<u8> {
    let prev_len = event.prev.as_ref().map_or(0, |p| p.value.len() + 28);
    let mut out =
        Vec::with_capacity(2 + 4 + event.kv.key.len() + 4 + event.kv.value.len() + 25 + prev_len);
    out.push(FORMAT);
    out.push(match event.kind {
        EventKind::Put => KIND_PUT,
        EventKind::Delete => KIND_DELETE,
    });
    put_bytes(&mut out, event.kv.key.as_bytes());
    put_revisions(&mut out, &event.kv);
    match &event.prev {
        Some(prev) => {
            out.push(1);
            put_revisions(&mut out, prev);
        }
        None => out.push(0),
    }
    out
}

/// The key of an event record, without decoding the rest (for prefix
/// filtering).
pub(super) fn event_key(bytes: &[u8]) -> Result<&str> {
    let mut r = Reader::new(bytes);
    r.format()?;
    r.kind()?;
    r.str()
}

/// Decodes a record written by [`encode_event`].
pub(super) fn decode_event(bytes: &[u8]) -> Result<Event> {
    let mut r = Reader::new(bytes);
    r.format()?;
    let kind = r.kind()?;
    let key = r.str()?.to_owned();
    let kv = r.revisions(key.clone())?;
    let prev = match r.u8()? {
        0 => None,
        1 => Some(r.revisions(key)?),
        other => return Err(corrupt(format!("bad prev flag {other}"))),
    };
    r.finish()?;
    Ok(Event { kind, kv, prev })
}

/// Value, create_revision, mod_revision, version.
fn put_revisions(out: &mut Vec<u8>, kv: &KeyValue) {
    put_bytes(out, &kv.value);
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // redb refuses values over 3 GiB, so a record's fields always fit in u32;
    // saturating keeps this total, and the decoder would then reject it.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

fn corrupt(what: String) -> Error {
    Error::Backend(format!("corrupt store record: {what}"))
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(corrupt(format!(
                "truncated: needed {n} bytes, {} left",
                self.rest.len()
            )));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        let mut buf = [0u8; 4];
        buf.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(buf))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(buf))
    }

    fn bytes(&mut self) -> Result<&'a [u8]> {
        let len = self.u32()?;
        let len = usize::try_from(len).map_err(|_| corrupt(format!("length {len} too large")))?;
        self.take(len)
    }

    fn str(&mut self) -> Result<&'a str> {
        std::str::from_utf8(self.bytes()?).map_err(|e| corrupt(format!("key is not UTF-8: {e}")))
    }

    fn format(&mut self) -> Result<()> {
        match self.u8()? {
            FORMAT => Ok(()),
            other => Err(corrupt(format!("unknown record format {other}"))),
        }
    }

    fn kind(&mut self) -> Result<EventKind> {
        match self.u8()? {
            KIND_PUT => Ok(EventKind::Put),
            KIND_DELETE => Ok(EventKind::Delete),
            other => Err(corrupt(format!("unknown event kind {other}"))),
        }
    }

    fn revisions(&mut self, key: String) -> Result<KeyValue> {
        let value = self.bytes()?.to_vec();
        let create_revision = self.u64()?;
        let mod_revision = self.u64()?;
        let version = self.u64()?;
        Ok(KeyValue {
            key,
            value,
            create_revision,
            mod_revision,
            version,
        })
    }

    fn finish(&self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(corrupt(format!("{} trailing bytes", self.rest.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &[u8], c: u64, m: u64, v: u64) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: value.to_vec(),
            create_revision: c,
            mod_revision: m,
            version: v,
        }
    }

    #[test]
    fn kv_roundtrip() {
        for record in [
            kv("/a", b"hello", 1, 7, 3),
            kv("", b"", 0, 0, 0),
            kv(
                "/ünïcode/ключ",
                &[0, 255, 1, 254],
                u64::MAX,
                u64::MAX - 1,
                42,
            ),
        ] {
            let bytes = encode_kv(&record);
            assert_eq!(decode_kv(&record.key, &bytes).expect("decodes"), record);
        }
    }

    #[test]
    fn event_roundtrip() {
        let events = [
            Event {
                kind: EventKind::Put,
                kv: kv("/x/y", b"v1", 5, 5, 1),
                prev: None,
            },
            Event {
                kind: EventKind::Put,
                kv: kv("/x/y", b"v2", 5, 9, 2),
                prev: Some(kv("/x/y", b"v1", 5, 5, 1)),
            },
            Event {
                kind: EventKind::Delete,
                kv: kv("/x/y", b"v2", 5, 12, 2),
                prev: Some(kv("/x/y", b"v2", 5, 9, 2)),
            },
        ];
        for event in events {
            let bytes = encode_event(&event);
            assert_eq!(event_key(&bytes).expect("key decodes"), "/x/y");
            assert_eq!(decode_event(&bytes).expect("decodes"), event);
        }
    }

    #[test]
    fn rejects_truncated_trailing_and_unknown() {
        let record = kv("/k", b"value", 1, 2, 3);
        let bytes = encode_kv(&record);
        for cut in 0..bytes.len() {
            assert!(decode_kv("/k", &bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode_kv("/k", &long).is_err());
        let mut bad_format = bytes.clone();
        bad_format[0] = 99;
        assert!(decode_kv("/k", &bad_format).is_err());

        let event = encode_event(&Event {
            kind: EventKind::Delete,
            kv: record.clone(),
            prev: Some(record),
        });
        for cut in 0..event.len() {
            assert!(decode_event(&event[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_kind = event.clone();
        bad_kind[1] = 7;
        assert!(decode_event(&bad_kind).is_err());
        assert!(event_key(&bad_kind).is_err());
        let mut bad_utf8 = event.clone();
        bad_utf8[6] = 0xff; // first byte of the key "/k"
        assert!(decode_event(&bad_utf8).is_err());
    }
}
