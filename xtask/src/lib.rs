//! Developer tasks for the ring3 workspace, run as `cargo xtask ...`.
//!
//! The pieces live in this library so that every subcommand in `main.rs`
//! can reuse them; [`lab`] boots a throwaway QEMU VM with emulated PCI
//! devices and a virtual IOMMU and runs host commands inside it; [`bench`] measures
//! ring3 drivers against their kernel peers in it.

pub mod bench;
pub mod lab;
pub mod tasks;
