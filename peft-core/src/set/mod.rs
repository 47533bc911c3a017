//! Several LoRA adapters over one frozen base: named, switched on and off,
//! scaled, swapped, and routed per sequence.
//!
//! ```text
//! y = x W^T + b + sum over active adapters i of  m_i s_i (x A_i^T) B_i^T
//! ```
//!
//! `m_i` is the adapter's multiplier (llama.cpp's `--lora-scaled`; 1 by
//! default) and `s_i` its own scale. Several active adapters add their
//! deltas, as PEFT does when several adapters are active; none active is
//! the plain base (PEFT's `disable_adapter`). The base is not part of the
//! set: like every adapter of this crate, the passes take it as a read-only
//! [`FrozenLinear`](crate::base::FrozenLinear), so a base in flash (or
//! shared by threads) serves any number of sets.
//!
//! Two storages, one type ([`AdapterSet`], generic over a [`SlotStore`]):
//!
//! * [`FixedSet`]: `N` slots in an array, no heap (firmware). Inserting
//!   into a full set is refused and gives the adapter back, as heapless's
//!   `push` does.
//! * `VecSet` (feature `alloc`): as many slots as inserted.
//!
//! AdapterSlot indices are stable: removing an adapter frees its slot and leaves
//! the others where they are, so an index taken from
//! [`index_of`](AdapterSet::index_of) stays valid (and a route of a
//! [mixed batch](AdapterSet::forward_mixed) can name an adapter without a string lookup per
//! sequence).
//!
//! **Hot swap.** [`replace`](AdapterSet::replace) puts new tensors in a
//! slot (same shapes and name, flags kept) and gives the old adapter back;
//! [`lora_mut`](AdapterSet::lora_mut) overwrites them in place. Both need
//! `&mut` to the set and nothing of the base, so threads that read the
//! base (through this or any other set) run on while a set changes. Behind
//! a lock, a reader sees the old adapter or the new one, never a mix
//! (`peft-faer`'s `tests/sets.rs`).
//!
//! The passes ([`forward`](AdapterSet::forward),
//! [`backward`](AdapterSet::backward), and the mixed-batch ones in
//! [`AdapterSet::forward_mixed`]) add each adapter in slot order.
//!
//! ## The set's forward and backward over its active adapters
//!
//! ```text
//! y   = x W^T + b + sum_i m_i s_i (x A_i^T) B_i^T
//! dA_i += m_i s_i (G B_i)^T x        dB_i += m_i s_i G^T (x A_i^T)
//! dx  = G W + sum_i m_i s_i (G B_i) A_i
//! ```
//!
//! (sums over the active adapters `i`, in slot order; each term is LoRA's
//! own pass at scale `m_i s_i`, see [`crate::lora`]).
//!
//! ## Mixed-adapter batches: each sequence of a batch names its adapter (or
//!
//! the base alone), as PEFT's `adapter_names=` per sample, LoRAX, or
//! llama.cpp's per-request adapters.
//!
//! The rows of `x` are the sequences one after another; [`Route`]s give
//! each sequence's row count and adapter (a slot index of the set). The
//! base product runs once for the whole batch; each adapter's low-rank path
//! runs on its own rows only:
//!
//! ```text
//! y            = x W^T + b                              (one gemm, all rows)
//! y[rows_j]   += m_i s_i (x[rows_j] A_i^T) B_i^T         (route j uses adapter i)
//! dx           = G W                                     (one gemm, all rows)
//! dx[rows_j]  += m_i s_i (G[rows_j] B_i) A_i
//! dA_i        += m_i s_i (G[rows_j] B_i)^T x[rows_j]     (summed over i's routes)
//! dB_i        += m_i s_i G[rows_j]^T (x[rows_j] A_i^T)
//! ```
//!
//! So every row equals that adapter's own forward on that row (a
//! `peft-verify` property), whatever the mix. A route names its adapter
//! explicitly: the set's active flags do not apply here, the multipliers
//! do.

mod mixed;
mod pass;

use core::marker::PhantomData;

use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len};
use crate::lora::Lora;

pub use mixed::Route;

