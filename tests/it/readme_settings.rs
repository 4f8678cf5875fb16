//! The README's environment-variable tables and `config::SETTINGS` name the same variables, both
//! ways: every declared variable is documented, and every documented one is read.

use std::collections::BTreeSet;

use worker_candle::config::{NO_EFFECT, SETTINGS};

/// The upper-case names in backticks of a piece of text.
fn names(text: &str) -> BTreeSet<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| {
            w.len() > 2
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                && w.starts_with(|c: char| c.is_ascii_uppercase())
        })
        .map(str::to_string)
        .collect()
}

/// The README's "Environment variables" section: the first column of its tables and its
/// "Platform" paragraph; the "Accepted and ignored" paragraph apart.
fn documented() -> (BTreeSet<String>, BTreeSet<String>) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("## Environment variables")
        .expect("the section");
    let section = &readme[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let section = &section[..end];
    let (mut read, mut ignored) = (BTreeSet::new(), BTreeSet::new());
    for paragraph in section.split("\n\n") {
        if paragraph.starts_with("**Accepted and ignored**") {
            ignored.extend(names(paragraph));
            continue;
        }
        if paragraph.starts_with("**Platform") {
            read.extend(names(paragraph));
            continue;
        }
        for row in paragraph.lines().filter(|l| l.starts_with("| `")) {
            let first = row.split('|').nth(1).unwrap_or("");
            read.extend(names(first));
        }
    }
    (read, ignored)
}

#[test]
fn the_readme_tables_match_the_declared_settings() {
    let (readme, readme_ignored) = documented();
    let declared: BTreeSet<String> = SETTINGS.iter().map(|s| s.name.to_string()).collect();
    let undocumented: Vec<_> = declared.difference(&readme).collect();
    let unread: Vec<_> = readme.difference(&declared).collect();
    assert!(
        undocumented.is_empty(),
        "declared in config::SETTINGS but not in the README's tables: {undocumented:?}"
    );
    assert!(
        unread.is_empty(),
        "in the README's tables but not declared in config::SETTINGS: {unread:?}"
    );
    let ignored: BTreeSet<String> = NO_EFFECT.iter().map(|(s, _)| s.to_string()).collect();
    assert_eq!(readme_ignored, ignored, "the README's ignored variables");
}
