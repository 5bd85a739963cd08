//! The budget of one evaluation: work (steps) and memory (bytes allocated), plus the size caps
//! of single collections and strings.
//!
//! Work and memory are counted where collections and strings come into being rather than in
//! each function: [`Meter::produced`] runs on every collection an expression node returns
//! (see `Ctx::eval`), so a new function is charged for its output without doing anything.
//! What a function does *besides* producing output (comparisons in `distinct()`, keys scanned
//! by navigation, a regex run over a long string) is charged through the helpers here: item
//! comparison has no uncharged entry point (`item_equal` takes the meter's counter).

use std::cell::Cell;

use super::Limits;
use super::error::{Budget, FhirPathError, Result};
use super::value::Item;

/// Bytes of text one step of work stands for when scanning or comparing strings: a byte costs
/// far less than an item visit (an allocation and a few branches).
pub(crate) const BYTES_PER_STEP: usize = 64;

/// The running totals of one evaluation against its [`Limits`].
pub(crate) struct Meter {
    limits: Limits,
    steps: Cell<u64>,
    bytes: Cell<u64>,
}

impl Meter {
    pub fn new(limits: Limits) -> Self {
        Meter {
            limits,
            steps: Cell::new(0),
            bytes: Cell::new(0),
        }
    }

    /// Charge `n` steps and fail once the budget is spent.
    pub fn charge(&self, n: u64) -> Result<()> {
        self.note(n);
        self.check()
    }

    /// Record `n` steps without checking, for code that cannot fail (navigation); its work per
    /// call is bounded by the input, and the caller's next [`Meter::charge`] or
    /// [`Meter::check`] reports the overrun.
    pub fn note(&self, n: u64) {
        self.steps.set(self.steps.get().saturating_add(n));
    }

    /// Fail if the work budget is spent.
    pub fn check(&self) -> Result<()> {
        if self.steps.get() > self.limits.max_steps {
            return Err(exhausted(Budget::Steps, self.limits.max_steps));
        }
        Ok(())
    }

    /// Charge `n` bytes allocated. Allocation is counted cumulatively (nothing is given back
    /// when it is freed), so the total bounds the evaluation's peak memory from above.
    pub fn alloc(&self, n: usize) -> Result<()> {
        let b = self.bytes.get().saturating_add(n as u64);
        self.bytes.set(b);
        if b > self.limits.max_bytes {
            return Err(exhausted(Budget::Bytes, self.limits.max_bytes));
        }
        Ok(())
    }

    /// Charge for a collection an expression produced: a step per item (each was visited or
    /// computed) and the bytes of the vector and of any text the items own. Every node of the
    /// syntax tree passes its result through here.
    pub fn produced(&self, out: &Vec<Item<'_>>) -> Result<()> {
        self.check_len(out.len())?;
        self.charge(out.len() as u64)?;
        let owned: usize = out.iter().map(heap_bytes).sum();
        self.alloc(out.capacity() * size_of::<Item>() + owned)
    }

    /// Charge for scanning `len` bytes of text (regex, search, case mapping...).
    pub fn scan(&self, len: usize) -> Result<()> {
        self.charge(1 + (len / BYTES_PER_STEP) as u64)
    }

    /// Fail if a collection is over the size cap.
    pub fn check_len(&self, n: usize) -> Result<()> {
        if n > self.limits.max_collection {
            return Err(exhausted(
                Budget::CollectionItems,
                self.limits.max_collection as u64,
            ));
        }
        Ok(())
    }

    /// Fail if a string of `n` bytes would be over the size cap (check before building it).
    pub fn check_str(&self, n: usize) -> Result<()> {
        if n > self.limits.max_string {
            return Err(exhausted(
                Budget::StringBytes,
                self.limits.max_string as u64,
            ));
        }
        Ok(())
    }

    /// How many more items a collection of `len` items may take before it is over the cap;
    /// producers that cannot fail stop one past it so their caller reports the overrun.
    pub fn room(&self, len: usize) -> usize {
        self.limits.max_collection.saturating_sub(len) + 1
    }

    /// Steps and bytes charged so far.
    pub fn spent(&self) -> (u64, u64) {
        (self.steps.get(), self.bytes.get())
    }
}

fn exhausted(what: Budget, limit: u64) -> FhirPathError {
    FhirPathError::BudgetExhausted { what, limit }
}

/// Heap bytes an item owns beyond its own size (borrowed nodes own none).
fn heap_bytes(item: &Item) -> usize {
    match item {
        Item::String(s) => s.capacity(),
        Item::Quantity(q) => q.unit.capacity(),
        // Synthesised JSON (`type()`, `resolve()` stand-ins, children of those) is small; a
        // flat estimate keeps this O(1).
        Item::Node(n) if matches!(n.json, super::value::JsonRef::Owned(_)) => 128,
        _ => 0,
    }
}
