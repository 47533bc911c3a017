//! [`HfError`]: everything that can be wrong with PEFT files and
//! checkpoints, naming the file, tensor or field.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::files::OutputError;

/// Everything that can be wrong with PEFT files and checkpoints.
#[derive(Debug)]
pub enum HfError {
    /// A file-system error on a path.
    Io(PathBuf, std::io::Error),
    /// Invalid JSON (config or index).
    Json(String),
    /// A field is missing or has the wrong type or value: of
    /// `adapter_config.json`, of a model's `config.json`, or an argument
    /// (`ids`). Readers of a file wrap it in [`HfError::At`] naming the
    /// file, so the message never guesses which file it was.
    Config {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A feature whose math this crate does not implement; the message
    /// names the field or tensor.
    Unsupported(String),
    /// A malformed safetensors file.
    Safetensors(PathBuf, String),
    /// A malformed GGUF file, or one this crate does not read (the message
    /// names the key or tensor).
    Gguf(PathBuf, String),
    /// A safetensors header names a tensor twice.
    DuplicateKey(PathBuf, String),
    /// A tensor has a shape its method or config does not allow.
    TensorShape {
        /// The tensor (with its module).
        tensor: String,
        /// Its shape as stored.
        shape: Vec<usize>,
        /// The shape required, in words (`"[out]"`, `"a matrix"`, ...).
        expected: String,
    },
    /// A module has the method's tensors, but the config's
    /// `target_modules` (and `exclude_modules`) do not select it.
    Untargeted {
        /// The module.
        module: String,
        /// The method (`"LoRA"`, ...).
        method: &'static str,
    },
    /// A tensor is present while the config field that calls for it is
    /// false (`present`), or missing while the field is true.
    FieldTensor {
        /// The config field (`"use_dora"`, `"lora_bias"`).
        field: &'static str,
        /// The tensor.
        tensor: String,
        /// Whether the tensor is present.
        present: bool,
    },
    /// The adapter file holds none of its method's tensors.
    NoTensors {
        /// The method's tensor keys (`"lora_A / lora_B"`, ...).
        keys: &'static str,
    },
    /// A file holds another number of tensors than its kind has.
    TensorCount {
        /// Tensors found.
        found: usize,
        /// What the kind holds, in words.
        expected: &'static str,
    },
    /// Two tensors or adapters claim one weight (adapted twice, adapted and
    /// replaced, replaced twice, or both linear and embedding LoRA).
    Conflict {
        /// The weight or module.
        name: String,
        /// How (`"is adapted twice"`, ...).
        reason: &'static str,
    },
    /// A key the method does not have, and not a tensor the adapter may
    /// replace (`modules_to_save`, a trained bias).
    UnexpectedKey {
        /// The key as stored.
        key: String,
        /// The method whose keys were expected (`"LoRA"`, ...).
        method: &'static str,
    },
    /// A module's tensor is given twice (under two spellings of its key).
    DuplicateTensor {
        /// The module.
        module: String,
        /// The tensor (`lora_A.weight`, `hada_w1_a`, ...).
        tensor: String,
    },
    /// A module lacks a tensor its method needs.
    MissingTensor {
        /// The module (empty for a tensor of the whole adapter or model).
        module: String,
        /// The tensor.
        tensor: String,
    },
    /// The rank in the tensors differs from the config's.
    RankMismatch {
        /// Module name.
        module: String,
        /// Rank from `r` / `rank_pattern`.
        config: usize,
        /// Rank of the tensors.
        tensors: usize,
    },
    /// An adapted module's base weight is missing or has another shape.
    Base(String),
    /// The index names a shard that is not there.
    MissingShard(PathBuf),
    /// The output already exists (a sharded output is a new folder).
    OutputExists(PathBuf),
    /// `peft-core` rejected a value.
    Core(peft_core::Error),
    /// `peft-core` rejected a value of one module or tensor.
    InModule {
        /// The module or tensor.
        module: String,
        /// What `peft-core` said.
        error: peft_core::Error,
    },
    /// The compute backend failed (its own error, printed, and its kind).
    Backend(String, peft_core::ErrorKind),
    /// Writing the output would replace or delete an input.
    OutputIsInput {
        /// The output.
        output: PathBuf,
        /// The input.
        input: PathBuf,
    },
    /// A value to be written or used is NaN or infinite, or a finite value
    /// its output type cannot hold (refused; `cause` says why, and names
    /// `--allow-nonfinite` where that flag writes it anyway).
    NonFinite {
        /// The tensor.
        tensor: String,
        /// The first bad element (row-major index).
        index: usize,
        /// Its value.
        value: f32,
        /// Where it comes from.
        cause: &'static str,
    },
    /// An error in the file `.0`.
    At(PathBuf, Box<HfError>),
}

impl HfError {
    /// [`HfError::TensorShape`].
    pub(crate) fn shape(tensor: impl Into<String>, shape: &[usize], expected: impl Into<String>) -> Self {
        HfError::TensorShape { tensor: tensor.into(), shape: shape.to_vec(), expected: expected.into() }
    }

