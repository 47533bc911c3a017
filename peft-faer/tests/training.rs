//! Training, saving and reloading on the tiny model: the frozen base is
//! bit-identical after training, a NaN gradient is refused with nothing
//! changed, and adapter files round-trip bit-exact, atomically, and reject
//! files made for another model.
#![cfg(feature = "model")]

use peft_core::activation::Activation;
use peft_core::adapter::AdapterConfig;
use peft_core::error::Operand;
use peft_core::format::FormatError;
use peft_core::optim::AdamW;
use peft_core::{Error, Method};
use peft_faer::Faer;
use peft_faer::files::write_file;
use peft_faer::io::{IoError, decode, encode, load};
use peft_faer::tiny::{Peft, Runner, Spec, TinyConfig, TinyModel, projection_indices};
use peft_faer::train::{Trainer, loss, setup, train};

fn small() -> TinyConfig {
    TinyConfig { vocab: 16, d: 16, heads: 2, layers: 2, hidden: 24, seq: 6 }
}

fn specs() -> Vec<Spec> {
    let qv = projection_indices(&["q_proj", "v_proj"]).unwrap();
    vec![
        Spec::lora(2, 4.0, &["q_proj", "v_proj"]).unwrap(),
        Spec::Dora { rank: 2, alpha: 4.0, targets: qv.clone() },
        Spec::Ia3 { targets: projection_indices(&["q_proj", "v_proj", "o_proj"]).unwrap(), feedforward: vec![3] },
        Spec::Loha { rank: 2, alpha: 4.0, targets: qv.clone() },
        Spec::Lokr { rank: 1, alpha: 2.0, targets: qv.clone() },
        Spec::Vera { rank: 8, targets: qv },
        Spec::Adapter { config: AdapterConfig::width(4).with_activation(Activation::GeluErf) },
        Spec::Prompt { n_virtual: 3 },
        Spec::Prefix { n_prefix: 2 },
    ]
}

/// Every method: 60 steps lower the held-out loss, and every frozen tensor
/// is bit-identical afterwards (the model compares equal to a copy taken
/// before, `f32` by `f32`, which for finite values is bit equality).
#[test]
fn training_lowers_the_loss_and_leaves_the_base_bit_identical() {
    let model = TinyModel::new(small(), 11).unwrap();
    let frozen = model.clone();
    let bits: Vec<u32> = frozen.tensors().iter().flat_map(|(_, t)| t.iter().map(|v| v.to_bits())).collect();
    let task = setup(&model, 2, Faer::new(), 12).unwrap();
    for spec in specs() {
        let mut peft = Peft::new(&model, spec, 13).unwrap();
        let (method, name) = (peft.method(), peft.name());
        let mut trainer = Trainer::new(&peft, AdamW::new(method.default_lr()).with_max_grad_norm(Some(1.0)));
        let mut runner = Runner::new(&model, Faer::new()).unwrap();
        let before = loss(&mut runner, Some(&mut peft), &task.held_out).unwrap();
        train(&mut runner, &mut peft, &mut trainer, &task, 60, 8, |_, _| {}).unwrap();
        let after = loss(&mut runner, Some(&mut peft), &task.held_out).unwrap();
        assert!(after < 0.9 * before, "{name}: held-out loss {before} -> {after}");
    }
    let after: Vec<u32> = model.tensors().iter().flat_map(|(_, t)| t.iter().map(|v| v.to_bits())).collect();
    assert_eq!(bits, after, "a frozen tensor changed");
}

/// Every parameter's bits (gradients excluded).
fn bits(p: &Peft) -> Vec<u32> {
    p.params.iter().flat_map(|t| t.value.iter().map(|v| v.to_bits())).collect()
}

