//! Hugging Face PEFT interoperability: adapter directories
//! (`adapter_config.json` + `adapter_model.safetensors`) read and written
//! exactly, base checkpoints (one `.safetensors` file or a sharded folder
//! with `model.safetensors.index.json`), a streaming merge, and conversion
//! to and from this crate's own adapter format.
//!
//! Tensor keys are accepted with or without the `base_model.model.` prefix
//! and with or without an adapter name (`lora_A.default.weight`); they are
//! written as PEFT 0.21 writes them (`base_model.model.<module>.lora_A.weight`,
//! `A [r, in]`, `B [out, r]`, safetensors metadata `{"format": "pt"}`).

mod adalora;
mod adapter;
pub mod base;
mod boft;
mod c3a;
pub mod combine;
mod config;
pub mod convert;
mod error;
mod fourierft;
mod hra;
mod ia3;
pub mod inspect;
mod keys;
mod ln_tuning;
mod loha;
mod lokr;
mod lora;
pub mod merge;
mod miss;
mod oft;
mod randlora;
mod road;
mod shira;
pub mod st;
mod summary;
mod trainable_tokens;
mod vblora;
mod vera;

pub use adalora::{ADALORA_KEYS, AdaLoraModule};
pub use adapter::HfAdapter;
pub use adapter::HfTensor;
pub(crate) use adapter::write_raw_dir;
pub use boft::BoftModule;
pub use c3a::C3aModule;
pub use config::{
    AdaLoraConfig, BiasMode, BoftConfig, C3aConfig, FourierFtConfig, HfLoraConfig, HraConfig, Ia3Config,
    LnTuningConfig, LohaConfig, LokrConfig, MissConfig, OftConfig, Pattern, PeftConfig, PromptConfig, RandLoraConfig,
    RoadConfig, ShiraConfig, Targets, TokenIndices, TrainableTokensConfig, VbLoraConfig, VeraConfig,
};
pub use error::HfError;
pub use fourierft::{FourierFtModule, torch_randperm_prefix};
pub use hra::HraModule;
pub use ia3::Ia3Module;
pub use keys::normalize_key;
pub use ln_tuning::LnTuningModule;
pub use loha::{LOHA_KEYS, LohaModule};
pub use lokr::LokrModule;
pub use lora::LoraModule;
pub use miss::MissModule;
pub use oft::{OftModule, adjust_oft_parameters};
pub use randlora::{RANDLORA_A_KEY, RANDLORA_B_KEY, RandLoraModule, RandLoraShared};
pub use road::RoadModule;
pub use shira::ShiraModule;
pub use summary::{
    AdaLoraSummary, AdapterSummary, BoftSummary, C3aSummary, FourierFtSummary, HraSummary, Ia3Summary, LnTuningSummary,
    LohaSummary, LokrSummary, MissSummary, ModuleSummary, NonFinite, OftSummary, ProjectionSummary, RandLoraSummary,
    RoadSummary, TensorSummary, TrainableTokensSummary, VeraSummary,
};
pub use trainable_tokens::TrainableTokensModule;
pub use vblora::{SavedTensor, VBLORA_BANK_KEY, VbLoraBank, VbLoraModule, VbLoraStored};
pub use vera::{VERA_A_KEY, VERA_B_KEY, VeraModule, VeraProjections};

/// The file names PEFT uses.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file PEFT writes.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Adapter files larger than this are refused before reading (a LoRA
/// adapter of a 70B model at rank 64 is about 1.6 GB in f32).
pub const MAX_ADAPTER_BYTES: u64 = 8 << 30;

/// `adapter_config.json` and `model.safetensors.index.json` files larger
/// than this are refused before reading (the largest real ones are a few
/// MB: an index of 100k tensors, a config listing every module).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
