//! The endpoints of a mass-storage interface.

/// The interface and bulk endpoints a Bulk-Only Transport device is driven through
/// (interface class 08h, subclass 06h SCSI transparent, protocol 50h Bulk-Only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkEndpoints {
    /// `bInterfaceNumber`, the `wIndex` of the class requests.
    pub interface: u8,
    /// Address of the bulk-in endpoint (bit 7 set, e.g. `0x81`).
    pub bulk_in: u8,
    /// Address of the bulk-out endpoint (bit 7 clear, e.g. `0x02`).
    pub bulk_out: u8,
    /// `wMaxPacketSize` of bulk-in.
    pub max_packet_in: usize,
    /// `wMaxPacketSize` of bulk-out.
    pub max_packet_out: usize,
}
