//! Disk KV cache (protocol.md §5.5-§5.7): one file per checkpoint, named by the SHA-1 of its
//! cache text, found again by text prefix after a restart.
//!
//! Layout (little-endian) as §5.5, with one addition: the reserved u32 at offset 20 holds a
//! CRC-32 of everything after the 52-byte header (text, payload, tool-map trailer), so a
//! corrupt file is detected before its payload is restored. Hits and last-used time live in
//! the header and are rewritten in place without touching the checksum. Files are written to
//! `<name>.tmp.<pid>` and renamed. A file that is truncated, corrupt or not ours is skipped and
//! removed with a log line; nothing here panics on bad bytes.

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const HEADER: usize = 52;
const MAGIC: &[u8; 3] = b"KVC";
const VERSION: u8 = 1;
const TRAILER_MAGIC: &[u8; 3] = b"KTM";

/// Why a checkpoint was written (header byte 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Cold = 1,
    Continued = 2,
    Evict = 3,
    Shutdown = 4,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Cold => "cold",
            Reason::Continued => "continued",
            Reason::Evict => "evict",
            Reason::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone)]
struct Header {
    ext: u8,
    tokens: u32,
    hits: u32,
    ctx: u32,
    crc: u32,
    last_used: u64,
    payload_len: u64,
    text_len: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn parse_header(b: &[u8]) -> Result<Header, String> {
    if b.len() < HEADER {
        return Err("truncated header".into());
    }
    if &b[0..3] != MAGIC {
        return Err("bad magic".into());
    }
    if b[3] != VERSION {
        return Err(format!("unsupported version {}", b[3]));
    }
    if b[4] != 2 && b[4] != 4 {
        return Err(format!("bad quant bits {}", b[4]));
    }
    let h = Header {
        ext: b[6],
        tokens: le32(b, 8),
        hits: le32(b, 12),
        ctx: le32(b, 16),
        crc: le32(b, 20),
        last_used: le64(b, 32),
        payload_len: le64(b, 40),
        text_len: le32(b, 48),
    };
    if h.tokens == 0 {
        return Err("zero tokens".into());
    }
    Ok(h)
}

/// A checkpoint found for a prompt.
pub struct Hit {
    pub tokens: u32,
    /// Length in bytes of the cache text (a byte prefix of the prompt).
    pub text_len: usize,
    pub payload: Vec<u8>,
    pub tool_map: Vec<(String, String)>,
    pub path: PathBuf,
}

struct Entry {
    path: PathBuf,
    name_hex: String,
    header: Header,
    size: u64,
}

pub struct DiskCache {
    dir: PathBuf,
    budget: u64,
    quant_bits: u8,
}

fn is_name(stem: &str) -> bool {
    stem.len() == 40 && stem.bytes().all(|c| c.is_ascii_hexdigit())
}

fn sha1_hex(b: &[u8]) -> String {
    sha1_smol::Sha1::from(b).digest().to_string()
}

impl DiskCache {
    /// Opens (creating, mode 0700) the cache directory, removes invalid files and evicts down
    /// to the budget.
    pub fn open(dir: &Path, budget_mb: u64, quant_bits: u8) -> std::io::Result<DiskCache> {
        fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        }
        let c = DiskCache {
            dir: dir.to_path_buf(),
            budget: budget_mb.saturating_mul(1 << 20),
            quant_bits: if quant_bits == 4 { 4 } else { 2 },
        };
        c.evict_to_budget(None);
        Ok(c)
    }

