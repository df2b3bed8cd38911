//! The driver's one logging facade, without `core::fmt`.
//!
//! `log!(a, b, ...)` renders each argument into one [`Line`] on the stack, in order, and
//! hands the line to the platform's sink ([`crate::platform::log`]): `DbgPrint("%s")` in the
//! driver, standard output or a capture buffer on the host. An argument is anything that is
//! [`LogText`]: string slices, unsigned integers (decimal), and the domain values
//! the driver logs (IRQL, port, exception set, library error, `NTSTATUS`).
//!
//! Why not `format_args!`: `core::fmt` is the largest part of a driver image that uses it
//! (the `Formatter` machinery, padding, `Debug` escaping, the integer tables). The renderers
//! here are a few loops over bytes and digits, so the driver image links no `core::fmt` code
//! at all (PERFORMANCE.md, "`.sys` size"). The text is the same as the library's `Display`
//! impls give for the same values; `crate::tests` compares the two for every value.
//!
//! Neither rendering nor the sinks allocate, so `log!` may be used in callbacks at
//! `DISPATCH_LEVEL`. The driver logic never calls a platform printing function directly.

use teredo_watcher::{
    Error, Irql, IrqlBound, NetioCall, NetioStatus, TeredoExceptions, TeredoPort, UPNP_PORT,
};

/// Logs one line through the platform (see the module documentation): the arguments are
/// [`LogText`] values, rendered in order with nothing between them.
///
/// # IRQL
///
/// `<= DISPATCH_LEVEL` (the driver's sink calls `DbgPrint`, valid up to `DIRQL`).
#[cfg(not(feature = "no-log"))]
macro_rules! log {
    ($($arg:expr),+ $(,)?) => {{
        let mut line = $crate::log::Line::new();
        $( $crate::log::LogText::write_to(&$arg, &mut line); )+
        $crate::platform::log(&line);
    }};
}

/// `no-log`: the arguments are evaluated and nothing is rendered or printed (the image
/// without the driver's own log, for measuring what that log costs).
#[cfg(feature = "no-log")]
macro_rules! log {
    ($($arg:expr),+ $(,)?) => {{
        $( let _ = &$arg; )+
    }};
}

/// Bytes of text one line holds; the rest is cut (at a character boundary).
pub const LINE_CAPACITY: usize = 480;

/// One line of log text on the stack: at most [`LINE_CAPACITY`] bytes of UTF-8 and room
/// for the terminating NUL the kernel sink appends.
///
/// # Invariants
///
/// `bytes[..len]` is valid UTF-8 without NUL bytes (only whole characters of `str`s, with
/// NUL replaced by a space, are appended), `len <= LINE_CAPACITY`, and `bytes[len..]` is
/// all zero (the buffer starts zeroed and text is only ever appended), so `bytes[..=len]`
/// is always a C string.
pub struct Line {
    bytes: [u8; LINE_CAPACITY + 1],
    len: usize,
}

impl Line {
    /// An empty line.
    #[must_use]
    pub const fn new() -> Self {
        // INVARIANT: empty, all zero.
        Line {
            bytes: [0; LINE_CAPACITY + 1],
            len: 0,
        }
    }

    /// Appends `s`, cut at the last character boundary that fits. A NUL would end the C
    /// string early, so it is written as a space.
    ///
    /// None of these methods can panic (a panic on the log path would be a bugcheck): they
    /// reach the buffer through `get`/`get_mut` only.
    pub fn push_str(&mut self, s: &str) -> &mut Self {
        let room = LINE_CAPACITY.saturating_sub(self.len);
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        let text = s.as_bytes().get(..take).unwrap_or_default();
        if let Some(free) = self.bytes.get_mut(self.len..self.len + take) {
            for (slot, &b) in free.iter_mut().zip(text) {
                *slot = if b == 0 { b' ' } else { b };
            }
            // INVARIANT: whole characters only (cut at a boundary), NUL replaced, and
            // `len + take <= LINE_CAPACITY`.
            self.len += take;
        }
        self
    }

