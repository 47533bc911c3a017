//! The one list of methods (`peft_core::method::METHODS`) reaches every
//! path that must know each method: the `peft` command's `--method`
//! values, the trainer's setup, the PEFT folder it writes (its
//! `peft_type` and `use_dora`), and `peft inspect`'s report of that
//! folder. A method added to the list and forgotten on one of these paths
//! fails here.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use common::scratch;
use peft_core::method::{Family, METHODS};
use peft_faer::llama::Llama;
use peft_faer::llama::finetune::{default_llama, trainable};
use peft_faer::llama::train::Trainable;

#[test]
fn every_listed_method_reaches_the_cli_the_trainer_the_files_and_inspect() {
    let peft = env!("CARGO_BIN_EXE_peft");
    let help = Command::new(peft).args(["finetune", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let model = Llama::random(default_llama().unwrap(), 3);
    let dir = scratch("registry");
    for spec in &METHODS {
        assert!(help.contains(spec.name), "`peft finetune --method` does not offer {}", spec.name);
        let t = trainable(&model, spec, 2, 1).unwrap();
        let t = t.unwrap_or_else(|| panic!("the trainer has no setup for {}", spec.name));
        match (t, spec.peft_type) {
            (Trainable::Bottleneck(_), None) => assert_eq!(spec.family, Family::Inserted),
            (Trainable::Peft(ad), Some(peft_type)) => {
                let out = dir.join(spec.name);
                ad.write_dir(&out, true).unwrap();
                let text = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
                let config: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert_eq!(config["peft_type"], peft_type, "{}", spec.name);
                let dora = config["use_dora"].as_bool().unwrap_or(false);
                assert_eq!(dora, spec.name == "dora", "{}: use_dora", spec.name);
                let report = Command::new(peft).args(["inspect", "--json"]).arg(&out).output().unwrap();
                assert!(report.status.success(), "{}: {}", spec.name, String::from_utf8_lossy(&report.stderr));
                let doc: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
                let want = if spec.name == "dora" { "lora" } else { spec.name };
                assert_eq!(doc["method"], want, "{}: inspect", spec.name);
            }
            (_, peft_type) => panic!("{}: trainable and peft_type {peft_type:?} disagree", spec.name),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
