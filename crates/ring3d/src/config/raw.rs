//! The config file as TOML gives it: serde structs whose fields are all optional and
//! carry their spans, and a checker that reads a table key by key so that one bad key
//! does not hide the problems of the others.
//!
//! serde stops at the first error in a struct. To report every problem, each key of a
//! table is first deserialized alone (a one-entry table) into the section's struct, which
//! denies unknown fields: that finds unknown keys and wrong types one by one. Bad entries
//! are then dropped and the rest deserialized together, so that the value checks in
//! `config.rs` still see every good key.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use crate::error::{ConfigError, Location};

/// `[daemon]`.
#[derive(Deserialize, Debug, Default)]
#[serde(
    deny_unknown_fields,
    expecting = "a table: [daemon] followed by its keys"
)]
pub(super) struct RawDaemon {
    pub socket: Option<Spanned<String>>,
    pub socket_group: Option<Spanned<String>>,
    pub driver_user: Option<Spanned<String>>,
    pub restart_budget: Option<Spanned<RawRestartBudget>>,
    pub heartbeat_ms: Option<Spanned<i64>>,
    pub heartbeat_timeout_ms: Option<Spanned<i64>>,
}

/// `restart_budget = { restarts = N, window_s = S }`.
#[derive(Deserialize, Debug)]
#[serde(
    deny_unknown_fields,
    expecting = "a table such as { restarts = 5, window_s = 1800 }"
)]
pub(super) struct RawRestartBudget {
    pub restarts: Option<Spanned<i64>>,
    pub window_s: Option<Spanned<i64>>,
}

/// One `[[device]]`.
#[derive(Deserialize, Debug)]
#[serde(
    deny_unknown_fields,
    expecting = "a table: [[device]] followed by its keys"
)]
pub(super) struct RawDevice {
    pub name: Option<Spanned<String>>,
    pub pci: Option<Spanned<String>>,
    #[serde(rename = "match")]
    pub match_ids: Option<Spanned<String>>,
    pub index: Option<Spanned<i64>>,
    pub usb: Option<Spanned<String>>,
    pub force: Option<Spanned<bool>>,
    pub driver: Option<Spanned<String>>,
    pub expose: Option<Spanned<String>>,
    pub nvme: Option<Spanned<RawNvme>>,
    pub net: Option<Spanned<RawNet>>,
    pub serial: Option<Spanned<RawSerial>>,
}

/// `[device.serial]`.
#[derive(Deserialize, Debug)]
#[serde(
    deny_unknown_fields,
    expecting = "a table: [device.serial] followed by its keys"
)]
pub(super) struct RawSerial {
    pub baud: Option<Spanned<i64>>,
}

/// `[device.net]`.
#[derive(Deserialize, Debug)]
#[serde(
    deny_unknown_fields,
    expecting = "a table: [device.net] followed by its keys"
)]
pub(super) struct RawNet {
    pub queues: Option<Spanned<i64>>,
    pub ring_size: Option<Spanned<i64>>,
}

/// `[device.nvme]`.
#[derive(Deserialize, Debug)]
#[serde(
    deny_unknown_fields,
    expecting = "a table: [device.nvme] followed by its keys"
)]
pub(super) struct RawNvme {
    pub queues: Option<Spanned<i64>>,
    pub queue_depth: Option<Spanned<i64>>,
    pub namespaces: Option<Spanned<Vec<Spanned<i64>>>>,
}

/// Checks one nested table key by key; returns it without its bad entries.
type NestedCheck =
    for<'i> fn(&Spanned<DeValue<'i>>, &str, &mut Report<'_>) -> Option<Spanned<DeValue<'i>>>;

/// A table of the config file.
pub(super) trait Section: DeserializeOwned {
    /// The checker for `key` if its value is itself a section (a table checked key by
    /// key); `None` for plain values.
    fn nested(_key: &str) -> Option<NestedCheck> {
        None
    }
}

impl Section for RawDaemon {
    fn nested(key: &str) -> Option<NestedCheck> {
        (key == "restart_budget").then_some(clean::<RawRestartBudget> as NestedCheck)
    }
}

impl Section for RawRestartBudget {}

impl Section for RawDevice {
    fn nested(key: &str) -> Option<NestedCheck> {
        match key {
            "nvme" => Some(clean::<RawNvme> as NestedCheck),
            "net" => Some(clean::<RawNet> as NestedCheck),
            "serial" => Some(clean::<RawSerial> as NestedCheck),
            _ => None,
        }
    }
}

impl Section for RawNvme {}

