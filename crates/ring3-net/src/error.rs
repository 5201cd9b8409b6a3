//! Errors of the network drivers.

/// What went wrong in a network driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The platform (VFIO, DMA, interrupts) failed.
    #[error(transparent)]
    Platform(#[from] ring3::Error),
    /// The device is not what the driver drives, or lacks a feature it needs.
    #[error("{address}: {what}")]
    Unsupported {
        /// The device.
        address: String,
        /// What is missing.
        what: String,
    },
    /// The device wrote something that breaks the rules (an index out of range, a length
    /// beyond the buffer, a descriptor that was never posted). The queue is unusable
    /// until the device is reset.
    #[error("{address}: the device misbehaved: {what}")]
    Misbehaved {
        /// The device.
        address: String,
        /// What it did, with the values.
        what: String,
    },
    /// The device did not do something in time.
    #[error("{address}: timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// The device.
        address: String,
        /// What was awaited.
        what: String,
        /// How long.
        waited: std::time::Duration,
    },
    /// A caller error (a queue taken twice, a frame larger than the buffer).
    #[error("{0}")]
    InvalidArgument(String),
}

/// The result type of the network drivers.
pub type Result<T, E = Error> = std::result::Result<T, E>;
