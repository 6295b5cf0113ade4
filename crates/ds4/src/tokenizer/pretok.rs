//! The official DeepSeek V4 pre-tokenizer (tokenizer.json, protocol.md §1.3), as a hand-written
//! scanner instead of a backtracking regex engine.
//!
//! HF applies three `Split` pre-tokenizers in sequence, each with `Isolated` behaviour: every
//! match becomes a piece and so does every non-empty gap between matches, and each later split
//! runs on each earlier piece *in isolation* (its lookahead sees the piece's end, not the text
//! after it):
//!
//! 1. `\p{N}{1,3}`
//! 2. `[一-龥぀-ゟ゠-ヿ]+`
//! 3. `[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+` (A1)
//!    `|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+` (A2) `| ?[\p{P}\p{S}]+[\r\n]*` (A3)
//!    `|\s*[\r\n]+` (A4) `|\s+(?!\S)` (A5) `|\s+` (A6)
//!
//! Split 1 isolates every number run in chunks of three; the gaps contain no `\p{N}`. Split 2
//! then isolates maximal runs of the CJK ranges inside those gaps. Split 3 never matches inside
//! a pure-number piece (every alternative needs a letter, mark, punctuation, symbol or
//! whitespace), so number chunks pass through unchanged, while CJK runs and the remaining gaps
//! are each scanned by split 3 separately. The text therefore decomposes into maximal runs of
//! three kinds (number / CJK / other) and split 3 only ever sees one run at a time.

use unicode_general_category::{get_general_category, GeneralCategory as G};

/// `\p{L}`
const L: u16 = 1 << 0;
/// `\p{M}`
const M: u16 = 1 << 1;
/// `\p{N}`
const N: u16 = 1 << 2;
/// `\p{P}`
const P: u16 = 1 << 3;
/// `\p{S}`
const S: u16 = 1 << 4;
/// `\s` (Oniguruma's Unicode `\s` = the White_Space property)
const WS: u16 = 1 << 5;
/// `[\r\n]`
const CRLF: u16 = 1 << 6;
/// The ASCII punctuation/symbol class that starts alternative A1.
const APUNCT: u16 = 1 << 7;
/// `[A-Za-z]`
const ALPHA: u16 = 1 << 8;
/// The character ranges of split 2.
const CJK: u16 = 1 << 9;

/// Flags of the 128 ASCII code points, computed at compile time.
const ASCII_FLAGS: [u16; 128] = build_ascii_flags();

const fn build_ascii_flags() -> [u16; 128] {
    let mut t = [0u16; 128];
    let mut i = 0usize;
    while i < 128 {
        let c = i as u8;
        t[i] = match c {
            b'A'..=b'Z' | b'a'..=b'z' => L | ALPHA,
            b'0'..=b'9' => N,
            b'\r' | b'\n' => WS | CRLF,
            b'\t' | 0x0B | 0x0C | b' ' => WS,
            // Unicode classes ASCII symbols (Sm, Sc, Sk) separately from punctuation.
            b'$' | b'+' | b'<' | b'=' | b'>' | b'^' | b'`' | b'|' | b'~' => S | APUNCT,
            b'!'..=b'/' | b':'..=b'@' | b'['..=b'`' | b'{'..=b'~' => P | APUNCT,
            _ => 0,
        };
        i += 1;
    }
    t
}

/// Character class flags for one code point.
#[inline]
fn flags(c: char) -> u16 {
    let cp = c as u32;
    if cp < 128 {
        return ASCII_FLAGS[cp as usize];
    }
    let mut f = match get_general_category(c) {
        G::UppercaseLetter
        | G::LowercaseLetter
        | G::TitlecaseLetter
        | G::ModifierLetter
        | G::OtherLetter => L,
        G::NonspacingMark | G::SpacingMark | G::EnclosingMark => M,
        G::DecimalNumber | G::LetterNumber | G::OtherNumber => N,
        G::ConnectorPunctuation
        | G::DashPunctuation
        | G::OpenPunctuation
        | G::ClosePunctuation
        | G::InitialPunctuation
        | G::FinalPunctuation
        | G::OtherPunctuation => P,
        G::MathSymbol | G::CurrencySymbol | G::ModifierSymbol | G::OtherSymbol => S,
        _ => 0,
    };
    // White_Space outside ASCII (stable since Unicode 6.3 removed U+180E).
    if matches!(
        cp,
        0x85 | 0xA0 | 0x1680 | 0x2000..=0x200A | 0x2028 | 0x2029 | 0x202F | 0x205F | 0x3000
    ) {
        f |= WS;
    }
    if matches!(cp, 0x4E00..=0x9FA5 | 0x3040..=0x309F | 0x30A0..=0x30FF) {
        f |= CJK;
    }
    f
}

