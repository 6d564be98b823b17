//! The agent's durable buffer, on sled 0.34.7.
//!
//! # Durability contract
//!
//! A report is acknowledged to the broker only after [`Buffer::flush`] returned for a flush
//! that started after the report was written. A report leaves the buffer only after the
//! endpoint answered for it ([`Buffer::settle`]). Between those two points it survives
//! crashes, kill -9 and power loss (sled fsyncs on flush).
//!
//! # On-disk format (trees of one sled `Db`)
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `chunks` | chunk id, u64 BE (sled `generate_id`: increasing, unique across restarts) | chunk format v1 (below) |
//! | `quarantine` | sled-generated u64 BE | JSON [`Quarantined`] |
//! | `rejected` | sled-generated u64 BE ‖ record id, 16 bytes BE (before: record id alone) | JSON [`Rejected`] |
//! | `meta` | `b"batch_seq"` | next batch sequence, u64 BE |
//! | `meta` | `b"generation"` | commit groups made durable, u64 BE |
//!
//! Beside sled's files, `generation` (a text file) holds a generation that sled had made
//! durable, written every few seconds and at shutdown. sled opens a damaged database
//! without complaint and silently misses what it cannot read; a sled generation lower than
//! the file's is how the agent notices ([`StoreError::LostData`]).
//!
//! A chunk holds up to [`CHUNK_REPORTS_MAX`] pending reports of one commit group, in
//! receive order: version byte `1`, then per report `len` u16 BE (of the report) ‖ record
//! id, 16 bytes BE ‖ received_ms u64 BE ‖ the original report bytes. One sled insert per
//! chunk instead of per report is what lets the committer keep up with the broker (sled
//! costs a few µs per insert whatever the value size). `received_ms ‖ report` stays
//! contiguous, which is what `salvage` scans raw files for. Batches go out in chunk order,
//! i.e. receive order; settling a batch removes the chunks it covers whole and rewrites the
//! one it covers in part without the settled reports.
//!
//! A report redelivered by the broker (its ack was lost in a crash) is stored again in a
//! later chunk: the endpoint answers `duplicate` for the second copy, so it costs bytes,
//! never a double count. An older database with a `pending` tree keyed by record id (the
//! layout before chunks) is converted at open.
//!
//! # Limits
//!
//! Quarantine and `rejected` have their own space ([`SideLimits`], `store.quarantine_bytes_max`
//! and `store.rejected_bytes_max`): when a new entry does not fit, the oldest entries are
//! dropped and counted ([`Buffer::dropped`]). They never count against the report quota, so
//! a device publishing garbage cannot hold back anyone's reports; every stored string is
//! cut to a named limit ([`QUARANTINE_TOPIC_BYTES_MAX`], [`QUARANTINE_DETAIL_BYTES_MAX`],
//! [`REJECTED_DETAIL_BYTES_MAX`]), so one entry is bounded too. `countersign-agent purge`
//! empties them (on a stopped agent).
//!
//! The page cache is bounded by `store.cache_capacity_bytes`. sled's space amplification is
//! real (about 2.5× the live data): the agent's quota counts logical bytes
//! ([`Buffer::logical_bytes`]) and, separately, keeps a reserve of free space on the
//! filesystem ([`free_bytes`]) so sled rarely meets a full disk at all.
//!
//! # Full disks and sled 0.34.7
//!
//! sled writes a snapshot as `snap.<lsn>.generating` and renames it when complete, but at
//! open it reads the newest `snap.*` file *including* an unfinished `.generating` one
//! (sled issue #1527). A snapshot cut short by a full disk (or a crash) then makes the
//! next open fail with `Corruption { at: None }` although nothing else is damaged — and a
//! database refused as corrupt is moved aside, with every report in it. [`Buffer::open`]
//! therefore removes unfinished snapshots first: sled falls back to the last complete
//! snapshot and replays its log, exactly the recovery a crash mid-snapshot needs. The
//! generation check below still catches a database that lost durable data.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use countersign_meter::report::{RecordId, RECORD_KEY_BYTES};
use countersign_protocol::{RecordOutcome, RejectReason};
use serde::{Deserialize, Serialize};

use crate::evidence::cut;

const RECEIVED_MS_BYTES: usize = 8;
/// Most reports in one chunk.
pub const CHUNK_REPORTS_MAX: usize = 64;
/// Most bytes in one chunk value (a chunk closes before it would pass this).
pub const CHUNK_BYTES_MAX: usize = 8 * 1024;
const CHUNK_VERSION: u8 = 1;
const CHUNK_KEY_BYTES: usize = 8;
/// Per report in a chunk: length, record id and receive time.
const ENTRY_HEADER_BYTES: usize = 2 + RECORD_KEY_BYTES + RECEIVED_MS_BYTES;
/// The tree of the layout before chunks, converted at open.
const LEGACY_PENDING_TREE: &[u8] = b"pending";
const BATCH_SEQ_KEY: &[u8] = b"batch_seq";
const GENERATION_KEY: &[u8] = b"generation";
/// The sidecar file that remembers a durable generation, inside the data directory.
pub const GENERATION_FILE: &str = "generation";
/// Longest a flush may take before it counts as a store fault.
pub const FLUSH_TIMEOUT_MS: u64 = 30_000;
/// At most this much of a quarantined payload is kept (its length is always kept).
pub const QUARANTINE_PAYLOAD_BYTES_MAX: usize = 4096;
/// At most this much of a quarantined payload's topic is kept (MQTT allows 65535 bytes).
pub const QUARANTINE_TOPIC_BYTES_MAX: usize = 256;
/// At most this much of a quarantine detail is kept.
pub const QUARANTINE_DETAIL_BYTES_MAX: usize = 512;
/// At most this much of the endpoint's detail on a rejected report is kept.
pub const REJECTED_DETAIL_BYTES_MAX: usize = 512;
/// Default space of the quarantine tree (keys and values); the oldest entries go first.
pub const QUARANTINE_BYTES_MAX_DEFAULT: u64 = 8 * 1024 * 1024;
/// Default space of the `rejected` tree (keys and values); the oldest entries go first.
pub const REJECTED_BYTES_MAX_DEFAULT: u64 = 8 * 1024 * 1024;
/// Key of a `rejected` entry: insertion order (sled id, u64 BE) then the record id.
const REJECTED_KEY_BYTES: usize = 8 + RECORD_KEY_BYTES;
/// Suffix of a snapshot sled has not finished writing (see the module docs).
const SNAPSHOT_UNFINISHED_SUFFIX: &str = ".generating";
/// Most directory entries looked at for unfinished snapshots (sled keeps a handful).
const DB_DIR_ENTRIES_MAX: usize = 10_000;

