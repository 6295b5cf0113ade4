//! On-disk cache of compiled kernel images (cubins), so NVRTC runs once per
//! (source, GPU architecture, NVRTC version, options) rather than at every start.
//!
//! Entry file: `<dir>/<key>.cubin` = header + image, where the header holds a magic, the key
//! and the image's length and checksum. A file whose header does not check out (truncated
//! write, disk corruption, a different key hashed to the same name) is treated as a miss and
//! rebuilt. Writes go to a unique temporary file in the same directory and are renamed into
//! place, so readers never see a half-written entry even with concurrent processes.
//!
//! Pure std, no GPU: unit-tested on every machine.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"DS4CUBN1";

/// 128-bit FNV-1a. Not cryptographic: it names cache entries and detects corruption, and the
/// full key is stored in the entry, so a collision costs a rebuild, never a wrong kernel.
pub fn fnv128(parts: &[&[u8]]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h = OFFSET;
    for p in parts {
        // Length prefix so ("ab","c") and ("a","bc") differ.
        for &b in (p.len() as u64).to_le_bytes().iter().chain(p.iter()) {
            h ^= b as u128;
            h = h.wrapping_mul(PRIME);
        }
    }
    h
}

/// Cache key (32 hex digits) of a kernel build.
pub fn cache_key(source: &str, arch: &str, nvrtc: (u32, u32), options: &[String]) -> String {
    let ver = format!("{}.{}", nvrtc.0, nvrtc.1);
    let opts = options.join("\u{1f}");
    format!(
        "{:032x}",
        fnv128(&[
            source.as_bytes(),
            arch.as_bytes(),
            ver.as_bytes(),
            opts.as_bytes()
        ])
    )
}

/// A directory of cached kernel images; `dir: None` disables caching.
#[derive(Clone, Debug)]
pub struct KernelCache {
    dir: Option<PathBuf>,
}

/// Environment variable overriding the cache directory (empty = caching off).
pub const CACHE_ENV: &str = "DS4_CUDA_CACHE";

impl KernelCache {
    /// Cache in `dir` (created on first store).
    pub fn new(dir: Option<PathBuf>) -> KernelCache {
        KernelCache { dir }
    }

    /// `$DS4_CUDA_CACHE`, else `$XDG_CACHE_HOME/ds4/cuda`, else `~/.cache/ds4/cuda`.
    pub fn from_env() -> KernelCache {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let dir = if let Some(v) = std::env::var_os(CACHE_ENV) {
            (!v.is_empty()).then(|| PathBuf::from(v))
        } else if let Some(x) = env("XDG_CACHE_HOME") {
            Some(PathBuf::from(x).join("ds4").join("cuda"))
        } else {
            env("HOME").map(|h| PathBuf::from(h).join(".cache").join("ds4").join("cuda"))
        };
        KernelCache { dir }
    }

    /// The directory, if caching is on.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn path(&self, key: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{key}.cubin")))
    }

    /// The cached image for `key`, or `None` on a miss or an entry that fails verification.
    pub fn load(&self, key: &str) -> Option<Vec<u8>> {
        let bytes = fs::read(self.path(key)?).ok()?;
        decode_entry(key, &bytes)
    }

    /// Stores `image` under `key` atomically (temp file + rename).
    pub fn store(&self, key: &str, image: &[u8]) -> io::Result<()> {
        let (Some(dir), Some(path)) = (self.dir.as_ref(), self.path(key)) else {
            return Ok(());
        };
        fs::create_dir_all(dir)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tmp = dir.join(format!(".{key}.{}.{nanos}.tmp", std::process::id()));
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&encode_entry(key, image))?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

fn encode_entry(key: &str, image: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(image.len() + 80);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&(key.len() as u32).to_le_bytes());
    v.extend_from_slice(key.as_bytes());
    v.extend_from_slice(&(image.len() as u64).to_le_bytes());
    v.extend_from_slice(&fnv128(&[image]).to_le_bytes());
    v.extend_from_slice(image);
    v
}

fn decode_entry(key: &str, b: &[u8]) -> Option<Vec<u8>> {
    let rest = b.strip_prefix(MAGIC)?;
    let (klen, rest) = rest.split_first_chunk::<4>()?;
    let klen = u32::from_le_bytes(*klen) as usize;
    if rest.len() < klen || &rest[..klen] != key.as_bytes() {
        return None;
    }
    let rest = &rest[klen..];
    let (len, rest) = rest.split_first_chunk::<8>()?;
    let (sum, image) = rest.split_first_chunk::<16>()?;
    if u64::from_le_bytes(*len) != image.len() as u64
        || u128::from_le_bytes(*sum) != fnv128(&[image])
    {
        return None;
    }
    Some(image.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ds4-cache-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn key_depends_on_every_part() {
        let o = vec!["-O3".to_string()];
        let k = cache_key("src", "sm_90", (13, 0), &o);
        assert_eq!(k.len(), 32);
        assert_ne!(k, cache_key("src ", "sm_90", (13, 0), &o));
        assert_ne!(k, cache_key("src", "sm_89", (13, 0), &o));
        assert_ne!(k, cache_key("src", "sm_90", (13, 1), &o));
        assert_ne!(k, cache_key("src", "sm_90", (13, 0), &[]));
        assert_eq!(k, cache_key("src", "sm_90", (13, 0), &o));
        assert_ne!(fnv128(&[b"ab", b"c"]), fnv128(&[b"a", b"bc"]));
    }

    #[test]
    fn store_load_and_reject_corruption() {
        let d = tmpdir("rt");
        let c = KernelCache::new(Some(d.clone()));
        assert_eq!(c.load("k1"), None);
        let img: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        c.store("k1", &img).unwrap();
        assert_eq!(c.load("k1").as_deref(), Some(&img[..]));
        // Another key never reads this entry, even if its file were renamed.
        fs::copy(d.join("k1.cubin"), d.join("k2.cubin")).unwrap();
        assert_eq!(c.load("k2"), None);
        // Flip one payload byte: checksum mismatch -> miss.
        let p = d.join("k1.cubin");
        let mut b = fs::read(&p).unwrap();
        let n = b.len();
        b[n - 10] ^= 1;
        fs::write(&p, &b).unwrap();
        assert_eq!(c.load("k1"), None);
        // Truncation -> miss; a fresh store repairs it.
        fs::write(&p, &b[..n / 2]).unwrap();
        assert_eq!(c.load("k1"), None);
        c.store("k1", &img).unwrap();
        assert_eq!(c.load("k1").as_deref(), Some(&img[..]));
        // No temporary files left behind.
        let leftovers = fs::read_dir(&d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .count();
        assert_eq!(leftovers, 0);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn disabled_cache_is_a_no_op() {
        let c = KernelCache::new(None);
        c.store("k", b"x").unwrap();
        assert_eq!(c.load("k"), None);
    }
}
