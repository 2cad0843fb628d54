//! Lint: only the lease service writes lease state.
//!
//! `in_use`, `used_count`, `proxy_used`, `last_used_at`, `webhook_url`, `upstream_failures` and `lease_rev` may be
//! named as database fields (string literals, which is how every `doc!` filter and update names them) only under
//! `services/lease/`. Whole-document replacement of a
//! proxy, which would overwrite them, is refused everywhere. New proxies get the zero defaults from
//! `ProxyDoc::new`, which names no field as a string. Integration tests (`*/tests/*`) may name them: they set up
//! state and prove that the admin API refuses them.

use std::path::{Path, PathBuf};

const LEASE_FIELDS: [&str; 7] = [
    "\"in_use",
    "\"used_count",
    "\"proxy_used",
    "\"lease_rev",
    "\"last_used_at",
    "\"webhook_url",
    "\"upstream_failures",
];
const REPLACE_CALLS: [&str; 2] = [".replace_one(", ".find_one_and_replace("];
const ALLOWED_PREFIX: &str = "services/lease/";
const THIS_FILE: &str = "libs/store/tests/lease_fields_guard.rs";

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() {
            if name != "target" && !name.to_string_lossy().starts_with('.') {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Violations in one file's text: `(line number, line)`.
fn violations(rel: &str, text: &str) -> Vec<(usize, String)> {
    // Integration tests name the fields to prove that the API refuses them, or to set up state.
    if rel == THIS_FILE || rel.contains("/tests/") {
        return Vec::new();
    }
    let lease_allowed = rel.starts_with(ALLOWED_PREFIX);
    text.lines()
        .enumerate()
        .filter(|(_, line)| {
            let code = line.split("//").next().unwrap_or_default();
            (!lease_allowed && LEASE_FIELDS.iter().any(|f| code.contains(f)))
                || REPLACE_CALLS.iter().any(|c| code.contains(c))
        })
        .map(|(i, l)| (i + 1, l.trim().to_owned()))
        .collect()
}

#[test]
fn the_scanner_catches_a_violation() {
    let bad = r#"coll.update_one(doc! {"_id": id}, doc! {"$inc": {"in_use": -1}})"#;
    assert_eq!(violations("services/gateway/src/routes/admin.rs", bad).len(), 1);
    assert!(violations("services/lease/src/service.rs", bad).is_empty());
    assert_eq!(violations("services/lease/src/service.rs", "c.replace_one(f, d)").len(), 1);
    assert!(violations("libs/x/src/a.rs", "// \"in_use\" in a comment").is_empty());
}

#[test]
fn only_the_lease_service_writes_lease_fields() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    rust_files(&root.join("services"), &mut files);
    rust_files(&root.join("libs"), &mut files);
    assert!(files.len() > 10, "the scan found too few files to be meaningful: {}", files.len());
    let mut found = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&root).unwrap_or(f).to_string_lossy().replace('\\', "/");
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for (line, code) in violations(&rel, &text) {
            found.push(format!("{rel}:{line}: {code}"));
        }
    }
    assert!(
        found.is_empty(),
        "lease fields are written only by services/lease (and proxies are never replaced whole):\n{}",
        found.join("\n")
    );
}
