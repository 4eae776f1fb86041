//! Making sled's writes durable: what `sled::Db::flush` leaves out.
//!
//! sled 0.34's flush writes its log and asks the kernel to write the range
//! back (`sync_file_range`), which does not make it durable on every file
//! system; the data file is therefore `fdatasync`ed after it. Besides its
//! log, sled keeps every log message over a quarter of a segment (128 KiB:
//! a deployed component, a rewritten leaf of large values) in a file of
//! its own under `blobs/`, which its log then points to. Our sled syncs
//! such a file and the directory that names it before the log can point
//! to it (`third_party/sled/PATCHES.md`, 4), so a flush need not list or
//! sync them. A ledger written by an earlier build may hold blob files
//! that were never synced: the first flush of a process syncs every blob
//! file present, once.
//!
//! Architecture invariant: nothing is reported durable (`Ledger::flush`
//! returns) before the data file is synced, and every blob file is
//! synced before the log that points to it is written.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::Result;

/// The files a flush syncs after sled's own flush.
pub(super) struct Durable {
    data_file: Option<File>,
    blobs: PathBuf,
    /// Whether this process synced the blob files it found (see the
    /// module docs).
    found_blobs_synced: AtomicBool,
}

impl Durable {
    /// For the sled database in `dir`.
    pub fn new(dir: &Path) -> Durable {
        Durable {
            data_file: File::open(dir.join("db")).ok(),
            blobs: dir.join("blobs"),
            found_blobs_synced: AtomicBool::new(false),
        }
    }

    /// `db.flush()`, then (the first time) the blob files found, then the
    /// data file synced.
    pub fn flush(&self, db: &sled::Db) -> Result<()> {
        db.flush()?;
        if !self.found_blobs_synced.load(Ordering::Acquire) {
            self.sync_blob_files()?;
            self.found_blobs_synced.store(true, Ordering::Release);
        }
        if let Some(f) = &self.data_file {
            f.sync_data()?;
        }
        Ok(())
    }

    /// Syncs every blob file present, then their directory; returns how
    /// many it synced.
    fn sync_blob_files(&self) -> Result<usize> {
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let mut synced = 0;
        for entry in entries {
            match File::open(entry?.path()) {
                Ok(f) => f.sync_all()?,
                // Removed meanwhile (sled drops blobs no longer needed).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            }
            synced += 1;
        }
        if synced > 0 {
            File::open(&self.blobs)?.sync_all()?;
        }
        Ok(synced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob_files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("blobs")).map_or(0, |d| d.count())
    }

    #[test]
    fn the_first_flush_syncs_the_blob_files_it_finds_and_later_ones_do_not_list_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::Config::new().path(dir.path()).open().expect("sled");
            // A value over a quarter of sled's 512 KiB segment is a blob file.
            db.insert(b"big", vec![7u8; 300 << 10]).expect("insert");
            db.flush().expect("sled flush");
        }
        assert!(
            blob_files(dir.path()) >= 1,
            "sled wrote the value as a blob file"
        );
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        let durable = Durable::new(dir.path());
        assert!(durable.sync_blob_files().expect("sync") >= 1);
        assert!(!durable.found_blobs_synced.load(Ordering::Acquire));
        durable.flush(&db).expect("flush");
        assert!(durable.found_blobs_synced.load(Ordering::Acquire));
        db.insert(b"big2", vec![8u8; 300 << 10]).expect("insert");
        durable.flush(&db).expect("flush");
        assert_eq!(
            db.get(b"big2").expect("get").map(|v| v.len()),
            Some(300 << 10)
        );
    }
}
