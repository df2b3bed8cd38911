//! The driver's one logging facade.
//!
//! `log!(...)` formats like `format_args!` and hands the line to the platform's `log`
//! function ([`crate::platform::log`]): `DbgPrint` in the driver, standard output on the host.
//! Neither allocates, so `log!` may be used in callbacks at `DISPATCH_LEVEL`. The driver
//! logic never calls a platform printing function directly.

/// Logs one line through the platform (see the module documentation).
///
/// # IRQL
///
/// `<= DISPATCH_LEVEL` (the driver binding calls `DbgPrint`, valid up to `DIRQL`).
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::platform::log(::core::format_args!($($arg)*))
    };
}
