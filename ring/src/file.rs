//! The header every ring file starts with, and creating and opening such files with memmap2.
//!
//! ```text
//!  0                   8          12         16                  24
//!  +-------------------+----------+----------+-------------------+
//!  | magic "IGRING\0\0"| version  | kind     | capacity (bytes)  |
//!  +----------+--------+----------+----------+-------------------+
//!  | align    | data_offset       | file_len (bytes)            |
//!  +----------+-------------------+-----------------------------+  64: end of header
//!  | ring-specific metadata (indices, counters), then the data area at data_offset,
//!  | `capacity` bytes long, then nothing: file_len = data_offset + capacity
//! ```

use crate::Error;
use memmap2::MmapMut;
use std::fs::OpenOptions;
use std::path::Path;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First eight bytes of every ring file.
pub const MAGIC: [u8; 8] = *b"IGRING\0\0";
/// The layout version this build reads and writes.
pub const LAYOUT_VERSION: u32 = 1;
/// Size of [`FileHeader`].
pub const HEADER_LEN: usize = size_of::<FileHeader>();
/// Smallest data area.
pub const MIN_CAPACITY: u64 = 64;
/// Largest data area (1 TiB): a larger header value is corrupt, not a real ring.
pub const MAX_CAPACITY: u64 = 1 << 40;

/// What kind of ring a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RingKind {
    /// Many producers, one consumer: commands and publications, clients to engine.
    Records = 1,
    /// One producer, many readers: deliveries and responses, engine to clients.
    Broadcast = 2,
}

/// The header at offset 0 of every ring file.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FileHeader {
    /// Offset 0: [`MAGIC`].
    pub magic: [u8; 8],
    /// Offset 8: [`LAYOUT_VERSION`].
    pub version: U32,
    /// Offset 12: [`RingKind`] code.
    pub kind: U32,
    /// Offset 16: bytes in the data area; a power of two.
    pub capacity: U64,
    /// Offset 24: record alignment in bytes; a power of two, at least 8.
    pub record_alignment: U32,
    /// Offset 28: where the data area starts; a multiple of 64 (cache line) and of the alignment.
    pub data_offset: U32,
    /// Offset 32: total file length, `data_offset + capacity`.
    pub file_len: U64,
    /// Offset 40: reserved, zero.
    pub reserved: [u8; 24],
}

/// A ring file, mapped read-write into this process.
#[derive(Debug)]
pub struct SharedFile {
    map: MmapMut,
    /// `map`'s start, taken once from `&mut` so writes through it are allowed.
    base: *mut u8,
    header: FileHeader,
}

// SAFETY: `base` points into `map`, which the struct owns; the mapping is shared memory meant
// for concurrent use, accessed through the ring protocols.
unsafe impl Send for SharedFile {}
// SAFETY: as above.
unsafe impl Sync for SharedFile {}

impl SharedFile {
    /// Creates (or truncates) the file at `path` for a ring of `kind` with a data area of
    /// `capacity` bytes, `metadata_len` bytes of ring metadata after the header, and records
    /// aligned to `record_alignment`.
    pub fn create(
        path: &Path,
        kind: RingKind,
        capacity: u64,
        record_alignment: u32,
        metadata_len: usize,
    ) -> Result<Self, Error> {
        let name = path.display().to_string();
        let bad = |what: String| Error::BadLayout {
            path: name.clone(),
            what,
        };
        let header = new_header(kind, capacity, record_alignment, metadata_len).map_err(&bad)?;
        let file_len = header.file_len.get();
        let io = |source| Error::Io {
            path: name.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io)?;
        file.set_len(file_len).map_err(io)?;
        let map = map_file(&file).map_err(io)?;
        Self::with_header(map, header).map_err(bad)
    }

    /// A ring of `kind` like [`create`](Self::create)'s, in this process's own memory instead
    /// of a file: for a producer and a consumer that are threads of one process (an embedded
    /// engine's publications), which share it through an `Arc`. No other process can open it,
    /// and a child made by `fork` does not inherit it.
    ///
    /// Where the kernel allows (transparent huge pages in `madvise` mode or `always`) it is
    /// backed by 2 MiB pages: a data path that streams through a ring of several MiB, in a
    /// virtual machine where every TLB miss walks two sets of page tables, pays for 4 KiB pages
    /// on every fourth 1 KiB record (docs/performance.md, twenty-sixth set). A file in
    /// `/dev/shm` gets no huge pages unless the tmpfs is mounted with `huge=`.
    pub fn anonymous(
        kind: RingKind,
        capacity: u64,
        record_alignment: u32,
        metadata_len: usize,
    ) -> Result<Self, Error> {
        let name = ANONYMOUS;
        let bad = |what: String| Error::BadLayout {
            path: name.into(),
            what,
        };
        let header = new_header(kind, capacity, record_alignment, metadata_len).map_err(&bad)?;
        let len =
            usize::try_from(header.file_len.get()).map_err(|_| bad("too large for this machine".into()))?;
        // Mapped as a whole number of huge pages, so that the kernel aligns the mapping to one;
        // the bytes past `file_len` are never touched, so never allocated.
        let huge = len / HUGE_PAGE * HUGE_PAGE;
        let len = if huge > 0 {
            len.div_ceil(HUGE_PAGE) * HUGE_PAGE
        } else {
            len
        };
        let io = |source| Error::Io {
            path: name.into(),
            source,
        };
        let map = memmap2::MmapOptions::new().len(len).map_anon().map_err(io)?;
        // Both are hints. A kernel without transparent huge pages, or with them off, refuses the
        // first, and the ring works on small pages. It covers only whole huge pages of the
        // ring: a 16 MiB data area after its 512 bytes of header would otherwise take a ninth
        // huge page for its last 512 bytes. The second keeps a child of `fork` from sharing the
        // pages copy-on-write (the first write after each fork would copy them).
        #[cfg(target_os = "linux")]
        {
            if huge > 0 {
                let _ = map.advise_range(memmap2::Advice::HugePage, 0, huge);
            }
            let _ = map.advise(memmap2::Advice::DontFork);
        }
        Self::with_header(map, header).map_err(bad)
    }

