//! Waiting for interrupts.
//!
//! VFIO delivers each interrupt vector (INTx, an MSI vector or an MSI-X vector) to an
//! eventfd; the fake backend raises its model's interrupts the same way. An [`Interrupt`]
//! owns that eventfd and waits on it: blocking with a timeout, by polling, or
//! asynchronously with the `tokio` feature.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::sys;

/// Which kind of interrupt a device raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IrqMode {
    /// Legacy pin interrupt (shared, level-triggered; VFIO masks it until unmasked).
    Intx,
    /// Message-signalled interrupts.
    Msi,
    /// Extended message-signalled interrupts, one table entry per vector.
    MsiX,
}

impl std::fmt::Display for IrqMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IrqMode::Intx => "INTx",
            IrqMode::Msi => "MSI",
            IrqMode::MsiX => "MSI-X",
        })
    }
}

/// One interrupt vector, delivered to an eventfd.
#[derive(Clone)]
pub struct Interrupt {
    eventfd: Arc<OwnedFd>,
    mode: IrqMode,
    vector: u32,
    unmask: Option<Arc<dyn Fn() -> Result<()> + Send + Sync>>,
    /// Set after a level-triggered delivery; the line is unmasked at the next poll or wait,
    /// after the driver has had the chance to acknowledge the device.
    unmask_pending: Arc<AtomicBool>,
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupt")
            .field("mode", &self.mode)
            .field("vector", &self.vector)
            .finish()
    }
}

impl Interrupt {
    /// A new vector with a fresh eventfd; the backend then tells the kernel or model about it.
    pub fn new(mode: IrqMode, vector: u32) -> Result<Self> {
        Ok(Interrupt {
            eventfd: Arc::new(sys::new_eventfd()?),
            mode,
            vector,
            unmask: None,
            unmask_pending: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Adds what to do after each delivery to let the next one through (INTx needs it).
    ///
    /// The unmask runs when the driver next polls or waits, so a level-triggered line is
    /// unmasked only after the driver has acknowledged the device, not while it is still
    /// asserted (which would deliver the same interrupt twice).
    pub fn with_unmask(mut self, unmask: Arc<dyn Fn() -> Result<()> + Send + Sync>) -> Self {
        self.unmask = Some(unmask);
        self
    }

    /// The interrupt kind.
    pub fn mode(&self) -> IrqMode {
        self.mode
    }

    /// The vector number within its kind.
    pub fn vector(&self) -> u32 {
        self.vector
    }

    /// Takes any pending interrupts without waiting; returns how many arrived (0 if none).
    pub fn poll(&self) -> Result<u64> {
        self.unmask_if_pending()?;
        let count = sys::eventfd_take(self.eventfd.as_fd())?.unwrap_or(0);
        if count > 0 && self.unmask.is_some() {
            self.unmask_pending.store(true, Ordering::Release);
        }
        Ok(count)
    }

    /// Lets the next level-triggered interrupt through now, rather than at the next poll
    /// or wait; call it right after acknowledging the device. A no-op for MSI and MSI-X.
    pub fn unmask_if_pending(&self) -> Result<()> {
        if self.unmask_pending.swap(false, Ordering::AcqRel) {
            if let Some(unmask) = &self.unmask {
                return unmask();
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for the interrupt; returns how many arrived since the last wait.
    pub fn wait(&self, timeout: Duration) -> Result<u64> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let count = self.poll()?;
            if count > 0 {
                return Ok(count);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || !sys::wait_readable(self.eventfd.as_fd(), left)? {
                return Err(Error::Timeout {
                    what: format!("{} interrupt vector {}", self.mode, self.vector),
                    timeout,
                });
            }
        }
    }

    /// Raises the interrupt by hand (what the kernel or the fake model does on delivery).
    pub fn trigger(&self) -> Result<()> {
        sys::eventfd_signal(self.eventfd.as_fd())
    }

    /// Waits for the interrupt without blocking the thread; returns how many arrived.
    #[cfg(feature = "tokio")]
    pub async fn wait_async(&self, timeout: Duration) -> Result<u64> {
        use tokio::io::unix::AsyncFd;
        use tokio::io::Interest;

        let borrowed = BorrowedEventfd(self.eventfd.clone());
        // SAFETY: `borrowed` holds an Arc of the OwnedFd, so the descriptor stays open and
        // names the same eventfd for the whole life of the AsyncFd.
        let async_fd = unsafe { AsyncFd::register_with_interest(borrowed, Interest::READABLE) }
            .map_err(|e| Error::io("registering an eventfd with tokio", e.into_parts().1))?;
        let wait = async {
            loop {
                let mut guard = async_fd
                    .readable()
                    .await
                    .map_err(|e| Error::io("waiting on an eventfd", e))?;
                let count = self.poll()?;
                if count > 0 {
                    return Ok(count);
                }
                guard.clear_ready();
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("{} interrupt vector {}", self.mode, self.vector),
                timeout,
            })?
    }
}

impl AsFd for Interrupt {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.eventfd.as_fd()
    }
}

#[cfg(feature = "tokio")]
struct BorrowedEventfd(Arc<OwnedFd>);

#[cfg(feature = "tokio")]
impl std::os::fd::AsRawFd for BorrowedEventfd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_times_out_then_sees_a_trigger_from_another_thread() {
        let irq = Interrupt::new(IrqMode::Msi, 0).unwrap();
        let err = irq.wait(Duration::from_millis(20)).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        let remote = irq.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            remote.trigger().unwrap();
            remote.trigger().unwrap();
        });
        t.join().unwrap();
        assert_eq!(irq.wait(Duration::from_secs(5)).unwrap(), 2);
        assert_eq!(irq.poll().unwrap(), 0, "the count was consumed");
    }

    #[test]
    fn unmask_runs_after_the_driver_had_its_turn() {
        let count = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = count.clone();
        let irq = Interrupt::new(IrqMode::Intx, 0)
            .unwrap()
            .with_unmask(Arc::new(move || {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }));
        irq.trigger().unwrap();
        irq.wait(Duration::from_secs(1)).unwrap();
        assert_eq!(
            count.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "still masked while the driver acknowledges"
        );
        assert_eq!(irq.poll().unwrap(), 0);
        assert_eq!(
            count.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "unmasked at the next poll"
        );
        irq.unmask_if_pending().unwrap();
        assert_eq!(
            count.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "only once per delivery"
        );
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn async_wait_sees_a_trigger() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let irq = Interrupt::new(IrqMode::MsiX, 3).unwrap();
        rt.block_on(async {
            assert!(irq.wait_async(Duration::from_millis(10)).await.is_err());
            irq.trigger().unwrap();
            assert_eq!(irq.wait_async(Duration::from_secs(1)).await.unwrap(), 1);
        });
    }
}
