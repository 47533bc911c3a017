//! Adapters trained on the tiny model, for every method with a PEFT
//! equivalent, go to a PEFT folder through `peft convert` (the config
//! generated from the `.peft` file's typed entries), are read back by the
//! same reader as PEFT's own files, and `peft merge` of that folder gives
//! the tiny model's own merge (within f32 rounding).
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_faer::Faer;
use peft_faer::hf::{HfAdapter, PeftConfig};
use peft_faer::io::encode;
use peft_faer::tiny::{Peft, Runner, Spec, TinyConfig, TinyModel, projection_indices};
use peft_faer::train::{Trainer, setup, train};

use common::{load, max_rel, scratch};

#[test]
fn every_projection_method_converts_and_merges_as_the_tiny_model() {
    let cfg = TinyConfig { vocab: 16, d: 16, heads: 2, layers: 2, hidden: 24, seq: 6 };
    let model = TinyModel::new(cfg, 21).unwrap();
    let dir = scratch("tiny-to-peft");
    // The frozen model as a safetensors checkpoint.
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = model
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let shape = if k == "embed_tokens.weight" { vec![cfg.vocab, cfg.d] } else { vec![v.len() / cfg.d, cfg.d] };
            (k, v.iter().flat_map(|f| f.to_le_bytes()).collect(), shape)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, b, s)| {
            (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    let base = dir.join("base.safetensors");
    safetensors::serialize_to_file(views, &None, &base).unwrap();
    let task = setup(&model, 2, Faer::new(), 22).unwrap();
    let qv = projection_indices(&["q_proj", "v_proj"]).unwrap();
    let specs = [
        Spec::lora(2, 4.0, &["q_proj", "v_proj"]).unwrap(),
        Spec::Dora { rank: 2, alpha: 4.0, targets: qv.clone() },
        Spec::Ia3 { targets: projection_indices(&["q_proj", "v_proj", "o_proj"]).unwrap(), feedforward: vec![3] },
        Spec::Loha { rank: 2, alpha: 4.0, targets: qv.clone() },
        Spec::Lokr { rank: 1, alpha: 2.0, targets: qv.clone() },
        Spec::Vera { rank: 8, targets: qv },
    ];
    for spec in specs {
        let mut peft = Peft::new(&model, spec, 23).unwrap();
        let name = peft.name();
        let mut trainer = Trainer::new(&peft, peft_core::optim::AdamW::new(peft.method().default_lr()));
        train(&mut Runner::new(&model, Faer::new()).unwrap(), &mut peft, &mut trainer, &task, 10, 4, |_, _| {})
            .unwrap();
        let own = dir.join(format!("{name}.peft"));
        std::fs::write(&own, encode(&peft, &model).unwrap()).unwrap();
        let hf = dir.join(name);
        let run = |args: &[&std::ffi::OsStr]| Command::new(env!("CARGO_BIN_EXE_peft")).args(args).output().unwrap();
        let o = run(&["convert".as_ref(), own.as_os_str(), hf.as_os_str()]);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let ad = HfAdapter::read_dir(&hf).unwrap();
        let kind = match ad.config {
            PeftConfig::Lora(ref c) if c.use_dora => "dora",
            PeftConfig::Lora(_) => "lora",
            PeftConfig::Ia3(_) => "ia3",
            PeftConfig::Loha(_) => "loha",
            PeftConfig::Lokr(_) => "lokr",
            PeftConfig::Vera(_) => "vera",
            PeftConfig::Prompt(_) => "prompt",
        };
        assert_eq!(kind, name);
        let out = dir.join(format!("{name}-merged.safetensors"));
        let o = run(&[
            "merge".as_ref(),
            "--base".as_ref(),
            base.as_os_str(),
            "--adapter".as_ref(),
            hf.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ]);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let got = load(&out);
        let want = model.merged(&peft, &Faer::new()).unwrap();
        let mut changed = 0;
        for (k, w) in want.tensors() {
            let rel = max_rel(&got[&k].2, w);
            assert!(rel <= 1e-5, "{name}: {k}: relative error {rel:.2e}");
            changed += usize::from(model.tensors().iter().any(|(k0, w0)| *k0 == k && *w0 != w));
        }
        assert!(changed >= 4, "{name}: the merge changed {changed} tensors");
    }
}
