//! Base checkpoints: one `.safetensors` file, or a folder with
//! `model.safetensors.index.json` and its shards.

use std::collections::HashMap;

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
}

/// A sharded checkpoint's index, parsed: tensor to shard file, and the
/// other top-level fields.
#[derive(Debug)]
pub struct Index {
    /// `weight_map`: tensor name to its shard (a position in `shards`).
    pub weight_map: HashMap<String, usize>,
    /// The shard file names, sorted, each once.
    pub shards: Vec<String>,
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
        // A visitor rather than `#[serde(flatten)]`, which would buffer the
        // whole `weight_map` before reading it.
        struct Top;
        impl<'de> serde::de::Visitor<'de> for Top {
            type Value = (Option<WeightMap>, serde_json::Map<String, Value>);
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object with a `weight_map`")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut weight_map, mut extra) = (None, serde_json::Map::new());
                while let Some(k) = map.next_key::<String>()? {
                    if k == "weight_map" {
                        if weight_map.replace(map.next_value::<WeightMap>()?).is_some() {
                            return Err(serde::de::Error::custom("`weight_map` appears twice"));
                        }
                    } else {
                        let v = map.next_value::<Value>()?;
                        extra.insert(k, v);
                    }
                }
                Ok((weight_map, extra))
            }
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let (weight_map, extra) = serde::Deserializer::deserialize_map(&mut de, Top).map_err(HfError::json)?;
        de.end().map_err(HfError::json)?;
        let WeightMap { map, shards, duplicate } =
            weight_map.ok_or_else(|| HfError::Base("no `weight_map` object".into()))?;
        if let Some(tensor) = duplicate {
            return Err(HfError::Base(format!("the index lists {tensor} twice")));
        }
        if let Some(file) =
            shards.iter().find(|f| f.is_empty() || f.contains('/') || f.contains('\\') || f.starts_with('.'))
        {
            return Err(HfError::Base(format!("shard name {file:?} must be a plain file name")));
        }
        // Shards sorted by name, positions remapped.
        let mut order: Vec<usize> = (0..shards.len()).collect();
        order.sort_unstable_by(|&i, &j| shards[i].cmp(&shards[j]));
        let mut rank = vec![0; shards.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i] = r;
        }
        let weight_map = map.into_iter().map(|(t, i)| (t, rank[i])).collect();
        let mut sorted: Vec<String> = shards;
        sorted.sort_unstable();
        Ok(Self { weight_map, shards: sorted, extra })
    }
}

/// A string borrowed from the input when it has no escapes (serde's own
/// `Cow<str>` always copies).
struct Name<'de>(std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Name<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a shard file name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                Ok(Name(std::borrow::Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// `weight_map` read in one pass: each tensor once (a duplicate is
/// recorded, where a JSON map would keep the last), each shard file name
/// stored once.
struct WeightMap {
    map: HashMap<String, usize>,
    shards: Vec<String>,
    /// The first tensor listed twice.
    duplicate: Option<String>,
}

impl<'de> serde::Deserialize<'de> for WeightMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = WeightMap;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of tensor name to shard file name")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<WeightMap, A::Error> {
                let mut map = HashMap::new();
                let mut duplicate = None;
                let mut shards: Vec<String> = Vec::new();
                let mut shard_ids: HashMap<String, usize> = HashMap::new();
                // Indexes list runs of tensors in one shard: the last shard
                // is compared first, the name table consulted on a change.
                let mut last: Option<usize> = None;
                while let Some((tensor, Name(file))) = access.next_entry::<String, Name<'de>>()? {
                    let id = match last.filter(|&i| shards[i] == file) {
                        Some(id) => id,
                        None => match shard_ids.get(file.as_ref()) {
                            Some(&id) => id,
                            None => {
                                shards.push(file.to_string());
                                shard_ids.insert(file.to_string(), shards.len() - 1);
                                shards.len() - 1
                            }
                        },
                    };
                    last = Some(id);
                    match map.entry(tensor) {
                        std::collections::hash_map::Entry::Occupied(e) => {
                            duplicate.get_or_insert_with(|| e.key().clone());
                        }
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(id);
                        }
                    }
                }
                Ok(WeightMap { map, shards, duplicate })
            }
        }
        d.deserialize_map(V)
    }
}