/// Permission bits that make an existing data directory unsafe: anything for others, or
/// write for the group. Group read is allowed because the package gives the agent its own
/// group (`StateDirectoryMode=0750`); others must not read buffered reports or write them.
pub const DATA_DIR_MODE_FORBIDDEN: u32 = 0o027;
/// Mode of a data directory the agent creates.
pub const DATA_DIR_MODE_CREATED: u32 = 0o700;
/// Permission bits that make an existing state file unsafe (someone else could rewrite it).
pub const STATE_FILE_MODE_FORBIDDEN: u32 = 0o022;

/// Whether `mode` has any of the `forbidden` permission bits. Pure.
pub fn mode_exposed(mode: u32, forbidden: u32) -> bool {
    mode & forbidden != 0
}

/// Creates `dir` (and missing parents) with mode 0700, or checks that an existing one is not
/// open to others ([`DATA_DIR_MODE_FORBIDDEN`]). Called at start, before sled opens it.
pub fn secure_data_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |e| StoreError::Io(sled::Error::Io(e));
    match std::fs::metadata(dir) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o7777;
            if mode_exposed(mode, DATA_DIR_MODE_FORBIDDEN) {
                return Err(StoreError::Exposed {
                    path: dir.display().to_string(),
                    mode,
                    what: "data directory",
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(DATA_DIR_MODE_CREATED).create(dir).map_err(io)
        }
        Err(e) => Err(io(e)),
    }
}

/// Checks that an existing state file (the uplink meter's) cannot be written by others.
pub fn check_state_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o7777;
            if mode_exposed(mode, STATE_FILE_MODE_FORBIDDEN) {
                return Err(StoreError::Exposed {
                    path: path.display().to_string(),
                    mode,
                    what: "state file",
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::Io(sled::Error::Io(e))),
    }
}

/// Bytes an unprivileged process can still write on the filesystem holding `path` (which
/// must exist).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Removes the snapshots sled began but did not finish under `dir`; returns their paths.
/// Safe because a finished snapshot is always renamed away from the suffix, and sled keeps
/// the previous snapshot until then (see the module docs).
pub fn remove_unfinished_snapshots(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries.take(DB_DIR_ENTRIES_MAX) {
        let path = entry?.path();
        let unfinished = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            n.starts_with("snap.") && n.ends_with(SNAPSHOT_UNFINISHED_SUFFIX) && path.is_file()
        });
        if unfinished {
            std::fs::remove_file(&path)?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Why the buffer failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (locked by another process, corrupt, no permission).
    /// Not recoverable by retrying in this process.
    #[error("cannot open agent database at {path}: {source}")]
    Open {
        /// The database directory.
        path: String,
        /// sled's error.
        source: sled::Error,
    },
    /// The data directory or a state file is open to other users. Not recoverable by
    /// retrying: fix the mode (the message says how).
    #[error(
        "{what} {path} has mode {mode:04o}: other users could read or alter buffered data; \
         chmod go-w,o-rwx {path} (0700, or 0750 with the agent's own group)"
    )]
    Exposed {
        /// The directory or file.
        path: String,
        /// Its permission bits.
        mode: u32,
        /// What it is.
        what: &'static str,
    },
    /// A read, write or flush failed (e.g. disk full). Recoverable: retry once the cause clears.
    #[error("agent database i/o: {0}")]
    Io(#[from] sled::Error),
    /// A stored value does not have the documented format. Not recoverable for that entry.
    #[error("agent database entry is corrupt: {0}")]
    Corrupt(&'static str),
    /// sled opened the database but it has lost commits it had made durable before: the
    /// files are damaged. Not recoverable in place: move it aside and salvage.
    #[error(
        "agent database lost data: it is at generation {sled}, but generation {sidecar} was durable before"
    )]
    LostData {
        /// Generation found in sled.
        sled: u64,
        /// Generation the sidecar file remembers.
        sidecar: u64,
    },
}

/// A report waiting for the endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// Its record id.
    pub id: RecordId,
    /// When the gateway received it, Unix milliseconds.
    pub received_ms: u64,
    /// The device's original bytes.
    pub report: Vec<u8>,
    /// Where it is stored: chunk id and position in the chunk.
    slot: (u64, usize),
}

/// One report inside a chunk value.
struct Entry<'a> {
    id: RecordId,
    received_ms: u64,
    report: &'a [u8],
}

/// The reports of a chunk value, in order; one `Err` at the first malformed byte, then the end.
fn chunk_entries(v: &[u8]) -> ChunkEntries<'_> {
    match v.split_first() {
        Some((&CHUNK_VERSION, rest)) => ChunkEntries { rest, bad_version: false },
        _ => ChunkEntries { rest: &[], bad_version: true },
    }
}

/// Iterator of [`chunk_entries`].
struct ChunkEntries<'a> {
    rest: &'a [u8],
    bad_version: bool,
}

impl<'a> ChunkEntries<'a> {
    fn entry(&mut self) -> Result<Entry<'a>, StoreError> {
        let truncated = StoreError::Corrupt("chunk entry is truncated");
        let (head, tail) = self.rest.split_at_checked(ENTRY_HEADER_BYTES).ok_or(truncated)?;
        let len = usize::from(u16::from_be_bytes([head[0], head[1]]));
        let id = RecordId::from_key(&head[2..2 + RECORD_KEY_BYTES])
            .ok_or(StoreError::Corrupt("chunk entry has a bad record id"))?;
        let mut ms = [0u8; RECEIVED_MS_BYTES];
        ms.copy_from_slice(&head[2 + RECORD_KEY_BYTES..]);
        let (report, tail) =
            tail.split_at_checked(len).ok_or(StoreError::Corrupt("chunk entry is truncated"))?;
        self.rest = tail;
        Ok(Entry { id, received_ms: u64::from_be_bytes(ms), report })
    }
}