/// One adapter of a set: its name, tensors, whether it is active, and its
/// multiplier.
#[derive(Clone, Debug)]
pub struct AdapterSlot<K, E, S> {
    name: K,
    lora: Lora<E, S>,
    active: bool,
    multiplier: f64,
}

impl<K, E, S> AdapterSlot<K, E, S> {
    /// The adapter's name.
    pub fn name(&self) -> &K {
        &self.name
    }

    /// The adapter.
    pub fn lora(&self) -> &Lora<E, S> {
        &self.lora
    }

    /// Whether [`AdapterSet::forward`] applies it.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Its multiplier `m` (the delta is `m s B A`).
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }
}

/// Where a set keeps its slots: `[Option<T>; N]` (fixed, no heap) or, with
/// feature `alloc`, `Vec<Option<T>>`.
pub trait SlotStore<T> {
    /// The slots, `None` where free.
    fn slots(&self) -> &[Option<T>];
    /// The slots, mutably.
    fn slots_mut(&mut self) -> &mut [Option<T>];
    /// The index of a free slot (a `Vec` grows one), or `None` when full.
    fn free_slot(&mut self) -> Option<usize>;
    /// The most slots it can hold (`usize::MAX` for a `Vec`).
    fn capacity(&self) -> usize;
}

impl<T, const N: usize> SlotStore<T> for [Option<T>; N] {
    fn slots(&self) -> &[Option<T>] {
        self
    }

    fn slots_mut(&mut self) -> &mut [Option<T>] {
        self
    }

    fn free_slot(&mut self) -> Option<usize> {
        self.iter().position(Option::is_none)
    }

    fn capacity(&self) -> usize {
        N
    }
}

#[cfg(feature = "alloc")]
impl<T> SlotStore<T> for alloc::vec::Vec<Option<T>> {
    fn slots(&self) -> &[Option<T>] {
        self
    }

    fn slots_mut(&mut self) -> &mut [Option<T>] {
        self
    }

    fn free_slot(&mut self) -> Option<usize> {
        Some(self.iter().position(Option::is_none).unwrap_or_else(|| {
            self.push(None);
            self.len() - 1
        }))
    }

    fn capacity(&self) -> usize {
        usize::MAX
    }
}

/// `K`, `E` and `S` as type tags only (so `Send`/`Sync` follow the store).
type Tags<K, E, S> = PhantomData<fn() -> (K, E, S)>;

/// A set of LoRA adapters for one `in -> out` base layer (see the
/// [module docs](self)).
///
/// `K` is the name type (`&'static str` on firmware, `String` with a heap),
/// `E` the element type, `S` the adapters' storage (as [`Lora`]'s), `C`
/// the slot store. `Send` and `Sync` follow `C`.
#[derive(Clone, Debug)]
pub struct AdapterSet<K, E, S, C> {
    store: C,
    in_features: usize,
    out_features: usize,
    _types: Tags<K, E, S>,
}

/// A set of at most `N` adapters in an array: no heap.
pub type FixedSet<K, E, S, const N: usize> = AdapterSet<K, E, S, [Option<AdapterSlot<K, E, S>>; N]>;

/// A set of any number of adapters, in a `Vec` (feature `alloc`).
#[cfg(feature = "alloc")]
pub type VecSet<K, E, S> = AdapterSet<K, E, S, alloc::vec::Vec<Option<AdapterSlot<K, E, S>>>>;

impl<K, E, S, const N: usize> AdapterSet<K, E, S, [Option<AdapterSlot<K, E, S>>; N]> {
    /// An empty set of capacity `N` for a base `in_features -> out_features`.
    pub fn new(in_features: usize, out_features: usize) -> Self {
        Self { store: core::array::from_fn(|_| None), in_features, out_features, _types: PhantomData }
    }
}

#[cfg(feature = "alloc")]
impl<K, E, S> AdapterSet<K, E, S, alloc::vec::Vec<Option<AdapterSlot<K, E, S>>>> {
    /// An empty set for a base `in_features -> out_features`.
    pub fn new(in_features: usize, out_features: usize) -> Self {
        Self { store: alloc::vec::Vec::new(), in_features, out_features, _types: PhantomData }
    }
}

