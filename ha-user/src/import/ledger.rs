//! The ledger of an import: every line the translation consumed, and a
//! note on every other one (or on one carried over with a change), so that
//! nothing in either file is dropped silently.

use std::collections::BTreeSet;

/// A directive that was not carried over, or carried over with a change.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Note {
    pub file: String,
    pub line: usize,
    pub directive: String,
    pub why: String,
}

impl Note {
    /// `file:line`, as editors and compilers name a place.
    pub fn at(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

/// Lines consumed by the translation and notes about the rest.
#[derive(Default)]
pub(crate) struct Ledger {
    consumed: BTreeSet<(String, usize)>,
    notes: Vec<Note>,
}

impl Ledger {
    pub(crate) fn consume(&mut self, file: &str, line: usize) {
        self.consumed.insert((file.to_string(), line));
    }

    pub(crate) fn note(
        &mut self,
        file: &str,
        line: usize,
        directive: impl Into<String>,
        why: &str,
    ) {
        self.consume(file, line);
        self.notes.push(Note {
            file: file.to_string(),
            line,
            directive: directive.into(),
            why: why.to_string(),
        });
    }

    pub(crate) fn is_consumed(&self, file: &str, line: usize) -> bool {
        self.consumed.contains(&(file.to_string(), line))
    }

    /// The notes, sorted by file and line, each once.
    pub(crate) fn into_notes(self) -> Vec<Note> {
        let mut notes = self.notes;
        notes.sort();
        notes.dedup();
        notes
    }
}