    /// Appends `n` in decimal.
    pub fn push_decimal(&mut self, mut n: u64) -> &mut Self {
        // u64::MAX has 20 digits.
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        for slot in digits.iter_mut().rev() {
            // `n % 10 < 10`: the cast cannot truncate.
            #[allow(clippy::cast_possible_truncation, reason = "a digit, < 10")]
            let digit = (n % 10) as u8;
            *slot = b'0' + digit;
            start -= 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push_ascii(digits.get(start..).unwrap_or_default())
    }

    /// Appends `n` as `0x` and eight lowercase hexadecimal digits (C's `%#010x`).
    pub fn push_hex32(&mut self, n: u32) -> &mut Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = *b"0x00000000";
        for (i, slot) in digits.iter_mut().skip(2).enumerate() {
            let nibble = (n >> (28 - 4 * i)) & 0xF;
            *slot = HEX[nibble as usize];
        }
        self.push_ascii(&digits)
    }

    /// Appends ASCII bytes without NUL (digits); cut when full.
    fn push_ascii(&mut self, ascii: &[u8]) -> &mut Self {
        for &b in ascii {
            match self.bytes.get_mut(self.len) {
                Some(slot) if self.len < LINE_CAPACITY => {
                    // INVARIANT: ASCII without NUL is whole UTF-8 characters.
                    *slot = b;
                    self.len += 1;
                }
                _ => break,
            }
        }
        self
    }

    /// The text so far.
    #[must_use]
    pub fn as_str(&self) -> &str {
        // By the type invariant the bytes are UTF-8; the fallback is never taken.
        core::str::from_utf8(self.bytes.get(..self.len).unwrap_or_default()).unwrap_or("")
    }

    /// The text followed by a NUL: a C string for `DbgPrint("%s", ..)`.
    #[must_use]
    pub fn as_c_bytes(&self) -> &[u8] {
        // `len <= LINE_CAPACITY < bytes.len()` and `bytes[len] == 0` (type invariant); the
        // fallback (an empty C string) is never taken.
        self.bytes.get(..=self.len).unwrap_or(&[0])
    }
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

/// Only for a build that chooses to format (the shim's panic message with debug
/// assertions): the driver's own lines never go through `core::fmt`.
impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push_str(s);
        Ok(())
    }
}

/// A value `log!` can render.
pub trait LogText {
    /// Appends this value's text to `line`.
    fn write_to(&self, line: &mut Line);
}

impl<T: LogText + ?Sized> LogText for &T {
    fn write_to(&self, line: &mut Line) {
        (**self).write_to(line);
    }
}

impl LogText for str {
    fn write_to(&self, line: &mut Line) {
        line.push_str(self);
    }
}

macro_rules! decimal {
    ($($t:ty),*) => {$(
        impl LogText for $t {
            fn write_to(&self, line: &mut Line) {
                line.push_decimal(u64::from(*self));
            }
        }
    )*};
}
decimal!(u8, u16, u32, u64);

impl LogText for usize {
    fn write_to(&self, line: &mut Line) {
        // usize is at most 64 bits on every Windows target.
        line.push_decimal(*self as u64);
    }
}

/// As `Irql`'s `Display`: the level's name, else `IRQL n`.
impl LogText for Irql {
    fn write_to(&self, line: &mut Line) {
        match self.raw() {
            0 => line.push_str("PASSIVE_LEVEL"),
            1 => line.push_str("APC_LEVEL"),
            2 => line.push_str("DISPATCH_LEVEL"),
            n => line.push_str("IRQL ").push_decimal(u64::from(n)),
        };
    }
}

/// As `TeredoPort`'s `Display`: `udp/N`.
impl LogText for TeredoPort {
    fn write_to(&self, line: &mut Line) {
        line.push_str("udp/").push_decimal(u64::from(self.get()));
    }
}

/// A port or `none`.
#[derive(Clone, Copy)]
pub struct Port(pub Option<TeredoPort>);

impl LogText for Port {
    fn write_to(&self, line: &mut Line) {
        match self.0 {
            Some(port) => port.write_to(line),
            None => {
                line.push_str("none");
            }
        }
    }
}

