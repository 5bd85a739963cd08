//! Readable terminal tables for the CLI.

use comfy_table::presets::UTF8_BORDERS_ONLY;

/// A table printed with a header row and aligned columns.
pub struct Table(comfy_table::Table);

impl Table {
    /// A table with these column headers.
    pub fn new<const N: usize>(headers: [&str; N]) -> Self {
        let mut table = comfy_table::Table::new();
        table.load_preset(UTF8_BORDERS_ONLY).set_header(headers);
        Table(table)
    }

    /// Appends a row; each cell is rendered with `Display`.
    pub fn row<I, T>(&mut self, cells: I) -> &mut Self
    where
        I: IntoIterator<Item = T>,
        T: std::fmt::Display,
    {
        self.0
            .add_row(cells.into_iter().map(|cell| cell.to_string()));
        self
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
