//! Base checkpoints: one `.safetensors` file, or a folder with
//! `model.safetensors.index.json` and its shards.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::HfError;
use super::st::{Entry, StFile};

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// An open base checkpoint.
#[derive(Debug)]
pub struct Base {
    /// The shards (one for a single file), sorted by file name.
    pub shards: Vec<StFile>,
    /// For a sharded checkpoint: the folder, and the index's extra fields
    /// (`metadata`) to carry over.
    pub index: Option<(PathBuf, serde_json::Map<String, Value>)>,
    /// Tensor name to the shard that holds it.
    owner: HashMap<String, usize>,
}

/// A sharded checkpoint's index, parsed: tensor to shard file, and the
/// other top-level fields.
#[derive(Debug)]
pub struct Index {
    /// `weight_map`: tensor name to shard file name, in file order.
    pub weight_map: Vec<(String, String)>,
    /// Every other top-level field (`metadata`, ...).
    pub extra: serde_json::Map<String, Value>,
}

impl Index {
    /// Parses the text of `model.safetensors.index.json`.
    ///
    /// # Errors
    /// [`HfError::Json`]; [`HfError::Base`] for a missing `weight_map`, a
    /// file name that is not a string or not a plain name in the folder
    /// (no separators, not hidden), or a tensor listed twice.
    pub fn parse(text: &str) -> Result<Self, HfError> {
        #[derive(serde::Deserialize)]
        struct Raw {
            weight_map: Option<WeightMap>,
            #[serde(flatten)]
            extra: serde_json::Map<String, Value>,
        }
        let raw: Raw = serde_json::from_str(text).map_err(HfError::json)?;
        let WeightMap(weight_map) = raw.weight_map.ok_or_else(|| HfError::Base("no `weight_map` object".into()))?;
        let mut seen = HashSet::with_capacity(weight_map.len());
        for (tensor, file) in &weight_map {
            if file.is_empty() || file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(HfError::Base(format!("shard name {file:?} (for {tensor}) must be a plain file name")));
            }
            if !seen.insert(tensor.as_str()) {
                return Err(HfError::Base(format!("the index lists {tensor} twice")));
            }
        }
        Ok(Self { weight_map, extra: raw.extra })
    }
}

/// `weight_map` with its entries in file order and duplicates kept (a JSON
/// map would keep only the last of two).
struct WeightMap(Vec<(String, String)>);

impl<'de> serde::Deserialize<'de> for WeightMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = WeightMap;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of tensor name to shard file name")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<WeightMap, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    out.push((k, v));
                }
                Ok(WeightMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl Base {
    /// Opens `path`: a `.safetensors` file, or a folder holding
    /// [`INDEX_FILE`] (or a single `model.safetensors`). Every check is
    /// linear in the number of tensors.
    ///
    /// # Errors
    /// [`HfError::MissingShard`], [`HfError::Json`], the shards' own
    /// errors; [`HfError::Base`] if the index and the shards disagree: a
    /// tensor the index puts in a shard that does not hold it, a tensor
    /// held by two shards, or one held by a shard but absent from the index.
    pub fn open(path: &Path) -> Result<Self, HfError> {
        if !path.is_dir() {
            return Self::from_shards(vec![StFile::open(path)?], None);
        }
        let index_path = path.join(INDEX_FILE);
        if !index_path.exists() {
            let single = path.join("model.safetensors");
            if single.exists() {
                return Self::from_shards(vec![StFile::open(&single)?], None);
            }
            return Err(HfError::Base(format!("{} holds neither {INDEX_FILE} nor model.safetensors", path.display())));
        }
        let bytes = crate::files::read_bounded(&index_path, super::MAX_CONFIG_BYTES)?;
        let text = String::from_utf8(bytes).map_err(|_| HfError::Base("the index is not UTF-8".into()));
        let index = text.and_then(|t| Index::parse(&t)).map_err(|e| e.in_file(&index_path))?;
        let mut files: Vec<&str> = index.weight_map.iter().map(|(_, f)| f.as_str()).collect();
        files.sort_unstable();
        files.dedup();
        let mut shards = Vec::with_capacity(files.len());
        for f in &files {
            let p = path.join(f);
            if !p.exists() {
                return Err(HfError::MissingShard(p));
            }
            shards.push(StFile::open(&p)?);
        }
        let base = Self::from_shards(shards, Some((path.to_path_buf(), index.extra)))?;
        for (tensor, file) in &index.weight_map {
            let holder = base.owner.get(tensor).and_then(|&i| files.get(i));
            if holder != Some(&file.as_str()) {
                let actual = holder.map_or("no shard", |h| h);
                return Err(HfError::Base(format!("the index puts {tensor} in {file}, but {actual} holds it"))
                    .in_file(&index_path));
            }
        }
        let listed: HashSet<&str> = index.weight_map.iter().map(|(t, _)| t.as_str()).collect();
        if let Some((tensor, &i)) = base.owner.iter().find(|(t, _)| !listed.contains(t.as_str())) {
            let file = files.get(i).copied().unwrap_or_default();
            return Err(
                HfError::Base(format!("{file} holds {tensor}, which the index does not list")).in_file(&index_path)
            );
        }
        Ok(base)
    }

    fn from_shards(
        shards: Vec<StFile>,
        index: Option<(PathBuf, serde_json::Map<String, Value>)>,
    ) -> Result<Self, HfError> {
        let mut owner = HashMap::with_capacity(shards.iter().map(|s| s.entries.len()).sum());
        for (i, s) in shards.iter().enumerate() {
            for e in &s.entries {
                if let Some(j) = owner.insert(e.name.clone(), i) {
                    let first = shards.get(j).map_or(PathBuf::new(), |s| s.path.clone());
                    return Err(HfError::Base(format!(
                        "{} is stored twice, in {} and in {}",
                        e.name,
                        first.display(),
                        s.path.display()
                    )));
                }
            }
        }
        Ok(Self { shards, index, owner })
    }

    /// The tensor called `name` and the index of its shard.
    pub fn find(&self, name: &str) -> Option<(usize, &Entry)> {
        let &i = self.owner.get(name)?;
        Some((i, self.shards.get(i)?.entry(name)?))
    }

    /// The files read: every shard, and the index.
    pub fn input_files(&self) -> Vec<PathBuf> {
        let index = self.index.as_ref().map(|(dir, _)| dir.join(INDEX_FILE));
        self.shards.iter().map(|s| s.path.clone()).chain(index).collect()
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