/// As `TeredoExceptions`'s `Display`:
/// `dynamic udp/N, static udp/3544 (multicast 224.0.0.253)`, then
/// `, upnp udp/1900 (local subnet)` when the optional UPnP rule is chosen.
impl LogText for TeredoExceptions {
    fn write_to(&self, line: &mut Line) {
        line.push_str("dynamic ");
        Port(self.dynamic_port).write_to(line);
        line.push_str(", static udp/")
            .push_decimal(u64::from(self.static_port))
            .push_str(" (multicast ");
        for (i, octet) in self.multicast_group.octets().iter().enumerate() {
            if i > 0 {
                line.push_str(".");
            }
            line.push_decimal(u64::from(*octet));
        }
        line.push_str(")");
        if self.upnp {
            line.push_str(", upnp udp/")
                .push_decimal(u64::from(UPNP_PORT))
                .push_str(" (local subnet)");
        }
    }
}

/// As `NetioCall`'s `Display`: the routine's name.
impl LogText for NetioCall {
    fn write_to(&self, line: &mut Line) {
        line.push_str(match self {
            NetioCall::NotifyTeredoPortChange => "NotifyTeredoPortChange",
            NetioCall::GetTeredoPort => "GetTeredoPort",
            NetioCall::CancelMibChangeNotify2 => "CancelMibChangeNotify2",
        });
    }
}

/// As `NetioStatus`'s `Display`: `NAME (0x........)` or `status 0x........`.
impl LogText for NetioStatus {
    fn write_to(&self, line: &mut Line) {
        let bits = self.0.cast_unsigned();
        match self.name() {
            Some(name) => line
                .push_str(name)
                .push_str(" (")
                .push_hex32(bits)
                .push_str(")"),
            None => line.push_str("status ").push_hex32(bits),
        };
    }
}

/// As `IrqlBound`'s `Display`.
impl LogText for IrqlBound {
    fn write_to(&self, line: &mut Line) {
        line.push_str(match self {
            IrqlBound::Passive => "== PASSIVE_LEVEL",
            IrqlBound::BelowDispatch => "< DISPATCH_LEVEL",
            IrqlBound::AtMostDispatch => "<= DISPATCH_LEVEL",
        });
    }
}

/// As `Error`'s `Display`, for every variant the library has today; a variant added later
/// (the enum is `#[non_exhaustive]`) is shown by its netio call and status when it has them,
/// else as `teredo-watcher error`.
impl LogText for Error {
    fn write_to(&self, line: &mut Line) {
        let netio = |line: &mut Line, call: &NetioCall, what: &str, status: &NetioStatus| {
            call.write_to(line);
            line.push_str(what);
            status.write_to(line);
        };
        match self {
            Error::InvalidParameter { call, status } => {
                netio(line, call, ": invalid parameter: ", status);
            }
            Error::InvalidHandle { call, status } => {
                netio(line, call, ": invalid handle: ", status);
            }
            Error::OutOfMemory { call, status } => netio(line, call, ": out of memory: ", status),
            Error::TeredoNotStarted { call, status } => {
                netio(line, call, ": the Teredo client is not started: ", status);
            }
            Error::NoIpv6Stack { call, status } => {
                netio(line, call, ": no IPv6 stack is installed: ", status);
            }
            Error::Netio { call, status } => netio(line, call, " failed: ", status),
            Error::IrqlTooHigh {
                operation,
                current,
                required,
            } => {
                line.push_str(operation).push_str(" called at ");
                current.write_to(line);
                line.push_str("; it requires IRQL ");
                required.write_to(line);
            }
            Error::CancelFromCallback => {
                line.push_str(
                    "cannot cancel a Teredo notification from inside its own callback \
                     (CancelMibChangeNotify2 would deadlock)",
                );
            }
            Error::SubscriberTableFull { capacity } => {
                line.push_str("the subscriber table is full (");
                capacity.write_to(line);
                line.push_str(" subscribers)");
            }
            Error::UnknownSubscriber => {
                line.push_str("unknown or already removed subscriber");
            }
            Error::HandleTableFull { capacity } => {
                line.push_str("the handle table is full (");
                capacity.write_to(line);
                line.push_str(" registrations)");
            }
            Error::HandleTableClosed => {
                line.push_str("the handle table has been torn down");
            }
            Error::AllocationFailed { bytes } => {
                line.push_str("allocation of ");
                bytes.write_to(line);
                line.push_str(" bytes failed");
            }
            other => match (other.call(), other.status()) {
                (Some(call), Some(status)) => netio(line, &call, " failed: ", &status),
                _ => {
                    line.push_str("teredo-watcher error");
                }
            },
        }
    }
}
