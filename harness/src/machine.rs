//! A machine: one loaded image, the kernel model reset for it, and the I/O manager's part
//! (a `DRIVER_OBJECT`, a registry path, `DriverEntry` and `DriverUnload` at
//! `PASSIVE_LEVEL`).
//!
//! Everything that runs driver code runs on a thread of its own ([`Machine::spawn`]): a
//! bugcheck halts that thread for good, and the caller gets [`Stop::Bugcheck`] instead of
//! hanging; a call that does not come back in time is [`Stop::Hang`].

use std::sync::mpsc;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::kernel::{self, Bugcheck};
use crate::loader::{self, LoadError, LoadedImage};

/// Offset of `DriverUnload` in the x64 `DRIVER_OBJECT`.
pub const DRIVER_UNLOAD_OFFSET: usize = 0x68;
/// Size of the x64 `DRIVER_OBJECT`.
pub const DRIVER_OBJECT_SIZE: usize = 0x150;
/// `IO_TYPE_DRIVER`.
const IO_TYPE_DRIVER: u16 = 4;

/// Why a call into the driver did not return a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The machine bugchecked.
    Bugcheck(Bugcheck),
    /// The call did not return within the timeout.
    Hang {
        /// What was called.
        what: String,
        /// How long the harness waited.
        waited: Duration,
    },
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Bugcheck(b) => write!(f, "{b}"),
            Stop::Hang { what, waited } => write!(f, "{what} did not return in {waited:?}"),
        }
    }
}

impl std::error::Error for Stop {}

/// Only one machine at a time: the kernel model is global, like a kernel. `true` while an
/// [`Exclusive`] exists.
static ONE_MACHINE: Mutex<bool> = Mutex::new(false);
static ONE_MACHINE_FREED: Condvar = Condvar::new();

/// The right to use the kernel model alone: at most one exists in the process. A
/// [`Machine`] holds one; [`Exclusive::bare_kernel`] gives one without an image, for tests
/// that call the model's exports from Rust (the netio contract suite). Unlike a mutex
/// guard it may be dropped on another thread (a port source that owns it must be `Send`).
#[must_use = "the kernel model is released when this drops"]
pub struct Exclusive(());

impl Exclusive {
    /// Waits until no other [`Exclusive`] exists, then takes it.
    fn acquire() -> Exclusive {
        let mut taken = ONE_MACHINE.lock().unwrap_or_else(PoisonError::into_inner);
        while *taken {
            taken = ONE_MACHINE_FREED
                .wait(taken)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *taken = true;
        Exclusive(())
    }

    /// Takes the kernel model alone and resets it with no image mapped: empty pool, no
    /// registrations, client stopped, every netio knob at its default.
    pub fn bare_kernel() -> Exclusive {
        let one = Exclusive::acquire();
        kernel::reset((0, 0), false);
        one
    }
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        *ONE_MACHINE.lock().unwrap_or_else(PoisonError::into_inner) = false;
        ONE_MACHINE_FREED.notify_one();
    }
}

/// `UNICODE_STRING`.
#[repr(C)]
struct UnicodeString {
    length: u16,
    maximum_length: u16,
    buffer: *const u16,
}

/// A booted machine with the driver image mapped (not yet started).
pub struct Machine {
    image: LoadedImage,
    driver_object: Box<[u64; DRIVER_OBJECT_SIZE / 8]>,
    registry_path: Box<UnicodeString>,
    _registry_path_buffer: Vec<u16>,
    exports: Vec<(String, usize)>,
    timeout: Duration,
    _one: Exclusive,
}

