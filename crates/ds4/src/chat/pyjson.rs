//! Python `json` compatibility: the official encoder and parser build their bytes with
//! CPython's `json.loads` / `json.dumps(ensure_ascii=False)`, so byte parity needs the same
//! number spelling (`1e2` -> `100.0`, `1e-07`, exact big ints), the same escapes and the same
//! separators (`", "` / `": "`). serde_json normalises differently (and rejects `NaN`), so
//! this module carries its own small value type, reader and writer.

use std::collections::HashMap;

/// A JSON value as CPython's `json.loads` produces it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PyValue {
    Null,
    Bool(bool),
    /// Python ints are unbounded: kept as canonical decimal text (`-0` becomes `0`).
    Int(String),
    Float(f64),
    Str(String),
    List(Vec<PyValue>),
    /// Insertion order of first occurrence; a duplicate key replaces the value in place,
    /// exactly like a Python dict built from pairs.
    Dict(Vec<(String, PyValue)>),
}

/// CPython 3.11 refuses to convert ints longer than this (`sys.int_info.default_max_str_digits`);
/// `json.loads` then raises, which the encoder treats like any other parse failure.
const MAX_INT_DIGITS: usize = 4300;

/// CPython's scanner recurses per nesting level and raises `RecursionError` near its default
/// limit of 1000 frames (the exact cut depends on the caller's depth). Deeper input is treated
/// as unparseable; the bound also keeps this recursive reader far from any stack overflow.
const MAX_DEPTH: usize = 990;

/// `json.loads(text)`; `None` wherever CPython raises.
pub(crate) fn loads(text: &str) -> Option<PyValue> {
    // json.loads rejects a leading BOM explicitly ("Unexpected UTF-8 BOM").
    if text.starts_with('\u{feff}') {
        return None;
    }
    let mut r = Reader {
        s: text.as_bytes(),
        i: 0,
    };
    r.skip_ws();
    let v = r.value(0)?;
    r.skip_ws();
    (r.i == r.s.len()).then_some(v)
}