    /// Writes `header` at the start of `map` (at least `header.file_len` bytes long).
    fn with_header(mut map: MmapMut, header: FileHeader) -> Result<Self, String> {
        if (map.len() as u64) < header.file_len.get() {
            return Err(format!(
                "{} bytes mapped for a ring of {}",
                map.len(),
                header.file_len
            ));
        }
        header
            .write_to_prefix(&mut map[..])
            .map_err(|_| "file shorter than its header".to_string())?;
        let base = map.as_mut_ptr();
        Ok(Self { map, base, header })
    }

    /// Opens and checks an existing ring file that must hold a ring of `kind`.
    pub fn open(path: &Path, kind: RingKind) -> Result<Self, Error> {
        let name = path.display().to_string();
        let io = |source| Error::Io {
            path: name.clone(),
            source,
        };
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        let real_len = file.metadata().map_err(io)?.len();
        if real_len < HEADER_LEN as u64 {
            return Err(Error::BadLayout {
                path: name,
                what: format!("{real_len} bytes is shorter than the {HEADER_LEN}-byte header"),
            });
        }
        let mut map = map_file(&file).map_err(io)?;
        let header = validate(&name, &map[..], real_len, kind)?;
        let base = map.as_mut_ptr();
        Ok(Self { map, base, header })
    }

    /// The checked header.
    pub fn header(&self) -> &FileHeader {
        &self.header
    }

    /// Start of the mapping, for the rings' atomics and in-place access.
    pub(crate) fn base_ptr(&self) -> *mut u8 {
        self.base
    }

    /// The data area, `capacity` bytes.
    pub fn data(&self) -> &[u8] {
        let start = self.header.data_offset.get() as usize;
        &self.map[start..start + self.header.capacity.get() as usize]
    }

    /// The ring metadata between the header and the data area.
    pub fn metadata(&self) -> &[u8] {
        &self.map[HEADER_LEN..self.header.data_offset.get() as usize]
    }
}

// memmap2 makes mapping `unsafe` because another process may change or truncate the file under
// us. That is the point of a shared ring: every reader of the mapping treats its contents as
// untrusted bytes, and the length was checked against the header before use.
fn map_file(file: &std::fs::File) -> std::io::Result<MmapMut> {
    // SAFETY: the mapping is only read through bounds-checked slices, and ring code validates
    // every value it reads from it; a concurrent truncation by a hostile process can at worst
    // raise SIGBUS, which no safe API can prevent for shared mappings.
    unsafe { MmapMut::map_mut(file) }
}

/// What errors about a ring in a process's own memory name instead of a path.
pub(crate) const ANONYMOUS: &str = "(anonymous ring)";

/// Bytes of a transparent huge page on x86-64 and most arm64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// The header of a new ring of `kind`: a data area of `capacity` bytes after `metadata_len`
/// bytes of ring metadata, records aligned to `record_alignment`.
fn new_header(
    kind: RingKind,
    capacity: u64,
    record_alignment: u32,
    metadata_len: usize,
) -> Result<FileHeader, String> {
    check_capacity(capacity)?;
    check_alignment(record_alignment)?;
    let unit = 64.max(record_alignment as usize);
    let data_offset = (HEADER_LEN + metadata_len).div_ceil(unit) * unit;
    let data_offset = u32::try_from(data_offset).map_err(|_| "metadata too large".to_string())?;
    Ok(FileHeader {
        magic: MAGIC,
        version: LAYOUT_VERSION.into(),
        kind: (kind as u32).into(),
        capacity: capacity.into(),
        record_alignment: record_alignment.into(),
        data_offset: data_offset.into(),
        file_len: (u64::from(data_offset) + capacity).into(),
        reserved: [0; 24],
    })
}

fn check_capacity(capacity: u64) -> Result<(), String> {
    if !capacity.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
        return Err(format!(
            "capacity {capacity} is not a power of two in {MIN_CAPACITY}..={MAX_CAPACITY}"
        ));
    }
    Ok(())
}