/// Decode the code point starting at `pos` in `b` (which comes from a `&str`, so it is valid
/// UTF-8 and `pos` is a char boundary). Returns the char and its byte length.
#[inline]
fn decode_at(b: &[u8], pos: usize) -> (char, usize) {
    let b0 = b[pos];
    if b0 < 0x80 {
        return (b0 as char, 1);
    }
    let (len, init) = if b0 >= 0xF0 {
        (4, (b0 & 0x07) as u32)
    } else if b0 >= 0xE0 {
        (3, (b0 & 0x0F) as u32)
    } else {
        (2, (b0 & 0x1F) as u32)
    };
    let mut cp = init;
    for k in 1..len {
        // `get` keeps this panic-free even if a caller ever passed a non-boundary position.
        cp = (cp << 6) | (b.get(pos + k).copied().unwrap_or(0x80) & 0x3F) as u32;
    }
    (char::from_u32(cp).unwrap_or('\u{FFFD}'), len)
}

/// Run kinds for splits 1 and 2.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Number,
    Cjk,
    Other,
}

#[inline]
fn kind_of(f: u16) -> Kind {
    if f & N != 0 {
        Kind::Number
    } else if f & CJK != 0 {
        Kind::Cjk
    } else {
        Kind::Other
    }
}

/// Split `text` into pre-tokenizer pieces, calling `emit(start, end)` with byte ranges in
/// order. Pieces are non-empty and tile the whole text.
pub(crate) fn pre_tokenize(text: &str, emit: &mut impl FnMut(usize, usize)) {
    let b = text.as_bytes();
    let n = b.len();
    let mut pos = 0usize;
    while pos < n {
        let (c, cl) = decode_at(b, pos);
        let kind = kind_of(flags(c));
        let run_start = pos;
        pos += cl;
        if kind == Kind::Number {
            // Chunks of at most three number characters.
            let mut count = 1;
            let mut chunk_start = run_start;
            while pos < n {
                let (c2, l2) = decode_at(b, pos);
                if kind_of(flags(c2)) != Kind::Number {
                    break;
                }
                if count == 3 {
                    emit(chunk_start, pos);
                    chunk_start = pos;
                    count = 0;
                }
                count += 1;
                pos += l2;
            }
            emit(chunk_start, pos);
        } else {
            while pos < n {
                let (c2, l2) = if b[pos] < 0x80 {
                    (b[pos] as char, 1)
                } else {
                    decode_at(b, pos)
                };
                if kind_of(flags(c2)) != kind {
                    break;
                }
                pos += l2;
            }
            split3(&b[run_start..pos], run_start, emit);
        }
    }
}

/// Split 3 on one run `s` (absolute offset `base`), emitting matches and gaps.
fn split3(s: &[u8], base: usize, emit: &mut impl FnMut(usize, usize)) {
    let n = s.len();
    let mut pos = 0usize;
    let mut gap = 0usize;
    while pos < n {
        let (c, cl) = decode_at(s, pos);
        match match_at(s, pos, c, cl) {
            Some(end) => {
                if gap < pos {
                    emit(base + gap, base + pos);
                }
                emit(base + pos, base + end);
                pos = end;
                gap = end;
            }
            None => pos += cl,
        }
    }
    if gap < n {
        emit(base + gap, base + n);
    }
}

/// End of the maximal run of chars whose flags intersect `mask`, starting at `pos`.
#[inline]
fn run_of(s: &[u8], mut pos: usize, mask: u16) -> usize {
    let n = s.len();
    while pos < n {
        let b0 = s[pos];
        if b0 < 0x80 {
            if ASCII_FLAGS[b0 as usize] & mask == 0 {
                break;
            }
            pos += 1;
        } else {
            let (c, l) = decode_at(s, pos);
            if flags(c) & mask == 0 {
                break;
            }
            pos += l;
        }
    }
    pos
}

