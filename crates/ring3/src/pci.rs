//! PCI devices in sysfs (being written).
