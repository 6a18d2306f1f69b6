//! The guard every command runs on its files before any work: inputs must be readable regular
//! files, and an output must be a writable file path with the right extension that is not the
//! same file as any input.
//!
//! "The same file" is decided by identity, not by the path's spelling: the device and inode of
//! the output (following symbolic links, so a link to an input, a hard link to it, or
//! `./x/../A.gguf` all count) against those of every input. An output that does not exist yet
//! cannot be an input. `pack IN -o IN` is refused like any other: the rewrite is lossless but
//! not always byte-identical, so a file the user named as the input is never replaced.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::fail::Fail;

/// An input file that passed [`input`]: its path and identity.
#[derive(Debug, Clone)]
pub struct Input {
    /// What it is (`the base model`, `the adapter`, ...).
    pub label: String,
    /// The path as given.
    pub path: PathBuf,
    /// (device, inode).
    id: (u64, u64),
}

/// Checks that `path` is a regular file this process can open for reading; `label` says what it
/// is (`the base model`, `the requests`, ...).
pub fn input(label: &str, path: &Path) -> Result<Input, Fail> {
    let p = path.display();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Fail::unreadable(format!("{p}: cannot read {label}: no such file")),
        _ => Fail::unreadable(format!("{p}: cannot read {label}: {e}")),
    })?;
    if meta.is_dir() {
        return Err(Fail::unreadable(format!("{p}: cannot read {label}: it is a directory; give a file")));
    }
    if !meta.is_file() {
        return Err(Fail::unreadable(format!("{p}: cannot read {label}: not a regular file")));
    }
    std::fs::File::open(path).map_err(|e| Fail::unreadable(format!("{p}: cannot read {label}: {e}")))?;
    Ok(Input { label: label.to_owned(), path: path.to_owned(), id: (meta.dev(), meta.ino()) })
}

/// Checks every `(label, path)` with [`input`].
pub fn inputs(list: &[(&str, &Path)]) -> Result<Vec<Input>, Fail> {
    list.iter().map(|(label, path)| input(label, path)).collect()
}

/// Checks an output path before any work: not a directory, one of the extensions `exts` (e.g.
/// `["npy"]`; empty means any), in an existing directory this process can create files in, and
/// not the same file as any of `inputs`.
pub fn output(label: &str, path: &Path, exts: &[&str], inputs: &[Input]) -> Result<(), Fail> {
    let p = path.display();
    let text = path.as_os_str().to_string_lossy();
    if path.is_dir() || path.file_name().is_none() || text.ends_with('/') {
        return Err(Fail::usage(format!("{label} {p}: is a directory; give a file path")));
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !exts.is_empty() && !exts.contains(&ext) {
        let want: Vec<String> = exts.iter().map(|e| format!("*.{e}")).collect();
        return Err(Fail::usage(format!("{label} {p}: wrong extension; name the output {}", want.join(" or "))));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(Fail::usage(format!("{label} {p}: the output directory {} does not exist; create it first", dir.display())));
    }
    // Creating (and at once dropping, which removes it) a temporary is the one sure test that the
    // atomic write will be able to create its own. It is registered while it exists, like every
    // temporary, so that an interrupt at that moment removes it too.
    let probe = tempfile::Builder::new()
        .prefix(&iapt_format::temp::temp_prefix())
        .tempfile_in(&dir)
        .map_err(|e| Fail::usage(format!("{label} {p}: cannot create files in {}: {e}", dir.display())))?;
    let in_flight = iapt_format::temp::register(probe.path());
    drop(probe);
    drop(in_flight);
    if let Ok(meta) = std::fs::metadata(path) {
        let id = (meta.dev(), meta.ino());
        if let Some(same) = inputs.iter().find(|i| i.id == id) {
            return Err(Fail::usage(format!(
                "{label} {p} is the same file as {}, {}; writing it would destroy that input; choose another output path",
                same.label,
                same.path.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fail::Kind;

    #[test]
    fn the_same_file_is_found_by_identity_not_by_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.gguf");
        std::fs::write(&a, b"x").unwrap();
        std::fs::create_dir(dir.path().join("x")).unwrap();
        std::fs::hard_link(&a, dir.path().join("hard.gguf")).unwrap();
        std::os::unix::fs::symlink(&a, dir.path().join("soft.gguf")).unwrap();
        let ins = inputs(&[("the adapter", &a)]).unwrap();
        for same in ["a.gguf", "x/../a.gguf", "./a.gguf", "hard.gguf", "soft.gguf"] {
            let err = output("-o", &dir.path().join(same), &["gguf"], &ins).unwrap_err();
            assert_eq!(err.kind, Kind::Usage, "{same}");
            assert!(err.message.contains("same file"), "{same}: {}", err.message);
        }
        output("-o", &dir.path().join("b.gguf"), &["gguf"], &ins).unwrap();
        assert!(output("-o", &dir.path().join("b.npy"), &["gguf"], &ins).unwrap_err().message.contains(".gguf"));
        assert!(output("-o", &dir.path().join("x"), &[], &ins).unwrap_err().message.contains("directory"));
        assert!(output("-o", &dir.path().join("no/b.gguf"), &[], &ins).unwrap_err().message.contains("does not exist"));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 4, "the writability probe leaves nothing behind: {names:?}");
    }

    #[test]
    fn inputs_must_be_readable_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = input("the base model", &dir.path().join("none.gguf")).unwrap_err();
        assert_eq!(missing.kind, Kind::Unreadable);
        assert!(missing.message.contains("no such file"), "{}", missing.message);
        let d = input("the base model", dir.path()).unwrap_err();
        assert_eq!(d.kind, Kind::Unreadable);
        assert!(d.message.contains("is a directory"), "{}", d.message);
    }
}
