//! Adapter files on disk: [`Peft`] to and from `peft-core`'s adapter-only
//! format. Writes go through [`crate::files`].
//!
//! Configuration keys follow Hugging Face PEFT's `adapter_config.json`
//! names where PEFT has one (`r`, `lora_alpha`, `use_rslora`,
//! `target_modules`, `num_virtual_tokens`, `num_layers`, `token_dim`),
//! plus the model's `d_model` and `num_layers`, so a file is checked
//! against the model it is loaded into.

use std::path::Path;

use peft_core::activation::Activation;
use peft_core::adapter::{AdapterConfig, AdapterInit, Width};
use peft_core::format::{self, AdapterFile, FormatError, Tensor, Value};
use peft_core::{Error, Method};

use crate::tiny::{PROJECTIONS, Peft, Spec, TinyModel, projection_indices};

/// Errors of reading and writing adapter files.
#[derive(Debug)]
pub enum IoError {
    /// The file system, or an output that may not be written (it names the
    /// path).
    Files(crate::files::OutputError),
    /// `peft-core`: a malformed file, or one that does not fit the model.
    Peft(Error),
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoError::Files(e) => write!(f, "{e}"),
            IoError::Peft(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for IoError {}

impl From<Error> for IoError {
    fn from(e: Error) -> Self {
        IoError::Peft(e)
    }
}

impl From<crate::files::OutputError> for IoError {
    fn from(e: crate::files::OutputError) -> Self {
        IoError::Files(e)
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
    let names = |t: &[usize]| t.iter().filter_map(|&i| PROJECTIONS.get(i).copied()).collect::<Vec<_>>().join(",");
    let targets = names(peft.spec.targets());
    let feedforward: String;
    let mut config: Vec<(&str, Value<'_>)> = vec![
        ("d_model", Value::U64(cfg.d as u64)),
        ("num_layers", Value::U64(cfg.layers as u64)),
        ("num_attention_heads", Value::U64(cfg.heads as u64)),
    ];
    match &peft.spec {
        Spec::Lora { rank, alpha, use_rslora, .. } => {
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
        Spec::Dora { rank, alpha, .. } => config.extend([
            ("r", Value::U64(*rank as u64)),
            ("lora_alpha", Value::F64(*alpha)),
            ("use_rslora", Value::Bool(false)),
            ("use_dora", Value::Bool(true)),
            ("target_modules", Value::Str(&targets)),
        ]),
        Spec::Ia3 { feedforward: ff, .. } => {
            feedforward = names(ff);
            config
                .extend([("target_modules", Value::Str(&targets)), ("feedforward_modules", Value::Str(&feedforward))]);
        }
        Spec::Loha { rank, alpha, .. } | Spec::Lokr { rank, alpha, .. } => config.extend([
            ("r", Value::U64(*rank as u64)),
            ("alpha", Value::F64(*alpha)),
            ("target_modules", Value::Str(&targets)),
        ]),
        Spec::Vera { rank, .. } => {
            config.extend([("r", Value::U64(*rank as u64)), ("target_modules", Value::Str(&targets))])
        }
    }
    let tensors: Vec<Tensor<'_, f32>> = peft
        .params
        .iter()
        .chain(&peft.frozen)
        .map(|p| Tensor { name: &p.name, shape: &p.shape, data: &p.value })
        .collect();
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
    let targets = |key: &'static str| -> Result<Vec<usize>, IoError> {
        let names: Vec<&str> = f.get_str(key)?.split(',').filter(|n| !n.is_empty()).collect();
        if names.is_empty() && key == "feedforward_modules" {
            return Ok(Vec::new());
        }
        Ok(projection_indices(&names)?)
    };
    let spec = match f.method() {
        Method::Lora if f.get("use_dora") == Some(Value::Bool(true)) => {
            if f.get_bool("use_rslora")? {
                return Err(Error::InvalidParameter { name: "use_rslora", rule: "is not hosted with DoRA" }.into());
            }
            Spec::Dora {
                rank: usize_of(&f, "r")?,
                alpha: f.get_f64("lora_alpha")?,
                targets: targets("target_modules")?,
            }
        }
        Method::Lora => Spec::Lora {
            rank: usize_of(&f, "r")?,
            alpha: f.get_f64("lora_alpha")?,
            use_rslora: f.get_bool("use_rslora")?,
            targets: targets("target_modules")?,
        },
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
        Method::Ia3 => {
            let (targets, feedforward) = (targets("target_modules")?, targets("feedforward_modules")?);
            if feedforward.iter().any(|t| !targets.contains(t)) {
                return Err(Error::InvalidParameter {
                    name: "feedforward_modules",
                    rule: "must be among the target_modules",
                }
                .into());
            }
            Spec::Ia3 { targets, feedforward }
        }
        Method::Loha => {
            Spec::Loha { rank: usize_of(&f, "r")?, alpha: f.get_f64("alpha")?, targets: targets("target_modules")? }
        }
        Method::Lokr => {
            Spec::Lokr { rank: usize_of(&f, "r")?, alpha: f.get_f64("alpha")?, targets: targets("target_modules")? }
        }
        Method::Vera => Spec::Vera { rank: usize_of(&f, "r")?, targets: targets("target_modules")? },
    };
    // The structure (names, shapes) from the configuration, then the values.
    let mut peft = Peft::new(model, spec, 0)?;
    let expected = peft.params.len() + peft.frozen.len();
    if f.num_tensors() != expected {
        return Err(Error::ShapeMismatch { operand: op, expected, found: f.num_tensors() }.into());
    }
    for p in peft.params.iter_mut().chain(&mut peft.frozen) {
        let t = f.tensor(&p.name)?;
        if t.shape() != p.shape.as_slice() {
            let (want, found) = (p.shape.iter().product(), t.numel());
            return Err(Error::ShapeMismatch { operand: op, expected: want, found }.into());
        }
        t.read_into(&mut p.value)?;
    }
    Ok(peft)
}

/// Reads an adapter file for `model`, refusing a non-regular file and
/// one over `max_bytes` before reading it.
///
/// # Errors
/// [`IoError::Files`] naming the path (missing, not a regular file, over
/// `max_bytes`, unreadable), and [`decode`]'s errors.
pub fn load(path: &Path, model: &TinyModel, max_bytes: u64) -> Result<Peft, IoError> {
    decode(&crate::files::read_bounded(path, max_bytes)?, model)
}