impl<'a> Iterator for ChunkEntries<'a> {
    type Item = Result<Entry<'a>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if std::mem::take(&mut self.bad_version) {
            return Some(Err(StoreError::Corrupt("chunk has an unknown version")));
        }
        if self.rest.is_empty() {
            return None;
        }
        let e = self.entry();
        if e.is_err() {
            // Nothing after a malformed entry can be trusted.
            self.rest = &[];
        }
        Some(e)
    }
}

fn push_entry(chunk: &mut Vec<u8>, id: RecordId, received_ms: u64, report: &[u8]) -> Result<(), StoreError> {
    let len =
        u16::try_from(report.len()).map_err(|_| StoreError::Corrupt("report longer than a chunk entry"))?;
    if chunk.is_empty() {
        chunk.push(CHUNK_VERSION);
    }
    chunk.extend_from_slice(&len.to_be_bytes());
    chunk.extend_from_slice(&id.to_key());
    chunk.extend_from_slice(&received_ms.to_be_bytes());
    chunk.extend_from_slice(report);
    Ok(())
}

/// The own space of the quarantine and `rejected` trees (never part of the report quota).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SideLimits {
    /// Most bytes (keys and values) the quarantine tree holds.
    pub quarantine_bytes_max: u64,
    /// Most bytes (keys and values) the `rejected` tree holds.
    pub rejected_bytes_max: u64,
}

impl Default for SideLimits {
    fn default() -> Self {
        Self {
            quarantine_bytes_max: QUARANTINE_BYTES_MAX_DEFAULT,
            rejected_bytes_max: REJECTED_BYTES_MAX_DEFAULT,
        }
    }
}

/// Which side trees `purge` empties.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purge {
    /// The quarantine tree.
    Quarantine,
    /// The `rejected` tree.
    Rejected,
    /// Both.
    All,
}

/// A payload from the report topic that is not a usable report, kept for inspection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    /// When it arrived, Unix milliseconds.
    pub received_ms: u64,
    /// The MQTT topic, cut at [`QUARANTINE_TOPIC_BYTES_MAX`] bytes.
    pub topic: String,
    /// Stable reason code, e.g. `too_long`, `malformed`, `topic_mismatch`.
    pub reason: String,
    /// Human-readable detail, cut at [`QUARANTINE_DETAIL_BYTES_MAX`] bytes.
    pub detail: String,
    /// Length of the payload as the device sent it (for a payload over the MQTT packet
    /// limit, its true length: only an excerpt reached the agent).
    pub payload_len: usize,
    /// The payload in hex, cut at [`QUARANTINE_PAYLOAD_BYTES_MAX`] bytes.
    pub payload_hex: String,
}

/// A report the endpoint refused, kept with the endpoint's reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Stable reason code from the endpoint.
    pub reason: RejectReason,
    /// The endpoint's explanation, cut at [`REJECTED_DETAIL_BYTES_MAX`] bytes.
    pub detail: String,
    /// When the gateway received it.
    pub received_ms: u64,
    /// The report in hex.
    pub report_hex: String,
}

/// Counts of what the buffer holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Reports waiting for the endpoint.
    pub pending: usize,
    /// Payloads kept in quarantine.
    pub quarantined: usize,
    /// Reports the endpoint refused.
    pub rejected: usize,
    /// Bytes the quarantine tree holds (keys and values).
    pub quarantine_bytes: u64,
    /// Bytes the `rejected` tree holds (keys and values).
    pub rejected_bytes: u64,
}

/// Entries dropped from the side trees to make room, since the buffer was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Dropped {
    /// Oldest quarantine entries dropped.
    pub quarantine: u64,
    /// Oldest rejected entries dropped.
    pub rejected: u64,
}

/// One side tree with its own bounded space: the oldest entries (lowest keys) go first.
#[derive(Clone)]
struct SideTree {
    tree: sled::Tree,
    bytes: Arc<AtomicU64>,
    bytes_max: u64,
    dropped: Arc<AtomicU64>,
}

