//! The forward's status read on SQLite, done on the calling thread.
//!
//! Every forward and every cryptogram reads its token's status from the
//! durable store (so that a revocation by another process sharing the file
//! holds at once, see [`super::SqlTokenStore::status_now`]). Through sqlx
//! that read crosses to the connection's worker thread and back, two thread
//! wake-ups for one indexed row: on the default vault it was most of a
//! forward's cost (a profile had sqlx's worker thread at a quarter of the
//! samples and wake-ups at half). Here it is a plain SQLite read on the
//! thread that asks, through a few connections of its own, opened with
//! `query_only` so nothing can write through them.
//!
//! It never waits: in WAL mode readers do not wait for writers, and the
//! rare `SQLITE_BUSY` a reader can still meet (another process recovering
//! the WAL index, or holding the file in exclusive mode) is answered with
//! `busy_timeout = 0` and handed back as [`Read::Busy`], for the caller to
//! take the pool's path, which waits its `busy_timeout`. What it reads is
//! what a pool connection would read: the last committed state of the file.
//! Each read is its own read transaction (the statement is reset when the
//! row is taken), so a kept connection never holds an old snapshot, nor
//! holds back a checkpoint.
//!
//! The price of reading on the worker: the pages it needs (the table's
//! index and one row, and the WAL frames over them) come from SQLite's
//! page cache or the kernel's, normally; a page evicted from both is a
//! blocking `pread` of the disk while that worker's other connections
//! wait. It is the trade any in-process SQLite makes, here for one row.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};

/// Connections kept between reads; one per thread reading at once is
/// enough, more are closed after use.
const KEPT: usize = 8;

const STATUS: &str = "SELECT status, updated_at FROM network_tokens WHERE id = ?1";

/// What one inline read gave.
pub(super) enum Read {
    /// The row's status and `updated_at` columns, or `None`: no such token.
    Row(Option<(String, String)>),
    /// The file was busy; nothing was read.
    Busy,
    /// The read failed otherwise (the text holds no token data).
    Failed(String),
}

/// Read connections to one SQLite file.
pub(super) struct InlineReads {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl InlineReads {
    /// Reads of the database file at `path`, which must exist (an
    /// in-memory database has none: the caller keeps to the pool).
    pub(super) fn new(path: &Path) -> Option<Self> {
        path.is_file().then(|| Self {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        // A list of idle connections: a poisoned lock still holds usable ones.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        // Read-write without create: a WAL reader needs to write the shared
        // index (`-shm`), never the database, which `query_only` refuses.
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::ZERO)?;
        conn.pragma_update(None, "query_only", true)?;
        Ok(conn)
    }

    /// The status columns of token `id`, read now.
    pub(super) fn status(&self, id: &str) -> Read {
        let popped = self.idle().pop();
        let conn = match popped.map_or_else(|| self.open(), Ok) {
            Ok(conn) => conn,
            Err(e) => return classify(e),
        };
        let read = conn
            .prepare_cached(STATUS)
            .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))).optional());
        match read {
            Ok(row) => {
                let mut idle = self.idle();
                if idle.len() < KEPT {
                    idle.push(conn);
                }
                Read::Row(row)
            }
            // A connection that failed is closed, not kept: the next read
            // opens a fresh one.
            Err(e) => classify(e),
        }
    }
}

fn classify(e: rusqlite::Error) -> Read {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Read::Busy,
        _ => Read::Failed(e.to_string()),
    }
}
