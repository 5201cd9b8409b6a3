//! Results come back from the guest on its console: the guest's file system is the host's,
//! read-only, so the bench script prints each result file between tagged lines, and this
//! sink picks those out of the console stream while forwarding everything else (the
//! script's progress lines, errors) to the terminal.
//!
//! The protocol, one item per line:
//!
//! ```text
//! RING3-BENCH begin SOURCE ID STATUS
//! RING3-BENCH | a line of the result file
//! RING3-BENCH end
//! ```

use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};

/// The tag that starts every protocol line.
pub const TAG: &str = "RING3-BENCH";

/// One result file the guest sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// What produced it: `kernel`, `ring3`, `fill` or `info`.
    pub source: String,
    /// The workload's ID (or a name for the others).
    pub id: String,
    /// The exit status of the program that wrote it.
    pub status: i32,
    /// The file's contents.
    pub text: String,
    /// Whether the `end` line arrived (a block cut short by another `begin` or by the end
    /// of the output is incomplete).
    pub complete: bool,
}

#[cfg(test)]
impl Block {
    /// A complete block, as the guest sends it.
    pub(crate) fn finished(source: &str, id: &str, status: i32, text: &str) -> Block {
        Block {
            source: source.into(),
            id: id.into(),
            status,
            text: text.into(),
            complete: true,
        }
    }
}

/// Called with each block once it is complete, and the terminal to report on.
pub type OnBlock = Box<dyn FnMut(&Block, &mut dyn Write) + Send>;

/// The blocks a [`CaptureSink`] collected; readable after the VM has finished.
#[derive(Debug, Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<Block>>>);

impl Captured {
    /// The blocks received so far, in order.
    pub fn blocks(&self) -> Vec<Block> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn push(&self, block: Block) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(block);
    }
}

/// A `Write` for the lab's console output that keeps tagged blocks and forwards the rest.
pub struct CaptureSink {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    open: Option<Block>,
    captured: Captured,
    on_block: OnBlock,
}

impl CaptureSink {
    /// A sink forwarding untagged lines to `out` and storing blocks in `captured`.
    pub fn new(out: Box<dyn Write + Send>, captured: Captured, on_block: OnBlock) -> Self {
        CaptureSink {
            out,
            line: Vec::new(),
            open: None,
            captured,
            on_block,
        }
    }

    fn finish_block(&mut self, mut block: Block, complete: bool) {
        block.complete = complete;
        (self.on_block)(&block, &mut self.out);
        self.captured.push(block);
    }

    fn handle_line(&mut self, line: &str) {
        let Some(rest) = line
            .strip_prefix(TAG)
            .filter(|rest| rest.is_empty() || rest.starts_with(' '))
        else {
            let _ = writeln!(self.out, "{line}");
            return;
        };
        let rest = rest.strip_prefix(' ').unwrap_or(rest);
        if let Some(content) = rest
            .strip_prefix("| ")
            .or(rest.strip_prefix('|').filter(|r| r.is_empty()))
        {
            match &mut self.open {
                Some(block) => {
                    block.text.push_str(content);
                    block.text.push('\n');
                }
                None => {
                    let _ = writeln!(self.out, "bench: result line outside a block: {line}");
                }
            }
        } else if rest == "end" {
            match self.open.take() {
                Some(block) => self.finish_block(block, true),
                None => {
                    let _ = writeln!(self.out, "bench: `end` without a block");
                }
            }
        } else if let Some(header) = rest.strip_prefix("begin ") {
            if let Some(unfinished) = self.open.take() {
                self.finish_block(unfinished, false);
            }
            let fields: Vec<&str> = header.split_whitespace().collect();
            match fields.as_slice() {
                [source, id, status] => {
                    let status = status.parse::<i32>().unwrap_or(-1);
                    self.open = Some(Block {
                        source: (*source).to_string(),
                        id: (*id).to_string(),
                        status,
                        text: String::new(),
                        complete: false,
                    });
                }
                _ => {
                    let _ = writeln!(self.out, "bench: malformed block header: {line}");
                }
            }
        } else {
            let _ = writeln!(self.out, "{line}");
        }
    }
}

impl Write for CaptureSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &byte in buf {
            if byte == b'\n' {
                let line = std::mem::take(&mut self.line);
                let text = String::from_utf8_lossy(&line);
                let text = text.strip_suffix('\r').unwrap_or(&text).to_string();
                self.handle_line(&text);
            } else {
                self.line.push(byte);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Partial lines wait for their end: a block's lines must be seen whole. What is
        // not a block line is still shown once its line ends.
        self.out.flush()
    }
}

impl Drop for CaptureSink {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned();
            self.handle_line(&line);
        }
        if let Some(unfinished) = self.open.take() {
            self.finish_block(unfinished, false);
        }
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner))
                .into_owned()
        }
    }

    fn feed(chunks: &[&str]) -> (String, Vec<Block>, Vec<String>) {
        let out = Shared::default();
        let captured = Captured::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_in_callback = Arc::clone(&seen);
        let on_block: OnBlock = Box::new(move |block, out| {
            let _ = writeln!(out, "got {}", block.id);
            seen_in_callback
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(block.id.clone());
        });
        {
            let mut sink = CaptureSink::new(Box::new(out.clone()), captured.clone(), on_block);
            for chunk in chunks {
                sink.write_all(chunk.as_bytes()).expect("writes");
            }
        }
        let seen = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
        (out.text(), captured.blocks(), seen)
    }

    #[test]
    fn blocks_are_captured_and_other_lines_forwarded() {
        let (out, blocks, seen) = feed(&[
            "==> [1/3] kernel: randread\n",
            "RING3-BENCH begin kernel randread-4k 0\nRING3-BENCH | {\"a\":\n",
            "RING3-BEN",
            "CH | 1}\n[  5.0] a kernel message\nRING3-BENCH |\nRING3-BENCH end\n",
            "done\n",
        ]);
        assert_eq!(
            out,
            "==> [1/3] kernel: randread\n[  5.0] a kernel message\ngot randread-4k\ndone\n"
        );
        assert_eq!(seen, ["randread-4k"]);
        assert_eq!(
            blocks,
            [Block {
                source: "kernel".into(),
                id: "randread-4k".into(),
                status: 0,
                text: "{\"a\":\n1}\n\n".into(),
                complete: true,
            }]
        );
    }

    #[test]
    fn cut_short_blocks_are_incomplete() {
        let (_, blocks, _) = feed(&[
            "RING3-BENCH begin ring3 a 1\nRING3-BENCH | x\n",
            "RING3-BENCH begin ring3 b 0\nRING3-BENCH | y",
        ]);
        assert_eq!(blocks.len(), 2);
        assert_eq!((blocks[0].id.as_str(), blocks[0].complete), ("a", false));
        assert_eq!(blocks[0].status, 1);
        assert_eq!(
            (
                blocks[1].id.as_str(),
                blocks[1].complete,
                blocks[1].text.as_str()
            ),
            ("b", false, "y\n")
        );
    }

    #[test]
    fn stray_and_malformed_protocol_lines_are_shown() {
        let (out, blocks, _) = feed(&[
            "RING3-BENCH | orphan\nRING3-BENCH end\nRING3-BENCH begin only-two 0\n",
            "RING3-BENCHMARK is not the tag\r\n",
        ]);
        assert!(blocks.is_empty());
        assert!(out.contains("outside a block"), "{out}");
        assert!(out.contains("`end` without a block"), "{out}");
        assert!(out.contains("malformed block header"), "{out}");
        assert!(out.contains("RING3-BENCHMARK is not the tag\n"), "{out}");
    }
}
