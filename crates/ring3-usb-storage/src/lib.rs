//! User-mode driver for USB mass storage (Bulk-Only Transport, SCSI block commands).
