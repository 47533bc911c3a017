//! Adapter files on disk: [`Peft`] to and from `peft-core`'s adapter-only
//! format, and atomic writes.
//!
//! Configuration keys follow Hugging Face PEFT's `adapter_config.json`
//! names where PEFT has one (`r`, `lora_alpha`, `use_rslora`,
//! `target_modules`, `num_virtual_tokens`, `num_layers`, `token_dim`),
//! plus the model's `d_model` and `num_layers`, so a file is checked
//! against the model it is loaded into.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use peft_core::activation::Activation;
use peft_core::adapter::{AdapterConfig, AdapterInit, Width};
use peft_core::format::{self, AdapterFile, FormatError, Tensor, Value};
use peft_core::{Error, Method};

use crate::tiny::{PROJECTIONS, Peft, Spec, TinyModel};

/// Errors of reading and writing adapter files.
#[derive(Debug)]
pub enum IoError {
    /// The file system.
    Io(std::io::Error),
    /// `peft-core`: a malformed file, or one that does not fit the model.
    Peft(Error),
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoError::Io(e) => write!(f, "{e}"),
            IoError::Peft(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for IoError {}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> Self {
        IoError::Io(e)
    }
}

impl From<Error> for IoError {
    fn from(e: Error) -> Self {
        IoError::Peft(e)
    }
}

impl From<FormatError> for IoError {
    fn from(e: FormatError) -> Self {
        IoError::Peft(Error::Format(e))
    }
}

fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::Relu => "relu",
        Activation::GeluErf => "gelu",
        Activation::GeluTanh => "gelu_new",
        Activation::Silu => "silu",
    }
}

fn activation_from(name: &str) -> Option<Activation> {
    [Activation::Relu, Activation::GeluErf, Activation::GeluTanh, Activation::Silu]
        .into_iter()
        .find(|a| activation_name(*a) == name)
}

/// Encodes `peft` (for `model`) in the adapter-only format.
///
/// # Errors
/// `peft-core`'s format errors (they cannot occur for a `Peft` built by
/// [`Peft::new`]).
pub fn encode(peft: &Peft, model: &TinyModel) -> Result<Vec<u8>, IoError> {
    let cfg = model.cfg;
    let targets: String;
    let mut config: Vec<(&str, Value<'_>)> = vec![
        ("d_model", Value::U64(cfg.d as u64)),
        ("num_layers", Value::U64(cfg.layers as u64)),
        ("num_attention_heads", Value::U64(cfg.heads as u64)),
    ];
    match &peft.spec {
        Spec::Lora { rank, alpha, use_rslora, targets: t } => {
            targets = t.iter().map(|&i| PROJECTIONS[i]).collect::<Vec<_>>().join(",");
            config.extend([
                ("r", Value::U64(*rank as u64)),
                ("lora_alpha", Value::F64(*alpha)),
                ("use_rslora", Value::Bool(*use_rslora)),
                ("target_modules", Value::Str(&targets)),
            ]);
        }
        Spec::Adapter { config: a } => {
            let width = a.bottleneck(cfg.d)?;
            config.extend([
                ("bottleneck", Value::U64(width as u64)),
                ("activation", Value::Str(activation_name(a.activation))),
                ("scaling", Value::F64(a.scale)),
            ]);
        }
        Spec::Prompt { n_virtual } => config.push(("num_virtual_tokens", Value::U64(*n_virtual as u64))),
        Spec::Prefix { n_prefix } => config.push(("num_virtual_tokens", Value::U64(*n_prefix as u64))),
    }
    let tensors: Vec<Tensor<'_, f32>> =
        peft.params.iter().map(|p| Tensor { name: &p.name, shape: &p.shape, data: &p.value }).collect();
    let mut out = vec![0u8; format::encoded_len(&config, &tensors)?];
    let n = format::encode(peft.method(), &config, &tensors, &mut out)?;
    out.truncate(n);
    Ok(out)
}

fn usize_of(f: &AdapterFile<'_>, key: &'static str) -> Result<usize, IoError> {
    let v = f.get_u64(key)?;
    usize::try_from(v).map_err(|_| IoError::Peft(Error::Overflow))
}