/// An insert or replace that was refused: why, and the adapter given back
/// (nothing is lost, as with heapless's `push`).
#[derive(Debug)]
pub struct Refused<K, E, S> {
    /// Why.
    pub error: Error,
    /// The name given.
    pub name: K,
    /// The adapter given.
    pub lora: Lora<E, S>,
}

impl<K: AsRef<str>, E: Element, S: AsRef<[E]>, C: SlotStore<AdapterSlot<K, E, S>>> AdapterSet<K, E, S, C> {
    /// Input features of the base.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output features of the base.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Adapters held.
    pub fn len(&self) -> usize {
        self.store.slots().iter().flatten().count()
    }

    /// Whether it holds no adapter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of slots (free or not); slot indices are below it.
    pub fn slot_count(&self) -> usize {
        self.store.slots().len()
    }

    /// The most adapters it can hold.
    pub fn capacity(&self) -> usize {
        self.store.capacity()
    }

    /// The slot index of adapter `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.store.slots().iter().position(|s| s.as_ref().is_some_and(|s| s.name.as_ref() == name))
    }

    /// The slot at `index`, if it holds an adapter.
    pub fn slot(&self, index: usize) -> Option<&AdapterSlot<K, E, S>> {
        self.store.slots().get(index)?.as_ref()
    }

    /// The adapter named `name`.
    pub fn get(&self, name: &str) -> Option<&AdapterSlot<K, E, S>> {
        self.slot(self.index_of(name)?)
    }

    /// The held adapters with their slot indices, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &AdapterSlot<K, E, S>)> + '_ {
        self.store.slots().iter().enumerate().filter_map(|(i, s)| Some((i, s.as_ref()?)))
    }

    /// Adds adapter `name` in a free slot, inactive, with multiplier 1, and
    /// returns its slot index.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`) for an adapter of another
    /// `in -> out`, [`Error::DuplicateAdapter`], [`Error::SetFull`]; the
    /// set is unchanged and the adapter is given back in [`Refused`].
    #[allow(clippy::result_large_err)] // the adapter is given back, not boxed: no heap here
    pub fn insert(&mut self, name: K, lora: Lora<E, S>) -> core::result::Result<usize, Refused<K, E, S>> {
        let check = self.check_shape(&lora).and_then(|()| match self.index_of(name.as_ref()) {
            Some(_) => Err(Error::DuplicateAdapter),
            None => Ok(()),
        });
        if let Err(error) = check {
            return Err(Refused { error, name, lora });
        }
        let capacity = self.store.capacity();
        let Some(i) = self.store.free_slot() else {
            return Err(Refused { error: Error::SetFull { capacity }, name, lora });
        };
        match self.store.slots_mut().get_mut(i) {
            Some(slot) => {
                *slot = Some(AdapterSlot { name, lora, active: false, multiplier: 1.0 });
                Ok(i)
            }
            None => Err(Refused { error: Error::SetFull { capacity }, name, lora }),
        }
    }

    /// Removes adapter `name` and gives back its name and tensors; its slot
    /// becomes free, the other indices do not change.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`].
    pub fn remove(&mut self, name: &str) -> Result<(K, Lora<E, S>)> {
        let i = self.index_of(name).ok_or(Error::UnknownAdapter)?;
        let slot = self.store.slots_mut().get_mut(i).and_then(Option::take).ok_or(Error::UnknownAdapter)?;
        Ok((slot.name, slot.lora))
    }

    /// Hot swap: puts `lora` in the place of adapter `name` (same slot,
    /// activity and multiplier) and gives the old adapter back.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`], [`Error::ShapeMismatch`] (`Weight`); the
    /// set is unchanged and `lora` is given back in [`Refused`] (with an
    /// empty name: the set keeps its own).
    #[allow(clippy::result_large_err)] // the adapter is given back, not boxed: no heap here
    pub fn replace(&mut self, name: &str, lora: Lora<E, S>) -> core::result::Result<Lora<E, S>, Refused<(), E, S>> {
        let found = self.index_of(name).ok_or(Error::UnknownAdapter);
        let i = match found.and_then(|i| self.check_shape(&lora).map(|()| i)) {
            Ok(i) => i,
            Err(error) => return Err(Refused { error, name: (), lora }),
        };
        match self.store.slots_mut().get_mut(i).and_then(Option::as_mut) {
            Some(slot) => Ok(core::mem::replace(&mut slot.lora, lora)),
            None => Err(Refused { error: Error::UnknownAdapter, name: (), lora }),
        }
    }

    /// Makes adapter `name` active: [`forward`](Self::forward) adds its
    /// delta.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`].
    pub fn activate(&mut self, name: &str) -> Result<()> {
        self.slot_mut(name)?.active = true;
        Ok(())
    }

    /// Makes adapter `name` inactive.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`].
    pub fn deactivate(&mut self, name: &str) -> Result<()> {
        self.slot_mut(name)?.active = false;
        Ok(())
    }

    /// Makes only adapter `name` active (PEFT's `set_adapter`).
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`], and then nothing changed.
    pub fn activate_only(&mut self, name: &str) -> Result<()> {
        let i = self.index_of(name).ok_or(Error::UnknownAdapter)?;
        for (j, slot) in self.store.slots_mut().iter_mut().enumerate() {
            if let Some(slot) = slot {
                slot.active = j == i;
            }
        }
        Ok(())
    }

    /// Deactivates every adapter: the set's forward is the plain base's.
    pub fn deactivate_all(&mut self) {
        self.store.slots_mut().iter_mut().flatten().for_each(|s| s.active = false);
    }

    /// Sets adapter `name`'s multiplier `m`: its delta becomes `m s B A`
    /// (`0` silences it, negative values subtract it).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a non-finite `m`,
    /// [`Error::UnknownAdapter`].
    pub fn set_multiplier(&mut self, name: &str, multiplier: f64) -> Result<()> {
        if !multiplier.is_finite() {
            return Err(Error::InvalidParameter { name: "multiplier", rule: "must be finite" });
        }
        self.slot_mut(name)?.multiplier = multiplier;
        Ok(())
    }

    /// The highest rank among active adapters (0 when none is).
    pub fn max_active_rank(&self) -> usize {
        self.iter().filter(|(_, s)| s.active).map(|(_, s)| s.lora.rank()).max().unwrap_or(0)
    }

    /// Scratch [`forward`](Self::forward) needs: `tokens * r_max` over the
    /// active adapters (saturating).
    pub fn forward_scratch_len(&self, tokens: usize) -> usize {
        crate::lora::forward_scratch_len(tokens, self.max_active_rank())
    }

    /// Scratch [`backward`](Self::backward) needs: `2 * tokens * r_max`
    /// over the active adapters (saturating).
    pub fn backward_scratch_len(&self, tokens: usize) -> usize {
        crate::lora::backward_scratch_len(tokens, self.max_active_rank())
    }

    fn slot_mut(&mut self, name: &str) -> Result<&mut AdapterSlot<K, E, S>> {
        let i = self.index_of(name).ok_or(Error::UnknownAdapter)?;
        self.store.slots_mut().get_mut(i).and_then(Option::as_mut).ok_or(Error::UnknownAdapter)
    }

    fn check_shape(&self, lora: &Lora<E, S>) -> Result<()> {
        check_len(Operand::Weight, self.in_features, lora.in_features())?;
        check_len(Operand::Weight, self.out_features, lora.out_features())
    }
}

impl<K: AsRef<str>, E: Element, S: AsRef<[E]> + AsMut<[E]>, C: SlotStore<AdapterSlot<K, E, S>>> AdapterSet<K, E, S, C> {
    /// Adapter `name`, mutably: to train it, or to overwrite its tensors
    /// in place (through [`Lora::adapter_mut`]).
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`].
    pub fn lora_mut(&mut self, name: &str) -> Result<&mut Lora<E, S>> {
        Ok(&mut self.slot_mut(name)?.lora)
    }
}

#[cfg(test)]
mod tests;
