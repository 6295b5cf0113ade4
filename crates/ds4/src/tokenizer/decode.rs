//! Incremental UTF-8 assembly for streamed token bytes.
//!
//! A byte-level BPE token can end in the middle of a multi-byte character, so text can only
//! be shown once the character is complete. [`StreamDecoder`] buffers the incomplete tail and
//! emits everything before it; byte sequences that can never become valid UTF-8 are replaced
//! by U+FFFD exactly as [`String::from_utf8_lossy`] would replace them, so the concatenation
//! of all outputs equals `String::from_utf8_lossy` of all bytes.

use super::Tokenizer;

/// Turns a stream of token ids (or raw byte chunks) into valid UTF-8 text.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Append the bytes of token `id` and return the text that is now complete. Ids outside
    /// the vocabulary contribute nothing.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        if let Some(b) = tok.token_bytes(id) {
            self.pending.extend_from_slice(b);
        }
        self.take_complete()
    }

    /// Append raw bytes and return the text that is now complete.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        self.take_complete()
    }

    /// Number of bytes held back waiting for the rest of a character (at most 3).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// End of stream: whatever is held back can no longer complete, so it becomes U+FFFD.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0usize;
        loop {
            let rest = &self.pending[start..];
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    // `valid_up_to` guarantees this prefix is valid; the lossy call is a
                    // panic-free way to say so.
                    out.push_str(&String::from_utf8_lossy(&rest[..good]));
                    match e.error_len() {
                        // Invalid sequence: replace it and keep going.
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            start += good + bad;
                        }
                        // Truncated at the end: keep it for the next push.
                        None => {
                            start += good;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_partial_chars() {
        let mut d = StreamDecoder::new();
        let s = "é🙂".as_bytes();
        assert_eq!(d.push_bytes(&s[..1]), "");
        assert_eq!(d.push_bytes(&s[1..3]), "é");
        assert_eq!(d.pending_len(), 1);
        assert_eq!(d.push_bytes(&s[3..]), "🙂");
        assert_eq!(d.flush(), "");
    }

    #[test]
    fn invalid_bytes_match_lossy() {
        let inputs: [&[u8]; 5] = [
            b"\xff\xfeabc",
            b"a\xe2\x82",
            b"\xf0\x9f\x99",
            b"\xed\xa0\x80x",
            b"\xc3\x28\xe2\x28\xa1",
        ];
        for bytes in inputs {
            for split in 0..=bytes.len() {
                let mut d = StreamDecoder::new();
                let mut got = d.push_bytes(&bytes[..split]);
                got += &d.push_bytes(&bytes[split..]);
                got += &d.flush();
                assert_eq!(got, String::from_utf8_lossy(bytes), "{bytes:?} at {split}");
            }
        }
    }
}