/// A NaN in one gradient: the step is refused, and parameters, optimizer
/// state (observed through the next good step) and the step count are as
/// before.
#[test]
fn nan_gradient_step_is_refused_and_changes_nothing() {
    let model = TinyModel::new(small(), 1).unwrap();
    let adapter = specs().into_iter().find(|s| matches!(s, Spec::Adapter { .. })).unwrap();
    let mut peft = Peft::new(&model, adapter, 2).unwrap();
    let mut trainer = Trainer::new(&peft, AdamW::new(1e-2));
    for p in &mut peft.params {
        p.grad.iter_mut().enumerate().for_each(|(i, g)| *g = (i % 7) as f32 * 0.1 - 0.3);
    }
    trainer.apply(&mut peft, Some(1.0)).unwrap();
    let (values, steps) = (bits(&peft), trainer.opt.steps());
    let mut twin = trainer.clone();
    peft.params[2].grad[5] = f32::NAN;
    let err = trainer.apply(&mut peft, Some(1.0)).unwrap_err();
    assert_eq!(err, Error::NonFinite { operand: Operand::Gradient, index: 2 });
    assert!(bits(&peft) == values, "a parameter changed");
    assert_eq!(trainer.opt.steps(), steps);
    // The state is untouched: a good step now does exactly what the twin
    // (which never saw the NaN) does.
    peft.params[2].grad[5] = 0.0;
    let mut twin_peft = peft.clone();
    trainer.apply(&mut peft, None).unwrap();
    twin.apply(&mut twin_peft, None).unwrap();
    assert!(bits(&peft) == bits(&twin_peft), "optimizer state changed");
    // A NaN loss is refused the same way.
    let err = trainer.apply(&mut peft, Some(f64::NAN)).unwrap_err();
    assert_eq!(err, Error::NonFinite { operand: Operand::Loss, index: 0 });
}

/// Save then load gives the same tensors bit for bit, for every method,
/// after training has moved them off their init.
#[test]
fn save_load_round_trip_is_bit_exact() {
    let model = TinyModel::new(small(), 3).unwrap();
    let task = setup(&model, 2, Faer::new(), 4).unwrap();
    let dir = std::env::temp_dir().join(format!("peft-roundtrip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for spec in specs() {
        let mut peft = Peft::new(&model, spec, 5).unwrap();
        let mut trainer = Trainer::new(&peft, AdamW::new(peft.method().default_lr()));
        let mut runner = Runner::new(&model, Faer::new()).unwrap();
        train(&mut runner, &mut peft, &mut trainer, &task, 5, 4, |_, _| {}).unwrap();
        let bytes = encode(&peft, &model).unwrap();
        let path = dir.join(format!("{}.peft", peft.name()));
        write_file(&path, &bytes, true).unwrap();
        let back = load(&path, &model, 1 << 20).unwrap();
        assert_eq!(back.spec, peft.spec);
        assert_eq!((back.params.len(), back.frozen.len()), (peft.params.len(), peft.frozen.len()));
        for (a, b) in back.params.iter().chain(&back.frozen).zip(peft.params.iter().chain(&peft.frozen)) {
            assert_eq!((&a.name, &a.shape), (&b.name, &b.shape));
            assert!(a.value.iter().zip(&b.value).all(|(x, y)| x.to_bits() == y.to_bits()), "{}", a.name);
        }
        // The size limit is checked before reading.
        let too_big = load(&path, &model, 10).unwrap_err();
        assert!(matches!(&too_big, IoError::Files(peft_faer::files::OutputError::Io(p, _)) if p == &path), "{too_big}");
        assert!(too_big.to_string().contains("10-byte limit"), "{too_big}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A file made for another model is a typed error naming the mismatch; a
/// corrupted one is the format's error.
#[test]
fn files_for_another_model_or_corrupted_are_rejected() {
    let model = TinyModel::new(small(), 3).unwrap();
    let wider = TinyModel::new(TinyConfig { d: 32, ..small() }, 3).unwrap();
    for spec in specs() {
        let peft = Peft::new(&model, spec, 5).unwrap();
        let bytes = encode(&peft, &model).unwrap();
        let err = decode(&bytes, &wider).unwrap_err();
        assert!(
            matches!(err, IoError::Peft(Error::ShapeMismatch { operand: Operand::Parameter, expected: 32, found: 16 })),
            "{err}"
        );
        let mut bad = bytes.clone();
        let last = bad.len() - 10;
        bad[last] ^= 0x40;
        assert!(matches!(decode(&bad, &model), Err(IoError::Peft(Error::Format(FormatError::Checksum { .. })))));
    }
    let _ = Method::Lora;
}

/// An atomic write replaces the file whole, leaves no temporary file, and
/// on failure leaves the old file as it was.
#[test]
fn atomic_write_replaces_whole_or_not_at_all() {
    let dir = std::env::temp_dir().join(format!("peft-atomic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("a.peft");
    write_file(&path, b"old contents", true).unwrap();
    write_file(&path, b"new", true).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"new");
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "leftover files: {names:?}");
    // A destination that cannot be written (a directory in its place).
    let blocked = dir.join("blocked");
    std::fs::create_dir_all(blocked.join("x")).unwrap();
    assert!(write_file(&blocked, b"data", true).is_err());
    assert!(blocked.join("x").is_dir());
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "leftover files: {names:?}");
    std::fs::remove_dir_all(&dir).ok();
}
