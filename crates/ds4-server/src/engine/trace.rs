//! `--trace FILE` (protocol.md §4.11): a human-readable record of every request — what came
//! in, which KV state was reused and why, what the model wrote and how it was parsed. It is
//! the first thing to read when an agent session re-prefills unexpectedly or a tool call
//! goes wrong.
//!
//! The worker builds one request's record in memory and appends it to the file in a single
//! write when the request ends (requests run one at a time, so records never interleave); a
//! failed write is reported once on stderr and never fails the request.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The trace file, shared by the HTTP layer (does tracing run?) and the worker (writes).
#[derive(Debug, Clone)]
pub struct TraceFile {
    file: Arc<Mutex<File>>,
    count: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
}

impl TraceFile {
    /// Opens `path` for appending (created if missing).
    pub fn open(path: &Path) -> std::io::Result<TraceFile> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(TraceFile {
            file: Arc::new(Mutex::new(file)),
            count: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A new record, numbered from 1 in the order requests start.
    pub fn record(&self, head: &TraceHead) -> Record {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        let mut r = Record {
            n,
            buf: String::new(),
        };
        let _ = writeln!(r.buf, "===== request {n} {} =====", utc_now());
        r.line("kind", head.kind);
        r.line("model", &head.model);
        r.line("stream", head.stream);
        r.line("stream_include_usage", head.include_usage);
        r
    }

    /// Appends a finished record (one write, then flush).
    pub fn write(&self, mut r: Record) {
        let _ = writeln!(r.buf, "===== end request {} =====\n", r.n);
        let res = {
            let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
            f.write_all(r.buf.as_bytes()).and_then(|_| f.flush())
        };
        if let Err(e) = res {
            if !self.failed.swap(true, Ordering::SeqCst) {
                eprintln!(
                    "ds4-server: --trace: write failed ({e}); later failures are not reported"
                );
            }
        }
    }
}

/// What the HTTP layer knows of a request that the worker does not.
#[derive(Debug, Clone)]
pub struct TraceHead {
    /// Endpoint: `chat.completions`, `completions`, `responses`, `messages`.
    pub kind: &'static str,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// The request body as parsed.
    pub request: Value,
}

/// One request's trace, built in memory.
#[derive(Debug)]
pub struct Record {
    n: u64,
    buf: String,
}

impl Record {
    /// `key: value` on one line.
    pub fn line(&mut self, key: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.buf, "{key}: {value}");
    }

    /// A `--- name ---` section header.
    pub fn section(&mut self, name: &str) {
        let _ = writeln!(self.buf, "--- {name} ---");
    }

    /// A section holding `text` verbatim (a newline added if it lacks one).
    pub fn block(&mut self, name: &str, text: &str) {
        self.section(name);
        self.buf.push_str(text);
        if !text.ends_with('\n') {
            self.buf.push('\n');
        }
    }

    /// Something that happened while the request ran (`--- trace: <event> ---`).
    pub fn event(&mut self, what: &str) {
        let _ = writeln!(self.buf, "--- trace: {what} ---");
    }

    #[cfg(test)]
    pub fn text(&self) -> &str {
        &self.buf
    }
}

/// `YYYY-MM-DD hh:mm:ss.mmm UTC` (UTC, not local time: no time-zone database is needed and
/// traces from machines in different zones line up).
fn utc_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, dd) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{dd:02} {:02}:{:02}:{:02}.{:03} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `±8` tokens around the first index where `live` and `req` differ, as `id:"piece"` lists
/// (the mismatch marked with `>>`), so a trace shows what broke a prefix match.
pub fn mismatch_window(
    live: &[u32],
    req: &[u32],
    common: usize,
    piece: impl Fn(u32) -> String,
) -> String {
    let from = common.saturating_sub(8);
    let show = |t: &[u32]| {
        let to = (common + 8).min(t.len());
        let mut s = String::new();
        for (i, &id) in t.iter().enumerate().take(to).skip(from.min(to)) {
            if !s.is_empty() {
                s.push(' ');
            }
            if i == common {
                s.push_str(">>");
            }
            let _ = write!(s, "{id}:{:?}", piece(id));
        }
        s
    };
    format!(
        "at token {common}\n  live:    {}\n  request: {}",
        show(live),
        show(req)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_are_right_across_leap_years_and_eras() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_783), (2026, 11, 26));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn the_window_marks_the_first_differing_token() {
        let live: Vec<u32> = (0..20).collect();
        let mut req = live.clone();
        req[12] = 99;
        let w = mismatch_window(&live, &req, 12, |t| format!("p{t}"));
        assert!(w.starts_with("at token 12\n"), "{w}");
        assert!(w.contains("  live:    4:\"p4\""), "{w}");
        assert!(w.contains(">>12:\"p12\""), "{w}");
        assert!(w.contains(">>99:\"p99\""), "{w}");
        assert!(!w.contains("3:\"p3\""), "{w}");
        assert!(w.contains("19:\"p19\""), "{w}");
    }

    #[test]
    fn records_are_written_whole_and_numbered() {
        let dir = std::env::temp_dir().join(format!("ds4-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.log");
        let _ = std::fs::remove_file(&path);
        let tf = TraceFile::open(&path).unwrap();
        let head = TraceHead {
            kind: "chat.completions",
            model: "m".into(),
            stream: true,
            include_usage: false,
            request: Value::Null,
        };
        for _ in 0..2 {
            let mut r = tf.record(&head);
            r.event("cold");
            r.block("generated text", "hi");
            tf.write(r);
        }
        let s = std::fs::read_to_string(&path).unwrap();
        assert!(s.contains("===== request 1 "), "{s}");
        assert!(s.contains("===== end request 2 ====="), "{s}");
        assert!(
            s.contains("kind: chat.completions\nmodel: m\nstream: true\n"),
            "{s}"
        );
        assert!(
            s.contains("--- trace: cold ---\n--- generated text ---\nhi\n"),
            "{s}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
