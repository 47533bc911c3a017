//! Base checkpoints: one `.safetensors` file, or a folder with
//! `model.safetensors.index.json` and its shards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::HfError;
use super::st::{Entry, StFile};

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// An open base checkpoint.
#[derive(Debug)]
pub struct Base {
    /// The shards (one for a single file), in the index's order of first
    /// appearance.
    pub shards: Vec<StFile>,
    /// For a sharded checkpoint: the folder, and the index's extra fields
    /// (`metadata`) to carry over.
    pub index: Option<(PathBuf, serde_json::Map<String, Value>)>,
}

impl Base {
    /// Opens `path`: a `.safetensors` file, or a folder holding
    /// [`INDEX_FILE`] (or a single `model.safetensors`).
    ///
    /// # Errors
    /// [`HfError::MissingShard`], [`HfError::Json`], the shards' own
    /// errors, and [`HfError::Base`] if the index and the shards disagree.
    pub fn open(path: &Path) -> Result<Self, HfError> {
        if !path.is_dir() {
            return Ok(Self { shards: vec![StFile::open(path)?], index: None });
        }
        let index_path = path.join(INDEX_FILE);
        if !index_path.exists() {
            let single = path.join("model.safetensors");
            if single.exists() {
                return Ok(Self { shards: vec![StFile::open(&single)?], index: None });
            }
            return Err(HfError::Base(format!("{} holds neither {INDEX_FILE} nor model.safetensors", path.display())));
        }
        let text = std::fs::read_to_string(&index_path).map_err(|e| HfError::Io(index_path.clone(), e))?;
        let v: Value = serde_json::from_str(&text).map_err(HfError::json)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| HfError::Base(format!("{}: no `weight_map` object", index_path.display())))?;
        let mut files: Vec<String> = Vec::new();
        let mut wanted: BTreeMap<String, String> = BTreeMap::new();
        for (tensor, file) in map {
            let file =
                file.as_str().ok_or_else(|| HfError::Base(format!("weight_map[{tensor:?}] is not a file name")))?;
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(HfError::Base(format!("shard name {file:?} must be a plain file name")));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
            wanted.insert(tensor.clone(), file.to_string());
        }
        files.sort();
        let mut shards = Vec::new();
        for f in &files {
            let p = path.join(f);
            if !p.exists() {
                return Err(HfError::MissingShard(p));
            }
            shards.push(StFile::open(&p)?);
        }
        for (tensor, file) in &wanted {
            let shard =
                shards.iter().find(|s| s.path.file_name().is_some_and(|n| n.to_string_lossy() == file.as_str()));
            if shard.and_then(|s| s.entry(tensor)).is_none() {
                return Err(HfError::Base(format!("the index puts {tensor} in {file}, which does not hold it")));
            }
        }
        let mut extra = v.as_object().cloned().unwrap_or_default();
        extra.remove("weight_map");
        Ok(Self { shards, index: Some((path.to_path_buf(), extra)) })
    }

    /// The tensor called `name` and the index of its shard.
    pub fn find(&self, name: &str) -> Option<(usize, &Entry)> {
        self.shards.iter().enumerate().find_map(|(i, s)| s.entry(name).map(|e| (i, e)))
    }

    /// Every tensor, shard by shard in storage order.
    pub fn entries(&self) -> impl Iterator<Item = (usize, &Entry)> {
        self.shards.iter().enumerate().flat_map(|(i, s)| s.entries.iter().map(move |e| (i, e)))
    }

    /// Bytes of the largest tensor.
    pub fn largest_tensor(&self) -> u64 {
        self.entries().map(|(_, e)| e.len).max().unwrap_or(0)
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.entries().map(|(_, e)| e.len).sum()
    }
}
