//! The GPT-2 byte-to-unicode table (protocol.md §1.2).
//!
//! Byte-level BPE vocabularies store every token as a string of "printable" code points: the
//! 188 bytes that are already visible Latin-1 characters (33..=126, 161..=172, 174..=255) stand
//! for themselves, and the remaining 68 bytes are shifted, in increasing byte order, to
//! U+0100, U+0101, ... so that a vocabulary string never contains spaces or control characters.

/// True for the bytes that map to the code point with the same value.
const fn is_self_mapped(b: u8) -> bool {
    matches!(b, 33..=126 | 161..=172 | 174..=255)
}

/// `BYTE_TO_CHAR[b]` is the code point that stands for byte `b` in vocabulary strings.
pub(crate) const BYTE_TO_CHAR: [char; 256] = build_byte_to_char();

const fn build_byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let cp = if is_self_mapped(b as u8) {
            b as u32
        } else {
            let cp = 256 + shifted;
            shifted += 1;
            cp
        };
        // Every value here is below U+0144, so it is always a valid scalar value.
        table[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => '\0',
        };
        b += 1;
    }
    table
}

/// Inverse of [`BYTE_TO_CHAR`]: the byte a vocabulary code point stands for, or `None` when
/// the code point is not part of the byte alphabet (e.g. `｜` in special tokens).
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    if cp < 256 {
        let b = cp as u8;
        if is_self_mapped(b) {
            return Some(b);
        }
        return None;
    }
    // Shifted bytes occupy U+0100..U+0143 in increasing byte order.
    let idx = cp.checked_sub(256)?;
    if idx >= 68 {
        return None;
    }
    SHIFTED_BYTES.get(idx as usize).copied()
}

/// The 68 bytes that are not self-mapped, in increasing order (index = cp - 256).
const SHIFTED_BYTES: [u8; 68] = build_shifted();

const fn build_shifted() -> [u8; 68] {
    let mut out = [0u8; 68];
    let mut n = 0usize;
    let mut b = 0usize;
    while b < 256 {
        if !is_self_mapped(b as u8) && n < 68 {
            out[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    out
}

/// Bytes of a vocabulary string as the decoder emits them: if every code point belongs to the
/// byte alphabet, the bytes they stand for; otherwise the string's own UTF-8 bytes. This is the
/// rule HF's ByteLevel decoder applies per token; for the DeepSeek V4 vocabulary it coincides
/// with ds4's "contains U+FF5C → verbatim" rule (every token outside the alphabet contains
/// U+FF5C, and every other token is pure alphabet).
pub(crate) fn vocab_string_bytes(s: &str, out: &mut Vec<u8>) {
    let start = out.len();
    for c in s.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.truncate(start);
                out.extend_from_slice(s.as_bytes());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_a_bijection_with_known_points() {
        assert_eq!(BYTE_TO_CHAR[b' ' as usize], '\u{120}');
        assert_eq!(BYTE_TO_CHAR[b'\n' as usize], '\u{10A}');
        assert_eq!(BYTE_TO_CHAR[0], '\u{100}');
        assert_eq!(BYTE_TO_CHAR[b'A' as usize], 'A');
        assert_eq!(BYTE_TO_CHAR[0xAD], '\u{143}');
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = BYTE_TO_CHAR[b as usize];
            assert!(seen.insert(c));
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(char_to_byte('\u{144}'), None);
        assert_eq!(char_to_byte('\u{FF5C}'), None);
        assert_eq!(char_to_byte(' '), None);
    }

    #[test]
    fn vocab_strings_decode() {
        let mut v = Vec::new();
        vocab_string_bytes("\u{120}hi", &mut v);
        assert_eq!(v, b" hi");
        v.clear();
        vocab_string_bytes("<\u{FF5C}User\u{FF5C}>", &mut v);
        assert_eq!(v, "<\u{FF5C}User\u{FF5C}>".as_bytes());
    }
}