fn check_alignment(alignment: u32) -> Result<(), String> {
    if !alignment.is_power_of_two() || !(8..=4096).contains(&alignment) {
        return Err(format!(
            "record alignment {alignment} is not a power of two in 8..=4096"
        ));
    }
    Ok(())
}

/// Checks a header read from `bytes` (a file of `real_len` bytes) against what `kind` needs.
pub fn validate(path: &str, bytes: &[u8], real_len: u64, kind: RingKind) -> Result<FileHeader, Error> {
    let bad = |what: String| Error::BadLayout {
        path: path.to_string(),
        what,
    };
    let (header, _) =
        FileHeader::read_from_prefix(bytes).map_err(|_| bad("shorter than the header".into()))?;
    if header.magic != MAGIC {
        return Err(Error::BadMagic { path: path.into() });
    }
    if header.version.get() != LAYOUT_VERSION {
        return Err(Error::UnsupportedVersion {
            path: path.into(),
            found: header.version.get(),
            expected: LAYOUT_VERSION,
        });
    }
    if header.kind.get() != kind as u32 {
        return Err(Error::WrongKind {
            path: path.into(),
            found: header.kind.get(),
            expected: kind as u32,
        });
    }
    let capacity = header.capacity.get();
    check_capacity(capacity).map_err(&bad)?;
    let alignment = header.record_alignment.get();
    check_alignment(alignment).map_err(&bad)?;
    let data_offset = header.data_offset.get();
    if (data_offset as usize) < HEADER_LEN || data_offset % 64 != 0 || data_offset % alignment != 0 {
        return Err(bad(format!("data offset {data_offset} is misplaced")));
    }
    let file_len = header.file_len.get();
    if file_len != u64::from(data_offset) + capacity {
        return Err(bad(format!(
            "header length {file_len} is not data offset {data_offset} + capacity {capacity}"
        )));
    }
    if real_len != file_len {
        return Err(bad(format!(
            "file is {real_len} bytes, its header says {file_len}"
        )));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    fn temp(name: &str) -> crate::test_dir::TempPath {
        crate::test_dir::TempPath::new(name)
    }

    fn poke(path: &Path, offset: u64, bytes: &[u8]) {
        let mut f = OpenOptions::new().write(true).open(path).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(bytes).unwrap();
    }

    #[test]
    fn create_then_open() {
        let p = temp("ok");
        let f = SharedFile::create(&p, RingKind::Records, 4096, 8, 100).unwrap();
        assert_eq!(f.header().data_offset.get(), 192);
        assert_eq!(f.data().len(), 4096);
        assert_eq!(f.metadata().len(), 192 - HEADER_LEN);
        let g = SharedFile::open(&p, RingKind::Records).unwrap();
        assert_eq!(g.header().capacity.get(), 4096);
    }

    #[test]
    fn every_bad_file_is_a_typed_error() {
        let p = temp("bad");
        SharedFile::create(&p, RingKind::Broadcast, 1024, 64, 0).unwrap();
        assert!(matches!(
            SharedFile::open(&p, RingKind::Records),
            Err(Error::WrongKind {
                found: 2,
                expected: 1,
                ..
            })
        ));
        poke(&p, 8, &7u32.to_le_bytes());
        let e = SharedFile::open(&p, RingKind::Broadcast).unwrap_err();
        assert!(matches!(e, Error::UnsupportedVersion { found: 7, .. }), "{e}");
        poke(&p, 8, &LAYOUT_VERSION.to_le_bytes());
        poke(&p, 16, &1000u64.to_le_bytes());
        let e = SharedFile::open(&p, RingKind::Broadcast).unwrap_err();
        assert!(e.to_string().contains("not a power of two"), "{e}");
        poke(&p, 16, &1024u64.to_le_bytes());
        SharedFile::open(&p, RingKind::Broadcast).unwrap();
        // A file whose real size disagrees with its header.
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(500)
            .unwrap();
        let e = SharedFile::open(&p, RingKind::Broadcast).unwrap_err();
        assert!(e.to_string().contains("its header says"), "{e}");
        poke(&p, 0, b"NOTARING");
        assert!(matches!(
            SharedFile::open(&p, RingKind::Broadcast),
            Err(Error::BadMagic { .. })
        ));
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(10)
            .unwrap();
        assert!(matches!(
            SharedFile::open(&p, RingKind::Broadcast),
            Err(Error::BadLayout { .. })
        ));
        assert!(matches!(
            SharedFile::open(&temp("missing"), RingKind::Broadcast),
            Err(Error::Io { .. })
        ));
        assert!(SharedFile::create(&temp("c"), RingKind::Records, 100, 8, 0).is_err());
        assert!(SharedFile::create(&temp("a"), RingKind::Records, 128, 12, 0).is_err());
    }

    #[test]
    fn random_headers_never_panic() {
        use proptest::prelude::*;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        runner
            .run(&prop::collection::vec(any::<u8>(), 0..128), |bytes| {
                let _ = validate("x", &bytes, bytes.len() as u64, RingKind::Records);
                Ok(())
            })
            .unwrap();
    }
}