impl Section for RawNet {}

impl Section for RawSerial {}

/// A section as read, and the keys that were present but bad (already reported), so
/// that the value checks neither call them missing nor compare against them.
pub(super) struct Checked<T> {
    pub value: T,
    pub failed: BTreeSet<String>,
}

impl<T> Checked<T> {
    pub fn failed(&self, key: &str) -> bool {
        self.failed.contains(key)
    }
}

/// Reads `value` as section `T`, reporting every unknown key and wrong type under
/// `context` (such as `device "fast0"`). `None` if `value` is not a table at all.
pub(super) fn section<T: Section>(
    value: &Spanned<DeValue<'_>>,
    context: &str,
    report: &mut Report<'_>,
) -> Option<Checked<T>> {
    let mut failed = BTreeSet::new();
    let cleaned = clean_with_failures::<T>(value, context, report, &mut failed)?;
    match T::deserialize(ValueDeserializer::from(cleaned)) {
        Ok(value) => Some(Checked { value, failed }),
        Err(error) => {
            // Every entry passed alone; together they should too.
            report.toml(context, &error, value.span());
            None
        }
    }
}

fn clean<'i, T: Section>(
    value: &Spanned<DeValue<'i>>,
    context: &str,
    report: &mut Report<'_>,
) -> Option<Spanned<DeValue<'i>>> {
    clean_with_failures::<T>(value, context, report, &mut BTreeSet::new())
}

fn clean_with_failures<'i, T: Section>(
    value: &Spanned<DeValue<'i>>,
    context: &str,
    report: &mut Report<'_>,
    failed: &mut BTreeSet<String>,
) -> Option<Spanned<DeValue<'i>>> {
    let DeValue::Table(table) = value.get_ref() else {
        // Not a table: serde says what it is and what was expected.
        if let Err(error) = T::deserialize(ValueDeserializer::from(value.clone())) {
            report.toml(context, &error, value.span());
        }
        return None;
    };
    let mut kept = DeTable::new();
    for (key, entry) in table.iter() {
        let name: &str = key.get_ref();
        if let Some(check) = T::nested(name) {
            match check(entry, &format!("{context}: {name}"), report) {
                Some(cleaned) => {
                    kept.insert(key.clone(), cleaned);
                }
                None => {
                    failed.insert(name.to_string());
                }
            }
            continue;
        }
        let mut alone = DeTable::new();
        alone.insert(key.clone(), entry.clone());
        match T::deserialize(ValueDeserializer::from(Spanned::new(
            value.span(),
            DeValue::Table(alone),
        ))) {
            Ok(_) => {
                kept.insert(key.clone(), entry.clone());
            }
            Err(error) => {
                report.toml(context, &error, key.span());
                failed.insert(name.to_string());
            }
        }
    }
    Some(Spanned::new(value.span(), DeValue::Table(kept)))
}

/// Collects problems, turning byte spans into lines and columns.
pub(crate) struct Report<'t> {
    text: &'t str,
    file: PathBuf,
    errors: Vec<ConfigError>,
}

impl<'t> Report<'t> {
    pub fn new(text: &'t str, file: &Path) -> Self {
        Report {
            text,
            file: file.to_path_buf(),
            errors: Vec::new(),
        }
    }

    pub fn location(&self, span: &Range<usize>) -> Location {
        Location::of_offset(self.text, span.start)
    }

    /// A problem at `span`.
    pub fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let location = self.location(&span);
        self.errors
            .push(ConfigError::new(&self.file, Some(location), message));
    }

    /// A problem at the end of the file (where something missing would go).
    pub fn at_end(&mut self, message: impl Into<String>) {
        self.at(self.text.len()..self.text.len(), message);
    }

    /// A problem that TOML's parser or serde found, at its own span or else at `fallback`.
    pub fn toml(&mut self, context: &str, error: &toml::de::Error, fallback: Range<usize>) {
        let span = error.span().unwrap_or(fallback);
        let message = plain_words(error.message().trim_end());
        if context.is_empty() {
            self.at(span, message);
        } else {
            self.at(span, format!("{context}: {message}"));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn into_errors(self) -> Vec<ConfigError> {
        self.errors
    }
}

/// serde's Rust type names in TOML's words: `expected i64` → `expected an integer`.
fn plain_words(message: &str) -> String {
    message
        .replace("expected i64", "expected an integer")
        .replace("expected a string", "expected a string in quotes")
        .replace("expected a sequence", "expected an array such as [1, 2]")
        .replace("unknown field", "unknown key")
}
