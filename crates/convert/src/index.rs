//! Sharded checkpoints: an index JSON (`model.safetensors.index.json`,
//! `pytorch_model.bin.index.json`) whose `weight_map` names, for every tensor, the shard file that
//! holds it. Shards are looked up next to the index and must be plain file names in that folder.

use std::path::{Path, PathBuf};

/// Largest index file accepted.
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Why an index could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// Reading the index failed.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The index file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The index is not the expected JSON.
    #[error("{}: {what}; an index is {{\"weight_map\": {{\"tensor name\": \"shard file\", ...}}}}", path.display())]
    Malformed {
        /// The index file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// A shard name is not a plain file name next to the index.
    #[error("shard {name:?} is not a file name in the index's folder (no paths, no '..')")]
    BadShardName {
        /// The shard name.
        name: String,
    },
    /// A tensor named by the index is not in its shard.
    #[error("the index puts {key:?} in {shard} but that shard does not hold it; the index and shards do not match")]
    MissingInShard {
        /// The tensor.
        key: String,
        /// The shard.
        shard: String,
    },
}

/// A parsed index.
#[derive(Debug, Clone, PartialEq)]
pub struct Index {
    /// The shard files, in order of first appearance in `weight_map`.
    pub shards: Vec<PathBuf>,
    /// `(tensor name, shard number)` for every tensor.
    pub weight_map: Vec<(String, usize)>,
}

/// Whether a path names a sharded-checkpoint index (`*.index.json`).
pub fn is_index_path(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".index.json"))
}

/// Reads an index file.
pub fn read_index(path: &Path) -> Result<Index, IndexError> {
    let io = |source| IndexError::Io { path: path.to_owned(), source };
    let malformed = |what: String| IndexError::Malformed { path: path.to_owned(), what };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_INDEX_BYTES {
        return Err(malformed(format!("{len} bytes is more than the {MAX_INDEX_BYTES}-byte limit")));
    }
    let text = std::fs::read(path).map_err(io)?;
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| malformed(e.to_string()))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| malformed("no \"weight_map\" object".into()))?;
    let dir = path.parent().map(Path::to_owned).unwrap_or_default();
    let mut names: Vec<String> = Vec::new();
    let mut weight_map = Vec::with_capacity(map.len());
    for (key, shard) in map {
        let shard = shard.as_str().ok_or_else(|| malformed(format!("the shard of {key:?} is not a string")))?;
        let plain = Path::new(shard).file_name().and_then(|n| n.to_str()) == Some(shard) && shard != ".." && shard != ".";
        if !plain {
            return Err(IndexError::BadShardName { name: shard.to_owned() });
        }
        let i = match names.iter().position(|n| n == shard) {
            Some(i) => i,
            None => {
                names.push(shard.to_owned());
                names.len() - 1
            }
        };
        weight_map.push((key.clone(), i));
    }
    if weight_map.is_empty() {
        return Err(malformed("\"weight_map\" is empty".into()));
    }
    Ok(Index { shards: names.iter().map(|n| dir.join(n)).collect(), weight_map })
}