impl SideTree {
    fn open(tree: sled::Tree, bytes_max: u64) -> Result<Self, sled::Error> {
        let mut bytes = 0u64;
        for kv in tree.iter() {
            let (k, v) = kv?;
            bytes = bytes.saturating_add((k.len() + v.len()) as u64);
        }
        Ok(Self {
            tree,
            bytes: Arc::new(AtomicU64::new(bytes)),
            bytes_max,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Inserts, first dropping the oldest entries until the new one fits. An entry larger
    /// than the whole space is not kept (counted as dropped). One writer at a time per tree
    /// (the committer for quarantine, the uploader for `rejected`).
    fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let len = (key.len() + value.len()) as u64;
        if len > self.bytes_max {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        while self.bytes.load(Ordering::Relaxed).saturating_add(len) > self.bytes_max {
            let Some((k, v)) = self.tree.pop_min()? else {
                // The count drifted (it never should): start again from what is there.
                self.bytes.store(0, Ordering::Relaxed);
                break;
            };
            self.shrink((k.len() + v.len()) as u64);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(old) = self.tree.insert(key, value)? {
            self.shrink((key.len() + old.len()) as u64);
        }
        self.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    fn shrink(&self, n: u64) {
        let _ = self.bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.saturating_sub(n)));
    }

    fn clear(&self) -> Result<usize, StoreError> {
        let n = self.tree.len();
        self.tree.clear()?;
        self.bytes.store(0, Ordering::Relaxed);
        Ok(n)
    }
}

/// The agent's durable buffer. One per process; cheap to clone (sled handles are shared).
#[derive(Clone)]
pub struct Buffer {
    generation: Arc<AtomicU64>,
    durable_generation: Arc<AtomicU64>,
    sidecar: std::path::PathBuf,
    bytes: Arc<AtomicU64>,
    pending_count: Arc<AtomicU64>,
    db: sled::Db,
    chunks: sled::Tree,
    quarantine: SideTree,
    rejected: SideTree,
    meta: sled::Tree,
}

impl Buffer {
    /// Opens (or creates) the database under `dir` with a bounded page cache and the default
    /// [`SideLimits`].
    pub fn open(dir: &Path, cache_capacity_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with(dir, cache_capacity_bytes, SideLimits::default())
    }

    /// [`Buffer::open`] with the given space for quarantine and `rejected`.
    pub fn open_with(dir: &Path, cache_capacity_bytes: u64, limits: SideLimits) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open { path: dir.display().to_string(), source };
        // sled would create a missing directory with the umask's mode (0755, typically), which
        // `run` then refuses: any command that opens the buffer creates it private.
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DATA_DIR_MODE_CREATED)
                .create(dir)
                .map_err(|e| open_err(sled::Error::Io(e)))?;
        }
        for path in remove_unfinished_snapshots(dir).map_err(|e| open_err(sled::Error::Io(e)))? {
            tracing::warn!(path = %path.display(), "removed a snapshot sled had not finished (full disk or crash)");
        }
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(open_err)?;
        let b = Self {
            generation: Arc::new(AtomicU64::new(0)),
            durable_generation: Arc::new(AtomicU64::new(0)),
            sidecar: dir.join(GENERATION_FILE),
            bytes: Arc::new(AtomicU64::new(0)),
            pending_count: Arc::new(AtomicU64::new(0)),
            chunks: db.open_tree("chunks").map_err(open_err)?,
            quarantine: SideTree::open(
                db.open_tree("quarantine").map_err(open_err)?,
                limits.quarantine_bytes_max,
            )
            .map_err(open_err)?,
            rejected: SideTree::open(db.open_tree("rejected").map_err(open_err)?, limits.rejected_bytes_max)
                .map_err(open_err)?,
            meta: db.open_tree("meta").map_err(open_err)?,
            db,
        };
        b.convert_legacy_pending().map_err(|e| match e {
            StoreError::Io(source) => open_err(source),
            other => other,
        })?;
        // One scan at start; afterwards every write and removal keeps the counts.
        let mut bytes = 0u64;
        let mut count = 0u64;
        for kv in b.chunks.iter() {
            let (k, v) = kv.map_err(open_err)?;
            bytes = bytes.saturating_add((k.len() + v.len()) as u64);
            for e in chunk_entries(&v) {
                e?;
                count += 1;
            }
        }
        b.bytes.store(bytes, Ordering::Relaxed);
        b.pending_count.store(count, Ordering::Relaxed);
        let in_sled = b
            .meta
            .get(GENERATION_KEY)
            .map_err(open_err)?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let remembered = std::fs::read_to_string(&b.sidecar).ok().and_then(|t| t.trim().parse::<u64>().ok());
        if let Some(sidecar) = remembered.filter(|g| *g > in_sled) {
            return Err(StoreError::LostData { sled: in_sled, sidecar });
        }
        b.generation.store(in_sled, Ordering::Relaxed);
        b.durable_generation.store(in_sled, Ordering::Relaxed);
        Ok(b)
    }

    /// Logical bytes of pending reports (keys and values of chunks): what the quota counts.
    /// Quarantine and `rejected` have their own bounded space ([`SideLimits`]). sled's files
    /// are larger (about 2.5× for this workload), which the quota's docs account for.
    pub fn logical_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Reports waiting for the endpoint, counted as they come and go (O(1)).
    pub fn pending_count(&self) -> u64 {
        self.pending_count.load(Ordering::Relaxed)
    }

    /// Bytes a report adds to [`Buffer::logical_bytes`] (its share of a chunk's key and
    /// version byte rounded up to one of each, so the quota check never undercounts).
    pub fn report_cost_bytes(report_len: usize) -> u64 {
        (ENTRY_HEADER_BYTES + report_len) as u64 + (CHUNK_KEY_BYTES + 1) as u64
    }

