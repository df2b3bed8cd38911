//! Interrupt request levels.
//!
//! Every kernel-facing entry point of this crate checks the current IRQL against the level
//! its documentation names. A violation is reported through [`Kernel::irql_violation`]
//! (a debug assertion in a kernel build) and returned as [`Error::IrqlTooHigh`] in release
//! builds, so a misplaced call never becomes a bugcheck.
//!
//! [`Kernel::irql_violation`]: crate::Kernel::irql_violation
//! [`Error::IrqlTooHigh`]: crate::Error::IrqlTooHigh

use core::fmt;

use crate::{Error, Kernel};

/// An interrupt request level (`KIRQL`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Irql(u8);

impl Irql {
    /// `PASSIVE_LEVEL` (0): ordinary thread context; paged memory and waits allowed.
    pub const PASSIVE_LEVEL: Irql = Irql(0);
    /// `APC_LEVEL` (1): APCs masked; still preemptible, waits allowed.
    pub const APC_LEVEL: Irql = Irql(1);
    /// `DISPATCH_LEVEL` (2): scheduler masked; no waits, no paged memory. Spin locks run here.
    pub const DISPATCH_LEVEL: Irql = Irql(2);
    /// `HIGH_LEVEL` (15 on x64): everything masked.
    pub const HIGH_LEVEL: Irql = Irql(15);

    /// Wraps a raw `KIRQL`.
    #[must_use]
    pub const fn from_raw(raw: u8) -> Self {
        Irql(raw)
    }

    /// The raw `KIRQL` value.
    #[must_use]
    pub const fn raw(self) -> u8 {
        self.0
    }
}

impl fmt::Debug for Irql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Irql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("PASSIVE_LEVEL"),
            1 => f.write_str("APC_LEVEL"),
            2 => f.write_str("DISPATCH_LEVEL"),
            n => write!(f, "IRQL {n}"),
        }
    }
}

/// The IRQL bound an operation documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqlBound {
    /// Exactly `PASSIVE_LEVEL`.
    Passive,
    /// Strictly below `DISPATCH_LEVEL` (`PASSIVE_LEVEL` or `APC_LEVEL`).
    BelowDispatch,
    /// At most `DISPATCH_LEVEL`.
    AtMostDispatch,
}

impl IrqlBound {
    /// Whether `irql` satisfies the bound.
    #[must_use]
    pub const fn allows(self, irql: Irql) -> bool {
        match self {
            IrqlBound::Passive => irql.0 == 0,
            IrqlBound::BelowDispatch => irql.0 < 2,
            IrqlBound::AtMostDispatch => irql.0 <= 2,
        }
    }
}

impl fmt::Display for IrqlBound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IrqlBound::Passive => "== PASSIVE_LEVEL",
            IrqlBound::BelowDispatch => "< DISPATCH_LEVEL",
            IrqlBound::AtMostDispatch => "<= DISPATCH_LEVEL",
        })
    }
}

/// Checks the current IRQL for `operation`; reports and returns an error on a violation.
pub(crate) fn check<K: Kernel>(operation: &'static str, bound: IrqlBound) -> Result<(), Error> {
    let current = K::current_irql();
    if bound.allows(current) {
        Ok(())
    } else {
        K::irql_violation(operation, current, bound);
        Err(Error::IrqlTooHigh {
            operation,
            current,
            required: bound,
        })
    }
}