/// Decodes an adapter file for `model`: checks the file, that it was made
/// for a model of the same width and depth, that every tensor the method
/// needs is present with its shape (and nothing else is), and reads the
/// values bit-exact.
///
/// # Errors
/// [`FormatError`]s (through [`Error::Format`]) for a malformed file or a
/// missing key/tensor; [`Error::ShapeMismatch`] for a tensor or model of
/// another shape; [`Error::InvalidParameter`] for a bad configuration.
pub fn decode(bytes: &[u8], model: &TinyModel) -> Result<Peft, IoError> {
    let f = AdapterFile::parse(bytes)?;
    let cfg = model.cfg;
    let op = peft_core::error::Operand::Parameter;
    for (key, want) in [("d_model", cfg.d), ("num_layers", cfg.layers)] {
        let found = usize_of(&f, key)?;
        if found != want {
            return Err(Error::ShapeMismatch { operand: op, expected: want, found }.into());
        }
    }
    let spec = match f.method() {
        Method::Lora => {
            let names: Vec<&str> = f.get_str("target_modules")?.split(',').collect();
            let Spec::Lora { targets, .. } = Spec::lora(1, 1.0, &names)? else {
                return Err(Error::InvalidParameter {
                    name: "LoRA targets",
                    rule: "must name projections of the tiny model",
                }
                .into());
            };
            Spec::Lora {
                rank: usize_of(&f, "r")?,
                alpha: f.get_f64("lora_alpha")?,
                use_rslora: f.get_bool("use_rslora")?,
                targets,
            }
        }
        Method::Adapter => {
            let activation = activation_from(f.get_str("activation")?).ok_or(Error::InvalidParameter {
                name: "adapter activation",
                rule: "must be relu, gelu, tanh or identity",
            })?;
            Spec::Adapter {
                config: AdapterConfig {
                    width: Width::Explicit(usize_of(&f, "bottleneck")?),
                    activation,
                    scale: f.get_f64("scaling")?,
                    init: AdapterInit::KaimingUniform,
                },
            }
        }
        Method::Prompt => Spec::Prompt { n_virtual: usize_of(&f, "num_virtual_tokens")? },
        Method::Prefix => Spec::Prefix { n_prefix: usize_of(&f, "num_virtual_tokens")? },
    };
    // The structure (names, shapes) from the configuration, then the values.
    let mut peft = Peft::new(model, spec, 0)?;
    if f.num_tensors() != peft.params.len() {
        return Err(Error::ShapeMismatch { operand: op, expected: peft.params.len(), found: f.num_tensors() }.into());
    }
    for p in &mut peft.params {
        let t = f.tensor(&p.name)?;
        if t.shape() != p.shape.as_slice() {
            let (want, found) = (p.shape.iter().product(), t.numel());
            return Err(Error::ShapeMismatch { operand: op, expected: want, found }.into());
        }
        t.read_into(&mut p.value)?;
    }
    Ok(peft)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// folder, written and `fsync`ed, then renamed over `path` (and the folder
/// synced), so a reader sees the old file or the new one, never a part.
///
/// # Errors
/// File-system errors; the temporary file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        rename_durably(&tmp, path)
    })();
    if result.is_err() {
        fs::remove_file(&tmp).ok();
    }
    result
}

/// A temporary path beside `path` (the same folder, so renaming it over
/// `path` is atomic).
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

/// Renames `tmp` (a file or folder whose contents are already synced) to
/// `path`, then syncs the folder holding them: the rename is durable once
/// the directory entry is.
pub(crate) fn rename_durably(tmp: &Path, path: &Path) -> std::io::Result<()> {
    fs::rename(tmp, path)?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(d) = File::open(dir) {
        d.sync_all().ok();
    }
    Ok(())
}

/// Reads an adapter file for `model`, refusing files over `max_bytes`
/// before reading them.
///
/// # Errors
/// File-system errors, [`FormatError::TrailingBytes`] for an oversized
/// file, and [`decode`]'s errors.
pub fn load(path: &Path, model: &TinyModel, max_bytes: u64) -> Result<Peft, IoError> {
    let len = fs::metadata(path)?.len();
    if len > max_bytes {
        return Err(FormatError::TrailingBytes {
            expected: max_bytes,
            len: usize::try_from(len).unwrap_or(usize::MAX),
        }
        .into());
    }
    decode(&fs::read(path)?, model)
}
