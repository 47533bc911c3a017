//! Training on the built-in task: data, held-out loss, and the step
//! (forward and backward over a batch, then AdamW over adapter tensors only).

use peft_core::optim::{AdamW, Slot, StepInfo};
use peft_core::{Backend, Error, Result, Rng};

use crate::tiny::{Peft, Runner, TinyModel, Trace, mse};

/// Token sequences and the teacher's hidden states for them.
#[derive(Clone, Debug)]
pub struct Split {
    /// Token ids, `seq` each.
    pub tokens: Vec<Vec<usize>>,
    /// The teacher's output `[seq, d]` per sequence.
    pub targets: Vec<Vec<f32>>,
}

/// The synthetic task: train and held-out splits drawn from different
/// seeds, targets from the teacher (see [`crate::tiny`]).
#[derive(Clone, Debug)]
pub struct Task {
    /// Training sequences.
    pub train: Split,
    /// Held-out sequences.
    pub held_out: Split,
}

fn split<B: Backend<f32, Error = Error>>(teacher: &mut Runner<'_, B>, n: usize, seed: u64) -> Result<Split> {
    let cfg = teacher.model().cfg;
    let mut rng = Rng::new(seed);
    let mut tokens = Vec::with_capacity(n);
    let mut targets = Vec::with_capacity(n);
    let mut trace = Trace::default();
    for _ in 0..n {
        let t: Vec<usize> = (0..cfg.seq).map(|_| (rng.next_u64() % cfg.vocab as u64) as usize).collect();
        teacher.forward(None, &t, &mut trace)?;
        targets.push(trace.output(0, cfg.d).to_vec());
        tokens.push(t);
    }
    Ok(Split { tokens, targets })
}

impl Task {
    /// `n_train` and `n_held_out` random sequences labelled by `teacher`.
    ///
    /// # Errors
    /// The teacher's forward errors.
    pub fn new<B: Backend<f32, Error = Error>>(
        teacher: &mut Runner<'_, B>,
        n_train: usize,
        n_held_out: usize,
        seed: u64,
    ) -> Result<Self> {
        let train = split(teacher, n_train, seed)?;
        let held_out = split(teacher, n_held_out, seed ^ 0x9e37_79b9_7f4a_7c15)?;
        Ok(Self { train, held_out })
    }
}

/// Mean MSE of the student (frozen model plus `peft`) over a split.
///
/// # Errors
/// Forward errors.
pub fn loss<B: Backend<f32, Error = Error>>(
    runner: &mut Runner<'_, B>,
    mut peft: Option<&mut Peft>,
    data: &Split,
) -> Result<f64> {
    let d = runner.model().cfg.d;
    let nv = peft.as_deref().map_or(0, Peft::n_virtual);
    let mut trace = Trace::default();
    let mut total = 0.0;
    for (t, y) in data.tokens.iter().zip(&data.targets) {
        runner.forward(peft.as_deref_mut(), t, &mut trace)?;
        total += mse(trace.output(nv, d), y, 1.0, None);
    }
    Ok(total / data.tokens.len().max(1) as f64)
}

/// AdamW over an adapter's tensors, with its state.
#[derive(Clone, Debug)]
pub struct Trainer {
    /// The optimizer (its learning rate, betas, decay, clipping).
    pub opt: AdamW,
    state: Vec<Vec<f32>>,
}

impl Trainer {
    /// Zero state for every tensor of `peft`.
    pub fn new(peft: &Peft, opt: AdamW) -> Self {
        let state = peft.params.iter().map(|p| vec![0.0f32; opt.state_len(p.value.len())]).collect();
        Self { opt, state }
    }

    /// Bytes of optimizer state (two f32 moments per trainable element).
    pub fn state_bytes(&self) -> usize {
        self.state.iter().map(|s| s.len() * 4).sum()
    }

    /// One step on a batch of `(tokens, target)` pairs: the mean loss over the batch, its gradient
    /// through the model into the adapter only, and an AdamW update.
    /// Returns the batch loss and what the optimizer did.
    ///
    /// # Errors
    /// Forward/backward errors; [`peft_core::Error::NonFinite`] (the step
    /// is refused and nothing changes).
    pub fn step<B: Backend<f32, Error = Error>>(
        &mut self,
        runner: &mut Runner<'_, B>,
        peft: &mut Peft,
        batch: &[(&[usize], &[f32])],
    ) -> Result<(f64, StepInfo)> {
        let d = runner.model().cfg.d;
        let nv = peft.n_virtual();
        let weight = 1.0 / batch.len().max(1) as f64;
        peft.zero_grad();
        let mut trace = Trace::default();
        let mut total = 0.0;
        let mut g = Vec::new();
        for &(t, y) in batch {
            runner.forward(Some(peft), t, &mut trace)?;
            g.resize(y.len(), 0.0);
            total += mse(trace.output(nv, d), y, weight, Some(&mut g)) * weight;
            runner.backward(Some(peft), &trace, &g)?;
        }
        let info = self.apply(peft, Some(total))?;
        Ok((total, info))
    }

    /// The optimizer update from the gradients already in `peft`.
    ///
    /// # Errors
    /// As [`AdamW::step`].
    pub fn apply(&mut self, peft: &mut Peft, loss: Option<f64>) -> Result<StepInfo> {
        let mut slots: Vec<Slot<'_, f32>> = peft
            .params
            .iter_mut()
            .zip(&mut self.state)
            .map(|(p, s)| Slot { param: &mut p.value, grad: &p.grad, state: s, decay: p.decay })
            .collect();
        self.opt.step(&mut slots, loss)
    }
}

/// Trains `peft` on `task` for `steps` batches of `batch` training
/// sequences (taken in order, cycling), calling `progress(step, loss)`
/// after each step.
///
/// # Errors
/// As [`Trainer::step`].
pub fn train<B: Backend<f32, Error = Error>>(
    runner: &mut Runner<'_, B>,
    peft: &mut Peft,
    trainer: &mut Trainer,
    task: &Task,
    steps: usize,
    batch: usize,
    mut progress: impl FnMut(usize, f64),
) -> Result<()> {
    let n = task.train.tokens.len().max(1);
    for step in 0..steps {
        let start = (step * batch) % n;
        let pairs: Vec<(&[usize], &[f32])> = (0..batch)
            .map(|i| (start + i) % n)
            .map(|i| (task.train.tokens[i].as_slice(), task.train.targets[i].as_slice()))
            .collect();
        let (l, _) = trainer.step(runner, peft, &pairs)?;
        progress(step, l);
    }
    Ok(())
}

/// A frozen model with its teacher-labelled task, ready for `peft
/// finetune`.
pub fn setup<B: Backend<f32, Error = Error> + Copy>(
    model: &TinyModel,
    hidden_rank: usize,
    backend: B,
    seed: u64,
) -> Result<Task> {
    let teacher = model.with_hidden_change(hidden_rank, 0.15, seed ^ 0x5eed);
    let mut r = Runner::new(&teacher, backend)?;
    Task::new(&mut r, 256, 64, seed ^ 0xda7a)
}