/// Where the regex of split 3 matches when tried at `pos` (leftmost-first alternation, greedy
/// quantifiers with backtracking), or `None` if no alternative matches there.
#[inline]
fn match_at(s: &[u8], pos: usize, c: char, cl: usize) -> Option<usize> {
    let n = s.len();
    let f = flags(c);
    let nf = if pos + cl < n {
        flags(decode_at(s, pos + cl).0)
    } else {
        0
    };
    // A1: one ASCII punctuation char glued to the ASCII letters after it (`'s`, `.foo`).
    if f & APUNCT != 0 && nf & ALPHA != 0 {
        return Some(run_of(s, pos + cl, ALPHA));
    }
    // A2: letters/marks, optionally preceded by one char that is not a newline, letter,
    // punctuation or symbol. A leading mark ends in the same place whether the optional part
    // takes it or not, so "starts with L or M" covers both readings.
    if f & (L | M) != 0 {
        return Some(run_of(s, pos, L | M));
    }
    if f & (CRLF | L | P | S) == 0 && nf & (L | M) != 0 {
        return Some(run_of(s, pos + cl, L | M));
    }
    // A3: punctuation/symbol run, optionally after one ASCII space, plus trailing newlines.
    let punct_start = if c == ' ' && nf & (P | S) != 0 {
        Some(pos + 1)
    } else if f & (P | S) != 0 {
        Some(pos)
    } else {
        None
    };
    if let Some(p) = punct_start {
        let e = run_of(s, p, P | S);
        return Some(run_of(s, e, CRLF));
    }
    // A4..A6 all start with the maximal whitespace run W.
    if f & WS != 0 {
        let mut e = pos;
        let mut last_nl_end = None;
        let mut last_start = pos;
        while e < n {
            let (c2, l2) = decode_at(s, e);
            let f2 = flags(c2);
            if f2 & WS == 0 {
                break;
            }
            if f2 & CRLF != 0 {
                last_nl_end = Some(e + l2);
            }
            last_start = e;
            e += l2;
        }
        // A4 `\s*[\r\n]+`: backtracks to end right after the last newline of W.
        if let Some(end) = last_nl_end {
            return Some(end);
        }
        // A5 `\s+(?!\S)`: all of W at the end of the run, else W minus its last char
        // (which then starts the next word via A2 or A3).
        if e == n || last_start > pos {
            return Some(if e == n { e } else { last_start });
        }
        // A6 `\s+`: a single whitespace char before a non-space.
        return Some(e);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        pre_tokenize(text, &mut |a, b| out.push(&text[a..b]));
        out
    }

    #[test]
    fn english_and_contractions() {
        assert_eq!(
            pieces("Hello world, it's 2048!"),
            ["Hello", " world", ",", " it", "'s", " ", "204", "8", "!"]
        );
    }

    #[test]
    fn whitespace_rules() {
        assert_eq!(pieces("a   b"), ["a", "  ", " b"]);
        assert_eq!(pieces("a \n\n b"), ["a", " \n\n", " b"]);
        assert_eq!(pieces("a  "), ["a", "  "]);
        assert_eq!(pieces("\t."), ["\t", "."]);
        assert_eq!(pieces("x ."), ["x", " ."]);
        assert_eq!(pieces("x  ..\n\ny"), ["x", " ", " ..\n\n", "y"]);
        // The lookahead of `\s+(?!\S)` stops at the end of the run (a number follows).
        assert_eq!(pieces("a   1"), ["a", "   ", "1"]);
    }

    #[test]
    fn cjk_and_numbers() {
        assert_eq!(pieces("你好世界abc"), ["你好世界", "abc"]);
        assert_eq!(pieces("1234567"), ["123", "456", "7"]);
        // KATAKANA MIDDLE DOT (Po) inside a CJK run is split off by split 3.
        assert_eq!(pieces("カタ・カナ"), ["カタ", "・", "カナ"]);
    }

    #[test]
    fn tiles_the_input() {
        let text = "x\u{0}\u{1}y \u{300}\u{301} \u{85}\u{2028}🙂‍🙂 ١٢٣٤";
        let mut last = 0;
        pre_tokenize(text, &mut |a, b| {
            assert_eq!(a, last);
            assert!(b > a);
            last = b;
        });
        assert_eq!(last, text.len());
    }
}
