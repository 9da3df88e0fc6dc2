//! Values stored compressed: the outbox's entries and the journal's runs, whose size grows with the
//! events of a commit (a changelog record carries each event's key and hash, a run each event).
//!
//! Why: sled 0.34 writes a tree node larger than a quarter of a segment (16 KiB with the store's
//! 64 KiB segments) as a file of its own at every rewrite, on the committer's thread, and copies
//! a node whole at every insert. Uncompressed, the outbox's and the journal's leaves of 16 values
//! passed that size with a few events per commit. LZ4 (`lz4_flex`, block format) takes their JSON
//! to a fraction at about a microsecond per kilobyte. docs/BENCHMARKS.md has the figures.
//!
//! A compressed value is [`PACKED`], the uncompressed length (4 bytes, little-endian) and the LZ4
//! block. Values written before start with `{` (outbox JSON) or the journal's run marker, never
//! with [`PACKED`], and read as they are.

use aerostream_actors::ports::StoreError;
use std::borrow::Cow;

/// First byte of a compressed value.
const PACKED: u8 = 0xfe;

/// A stored value's uncompressed size at most: a larger claimed length is corruption, refused
/// before anything is allocated for it.
const MAX_UNPACKED: usize = 64 << 20;

/// `bytes`, compressed, as stored.
pub(super) fn pack(bytes: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(5 + lz4_flex::block::get_maximum_output_size(bytes.len()));
    value.push(PACKED);
    value.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    value.extend_from_slice(&lz4_flex::block::compress(bytes));
    value
}

/// A stored value as it was given to [`pack`]; one stored uncompressed, as it is.
pub(super) fn unpack(value: &[u8]) -> Result<Cow<'_, [u8]>, StoreError> {
    let Some((&PACKED, rest)) = value.split_first() else {
        return Ok(Cow::Borrowed(value));
    };
    let corrupt = |what: String| StoreError::Corrupt(format!("compressed value: {what}"));
    let (len, block) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| corrupt("no length".into()))?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > MAX_UNPACKED {
        return Err(corrupt(format!("a length of {len} bytes")));
    }
    lz4_flex::block::decompress(block, len)
        .map(Cow::Owned)
        .map_err(|e| corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packed_value_unpacks_to_what_was_packed() {
        let json = br#"{"Change":{"instance":"a","earlier":[{"version":1},{"version":2},{"version":3}]}}"#;
        let value = pack(json);
        assert_eq!(value[0], PACKED);
        assert_eq!(unpack(&value).unwrap().as_ref(), json.as_slice());
        let empty = pack(b"");
        assert_eq!(unpack(&empty).unwrap().as_ref(), b"");
    }

    #[test]
    fn a_value_stored_uncompressed_reads_as_it_is() {
        let old = br#"{"Output":{"id":"x"}}"#;
        assert!(matches!(unpack(old).unwrap(), Cow::Borrowed(_)));
        assert_eq!(
            unpack(&[0xff, 0, 0, 0, 1, b'x']).unwrap().as_ref(),
            &[0xff, 0, 0, 0, 1, b'x']
        );
    }

    #[test]
    fn a_damaged_value_is_refused_not_allocated() {
        let mut value = pack(b"some journal entries, some journal entries, some journal entries");
        let cut = value.len() - 3;
        assert!(matches!(unpack(&value[..cut]), Err(StoreError::Corrupt(_))));
        value[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(unpack(&value), Err(StoreError::Corrupt(_))));
        assert!(matches!(unpack(&[PACKED, 1]), Err(StoreError::Corrupt(_))));
    }
}