impl Drop for Machine {
    /// Waits (at most the machine's timeout) for the work items the driver still has queued
    /// or running: their routines run in the image, which is unmapped next, and they must
    /// not reach the model of the machine booted after this one.
    fn drop(&mut self) {
        let start = Instant::now();
        while kernel::work_items_outstanding() != 0
            && kernel::stopped().is_none()
            && start.elapsed() < self.timeout
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A call into the driver running on its own thread.
pub struct Cpu<T> {
    what: String,
    receiver: mpsc::Receiver<T>,
}

impl Machine {
    /// Resets the kernel model and maps `sys` at a base of the host's choosing.
    ///
    /// `echo` prints the debugger output as it happens (the main job).
    ///
    /// # Errors
    ///
    /// The loader's error, for instance every unresolved import with its module.
    pub fn boot(sys: &[u8], echo: bool) -> Result<Machine, LoadError> {
        let one = Exclusive::acquire();
        kernel::reset((0, 0), echo);
        let image = loader::load(sys, &kernel::resolve)?;
        let exports = goblin::pe::PE::parse(sys)
            .map(|pe| {
                pe.exports
                    .iter()
                    .filter_map(|e| Some((e.name?.to_owned(), e.rva)))
                    .collect()
            })
            .unwrap_or_default();
        kernel::reset((image.base(), image.size()), echo);
        #[cfg(target_os = "linux")]
        kernel::trap::watch_code(0, image.base(), image.size());
        let buffer: Vec<u16> =
            "\\Registry\\Machine\\System\\CurrentControlSet\\Services\\teredo_monitor"
                .encode_utf16()
                .collect();
        let bytes = u16::try_from(buffer.len() * 2).unwrap_or(u16::MAX);
        let registry_path = Box::new(UnicodeString {
            length: bytes,
            maximum_length: bytes,
            buffer: buffer.as_ptr(),
        });
        let mut driver_object = Box::new([0u64; DRIVER_OBJECT_SIZE / 8]);
        // Type, Size; DriverStart (0x18), DriverSize (0x20), DriverInit (0x58).
        driver_object[0] = u64::from(IO_TYPE_DRIVER) | ((DRIVER_OBJECT_SIZE as u64) << 16);
        driver_object[0x18 / 8] = image.base() as u64;
        driver_object[0x20 / 8] = image.size() as u64;
        driver_object[0x58 / 8] = image.entry() as u64;
        kernel::set_driver_object(driver_object.as_ptr().expose_provenance());
        Ok(Machine {
            image,
            driver_object,
            registry_path,
            _registry_path_buffer: buffer,
            exports,
            timeout: Duration::from_secs(20),
            _one: one,
        })
    }

    /// The mapped image.
    #[must_use]
    pub fn image(&self) -> &LoadedImage {
        &self.image
    }

    /// Runs `f` on a new thread at `irql` (a "processor" of the machine). A call that
    /// returns at another IRQL stops the machine (`IRQL_UNEXPECTED_VALUE`).
    ///
    /// # Panics
    ///
    /// If the host cannot create a thread.
    pub fn spawn<T: Send + 'static>(
        &self,
        what: &str,
        irql: u8,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Cpu<T> {
        let (sender, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name(what.to_owned())
            .spawn(move || {
                kernel::set_irql(irql);
                let value = f();
                let after = kernel::current_irql();
                if after != irql {
                    kernel::bugcheck(
                        kernel::IRQL_UNEXPECTED_VALUE,
                        [usize::from(after), usize::from(irql), 0, 0],
                        format!("a call returned at IRQL {after}, entered at {irql}"),
                    );
                }
                let _ = sender.send(value);
            })
            .expect("spawn a harness thread");
        Cpu {
            what: what.to_owned(),
            receiver,
        }
    }

    /// Waits for a call started with [`spawn`](Self::spawn).
    ///
    /// # Errors
    ///
    /// [`Stop::Bugcheck`] when the machine stopped, [`Stop::Hang`] after the timeout.
    pub fn join<T>(&self, cpu: Cpu<T>) -> Result<T, Stop> {
        let start = Instant::now();
        loop {
            match cpu.receiver.recv_timeout(Duration::from_millis(10)) {
                Ok(value) => return Ok(value),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // The thread ended without a value: a panic of the model itself.
                    return Err(Stop::Hang {
                        what: format!("{} (harness thread panicked)", cpu.what),
                        waited: start.elapsed(),
                    });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if let Some(stop) = kernel::stopped() {
                return Err(Stop::Bugcheck(stop));
            }
            if start.elapsed() > self.timeout {
                return Err(Stop::Hang {
                    what: cpu.what,
                    waited: start.elapsed(),
                });
            }
        }
    }

    /// [`spawn`](Self::spawn) then [`join`](Self::join).
    ///
    /// # Errors
    ///
    /// As [`join`](Self::join).
    pub fn on_cpu<T: Send + 'static>(
        &self,
        what: &str,
        irql: u8,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Stop> {
        let cpu = self.spawn(what, irql, f);
        self.join(cpu)
    }

    /// The address of the machine's `DRIVER_OBJECT` (what `DriverEntry` receives).
    #[must_use]
    pub fn driver_object_address(&self) -> usize {
        self.driver_object.as_ptr().expose_provenance()
    }

    /// Calls `DriverEntry(DriverObject, RegistryPath)` at `PASSIVE_LEVEL`.
    ///
    /// # Errors
    ///
    /// See [`Stop`].
    pub fn driver_entry(&self) -> Result<i32, Stop> {
        self.driver_entry_at(kernel::PASSIVE_LEVEL)
    }

    /// Calls `DriverEntry` at `irql` (anything but `PASSIVE_LEVEL` breaks the I/O
    /// manager's contract: for the IRQL violation scenario), then discards the image's
    /// `INIT*` sections ([`LoadedImage::discard_init`](crate::loader::LoadedImage::discard_init)).
    ///
    /// # Errors
    ///
    /// See [`Stop`].
    pub fn driver_entry_at(&self, irql: u8) -> Result<i32, Stop> {
        let entry = self.image.entry();
        // The I/O manager calls the PE entry point; an export named `DriverEntry` elsewhere is
        // legitimate (a WDK build enters at `GsDriverEntry`, which calls it) but worth a line.
        if let Some(export) = self
            .image
            .driver_entry_export()
            .filter(|rva| *rva != self.image.entry_rva())
        {
            kernel::note(&format!(
                "the export DriverEntry (RVA {export:#x}) is not the PE entry point (RVA {:#x}): \
                 calling the entry point, as Windows does",
                self.image.entry_rva()
            ));
        }
        let driver_object = self.driver_object_address();
        let registry_path =
            std::ptr::from_ref::<UnicodeString>(&self.registry_path).expose_provenance();
        let status =
            self.on_cpu("DriverEntry", irql, move || {
                // SAFETY: `entry` is the image's entry point (`AddressOfEntryPoint`), a
                // `DRIVER_INITIALIZE` routine, an NTAPI function
                // (`extern "system"`, the Windows x64 convention) of the mapped, relocated and
                // bound image; the driver object and the registry path live in the machine,
                // which outlives this call (the machine joins it or stops).
                let entry = unsafe {
                    std::mem::transmute::<
                        usize,
                        extern "win64" fn(*mut u8, *const UnicodeString) -> i32,
                    >(entry)
                };
                entry(
                    core::ptr::with_exposed_provenance_mut(driver_object),
                    core::ptr::with_exposed_provenance(registry_path),
                )
            })?;
        // The I/O manager discards INIT sections once DriverEntry has returned.
        self.image.discard_init();
        Ok(status)
    }

    /// `DriverObject->DriverUnload` as `DriverEntry` left it.
    #[must_use]
    pub fn driver_unload_routine(&self) -> Option<usize> {
        match self.driver_object[DRIVER_UNLOAD_OFFSET / 8] {
            0 => None,
            // The routine's address, as the driver stored it.
            address => usize::try_from(address).ok(),
        }
    }

    /// Fault injection: the driver's own `DriverUnload` runs on the thread of its next
    /// notification callback, from inside it (see [`kernel::run_in_next_callback`]).
    /// Returns `false` when `DriverEntry` set no `DriverUnload`.
    #[must_use = "false: nothing was armed"]
    pub fn unload_inside_next_callback(&self) -> bool {
        let Some(unload) = self.driver_unload_routine() else {
            return false;
        };
        kernel::run_in_next_callback(unload, self.driver_object_address());
        true
    }

    /// Calls `DriverUnload` at `PASSIVE_LEVEL` if `DriverEntry` set it, waits for the work
    /// items still queued or running (each keeps the image loaded until its routine
    /// returns), then retires the image (any later call into it faults) unless the driver
    /// still holds a reference to its driver object: then the image stays mapped, as on
    /// Windows, and the debugger output says so ([`kernel::after_driver_unload`],
    /// [`retire_if_unreferenced`](Self::retire_if_unreferenced)). Returns whether a routine
    /// was set.
    ///
    /// # Errors
    ///
    /// See [`Stop`]; [`Stop::Hang`] when work items were still outstanding after the
    /// timeout.
    ///
    /// # Panics
    ///
    /// If the routine the driver stored points outside its image.
    pub fn driver_unload(&self) -> Result<bool, Stop> {
        let Some(unload) = self.driver_unload_routine() else {
            // A driver whose DriverEntry failed (or that set no DriverUnload) is unloaded
            // without a call; a work item it queued still holds the driver object, so the
            // image stays until the routine returns, as after a DriverUnload.
            self.after_unload()?;
            return Ok(false);
        };
        assert!(
            self.image.contains(unload),
            "DriverUnload {unload:#x} points outside the image"
        );
        let driver_object = self.driver_object_address();
        self.on_cpu("DriverUnload", kernel::PASSIVE_LEVEL, move || {
            // SAFETY: `unload` is the `DRIVER_UNLOAD` routine the driver stored in its
            // driver object (checked to lie in the image), an NTAPI function; the driver
            // object outlives the call.
            let unload =
                unsafe { std::mem::transmute::<usize, extern "win64" fn(*mut u8)>(unload) };
            unload(core::ptr::with_exposed_provenance_mut(driver_object));
        })?;
        self.after_unload()?;
        Ok(true)
    }

    /// Waits for the work items still outstanding, then retires the image unless the
    /// driver holds a reference to its driver object.
    fn after_unload(&self) -> Result<(), Stop> {
        match kernel::after_driver_unload(self.timeout) {
            kernel::AfterUnload::Unmap => self.image.retire(),
            kernel::AfterUnload::KeptMapped(_) => {}
            kernel::AfterUnload::WorkItemsOutstanding(count) => {
                return Err(Stop::Hang {
                    what: format!("{count} work item(s) still outstanding after DriverUnload"),
                    waited: self.timeout,
                });
            }
            kernel::AfterUnload::Stopped => {
                return Err(Stop::Bugcheck(
                    kernel::stopped().expect("the model reported a stop"),
                ));
            }
        }
        Ok(())
    }

    /// Retires the image if `DriverUnload` has run and the driver holds no reference to
    /// its driver object any more (the last `ObDereferenceObject` happened); returns
    /// whether the image is retired now. The model never unmaps on its own: the thread that
    /// drops the last reference may still be returning into the image.
    #[must_use = "whether the image is retired"]
    pub fn retire_if_unreferenced(&self) -> bool {
        if !self.image.is_retired()
            && matches!(
                kernel::after_driver_unload(Duration::ZERO),
                kernel::AfterUnload::Unmap
            )
        {
            self.image.retire();
        }
        self.image.is_retired()
    }

    /// The address of an exported function of the image.
    #[must_use]
    pub fn export(&self, name: &str) -> Option<usize> {
        self.exports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, rva)| self.image.base() + rva)
    }

    /// Calls an exported function of the image that takes nothing and returns a `u32`, at
    /// `irql` on a thread of its own.
    ///
    /// # Safety
    ///
    /// The export must be such an NTAPI function, callable at `irql` now.
    ///
    /// # Errors
    ///
    /// See [`Stop`].
    ///
    /// # Panics
    ///
    /// If the image does not export `name`.
    pub unsafe fn call_export_u32(&self, name: &str, irql: u8) -> Result<u32, Stop> {
        let address = self
            .export(name)
            .unwrap_or_else(|| panic!("the image exports no {name}"));
        self.on_cpu(name, irql, move || {
            // SAFETY: the caller guarantees the export has this signature and may be
            // called at `irql` now.
            let f = unsafe { std::mem::transmute::<usize, extern "win64" fn() -> u32>(address) };
            f()
        })
    }
}
