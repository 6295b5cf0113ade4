//! Starts the built `ds4-server` binary on a loopback port and talks raw HTTP/1.1 to it
//! (the Python tests in tests/server cover the official SDKs).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(outputs: &[&str], extra: &[&str]) -> Server {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ds4-server-it-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("outputs.json");
    std::fs::write(&script, serde_json::to_string(outputs).unwrap()).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new(env!("CARGO_BIN_EXE_ds4-server"))
        .args(["--port", &port.to_string(), "--demo-layers", "1", "-m"])
        .arg(dir.join("absent.gguf"))
        .arg("--test-output")
        .arg(&script)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ds4-server");
    let s = Server { child, port };
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        if let Ok((200, _)) = request(&s, "GET", "/health", "") {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("server did not become healthy");
}

/// One request with `Connection: close`; returns (status, body with chunked framing removed).
fn request(s: &Server, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut c = TcpStream::connect(("127.0.0.1", s.port))?;
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    c.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut r = rest;
        while let Some((len, tail)) = r.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            r = &tail[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[test]
fn endpoints_and_errors() {
    let s = start(&["Let me think.</think>Hi!"], &["--ctx", "64"]);
    let (st, b) = request(&s, "GET", "/v1/models", "").unwrap();
    assert_eq!(st, 200);
    assert_eq!(json(&b)["data"][0]["id"], "deepseek-v4-flash");
    assert_eq!(request(&s, "GET", "/v1/models/nope", "").unwrap().0, 404);
    assert_eq!(request(&s, "GET", "/nope", "").unwrap().0, 404);
    let (st, b) = request(
        &s,
        "POST",
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .unwrap();
    assert_eq!(st, 200, "{b}");
    let v = json(&b);
    assert_eq!(v["choices"][0]["message"]["content"], "Hi!");
    assert_eq!(
        v["choices"][0]["message"]["reasoning_content"],
        "Let me think."
    );
    let (st, b) = request(&s, "POST", "/v1/chat/completions", "{bad json").unwrap();
    assert_eq!(st, 400);
    assert_eq!(json(&b)["error"]["type"], "invalid_request_error");
    let long = format!(
        r#"{{"max_tokens":5,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "word ".repeat(200)
    );
    let (st, b) = request(&s, "POST", "/v1/messages?beta=true", &long).unwrap();
    assert_eq!(st, 400);
    let msg = json(&b)["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.starts_with("prompt is too long: ") && msg.ends_with(" tokens > 64 maximum"),
        "{msg}"
    );
}

#[test]
fn anthropic_stream_event_order() {
    let s = start(&["Hmm.</think>Hello"], &[]);
    let body = r#"{"model":"x","max_tokens":50,"stream":true,"thinking":{"type":"adaptive"},"messages":[{"role":"user","content":"hi"}]}"#;
    let (st, b) = request(&s, "POST", "/v1/messages", body).unwrap();
    assert_eq!(st, 200);
    let events: Vec<&str> = b
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"message_start"));
    assert_eq!(events.last(), Some(&"message_stop"));
    let starts: Vec<String> = b
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(json)
        .filter(|v| v["type"] == "content_block_start")
        .map(|v| v["content_block"]["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(starts, ["thinking", "text"]);
}