    fn grow(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn shrink(&self, n: usize) {
        // Saturating: concurrent settle and re-insert of the same key can race the count by
        // one entry; never wrap.
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.saturating_sub(n as u64)));
    }

    /// Writes one report (not yet durable: see [`Buffer::flush`]).
    pub fn put_report(&self, id: RecordId, received_ms: u64, report: &[u8]) -> Result<(), StoreError> {
        self.put_reports(&[(id, received_ms, report)])
    }

    /// Writes reports in receive order, [`CHUNK_REPORTS_MAX`] to a chunk (not yet durable:
    /// see [`Buffer::flush`]).
    pub fn put_reports(&self, reports: &[(RecordId, u64, &[u8])]) -> Result<(), StoreError> {
        let mut chunk = Vec::with_capacity(CHUNK_BYTES_MAX);
        let mut in_chunk = 0usize;
        for (i, (id, ms, report)) in reports.iter().enumerate() {
            push_entry(&mut chunk, *id, *ms, report)?;
            in_chunk += 1;
            let next_len = reports.get(i + 1).map(|(_, _, r)| ENTRY_HEADER_BYTES + r.len());
            let full = in_chunk >= CHUNK_REPORTS_MAX
                || next_len.is_none_or(|n| chunk.len().saturating_add(n) > CHUNK_BYTES_MAX);
            if full {
                self.insert_chunk(&chunk, in_chunk)?;
                chunk.clear();
                in_chunk = 0;
            }
        }
        Ok(())
    }

    fn insert_chunk(&self, chunk: &[u8], reports: usize) -> Result<(), StoreError> {
        let key = self.db.generate_id()?.to_be_bytes();
        self.chunks.insert(key, chunk)?;
        self.grow(CHUNK_KEY_BYTES + chunk.len());
        self.pending_count.fetch_add(reports as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Moves the reports of the layout before chunks (`pending` keyed by record id) into
    /// chunks, flushes, then drops the old tree. A crash in between leaves both: the reports
    /// then go out twice, which the endpoint answers as duplicates.
    fn convert_legacy_pending(&self) -> Result<(), StoreError> {
        if !self.db.tree_names().iter().any(|n| n.as_ref() == LEGACY_PENDING_TREE) {
            return Ok(());
        }
        let legacy = self.db.open_tree(LEGACY_PENDING_TREE)?;
        let mut owned: Vec<(RecordId, u64, Vec<u8>)> = Vec::new();
        for kv in legacy.iter() {
            let (k, v) = kv?;
            let id =
                RecordId::from_key(&k).ok_or(StoreError::Corrupt("legacy pending key is not a record id"))?;
            if v.len() < RECEIVED_MS_BYTES {
                return Err(StoreError::Corrupt("legacy pending value shorter than its header"));
            }
            let (ms, report) = v.split_at(RECEIVED_MS_BYTES);
            let mut ms_be = [0u8; RECEIVED_MS_BYTES];
            ms_be.copy_from_slice(ms);
            owned.push((id, u64::from_be_bytes(ms_be), report.to_vec()));
        }
        let refs: Vec<(RecordId, u64, &[u8])> =
            owned.iter().map(|(i, m, r)| (*i, *m, r.as_slice())).collect();
        self.put_reports(&refs)?;
        self.db.flush()?;
        self.db.drop_tree(LEGACY_PENDING_TREE)?;
        self.db.flush()?;
        tracing::info!(reports = owned.len(), "converted the buffer to the chunk layout");
        Ok(())
    }

    /// Keeps a payload that is not a usable report (not yet durable: see [`Buffer::flush`]).
    /// Topic, detail and payload excerpt are cut to their limits here; the oldest entries
    /// are dropped if the quarantine is full.
    pub fn put_quarantine(&self, q: &Quarantined) -> Result<(), StoreError> {
        let id = self.db.generate_id()?;
        let bounded = Quarantined {
            received_ms: q.received_ms,
            topic: cut(&q.topic, QUARANTINE_TOPIC_BYTES_MAX).to_owned(),
            reason: cut(&q.reason, QUARANTINE_DETAIL_BYTES_MAX).to_owned(),
            detail: cut(&q.detail, QUARANTINE_DETAIL_BYTES_MAX).to_owned(),
            payload_len: q.payload_len,
            payload_hex: cut(&q.payload_hex, 2 * QUARANTINE_PAYLOAD_BYTES_MAX).to_owned(),
        };
        let v = serde_json::to_vec(&bounded)
            .map_err(|_| StoreError::Corrupt("quarantine entry does not serialize"))?;
        self.quarantine.insert(&id.to_be_bytes(), &v)
    }

    /// Entries dropped from quarantine and `rejected` to make room since open.
    pub fn dropped(&self) -> Dropped {
        Dropped {
            quarantine: self.quarantine.dropped.load(Ordering::Relaxed),
            rejected: self.rejected.dropped.load(Ordering::Relaxed),
        }
    }

    /// Empties quarantine, `rejected` or both, durably. Returns the entries removed
    /// (quarantine, rejected).
    pub fn purge(&self, which: Purge) -> Result<(usize, usize), StoreError> {
        let q = if which != Purge::Rejected { self.quarantine.clear()? } else { 0 };
        let r = if which != Purge::Quarantine { self.rejected.clear()? } else { 0 };
        self.db.flush()?;
        Ok((q, r))
    }

    /// Counts one more commit group; made durable by the next flush. One caller at a time
    /// (the committer).
    pub fn bump_generation(&self) -> Result<(), StoreError> {
        let g = self.generation.load(Ordering::SeqCst).saturating_add(1);
        self.meta.insert(GENERATION_KEY, &g.to_be_bytes())?;
        // Counted only once written, so a flush that reads the count covers the write.
        self.generation.store(g, Ordering::SeqCst);
        Ok(())
    }

    /// Makes every earlier write durable (fsync).
    ///
    /// sled's `flush_async`, because it reports a failed background write (a full disk)
    /// where the blocking `flush` was seen to return `Ok` (the fault suite lost acked reports
    /// that way). It has been reported to hang under load (sled #1241, #1308), so it is
    /// bounded: a flush that takes longer than [`FLUSH_TIMEOUT_MS`] is a store fault, and
    /// nothing it covers is acked.
    ///
    /// What it covers is fixed when it is called, not when it is first polled: the
    /// generation it will record as durable is read here, so a flush spawned on another task
    /// never claims commit groups written after the call.
    pub fn flush(&self) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let g = self.generation.load(Ordering::SeqCst);
        let db = self.db.clone();
        let durable = self.durable_generation.clone();
        async move {
            match tokio::time::timeout(std::time::Duration::from_millis(FLUSH_TIMEOUT_MS), db.flush_async())
                .await
            {
                Ok(r) => {
                    r?;
                }
                Err(_) => {
                    return Err(StoreError::Io(sled::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("sled flush took longer than {FLUSH_TIMEOUT_MS} ms"),
                    ))))
                }
            }
            durable.fetch_max(g, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Writes the durable generation to the sidecar file (atomically: temp file, fsync,
    /// rename). Call it now and then, not per commit: it costs two fsyncs.
    pub fn remember_generation(&self) -> Result<(), StoreError> {
        let g = self.durable_generation.load(Ordering::Relaxed);
        let tmp = self.sidecar.with_extension("tmp");
        let io = |e| StoreError::Io(sled::Error::Io(e));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(format!("{g}\n").as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.sidecar).map_err(io)?;
        if let Some(dir) = self.sidecar.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }

    /// Makes every earlier write durable, blocking the thread (for commands and tests).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Up to `records_max` pending reports in receive order whose reports add up to at most
    /// `report_bytes_max` bytes (always at least one, if any is pending).
    pub fn next_batch(
        &self,
        records_max: usize,
        report_bytes_max: usize,
    ) -> Result<Vec<Pending>, StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for kv in self.chunks.iter() {
            let (k, v) = kv?;
            let chunk = <[u8; CHUNK_KEY_BYTES]>::try_from(&k[..])
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("chunk key is not 8 bytes"))?;
            for (index, e) in chunk_entries(&v).enumerate() {
                let e = e?;
                let next = bytes.saturating_add(e.report.len());
                if !out.is_empty() && (out.len() >= records_max || next > report_bytes_max) {
                    return Ok(out);
                }
                bytes = next;
                out.push(Pending {
                    id: e.id,
                    received_ms: e.received_ms,
                    report: e.report.to_vec(),
                    slot: (chunk, index),
                });
            }
        }
        Ok(out)
    }

    /// Records the endpoint's answer: every record leaves the buffer; refused ones are kept
    /// in `rejected` with the reason. Chunks covered whole are removed, a chunk covered in
    /// part is rewritten with the rest, in one atomic sled batch. Not durable until the next
    /// flush, which is harmless: a record resent after a crash is a duplicate the endpoint
    /// recognises.
    pub fn settle(&self, batch: &[Pending], outcomes: &[RecordOutcome]) -> Result<(), StoreError> {
        let mut settled: std::collections::BTreeMap<u64, std::collections::BTreeSet<usize>> =
            std::collections::BTreeMap::new();
        for (p, o) in batch.iter().zip(outcomes) {
            if let RecordOutcome::Rejected { reason, detail } = o {
                let r = Rejected {
                    reason: *reason,
                    detail: cut(detail, REJECTED_DETAIL_BYTES_MAX).to_owned(),
                    received_ms: p.received_ms,
                    report_hex: hex::encode(&p.report),
                };
                let v = serde_json::to_vec(&r)
                    .map_err(|_| StoreError::Corrupt("rejected entry does not serialize"))?;
                let mut key = [0u8; REJECTED_KEY_BYTES];
                key[..8].copy_from_slice(&self.db.generate_id()?.to_be_bytes());
                key[8..].copy_from_slice(&p.id.to_key());
                self.rejected.insert(&key, &v)?;
            }
            settled.entry(p.slot.0).or_default().insert(p.slot.1);
        }
        let mut changes = sled::Batch::default();
        let (mut freed, mut added, mut gone) = (0usize, 0usize, 0u64);
        for (chunk, indices) in &settled {
            let key = chunk.to_be_bytes();
            let Some(v) = self.chunks.get(key)? else { continue };
            let mut rest = Vec::new();
            let mut total = 0usize;
            for (i, e) in chunk_entries(&v).enumerate() {
                let e = e?;
                total += 1;
                if !indices.contains(&i) {
                    push_entry(&mut rest, e.id, e.received_ms, e.report)?;
                }
            }
            freed += CHUNK_KEY_BYTES + v.len();
            gone += indices.iter().filter(|i| **i < total).count() as u64;
            if rest.is_empty() {
                changes.remove(&key);
            } else {
                added += CHUNK_KEY_BYTES + rest.len();
                changes.insert(&key, rest);
            }
        }
        self.chunks.apply_batch(changes)?;
        self.shrink(freed);
        self.grow(added);
        let _ = self
            .pending_count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some(c.saturating_sub(gone)));
        Ok(())
    }

    /// Takes the next batch sequence number (persisted with the next flush).
    pub fn next_batch_seq(&self) -> Result<u64, StoreError> {
        let old = self.meta.fetch_and_update(BATCH_SEQ_KEY, |old| {
            let n = old.and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes).unwrap_or(0);
            Some(n.wrapping_add(1).to_be_bytes().to_vec())
        })?;
        Ok(old.and_then(|b| <[u8; 8]>::try_from(&b[..]).ok()).map(u64::from_be_bytes).unwrap_or(0))
    }

    /// What the buffer holds now.
    pub fn stats(&self) -> Stats {
        Stats {
            pending: usize::try_from(self.pending_count()).unwrap_or(usize::MAX),
            quarantined: self.quarantine.tree.len(),
            rejected: self.rejected.tree.len(),
            quarantine_bytes: self.quarantine.bytes.load(Ordering::Relaxed),
            rejected_bytes: self.rejected.bytes.load(Ordering::Relaxed),
        }
    }

    /// Receive time of the oldest pending report. Scans the chunks: O(pending), meant for
    /// status queries, not the hot path.
    pub fn oldest_pending_ms(&self) -> Result<Option<u64>, StoreError> {
        let mut oldest: Option<u64> = None;
        for kv in self.chunks.iter() {
            let (_, v) = kv?;
            for e in chunk_entries(&v) {
                let ms = e?.received_ms;
                oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
            }
        }
        Ok(oldest)
    }

    /// Every quarantined payload, oldest first.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        self.quarantine
            .tree
            .iter()
            .map(|kv| {
                let (_, v) = kv?;
                serde_json::from_slice(&v).map_err(|_| StoreError::Corrupt("quarantine entry is not json"))
            })
            .collect()
    }

    /// Every rejected report: those stored before the own-space layout in record-id order,
    /// then the others oldest first.
    pub fn rejected(&self) -> Result<Vec<(RecordId, Rejected)>, StoreError> {
        self.rejected
            .tree
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let id_key = if k.len() == REJECTED_KEY_BYTES { &k[8..] } else { &k[..] };
                let id = RecordId::from_key(id_key)
                    .ok_or(StoreError::Corrupt("rejected key is not a record id"))?;
                let r = serde_json::from_slice(&v)
                    .map_err(|_| StoreError::Corrupt("rejected entry is not json"))?;
                Ok((id, r))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sled releases its file lock from a background thread after the last handle drops:
    /// a reopen right away can find it still held.
    fn reopen(dir: &Path) -> Buffer {
        for _ in 0..100 {
            match Buffer::open(dir, 1 << 20) {
                Ok(b) => return b,
                Err(StoreError::Open { source: sled::Error::Io(_), .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("database still locked after 2 s");
    }

    /// The error a reopen ends with, once the lock of an earlier handle is released.
    fn reopen_err(dir: &Path) -> StoreError {
        for _ in 0..100 {
            match Buffer::open(dir, 1 << 20) {
                Ok(_) => panic!("opened"),
                Err(StoreError::Open { source: sled::Error::Io(_), .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => return e,
            }
        }
        panic!("database still locked after 2 s");
    }

    fn id(seq: u32) -> RecordId {
        RecordId { meter_id: 1, epoch: 0, seq }
    }

    #[tokio::test]
    async fn survives_reopen_after_flush_and_settles() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = Buffer::open(dir.path(), 1 << 20).unwrap();
            for s in 0..10 {
                b.put_report(id(s), 1000 + u64::from(s), &[s as u8; 40]).unwrap();
            }
            b.put_report(id(3), 1003, &[3u8; 40]).unwrap(); // redelivery: a second copy
            b.flush().await.unwrap();
        }
        let b = reopen(dir.path());
        assert_eq!(b.stats().pending, 11);
        let batch = b.next_batch(4, usize::MAX).unwrap();
        assert_eq!(batch.iter().map(|p| p.id.seq).collect::<Vec<_>>(), vec![0, 1, 2, 3], "receive order");
        assert_eq!(batch[2].received_ms, 1002);
        let mut outcomes = vec![RecordOutcome::Stored; 4];
        outcomes[1] = RecordOutcome::Rejected { reason: RejectReason::BadTag, detail: "bad".into() };
        b.settle(&batch, &outcomes).unwrap();
        let st = b.stats();
        assert_eq!((st.pending, st.quarantined, st.rejected), (7, 0, 1));
        assert_eq!(b.rejected().unwrap()[0].0, id(1));
        assert_eq!(b.next_batch(100, 80).unwrap().len(), 2, "byte bound");
        assert_eq!(b.next_batch(100, 1).unwrap().len(), 1, "always at least one");
        assert_eq!(b.pending_count(), 7);
        assert_eq!(b.oldest_pending_ms().unwrap(), Some(1003));
        let bytes = b.logical_bytes();
        assert!(bytes <= 7 * Buffer::report_cost_bytes(40), "{bytes}");
        let rest = b.next_batch(100, usize::MAX).unwrap();
        assert_eq!(rest.iter().map(|p| p.id.seq).collect::<Vec<_>>(), vec![4, 5, 6, 7, 8, 9, 3]);
        drop(b);
        let b = reopen(dir.path());
        assert_eq!(b.logical_bytes(), bytes, "recounted at open");
        assert_eq!(b.pending_count(), 7, "recounted at open");
    }

    #[tokio::test]
    async fn chunks_split_and_partial_settles_keep_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        let payloads: Vec<Vec<u8>> = (0..300u32).map(|s| vec![s as u8; 20 + (s as usize % 30)]).collect();
        let reports: Vec<(RecordId, u64, &[u8])> =
            payloads.iter().enumerate().map(|(s, p)| (id(s as u32), 5000 + s as u64, p.as_slice())).collect();
        b.put_reports(&reports).unwrap();
        assert_eq!(b.chunks.len(), 300usize.div_ceil(CHUNK_REPORTS_MAX));
        assert_eq!(b.pending_count(), 300);
        // Batches that cut chunks in the middle, settled in turn.
        let mut seen = Vec::new();
        loop {
            let batch = b.next_batch(50, usize::MAX).unwrap();
            if batch.is_empty() {
                break;
            }
            for p in &batch {
                assert_eq!(p.report, payloads[p.id.seq as usize], "bytes kept exactly");
                assert_eq!(p.received_ms, 5000 + u64::from(p.id.seq));
            }
            seen.extend(batch.iter().map(|p| p.id.seq));
            b.settle(&batch, &vec![RecordOutcome::Stored; batch.len()]).unwrap();
        }
        assert_eq!(seen, (0..300).collect::<Vec<_>>());
        assert_eq!((b.pending_count(), b.logical_bytes(), b.chunks.len()), (0, 0, 0));
    }

    #[test]
    fn the_layout_before_chunks_is_converted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let legacy = db.open_tree(LEGACY_PENDING_TREE).unwrap();
            for s in 0..5u32 {
                let mut v = (7000 + u64::from(s)).to_be_bytes().to_vec();
                v.extend_from_slice(&[s as u8; 44]);
                legacy.insert(id(s).to_key(), v).unwrap();
            }
            db.flush().unwrap();
        }
        let b = reopen(dir.path());
        assert_eq!(b.pending_count(), 5);
        let batch = b.next_batch(100, usize::MAX).unwrap();
        assert_eq!(
            batch.iter().map(|p| (p.id.seq, p.received_ms)).collect::<Vec<_>>(),
            (0..5u32).map(|s| (s, 7000 + u64::from(s))).collect::<Vec<_>>()
        );
        assert_eq!(batch[4].report, vec![4u8; 44]);
        assert!(!b.db.tree_names().iter().any(|n| n.as_ref() == LEGACY_PENDING_TREE));
    }

    #[test]
    fn malformed_chunks_are_errors_not_panics() {
        for v in [&[][..], &[9u8][..], &[1, 0][..], &[1, 0, 5, 0, 0, 0][..]] {
            let r: Result<Vec<_>, _> = chunk_entries(v).map(|e| e.map(|e| e.report.len())).collect();
            assert!(r.is_err(), "{v:?}");
        }
        assert_eq!(chunk_entries(&[1]).count(), 0, "an empty chunk has no entries");
    }

    proptest::proptest! {
        #[test]
        fn chunk_decoding_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = chunk_entries(&bytes).take(1000).count();
        }
    }

    fn garbage(n: u64, topic: String) -> Quarantined {
        Quarantined {
            received_ms: n,
            topic,
            reason: "malformed".into(),
            detail: "d".repeat(10_000),
            payload_len: 1 << 30,
            payload_hex: "ab".repeat(QUARANTINE_PAYLOAD_BYTES_MAX),
        }
    }

    #[tokio::test]
    async fn quarantine_has_its_own_bounded_space_and_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let limits = SideLimits { quarantine_bytes_max: 50_000, rejected_bytes_max: 50_000 };
        let b = Buffer::open_with(dir.path(), 1 << 20, limits).unwrap();
        b.put_report(id(1), 1, &[1u8; 40]).unwrap();
        let quota_bytes = b.logical_bytes();
        for n in 0..40 {
            b.put_quarantine(&garbage(n, format!("t/{n}/{}", "é".repeat(1000)))).unwrap();
        }
        assert_eq!(b.logical_bytes(), quota_bytes, "quarantine is not counted against the quota");
        let st = b.stats();
        assert!(st.quarantine_bytes <= 50_000, "{st:?}");
        assert!(st.quarantined >= 4, "{st:?}");
        assert_eq!(b.dropped().quarantine, 40 - st.quarantined as u64);
        let kept = b.quarantined().unwrap();
        assert_eq!(kept.last().unwrap().received_ms, 39, "the newest is kept");
        assert_eq!(kept[0].received_ms, 40 - st.quarantined as u64, "the oldest went first");
        for q in &kept {
            assert!(
                q.topic.len() <= QUARANTINE_TOPIC_BYTES_MAX && q.detail.len() <= QUARANTINE_DETAIL_BYTES_MAX
            );
            assert_eq!(q.payload_len, 1 << 30);
        }
        b.flush().await.unwrap();
        drop(b);
        let b = {
            let mut r = None;
            for _ in 0..100 {
                match Buffer::open_with(dir.path(), 1 << 20, limits) {
                    Ok(b) => {
                        r = Some(b);
                        break;
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
            r.expect("reopened")
        };
        assert_eq!(b.stats().quarantine_bytes, st.quarantine_bytes, "recounted at open");
        assert_eq!(b.purge(Purge::Quarantine).unwrap(), (st.quarantined, 0));
        assert_eq!((b.stats().quarantined, b.stats().quarantine_bytes, b.stats().pending), (0, 0, 1));
    }

    #[test]
    fn rejected_has_its_own_bounded_space() {
        let dir = tempfile::tempdir().unwrap();
        let limits = SideLimits { quarantine_bytes_max: 1000, rejected_bytes_max: 3000 };
        let b = Buffer::open_with(dir.path(), 1 << 20, limits).unwrap();
        let reports: Vec<Vec<u8>> = (0..20u32).map(|s| vec![s as u8; 60]).collect();
        for (s, r) in reports.iter().enumerate() {
            b.put_report(id(s as u32), 1, r).unwrap();
        }
        let batch = b.next_batch(100, usize::MAX).unwrap();
        let outcomes: Vec<_> = (0..20)
            .map(|_| RecordOutcome::Rejected { reason: RejectReason::BadTag, detail: "x".repeat(5000) })
            .collect();
        b.settle(&batch, &outcomes).unwrap();
        let st = b.stats();
        assert!(st.rejected_bytes <= 3000 && st.rejected > 0, "{st:?}");
        assert_eq!(b.dropped().rejected, 20 - st.rejected as u64);
        let kept = b.rejected().unwrap();
        assert_eq!(kept.last().unwrap().0, id(19), "the newest is kept");
        assert!(kept.iter().all(|(_, r)| r.detail.len() <= REJECTED_DETAIL_BYTES_MAX));
        assert_eq!(b.purge(Purge::All).unwrap(), (0, st.rejected));
        assert_eq!(b.stats().rejected, 0);
    }

    #[test]
    fn data_dir_is_created_private_and_an_exposed_one_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let opened = tmp.path().join("opened");
        drop(Buffer::open(&opened, 1 << 20).unwrap());
        assert_eq!(
            std::fs::metadata(&opened).unwrap().permissions().mode() & 0o777,
            0o700,
            "open creates it private"
        );
        let dir = tmp.path().join("a/b");
        secure_data_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        secure_data_dir(&dir).unwrap();
        for (mode, ok) in [(0o700, true), (0o750, true), (0o770, false), (0o755, false), (0o701, false)] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = secure_data_dir(&dir);
            assert_eq!(r.is_ok(), ok, "{mode:o}");
            if let Err(e) = r {
                let text = e.to_string();
                assert!(
                    text.contains(&dir.display().to_string()) && text.contains(&format!("{mode:04o}")),
                    "{text}"
                );
            }
        }
        let f = tmp.path().join("state.json");
        check_state_file(&f).unwrap();
        std::fs::write(&f, b"{}").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_state_file(&f).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert!(check_state_file(&f).unwrap_err().to_string().contains("state file"));
    }

    #[test]
    fn batch_seq_increments() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(b.next_batch_seq().unwrap(), 0);
        assert_eq!(b.next_batch_seq().unwrap(), 1);
    }

    #[test]
    fn lost_commits_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = Buffer::open(dir.path(), 1 << 20).unwrap();
            for s in 0..2000 {
                b.put_report(id(s), 1, &[7u8; 48]).unwrap();
                b.bump_generation().unwrap();
            }
            b.flush_blocking().unwrap();
            b.durable_generation.store(2000, Ordering::Relaxed);
            b.remember_generation().unwrap();
        }
        // An intact database opens.
        drop(reopen(dir.path()));
        std::thread::sleep(std::time::Duration::from_millis(200));
        // Damage sled's data file the way a bad disk would: sled then opens it empty.
        let db = dir.path().join("db");
        let mut bytes = std::fs::read(&db).unwrap();
        for (i, b) in bytes.iter_mut().enumerate() {
            if i % 7 == 3 {
                *b ^= 0x5a;
            }
        }
        std::fs::write(&db, bytes).unwrap();
        let e = reopen_err(dir.path());
        // sled either notices (a checksum) or opens what it can; both are refused.
        let noticed = matches!(&e, StoreError::Open { source: sled::Error::Corruption { .. }, .. });
        assert!(noticed || matches!(e, StoreError::LostData { sidecar: 2000, .. }), "{e}");
        // The case sled does not notice at all: its files are gone or reset to empty.
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let f = f.unwrap().path();
            if f.file_name().is_some_and(|n| n != GENERATION_FILE) {
                if f.is_dir() {
                    std::fs::remove_dir_all(&f).unwrap();
                } else {
                    std::fs::remove_file(&f).unwrap();
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let e = reopen_err(dir.path());
        assert!(matches!(e, StoreError::LostData { sled: 0, sidecar: 2000 }), "{e}");
    }

    #[test]
    fn second_open_of_same_dir_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Buffer::open(dir.path(), 1 << 20).unwrap();
        let e = Buffer::open(dir.path(), 1 << 20).err().unwrap();
        assert!(matches!(e, StoreError::Open { .. }), "{e}");
    }
}
