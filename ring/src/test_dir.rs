//! Test files in a fresh directory that is removed, with everything in it, when dropped (also
//! when a test fails), so test runs leave nothing behind in the temporary directory.

use std::ops::Deref;
use std::path::{Path, PathBuf};

/// A path named `name` in a directory of its own.
#[derive(Debug)]
pub(crate) struct TempPath {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TempPath {
    pub(crate) fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("intergroup-ring-test-")
            .tempdir()
            .expect("a temporary directory");
        Self {
            path: dir.path().join(name),
            _dir: dir,
        }
    }
}

impl Deref for TempPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}