    /// All valid entries; invalid `*.kv` files and stale temp files are removed.
    fn scan(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return out;
        };
        for de in rd.flatten() {
            let path = de.path();
            let Some(fname) = path
                .file_name()
                .and_then(|s| s.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            if let Some(pos) = fname.find(".kv.tmp.") {
                // A temp file of a dead process (ours are renamed before returning).
                let pid = &fname[pos + 8..];
                if pid != std::process::id().to_string() && is_name(&fname[..pos]) {
                    eprintln!("ds4-server: kv cache: removing stale temp file {fname}");
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            let Some(stem) = fname.strip_suffix(".kv") else {
                continue;
            };
            if !is_name(stem) {
                continue;
            }
            match Self::read_entry(&path, stem) {
                Ok(e) => out.push(e),
                Err(why) => {
                    eprintln!("ds4-server: kv cache: removing invalid file {fname}: {why}");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        out
    }

    fn read_entry(path: &Path, stem: &str) -> Result<Entry, String> {
        let mut f = fs::File::open(path).map_err(|e| e.to_string())?;
        let size = f.metadata().map_err(|e| e.to_string())?.len();
        let mut hb = [0u8; HEADER];
        f.read_exact(&mut hb).map_err(|_| "truncated header")?;
        let header = parse_header(&hb)?;
        let need = HEADER as u64 + header.text_len as u64 + header.payload_len;
        if size < need {
            return Err(format!("truncated: {size} bytes < {need}"));
        }
        Ok(Entry {
            path: path.to_path_buf(),
            name_hex: stem.to_ascii_lowercase(),
            header,
            size,
        })
    }

    /// Writes a checkpoint atomically. `text` is the cache key: the decoded checkpoint bytes,
    /// or the visible transcript of a session with a live binding — what the next request
    /// renders, without the reasoning the KV holds; `key_bits` then says which (ext bit 1:
    /// Responses, bit 2: toolless thinking; 0 for token text).
    #[allow(clippy::too_many_arguments)]
    pub fn store(
        &self,
        text: &[u8],
        tokens: u32,
        ctx: u32,
        reason: Reason,
        payload: &[u8],
        tool_map: &[(String, String)],
        key_bits: u8,
    ) -> Result<PathBuf, String> {
        let name = sha1_hex(text);
        let path = self.dir.join(format!("{name}.kv"));
        let tool_map: Vec<&(String, String)> = tool_map
            .iter()
            .filter(|(id, dsml)| {
                !id.is_empty()
                    && id.len() <= 256
                    && !dsml.is_empty()
                    && contains(text, dsml.as_bytes())
            })
            .collect();
        let mut body = Vec::with_capacity(text.len() + payload.len() + 64);
        body.extend_from_slice(text);
        body.extend_from_slice(payload);
        if !tool_map.is_empty() {
            body.extend_from_slice(TRAILER_MAGIC);
            body.push(1);
            body.extend_from_slice(&(tool_map.len() as u32).to_le_bytes());
            for (id, dsml) in &tool_map {
                body.extend_from_slice(&(id.len() as u32).to_le_bytes());
                body.extend_from_slice(&(dsml.len() as u32).to_le_bytes());
                body.extend_from_slice(id.as_bytes());
                body.extend_from_slice(dsml.as_bytes());
            }
        }
        let total = (HEADER + body.len()) as u64;
        if total + total / 100 + 1 > self.budget {
            return Err(format!(
                "checkpoint of {total} bytes does not fit the {} byte budget",
                self.budget
            ));
        }
        let t = now();
        let mut h = Vec::with_capacity(HEADER);
        h.extend_from_slice(MAGIC);
        h.push(VERSION);
        h.push(self.quant_bits);
        h.push(reason as u8);
        h.push(u8::from(!tool_map.is_empty()) | (key_bits & 6));
        h.push(0);
        h.extend_from_slice(&tokens.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // hits
        h.extend_from_slice(&ctx.to_le_bytes());
        h.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        h.extend_from_slice(&t.to_le_bytes());
        h.extend_from_slice(&t.to_le_bytes());
        h.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        h.extend_from_slice(&(text.len() as u32).to_le_bytes());
        debug_assert_eq!(h.len(), HEADER);
        let tmp = self
            .dir
            .join(format!("{name}.kv.tmp.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&h)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(e.to_string());
        }
        self.evict_to_budget(Some(&path));
        Ok(path)
    }

    /// The longest checkpoint whose text is a byte prefix of `prompt`, loaded and verified.
    /// Corrupt candidates are removed and the next one is tried.
    pub fn lookup(&self, prompt: &[u8], ctx: u32, min_tokens: u32) -> Option<Hit> {
        let mut cands: Vec<Entry> = self
            .scan()
            .into_iter()
            .filter(|e| {
                let t = e.header.text_len as usize;
                t <= prompt.len()
                    && e.header.tokens >= min_tokens
                    && e.header.ctx <= ctx
                    && e.header.tokens < ctx
                    && sha1_hex(&prompt[..t]) == e.name_hex
            })
            .collect();
        cands.sort_by_key(|e| std::cmp::Reverse((e.header.text_len, e.header.tokens)));
        for e in cands {
            match self.load(&e, prompt) {
                Ok(hit) => return Some(hit),
                Err(why) => {
                    eprintln!(
                        "ds4-server: kv cache: removing corrupt file {}: {why}",
                        e.path.display()
                    );
                    let _ = fs::remove_file(&e.path);
                }
            }
        }
        None
    }

    fn load(&self, e: &Entry, prompt: &[u8]) -> Result<Hit, String> {
        let bytes = fs::read(&e.path).map_err(|x| x.to_string())?;
        let h = parse_header(&bytes)?;
        let body = &bytes[HEADER..];
        if crc32fast::hash(body) != h.crc {
            return Err("checksum mismatch".into());
        }
        let t = h.text_len as usize;
        let p = h.payload_len as usize;
        if body.len() < t + p {
            return Err("truncated".into());
        }
        if body[..t] != prompt[..t] {
            return Err("cache text differs from its name".into());
        }
        let payload = body[t..t + p].to_vec();
        let mut tool_map = Vec::new();
        let rest = &body[t + p..];
        if h.ext & 1 != 0 {
            tool_map = parse_trailer(rest).ok_or("bad tool-map trailer")?;
        } else if !rest.is_empty() {
            return Err("trailing bytes".into());
        }
        Ok(Hit {
            tokens: h.tokens,
            text_len: t,
            payload,
            tool_map,
            path: e.path.clone(),
        })
    }

    /// After a successful load: count the hit, or delete a consumed large checkpoint.
    pub fn touch(&self, hit: &Hit, consumed: bool) {
        if consumed {
            let _ = fs::remove_file(&hit.path);
            return;
        }
        let upd = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&hit.path)?;
            let mut hb = [0u8; HEADER];
            f.read_exact(&mut hb)?;
            let hits = le32(&hb, 12).saturating_add(1);
            f.seek(SeekFrom::Start(12))?;
            f.write_all(&hits.to_le_bytes())?;
            f.seek(SeekFrom::Start(32))?;
            f.write_all(&now().to_le_bytes())
        };
        let _ = upd();
    }

    /// Tool-map entries (id -> DSML block) for `ids`, from every checkpoint that has a trailer.
    pub fn tool_map_for(&self, ids: &HashSet<String>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if ids.is_empty() {
            return out;
        }
        for e in self.scan() {
            if e.header.ext & 1 == 0 {
                continue;
            }
            let Ok(bytes) = fs::read(&e.path) else {
                continue;
            };
            let off = HEADER + e.header.text_len as usize + e.header.payload_len as usize;
            if let Some(map) = bytes.get(off..).and_then(parse_trailer) {
                out.extend(map.into_iter().filter(|(id, _)| ids.contains(id)));
            }
        }
        out
    }

    /// Total bytes and file count.
    pub fn usage(&self) -> (u64, usize) {
        let v = self.scan();
        (v.iter().map(|e| e.size).sum(), v.len())
    }

    fn evict_to_budget(&self, protect: Option<&Path>) {
        let mut entries = self.scan();
        let mut total: u64 = entries.iter().map(|e| e.size).sum();
        if total <= self.budget {
            return;
        }
        let t = now();
        let score = |e: &Entry| {
            let age_h = t.saturating_sub(e.header.last_used) as f64 / 3600.0;
            let mut eff = e.header.hits as f64 * 2f64.powf(-age_h / 6.0);
            if eff < 0.01 {
                eff = 0.0;
            }
            (eff + 1.0) * e.header.tokens as f64 / e.size.max(1) as f64
        };
        entries.sort_by(|a, b| {
            score(a)
                .partial_cmp(&score(b))
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.header.last_used.cmp(&b.header.last_used))
        });
        for e in &entries {
            if total <= self.budget {
                break;
            }
            let protected = protect == Some(e.path.as_path()) && e.size <= self.budget;
            if protected {
                continue;
            }
            eprintln!(
                "ds4-server: kv cache: evicting {} ({} tokens, {} bytes)",
                e.path.display(),
                e.header.tokens,
                e.size
            );
            if fs::remove_file(&e.path).is_ok() {
                total -= e.size;
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

fn parse_trailer(b: &[u8]) -> Option<Vec<(String, String)>> {
    if b.len() < 8 || &b[0..3] != TRAILER_MAGIC || b[3] != 1 {
        return None;
    }
    let n = le32(b, 4) as usize;
    let mut at = 8;
    let mut out = Vec::new();
    for _ in 0..n {
        if b.len() < at + 8 {
            return None;
        }
        let il = le32(b, at) as usize;
        let dl = le32(b, at + 4) as usize;
        at += 8;
        if il == 0 || il > 256 || dl == 0 || b.len() < at + il + dl {
            return None;
        }
        let id = std::str::from_utf8(&b[at..at + il]).ok()?.to_string();
        let dsml = std::str::from_utf8(&b[at + il..at + il + dl])
            .ok()?
            .to_string();
        at += il + dl;
        out.push((id, dsml));
    }
    (at == b.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ds4kv-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn store_lookup_corrupt_and_budget() {
        let d = tmpdir("a");
        let c = DiskCache::open(&d, 1, 2).unwrap();
        let text = b"<BOS>system prompt here";
        let dsml = "\n\n<tool_calls>x</tool_calls>";
        let mut t2 = text.to_vec();
        t2.extend_from_slice(dsml.as_bytes());
        c.store(text, 5, 100, Reason::Cold, b"PAYLOAD", &[], 0)
            .unwrap();
        let p2 = c
            .store(
                &t2,
                9,
                100,
                Reason::Evict,
                b"PAYLOAD2",
                &[("call_1".into(), dsml.into())],
                0,
            )
            .unwrap();
        let mut prompt = t2.clone();
        prompt.extend_from_slice(b" and more");
        let hit = c.lookup(&prompt, 100, 1).unwrap();
        assert_eq!(hit.tokens, 9);
        assert_eq!(hit.payload, b"PAYLOAD2");
        assert_eq!(hit.tool_map.len(), 1);
        c.touch(&hit, false);
        let ids: HashSet<String> = ["call_1".to_string()].into();
        assert_eq!(c.tool_map_for(&ids).len(), 1);
        // Corrupt the longer one: lookup falls back to the shorter and removes the bad file.
        let mut b = fs::read(&p2).unwrap();
        let n = b.len();
        b[n - 3] ^= 0xff;
        fs::write(&p2, &b).unwrap();
        let hit = c.lookup(&prompt, 100, 1).unwrap();
        assert_eq!(hit.tokens, 5);
        assert!(!p2.exists());
        // Foreign and truncated files are removed at scan.
        fs::write(d.join(format!("{}.kv", "a".repeat(40))), b"garbage").unwrap();
        fs::write(d.join(format!("{}.kv", "b".repeat(40))), b"KVC\x01\x02").unwrap();
        assert_eq!(c.usage().1, 1);
        // Context gate.
        assert!(c.lookup(&prompt, 4, 1).is_none());
        let _ = fs::remove_dir_all(&d);
    }
}
