//! Progress reporting for the slow preparation steps.
//!
//! On a terminal this is an indicatif spinner (or byte bar while
//! downloading) on stderr; otherwise the steps that do real work are printed
//! as plain `lab: ...` lines so CI logs show where time went.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub(crate) struct Progress {
    bar: Option<ProgressBar>,
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} lab: {msg} [{elapsed}]")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bytes_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner} lab: {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

impl Progress {
    pub(crate) fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(spinner_style());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Progress { bar }
    }

    /// A quick step: shown on a terminal only.
    pub(crate) fn status(&self, msg: impl Into<String>) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg.into());
        }
    }

    /// A step that does real work: shown on a terminal, logged otherwise.
    pub(crate) fn step(&self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.bar {
            Some(bar) => {
                bar.set_style(spinner_style());
                bar.set_message(msg);
            }
            None => eprintln!("lab: {msg}"),
        }
    }

    /// Switches to a byte progress bar of `total` bytes (a spinner when the
    /// total is unknown).
    pub(crate) fn start_bytes(&self, msg: impl Into<String>, total: Option<u64>) {
        let msg = msg.into();
        match (&self.bar, total) {
            (Some(bar), Some(total)) => {
                bar.set_style(bytes_style());
                bar.set_length(total);
                bar.set_position(0);
                bar.reset_elapsed();
                bar.set_message(msg);
            }
            _ => self.step(msg),
        }
    }

    pub(crate) fn set_bytes(&self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
    }

    /// Prints a line above the spinner.
    pub(crate) fn println(&self, msg: impl AsRef<str>) {
        match &self.bar {
            Some(bar) => bar.println(msg.as_ref()),
            None => eprintln!("{}", msg.as_ref()),
        }
    }

    /// Hides the spinner while `f` writes to the terminal itself.
    pub(crate) fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
