//! Making sled's writes durable: what `sled::Db::flush` leaves out.
//!
//! sled 0.34's flush writes its log and asks the kernel to write the range
//! back (`sync_file_range`), which does not make it durable on every file
//! system; the data file is therefore `fdatasync`ed after it. Besides its
//! log, sled keeps every log message over a quarter of a segment (128 KiB:
//! a deployed component, a rewritten leaf of large values) in a file of
//! its own under `blobs/`, written without any sync, which its log then
//! points to. After a power loss the log could point to a blob the disk
//! never received: a missing one is skipped on recovery (that page's
//! update is lost), a truncated one fails the recovery. So every flush
//! also syncs the blob files that appeared since the last one, and the
//! directory that names them, before the flush counts as durable, and
//! before the data file's own sync. A window remains: sled's flush has
//! already written its log back (`sync_file_range`) before the blobs are
//! synced, and a disk may keep those log pages through a power cut
//! without the blob's; only sled syncing its blobs before writing the log
//! that points to them would close it.
//!
//! Architecture invariant: nothing is reported durable (`Ledger::flush`
//! returns) before the data file and every blob file present when sled's
//! flush returned are synced.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::Result;

/// The files a flush syncs after sled's own flush.
pub(super) struct Durable {
    data_file: Option<File>,
    blobs: PathBuf,
    /// Blob files synced so far (those still present).
    synced: Mutex<HashSet<OsString>>,
}

impl Durable {
    /// For the sled database in `dir`.
    pub fn new(dir: &Path) -> Durable {
        Durable {
            data_file: File::open(dir.join("db")).ok(),
            blobs: dir.join("blobs"),
            synced: Mutex::new(HashSet::new()),
        }
    }

    /// `db.flush()`, then the new blob files and the data file synced, in
    /// that order: the log that points to a blob is made durable by the
    /// data file's sync only once the blob is (sled's own flush asked the
    /// kernel to write the log back already, which on some disks is as
    /// good as durable: that window stays, see the module docs).
    pub fn flush(&self, db: &sled::Db) -> Result<()> {
        db.flush()?;
        self.sync_new_blobs()?;
        if let Some(f) = &self.data_file {
            f.sync_data()?;
        }
        Ok(())
    }

    /// Syncs the blob files not synced yet, then their directory; returns
    /// how many it synced.
    pub fn sync_new_blobs(&self) -> Result<usize> {
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let mut present = HashSet::new();
        let mut new = 0;
        for entry in entries {
            let name = entry?.file_name();
            if !synced.contains(&name) {
                match File::open(self.blobs.join(&name)) {
                    Ok(f) => f.sync_all()?,
                    // Removed meanwhile (sled drops blobs no longer needed).
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                }
                new += 1;
            }
            present.insert(name);
        }
        if new > 0 {
            File::open(&self.blobs)?.sync_all()?;
        }
        *synced = present;
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_syncs_the_blob_files_sled_wrote_and_forgets_removed_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        let durable = Durable::new(dir.path());
        durable.flush(&db).expect("flush");
        // A value over a quarter of sled's 512 KiB segment is a blob file.
        db.insert(b"big", vec![7u8; 300 << 10]).expect("insert");
        db.flush().expect("sled flush");
        let blobs = || std::fs::read_dir(dir.path().join("blobs")).map_or(0, |d| d.count());
        assert!(blobs() >= 1, "sled wrote the value as a blob file");
        assert!(durable.sync_new_blobs().expect("sync") >= 1);
        // Already synced: nothing new.
        assert_eq!(durable.sync_new_blobs().expect("sync"), 0);
        db.insert(b"big2", vec![8u8; 300 << 10]).expect("insert");
        durable.flush(&db).expect("flush");
        assert_eq!(
            durable.sync_new_blobs().expect("sync"),
            0,
            "the flush synced it"
        );
        let remembered = durable.synced.lock().expect("lock").len();
        assert_eq!(remembered, blobs());
    }
}