    /// [`HfError::MissingTensor`] of the whole adapter or model.
    pub(crate) fn missing(tensor: impl Into<String>) -> Self {
        HfError::MissingTensor { module: String::new(), tensor: tensor.into() }
    }

    /// [`HfError::Conflict`].
    pub(crate) fn conflict(name: impl Into<String>, reason: &'static str) -> Self {
        HfError::Conflict { name: name.into(), reason }
    }

    pub(crate) fn config(field: &str, reason: &str) -> Self {
        HfError::Config { field: field.into(), reason: reason.into() }
    }

    pub(crate) fn backend<E: peft_core::BackendError>(e: E) -> Self {
        HfError::Backend(e.to_string(), e.kind())
    }

    pub(crate) fn json(e: serde_json::Error) -> Self {
        HfError::Json(e.to_string())
    }

    /// The error itself, without the file an [`HfError::At`] names.
    pub fn into_root(self) -> Self {
        match self {
            HfError::At(_, e) => e.into_root(),
            e => e,
        }
    }

    /// This error, naming the file it is about (unless it already names one).
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            e @ (HfError::Io(..)
            | HfError::Safetensors(..)
            | HfError::Gguf(..)
            | HfError::DuplicateKey(..)
            | HfError::MissingShard(_)
            | HfError::OutputExists(_)
            | HfError::OutputIsInput { .. }
            | HfError::At(..)) => e,
            e => HfError::At(path.to_path_buf(), Box::new(e)),
        }
    }
}

impl From<OutputError> for HfError {
    fn from(e: OutputError) -> Self {
        match e {
            OutputError::Exists(p) => HfError::OutputExists(p),
            OutputError::IsInput { output, input } => HfError::OutputIsInput { output, input },
            e @ OutputError::NotAFile(_) => HfError::Base(e.to_string()),
            OutputError::Io(p, e) => HfError::Io(p, e),
        }
    }
}

impl fmt::Display for HfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HfError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            HfError::Json(e) => write!(f, "invalid JSON: {e}"),
            HfError::Config { field, reason } => write!(f, "`{field}`: {reason}"),
            HfError::Unsupported(what) => write!(f, "unsupported: {what}"),
            HfError::Safetensors(p, e) => write!(f, "{}: not a valid safetensors file: {e}", p.display()),
            HfError::Gguf(p, e) => write!(f, "{}: GGUF: {e}", p.display()),
            HfError::DuplicateKey(p, k) => write!(f, "{}: tensor {k:?} appears twice in the header", p.display()),
            HfError::TensorShape { tensor, shape, expected } => {
                write!(f, "`{tensor}` has shape {shape:?}, expected {expected}")
            }
            HfError::Untargeted { module, method } => {
                write!(f, "{module}: has {method} tensors but the config does not target it")
            }
            HfError::FieldTensor { field, tensor, present: true } => {
                write!(f, "`{tensor}` is present but {field} is false")
            }
            HfError::FieldTensor { field, tensor, present: false } => {
                write!(f, "{field} is true but `{tensor}` is missing")
            }
            HfError::NoTensors { keys } => write!(f, "the adapter file has no {keys} tensors"),
            HfError::TensorCount { found, expected } => write!(f, "{found} tensors, where {expected}"),
            HfError::Conflict { name, reason } => write!(f, "{name} {reason}"),
            HfError::UnexpectedKey { key, method } => {
                write!(f, "unexpected key `{key}` (not {method}, a trained bias or modules_to_save)")
            }
            HfError::DuplicateTensor { module, tensor } => write!(f, "{module}: {tensor} appears twice"),
            HfError::MissingTensor { module, tensor } if module.is_empty() => write!(f, "`{tensor}` is missing"),
            HfError::MissingTensor { module, tensor } => write!(f, "{module}.{tensor} is missing"),
            HfError::RankMismatch { module, config, tensors } => {
                write!(f, "{module}: the config says rank {config}, the tensors have rank {tensors}")
            }
            HfError::Base(msg) => write!(f, "base checkpoint: {msg}"),
            HfError::MissingShard(p) => write!(f, "the index names shard {}, which does not exist", p.display()),
            HfError::OutputExists(p) => write!(f, "{} already exists (pass --force to replace it)", p.display()),
            HfError::OutputIsInput { output, input } => {
                write!(f, "refusing to write {}: it would overwrite the input {}", output.display(), input.display())
            }
            HfError::NonFinite { tensor, index, value, cause } => {
                write!(f, "{tensor}: element {index} is {value}: {cause}")
            }
            HfError::At(p, e) => write!(f, "{}: {e}", p.display()),
            HfError::Core(e) => write!(f, "{e}"),
            HfError::InModule { module, error } => write!(f, "{module}: {error}"),
            HfError::Backend(e, kind) => write!(f, "compute backend ({kind:?}): {e}"),
        }
    }
}

impl std::error::Error for HfError {}

impl From<peft_core::Error> for HfError {
    fn from(e: peft_core::Error) -> Self {
        HfError::Core(e)
    }
}

impl From<peft_core::format::FormatError> for HfError {
    fn from(e: peft_core::format::FormatError) -> Self {
        HfError::Core(e.into())
    }
}
