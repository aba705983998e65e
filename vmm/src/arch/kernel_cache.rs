//! Decompressed kernels kept on disk, so that a bzImage is decompressed once, not at every
//! start: under nested virtualisation decompressing the lab's xz kernel took 1.7 s of a 2 s
//! start, reading it back takes milliseconds.
//!
//! An entry is named by the bzImage file's identity and last change (device, inode, length and
//! ctime, which no write leaves unchanged and no user can set back; hashing the image instead
//! cost half a second under nested TCG), lives in
//! `$XDG_CACHE_HOME/p2pvmm/vmlinux` (else `$HOME/.cache/...`), is written to a temporary name
//! and renamed into place, and is used only when its length is the one the bzImage's payload
//! records for its decompressed kernel. The cache is a speed-up only: an entry that cannot be
//! read or written is logged at debug level and the kernel is decompressed as if there were
//! none.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The cache directory, if the environment names one.
pub fn dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").filter(|h| !h.is_empty())?).join(".cache"),
    };
    Some(base.join("p2pvmm").join("vmlinux"))
}

/// The entry name for the bzImage file described by `meta`.
pub fn key(meta: &fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "vmlinux-{:x}-{}-{}-{}.{:09}",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

/// The cached kernel for `key`, opened, if it is an ELF file of `expected_len` bytes. The file
/// is handed over rather than read: the ELF loader reads its segments straight into guest RAM,
/// with no copy of the whole kernel in the VMM's heap first (under nested TCG, that read and its
/// page faults were most of the kernel phase of the start).
pub fn load(dir: &Path, key: &str, expected_len: Option<usize>) -> Option<File> {
    let path = dir.join(key);
    let file = File::open(&path).ok()?;
    let len = file.metadata().ok()?.len();
    if expected_len.is_some_and(|expected| expected as u64 != len) {
        log::debug!(
            "kernel cache {path:?}: {len} bytes, not the {expected_len:?} the bzImage records; ignored"
        );
        return None;
    }
    let mut magic = [0u8; 4];
    if file.read_exact_at(&mut magic, 0).is_err() || !super::kernel_payload::is_elf(&magic) {
        log::debug!("kernel cache {path:?}: not an ELF file; ignored");
        return None;
    }
    Some(file)
}

/// Stores `vmlinux` as `key`; failures are only logged.
pub fn store(dir: &Path, key: &str, vmlinux: &[u8]) {
    let tmp = dir.join(format!(".{key}.{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        fs::create_dir_all(dir)?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(vmlinux)?;
        fs::rename(&tmp, dir.join(key))
    })();
    if let Err(e) = result {
        log::debug!("kernel cache {dir:?}: not stored: {e}");
        let _ = fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn an_entry_round_trips_and_a_wrong_length_is_ignored() {
        let dir = std::env::temp_dir().join(format!("p2pvmm-kcache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let image = dir.join("bzImage");
        fs::write(&image, b"bzImage bytes").unwrap();
        let key = key(&fs::metadata(&image).unwrap());
        assert!(key.contains("-13-"), "{key}");
        let contents = |file: Option<File>| {
            file.map(|mut f| {
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes).unwrap();
                bytes
            })
        };
        assert!(load(&dir, &key, None).is_none());
        store(&dir, &key, b"\x7fELF kernel");
        assert_eq!(
            contents(load(&dir, &key, Some(11))).as_deref(),
            Some(&b"\x7fELF kernel"[..])
        );
        assert!(load(&dir, &key, Some(12)).is_none());
        store(&dir, "not-elf", b"MZ kernel");
        assert!(load(&dir, "not-elf", None).is_none());
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(&image, b"bzImage 2nd!!").unwrap();
        assert_ne!(
            super::key(&fs::metadata(&image).unwrap()),
            key,
            "rewritten in place"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
