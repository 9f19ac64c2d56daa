//! What a command prints: a table for people, or JSON (`--json`) for programs.

use serde::Serialize;

/// A command's result that can be printed either way.
pub trait Printable: Serialize {
    /// The human-readable form (ends with a newline).
    fn to_table(&self) -> String;

    /// The text to print: JSON when `json`, else the table.
    fn render(&self, json: bool) -> String {
        if json {
            let mut text = serde_json::to_string_pretty(self).expect("results serialise");
            text.push('\n');
            text
        } else {
            self.to_table()
        }
    }
}