impl Base {
    /// Opens `path`: a `.safetensors` file, or a folder holding a single
    /// `model.safetensors` (read first, as transformers reads it, even
    /// when an [`INDEX_FILE`] lies beside it) or [`INDEX_FILE`] and its
    /// shards. Every check is linear in the number of tensors.
    ///
    /// # Errors
    /// [`HfError::MissingShard`], [`HfError::Json`], the shards' own
    /// errors; [`HfError::Base`] if the index and the shards disagree: a
    /// tensor the index puts in a shard that does not hold it, a tensor
    /// held by two shards, or one held by a shard but absent from the index.
    pub fn open(path: &Path) -> Result<Self, HfError> {
        if !path.is_dir() {
            return Ok(Self { shards: vec![StFile::open(path)?], index: None });
        }
        // transformers' order: `model.safetensors` when the folder holds it,
        // whatever index lies beside it; the index otherwise.
        let single = path.join("model.safetensors");
        if single.exists() {
            return Ok(Self { shards: vec![StFile::open(&single)?], index: None });
        }
        let index_path = path.join(INDEX_FILE);
        if !index_path.exists() {
            return Err(HfError::Base(format!("{} holds neither {INDEX_FILE} nor model.safetensors", path.display())));
        }
        let bytes = crate::files::read_bounded(&index_path, super::MAX_CONFIG_BYTES)?;
        let text = String::from_utf8(bytes).map_err(|_| HfError::Base("the index is not UTF-8".into()));
        let index = text.and_then(|t| Index::parse(&t)).map_err(|e| e.in_file(&index_path))?;
        let files = &index.shards;
        let mut shards = Vec::with_capacity(files.len());
        for f in files {
            let p = path.join(f);
            if !p.exists() {
                return Err(HfError::MissingShard(p));
            }
            shards.push(StFile::open(&p)?);
        }
        // Linear: one hash lookup per tensor and direction.
        let bad = |msg: String| HfError::Base(msg).in_file(&index_path);
        for (i, (s, file)) in shards.iter().zip(files).enumerate() {
            for e in &s.entries {
                match index.weight_map.get(&e.name) {
                    None => return Err(bad(format!("{file} holds {}, which the index does not list", e.name))),
                    Some(&j) if j != i => {
                        let (f, other) = (&files[j], &shards[j]);
                        return Err(bad(if other.entry(&e.name).is_some() {
                            format!("{} is stored twice, in {f} and in {file}", e.name)
                        } else {
                            format!("the index puts {} in {f}, but {file} holds it", e.name)
                        }));
                    }
                    Some(_) => {}
                }
            }
        }
        // Every tensor the shards hold is listed, with its shard, and names
        // are unique: if the counts agree, every listed tensor is held.
        let held: usize = shards.iter().map(|s| s.entries.len()).sum();
        if held != index.weight_map.len()
            && let Some((tensor, &j)) = index.weight_map.iter().find(|(t, j)| shards[**j].entry(t).is_none())
        {
            return Err(bad(format!("the index puts {tensor} in {}, which does not hold it", files[j])));
        }
        Ok(Self { shards, index: Some((path.to_path_buf(), index.extra)) })
    }

    /// The tensor called `name` and the index of its shard (one hash
    /// lookup per shard).
    pub fn find(&self, name: &str) -> Option<(usize, &Entry)> {
        self.shards.iter().enumerate().find_map(|(i, s)| s.entry(name).map(|e| (i, e)))
    }

    /// Where the base is: its folder (sharded) or its file.
    pub fn path(&self) -> &Path {
        match (&self.index, self.shards.first()) {
            (Some((dir, _)), _) => dir,
            (None, Some(s)) => &s.path,
            (None, None) => Path::new(""),
        }
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