struct Reader<'a> {
    s: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &str) -> bool {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Option<PyValue> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string().map(PyValue::Str),
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b'n' if self.eat("null") => Some(PyValue::Null),
            b't' if self.eat("true") => Some(PyValue::Bool(true)),
            b'f' if self.eat("false") => Some(PyValue::Bool(false)),
            b'N' if self.eat("NaN") => Some(PyValue::Float(f64::NAN)),
            b'I' if self.eat("Infinity") => Some(PyValue::Float(f64::INFINITY)),
            b'-' if self.eat("-Infinity") => Some(PyValue::Float(f64::NEG_INFINITY)),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn object(&mut self, depth: usize) -> Option<PyValue> {
        self.i += 1; // '{'
        let mut pairs: Vec<(String, PyValue)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        self.skip_ws();
        if self.eat("}") {
            return Some(PyValue::Dict(pairs));
        }
        loop {
            if self.peek()? != b'"' {
                return None;
            }
            let key = self.string()?;
            self.skip_ws();
            if !self.eat(":") {
                return None;
            }
            self.skip_ws();
            let v = self.value(depth + 1)?;
            match index.get(&key) {
                Some(&at) => pairs[at].1 = v,
                None => {
                    index.insert(key.clone(), pairs.len());
                    pairs.push((key, v));
                }
            }
            self.skip_ws();
            if self.eat("}") {
                return Some(PyValue::Dict(pairs));
            }
            if !self.eat(",") {
                return None;
            }
            self.skip_ws();
        }
    }

    fn array(&mut self, depth: usize) -> Option<PyValue> {
        self.i += 1; // '['
        let mut items = Vec::new();
        self.skip_ws();
        if self.eat("]") {
            return Some(PyValue::List(items));
        }
        loop {
            items.push(self.value(depth + 1)?);
            self.skip_ws();
            if self.eat("]") {
                return Some(PyValue::List(items));
            }
            if !self.eat(",") {
                return None;
            }
            self.skip_ws();
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?`, ASCII digits only (the C scanner).
    /// A fraction or exponent that does not complete is left unconsumed, so the caller then
    /// fails on the stray byte, as CPython does ("Extra data" / "Expecting ',' delimiter").
    fn number(&mut self) -> Option<PyValue> {
        let start = self.i;
        self.eat("-");
        let int_start = self.i;
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        let int_digits = self.i - int_start;
        let mut is_float = false;
        let before_frac = self.i;
        if self.eat(".") {
            if self.digits() == 0 {
                self.i = before_frac;
            } else {
                is_float = true;
            }
        }
        let before_exp = self.i;
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                self.i = before_exp;
            } else {
                is_float = true;
            }
        }
        // The slice is ASCII, so it is valid UTF-8.
        let text = std::str::from_utf8(&self.s[start..self.i]).ok()?;
        if is_float {
            return text.parse::<f64>().ok().map(PyValue::Float);
        }
        if int_digits > MAX_INT_DIGITS {
            return None;
        }
        // Python's int("-0") is 0, so dumps writes it back as "0".
        if text == "-0" {
            return Some(PyValue::Int("0".to_string()));
        }
        Some(PyValue::Int(text.to_string()))
    }

    fn hex4(&mut self) -> Option<u32> {
        let h = self.s.get(self.i..self.i + 4)?;
        let h = std::str::from_utf8(h).ok()?;
        if !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.i += 4;
        u32::from_str_radix(h, 16).ok()
    }

    /// A string literal in strict mode: raw control characters are rejected.
    fn string(&mut self) -> Option<String> {
        self.i += 1; // opening quote
        let mut out = String::new();
        loop {
            let run_start = self.i;
            while let Some(b) = self.peek() {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.i += 1;
            }
            // The run stops only before ASCII bytes, so it ends on a char boundary.
            out.push_str(std::str::from_utf8(&self.s[run_start..self.i]).ok()?);
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some(out);
                }
                b'\\' => {
                    self.i += 1;
                    let esc = self.peek()?;
                    self.i += 1;
                    match esc {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => out.push(self.unicode_escape()?),
                        _ => return None,
                    }
                }
                _ => return None, // raw control character
            }
        }
    }

    /// The code point of `\uXXXX` (the `\u` already consumed), joining a surrogate pair.
    /// Python keeps a lone surrogate in its str; Rust strings cannot hold one, so it becomes
    /// U+FFFD (such a string could not be written out as UTF-8 by the encoder either).
    fn unicode_escape(&mut self) -> Option<char> {
        let hi = self.hex4()?;
        if (0xD800..0xDC00).contains(&hi) && self.s[self.i..].starts_with(b"\\u") {
            let save = self.i;
            self.i += 2;
            match self.hex4() {
                Some(lo) if (0xDC00..0xE000).contains(&lo) => {
                    let cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                    return char::from_u32(cp);
                }
                // Not a low surrogate: the next escape is decoded on its own.
                _ => self.i = save,
            }
        }
        Some(char::from_u32(hi).unwrap_or('\u{fffd}'))
    }
}

/// `json.dumps(v, ensure_ascii=False)`.
pub(crate) fn dumps(v: &PyValue) -> String {
    let mut out = String::new();
    write_value(&mut out, v);
    out
}

fn write_value(out: &mut String, v: &PyValue) {
    match v {
        PyValue::Null => out.push_str("null"),
        PyValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        PyValue::Int(digits) => out.push_str(digits),
        PyValue::Float(f) => out.push_str(&float_repr(*f)),
        PyValue::Str(s) => write_str(out, s),
        PyValue::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        PyValue::Dict(pairs) => {
            out.push('{');
            for (i, (k, item)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(out, k);
                out.push_str(": ");
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

/// `json.dumps` of a serde_json value (tool schemas, `response_format`). Map order is the
/// client's (serde_json is built with `preserve_order`). Integers beyond the u64/i64 range
/// have already become floats inside serde_json; Python would print them exactly.
pub(crate) fn dumps_serde(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write_serde(&mut out, v);
    out
}

fn write_serde(out: &mut String, v: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if n.is_i64() || n.is_u64() {
                out.push_str(&n.to_string());
            } else {
                out.push_str(&float_repr(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_serde(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(out, k);
                out.push_str(": ");
                write_serde(out, item);
            }
            out.push('}');
        }
    }
}

/// A JSON string literal as `json.dumps(s, ensure_ascii=False)` writes it.
pub(crate) fn dumps_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    write_str(&mut out, s);
    out
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    escape_str_into(out, s);
    out.push('"');
}

/// The body of a JSON string literal, without quotes. Escaping is per character, so a string
/// may be escaped in pieces (the stream parser relies on this).
pub(crate) fn escape_str_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
}

/// Python's `repr(float)` (what `json.dumps` writes for floats): the shortest round-trip
/// digits, positional notation for decimal exponents -4 < e <= 16, otherwise `d.ddde±XX`;
/// integral values keep a `.0`. Non-finite values use json's spellings.
pub(crate) fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if x == 0.0 {
        return format!("{sign}0.0");
    }
    // Rust's `{:e}` is also shortest round-trip: "1.2345e-7" -> digits "12345", exponent -7.
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let exp: i32 = exp.parse().unwrap_or(0);
    // Python's "decpt": value = 0.DIGITS * 10^decpt.
    let decpt = exp + 1;
    let n = digits.len() as i32;
    let body = if !(-4 < decpt && decpt <= 16) {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{first}{frac}e{esign}{:02}", exp.abs())
    } else if decpt <= 0 {
        format!("0.{}{digits}", "0".repeat((-decpt) as usize))
    } else if decpt >= n {
        format!("{digits}{}.0", "0".repeat((decpt - n) as usize))
    } else {
        let (a, b) = digits.split_at(decpt as usize);
        format!("{a}.{b}")
    };
    format!("{sign}{body}")
}

/// Python truthiness of a JSON value (`if response_format:`).
pub(crate) fn truthy(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(m) => !m.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(s: &str) -> Option<String> {
        loads(s).map(|v| dumps(&v))
    }

    #[test]
    fn float_repr_matches_python() {
        // Expected strings are Python 3.11 `repr(float(x))`.
        let cases: &[(f64, &str)] = &[
            (1.0, "1.0"),
            (100.0, "100.0"),
            (1e-7, "1e-07"),
            (2.5e20, "2.5e+20"),
            (0.1, "0.1"),
            (1.5e-10, "1.5e-10"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (-2.75, "-2.75"),
            (1e300 * 10.0, "1e+301"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (123.456, "123.456"),
        ];
        for (x, want) in cases {
            assert_eq!(float_repr(*x), *want, "{x:e}");
        }
    }

    #[test]
    fn loads_dumps_like_python() {
        assert_eq!(
            round("{\"a\":1,\"b\":[1.50,2E3],\"c\":-0}").unwrap(),
            "{\"a\": 1, \"b\": [1.5, 2000.0], \"c\": 0}"
        );
        assert_eq!(
            round(" [NaN, Infinity, -Infinity] ").unwrap(),
            "[NaN, Infinity, -Infinity]"
        );
        assert_eq!(
            round("{\"a\":1,\"b\":2,\"a\":3}").unwrap(),
            "{\"a\": 3, \"b\": 2}"
        );
        assert_eq!(
            round("123456789012345678901234567890").unwrap(),
            "123456789012345678901234567890"
        );
        assert_eq!(round("1e400").unwrap(), "Infinity");
        assert_eq!(round("\"\\ud83d\\ude00 \\u00e9\\/\"").unwrap(), "\"😀 é/\"");
        assert_eq!(round("\"\\ud800x\"").unwrap(), "\"\u{fffd}x\"");
        assert_eq!(
            round("\"a\\u0001\\b\\f\u{7f}\"").unwrap(),
            "\"a\\u0001\\b\\f\u{7f}\""
        );
        for bad in [
            "",
            "01",
            "1.",
            ".5",
            "-",
            "[1,]",
            "{\"a\":1,}",
            "{'a':1}",
            "\"a\nb\"",
            "\u{feff}{}",
            "nan",
            "-NaN",
            "1 2",
            "[1e]",
            "\"\\x\"",
            "\"\\u12G4\"",
        ] {
            assert!(loads(bad).is_none(), "{bad:?} must not parse");
        }
        let too_many_digits = "9".repeat(MAX_INT_DIGITS + 1);
        assert!(loads(&too_many_digits).is_none());
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        assert!(loads(&deep).is_none());
    }
}
