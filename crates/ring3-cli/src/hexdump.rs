//! Bytes on the terminal, `xxd`-style.

/// Offset, 16 bytes in hex, printable ASCII; runs of identical lines become `*`.
pub fn hex_dump(data: &[u8], base: u64) {
    let mut previous: Option<&[u8]> = None;
    let mut starred = false;
    for (index, line) in data.chunks(16).enumerate() {
        if previous == Some(line) && line.len() == 16 {
            if !starred {
                println!("*");
                starred = true;
            }
            continue;
        }
        starred = false;
        previous = Some(line);
        let hex: Vec<String> = line.iter().map(|byte| format!("{byte:02x}")).collect();
        let text: String = line
            .iter()
            .map(|&byte| {
                if (0x20..0x7f).contains(&byte) {
                    char::from(byte)
                } else {
                    '.'
                }
            })
            .collect();
        println!(
            "{:08x}  {:<47}  {text}",
            base + (index * 16) as u64,
            hex.join(" ")
        );
    }
}
