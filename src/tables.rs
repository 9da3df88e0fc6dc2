//! Plain text tables for the operator commands (`dlq`, `status`): columns two spaces apart, no
//! borders, no trailing spaces.

use comfy_table::{presets, Table};

/// A table without borders, with `header` unless it is empty.
pub fn plain(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    if !header.is_empty() {
        table.set_header(header.to_vec());
    }
    table
}

/// The table's text: no padding before the first column, two spaces between columns, lines
/// trimmed at the end.
pub fn render(mut table: Table) -> String {
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table
        .to_string()
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_without_borders_or_trailing_spaces() {
        let mut table = plain(&["A", "LONGER"]);
        table.add_row(vec!["wide value", "x"]);
        assert_eq!(render(table), "A           LONGER\nwide value  x");
    }
}
