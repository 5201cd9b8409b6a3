//! Human names for PCI class codes (PCI Code and ID Assignment Specification 1.x, section 1).

/// A short name for a 24-bit class code (base class, subclass, programming interface),
/// in `lspci`'s style: `"Mass storage controller: NVM Express"`.
pub(super) fn class_name(class_code: u32) -> &'static str {
    let [_, base, sub, prog_if] = class_code.to_be_bytes();
    match (base, sub, prog_if) {
        (0x01, 0x00, _) => "Mass storage controller: SCSI",
        (0x01, 0x01, _) => "Mass storage controller: IDE",
        (0x01, 0x04, _) => "Mass storage controller: RAID",
        (0x01, 0x05, _) => "Mass storage controller: ATA",
        (0x01, 0x06, 0x01) => "Mass storage controller: SATA (AHCI)",
        (0x01, 0x06, _) => "Mass storage controller: SATA",
        (0x01, 0x07, _) => "Mass storage controller: SAS",
        (0x01, 0x08, 0x02) => "Mass storage controller: NVM Express",
        (0x01, 0x08, _) => "Mass storage controller: Non-volatile memory",
        (0x01, 0x09, _) => "Mass storage controller: UFS",
        (0x01, _, _) => "Mass storage controller",

        (0x02, 0x00, _) => "Network controller: Ethernet",
        (0x02, 0x07, _) => "Network controller: InfiniBand",
        (0x02, 0x08, _) => "Network controller: Fabric",
        (0x02, _, _) => "Network controller",

        (0x03, 0x00, _) => "Display controller: VGA compatible",
        (0x03, 0x02, _) => "Display controller: 3D",
        (0x03, _, _) => "Display controller",

        (0x04, 0x00, _) => "Multimedia controller: Video",
        (0x04, 0x01, _) => "Multimedia controller: Audio",
        (0x04, 0x03, _) => "Multimedia controller: Audio device",
        (0x04, _, _) => "Multimedia controller",

        (0x05, 0x00, _) => "Memory controller: RAM",
        (0x05, 0x01, _) => "Memory controller: Flash",
        (0x05, 0x02, _) => "Memory controller: CXL",
        (0x05, _, _) => "Memory controller",

        (0x06, 0x00, _) => "Bridge: Host bridge",
        (0x06, 0x01, _) => "Bridge: ISA bridge",
        (0x06, 0x04, _) => "Bridge: PCI bridge",
        (0x06, 0x07, _) => "Bridge: CardBus bridge",
        (0x06, 0x09, _) => "Bridge: Semi-transparent PCI bridge",
        (0x06, _, _) => "Bridge",

        (0x07, 0x00, _) => "Communication controller: Serial",
        (0x07, 0x01, _) => "Communication controller: Parallel",
        (0x07, 0x03, _) => "Communication controller: Modem",
        (0x07, _, _) => "Communication controller",

        (0x08, 0x05, _) => "System peripheral: SD host controller",
        (0x08, 0x06, _) => "System peripheral: IOMMU",
        (0x08, _, _) => "System peripheral",

        (0x09, _, _) => "Input device controller",
        (0x0a, _, _) => "Docking station",
        (0x0b, _, _) => "Processor",

        (0x0c, 0x00, _) => "Serial bus controller: FireWire",
        (0x0c, 0x03, 0x00) => "Serial bus controller: USB (UHCI)",
        (0x0c, 0x03, 0x10) => "Serial bus controller: USB (OHCI)",
        (0x0c, 0x03, 0x20) => "Serial bus controller: USB (EHCI)",
        (0x0c, 0x03, 0x30) => "Serial bus controller: USB (xHCI)",
        (0x0c, 0x03, _) => "Serial bus controller: USB",
        (0x0c, 0x04, _) => "Serial bus controller: Fibre Channel",
        (0x0c, 0x05, _) => "Serial bus controller: SMBus",
        (0x0c, 0x07, _) => "Serial bus controller: IPMI",
        (0x0c, _, _) => "Serial bus controller",

        (0x0d, _, _) => "Wireless controller",
        (0x0e, _, _) => "Intelligent controller",
        (0x0f, _, _) => "Satellite communications controller",
        (0x10, _, _) => "Encryption controller",
        (0x11, _, _) => "Signal processing controller",
        (0x12, _, _) => "Processing accelerator",
        (0x13, _, _) => "Non-essential instrumentation",
        (0x40, _, _) => "Coprocessor",
        _ => "Unclassified device",
    }
}

#[cfg(test)]
mod tests {
    use super::class_name;

    #[test]
    fn class_name_names_common_classes() {
        let cases = [
            (0x01_08_02, "Mass storage controller: NVM Express"),
            (0x01_08_00, "Mass storage controller: Non-volatile memory"),
            (0x01_06_01, "Mass storage controller: SATA (AHCI)"),
            (0x01_ff_00, "Mass storage controller"),
            (0x02_00_00, "Network controller: Ethernet"),
            (0x06_04_00, "Bridge: PCI bridge"),
            (0x0c_03_30, "Serial bus controller: USB (xHCI)"),
            (0x00_ff_00, "Unclassified device"), // QEMU's edu device
            (0xff_00_00, "Unclassified device"),
            (0xffff_ffff, "Unclassified device"),
        ];
        for (class_code, expected) in cases {
            assert_eq!(class_name(class_code), expected, "{class_code:#08x}");
        }
    }
}
