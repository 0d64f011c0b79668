//! Durability of file creation and renames: the folder must be synced too.

use std::path::Path;

/// fsyncs a directory so that a rename or create inside it survives power loss.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// fsyncs the folder holding `path`.
pub fn fsync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => fsync_dir(p),
        _ => fsync_dir(Path::new(".")),
    }
}
