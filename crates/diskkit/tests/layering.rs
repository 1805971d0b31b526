//! The core's modules form layers without import cycles: each uses only the modules before it
//! in `LAYERS` (and itself), and each format's folder uses no other format. This reads the
//! sources, so a `use` that reaches up a layer fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bottom first. `output` (temporary files) sits with `storage`.
const LAYERS: &[&str] = &[
    "error",
    "output",
    "storage",
    "mapping",
    "layer",
    "formats",
    "stack",
    "image",
    "operations",
    "fuzzing",
];

/// Names the crate root re-exports, and the module each comes from.
const ROOT_NAMES: &[(&str, &str)] = &[
    ("Error", "error"),
    ("ErrorKind", "error"),
    ("Result", "error"),
    ("Mapping", "mapping"),
    ("Extent", "mapping"),
    ("ExtentKind", "mapping"),
    ("Layer", "layer"),
    ("LayerInfo", "layer"),
    ("ImageFormat", "layer"),
    ("LayerType", "layer"),
    ("OpenMode", "layer"),
    ("CreateOptions", "formats"),
    ("probe", "formats"),
    ("open_layer", "stack"),
    ("LayerDescription", "stack"),
    ("LayerOptions", "stack"),
    ("OpenOptions", "stack"),
    ("ParentPolicy", "stack"),
    ("RebaseMode", "stack"),
    ("DiskImage", "image"),
    ("PendingImage", "image"),
    ("copy", "operations"),
];

const FORMATS: &[&str] = &["raw", "asif", "qcow2"];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|&m| m == module)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a source file without comments (doc links are not imports).
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::NAME` path in `code`, as the module it names.
fn crate_paths(code: &str) -> BTreeSet<(String, Option<String>)> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + 7..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let module = ROOT_NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(name.clone(), |(_, m)| m.to_string());
        // The next path segment, to see which format a `crate::formats::` path names.
        let after = &rest[name.len()..];
        let next = after.strip_prefix("::").map(|a| {
            a.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        });
        out.insert((module, next));
    }
    out
}

#[test]
fn modules_only_use_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let parts: Vec<String> = rel
            .iter()
            .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        if parts == ["lib"] {
            continue;
        }
        let module = &parts[0];
        let Some(own) = rank(module) else {
            problems.push(format!("{}: module '{module}' is not in LAYERS", rel.display()));
            continue;
        };
        // Inside formats/<format>/, the format's own name.
        let own_format = (module == "formats" && parts.len() > 2).then(|| parts[1].clone());
        for (used, next) in crate_paths(&code(file)) {
            checked += 1;
            match rank(&used) {
                None => problems.push(format!("{}: crate::{used} is not a known module", rel.display())),
                Some(r) if r > own => problems.push(format!(
                    "{}: {module} uses {used}, which is above it",
                    rel.display()
                )),
                _ => {}
            }
            if let (Some(own_format), "formats", Some(next)) = (&own_format, used.as_str(), next) {
                if FORMATS.contains(&next.as_str()) && next != *own_format {
                    problems.push(format!(
                        "{}: the {own_format} format uses the {next} format",
                        rel.display()
                    ));
                }
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} crate paths found: is the scan broken?"
    );
    assert!(
        problems.is_empty(),
        "layering violations:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_scan_sees_a_violation() {
    let bad = "use crate::image::DiskImage;\n// use crate::operations::copy;\nfn f() { crate::formats::qcow2::x(); }";
    let found = crate_paths(bad);
    assert!(found.contains(&("image".to_string(), Some("DiskImage".to_string()))));
    assert!(found.contains(&("formats".to_string(), Some("qcow2".to_string()))));
    assert!(!crate_paths(&code_of(bad)).iter().any(|(m, _)| m == "operations"));
}

fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}
