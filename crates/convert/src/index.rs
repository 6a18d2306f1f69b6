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

/// The parts of an index file that are read: `weight_map` as an ordered list of entries, so that a
/// repeated key is seen rather than silently merged. Other fields (`metadata`, ...) are ignored.
#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: Option<Entries>,
}

/// A JSON object of string values, in file order, duplicates kept.
struct Entries(Vec<(String, String)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Entries, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object mapping tensor names to shard file names")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = a.next_entry::<String, String>()? {
                    v.push(entry);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
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
    let file: IndexFile = serde_json::from_slice(&text).map_err(|e| malformed(e.to_string()))?;
    let map = file.weight_map.ok_or_else(|| malformed("no \"weight_map\" object".into()))?.0;
    let dir = path.parent().map(Path::to_owned).unwrap_or_default();
    let mut names: Vec<String> = Vec::new();
    let mut shard_numbers: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut keys_seen: std::collections::HashSet<&str> = std::collections::HashSet::with_capacity(map.len());
    let mut weight_map: Vec<(String, usize)> = Vec::with_capacity(map.len());
    for (key, shard) in &map {
        // A JSON map where a repeated key silently wins would hide which shard holds the tensor.
        if !keys_seen.insert(key.as_str()) {
            return Err(malformed(format!("{key:?} appears twice in \"weight_map\"; each tensor must be listed once")));
        }
        let shard = shard.as_str();
        let plain = Path::new(shard).file_name().and_then(|n| n.to_str()) == Some(shard) && shard != ".." && shard != ".";
        if !plain {
            return Err(IndexError::BadShardName { name: shard.to_owned() });
        }
        let i = *shard_numbers.entry(shard).or_insert_with(|| {
            names.push(shard.to_owned());
            names.len() - 1
        });
        weight_map.push((key.clone(), i));
    }
    if weight_map.is_empty() {
        return Err(malformed("\"weight_map\" is empty".into()));
    }
    Ok(Index { shards: names.iter().map(|n| dir.join(n)).collect(), weight_map })
}

#[cfg(test)]
mod duplicate_tests {
    use super::*;

    fn index_with(text: &str) -> Result<Index, IndexError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors.index.json");
        std::fs::write(&p, text).unwrap();
        read_index(&p)
    }

    #[test]
    fn a_repeated_weight_map_key_is_refused() {
        let e = index_with(r#"{"weight_map": {"a.weight": "s1.safetensors", "a.weight": "s2.safetensors"}}"#).unwrap_err();
        assert!(e.to_string().contains("appears twice"), "{e}");
        let ok =
            index_with(r#"{"metadata": {"total_size": 8}, "weight_map": {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors"}}"#)
                .unwrap();
        assert_eq!(ok.weight_map, vec![("a.weight".to_string(), 0), ("b.weight".to_string(), 1)]);
        assert!(index_with(r#"{"weight_map": {"a.weight": 3}}"#).is_err());
        assert!(index_with(r#"{"shards": []}"#).is_err());
    }
}
