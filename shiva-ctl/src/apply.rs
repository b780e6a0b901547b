//! Declarative specs: `apply`, `diff` and `export`.
//!
//! Files hold task specs in YAML, TOML or JSON, several per file: a YAML stream of documents
//! (`---`), a list, or `tasks: [...]` (in TOML, `[[tasks]]` tables). Every spec is read by the
//! same strict reader as `submit` (unknown fields refused, every range checked), after its file
//! format is turned into JSON. Nothing is written unless every file is valid.
//!
//! What changes is decided by [`plan`], pure: a task the files name and the cluster lacks is
//! submitted (spec, then desired `running`); one whose spec differs gets its new spec only (its
//! desired state stays: a stopped task stays stopped); one that is equal is left alone (no
//! record, no restart). With a prune prefix, defined tasks under it that no file names are
//! deleted. `export` prints specs in a form `apply` takes back with no change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use shiva_proto::commands::{self, Command as Commanded};
use shiva_proto::{LogView, TaskId, TaskSpec};

use crate::{CtlError, invalid};

/// A spec read from a file, with where it came from.
#[derive(Debug, Clone)]
pub struct FileSpec {
    /// `FILE` or `FILE[n]` (the n-th task of the file, from 0).
    pub origin: String,
    /// The spec.
    pub spec: TaskSpec,
}

/// The formats files may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// YAML (`.yaml`, `.yml`).
    Yaml,
    /// TOML (`.toml`).
    Toml,
    /// JSON (`.json`).
    Json,
}

impl Format {
    /// The format of `path`, by its extension.
    fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "yaml" | "yml" => Some(Format::Yaml),
            "toml" => Some(Format::Toml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// Reads every spec of `paths` (files, or directories whose `.yaml`, `.yml`, `.toml` and
/// `.json` files are read, recursively, in name order). Errors name the file, the task's place
/// in it and the field; a task id named twice is refused, naming both places.
pub fn read_specs(paths: &[PathBuf]) -> Result<Vec<FileSpec>, CtlError> {
    let mut files = Vec::new();
    for path in paths {
        collect(path, &mut files, true)?;
    }
    let mut specs: Vec<FileSpec> = Vec::new();
    let mut seen: BTreeMap<TaskId, String> = BTreeMap::new();
    for (path, format) in files {
        let text = std::fs::read_to_string(&path)
            .map_err(|err| invalid(format!("cannot read {}: {err}", path.display())))?;
        let values = documents(&text, format).map_err(|err| invalid(format!("{}: {err}", path.display())))?;
        let many = values.len() > 1;
        for (index, value) in values.into_iter().enumerate() {
            let origin =
                if many { format!("{}[{index}]", path.display()) } else { path.display().to_string() };
            let spec = TaskSpec::from_user_json(&value.to_string())
                .map_err(|err| invalid(format!("{origin}: {err}")))?;
            if let Some(first) = seen.insert(spec.id.clone(), origin.clone()) {
                return Err(invalid(format!(
                    "task '{}' is defined twice: in {first} and in {origin}",
                    spec.id
                )));
            }
            specs.push(FileSpec { origin, spec });
        }
    }
    if specs.is_empty() {
        return Err(invalid("no task spec in the given files (YAML, TOML or JSON files)"));
    }
    Ok(specs)
}

fn collect(path: &Path, files: &mut Vec<(PathBuf, Format)>, named: bool) -> Result<(), CtlError> {
    let metadata =
        std::fs::metadata(path).map_err(|err| invalid(format!("cannot read {}: {err}", path.display())))?;
    if metadata.is_dir() {
        let cannot = |err: std::io::Error| invalid(format!("cannot read {}: {err}", path.display()));
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(path).map_err(cannot)? {
            let entry = entry.map_err(cannot)?;
            // A link to a directory is not followed (a loop would never end); one to a file is.
            if entry.file_type().map_err(cannot)?.is_symlink() && entry.path().is_dir() {
                continue;
            }
            entries.push(entry.path());
        }
        entries.sort();
        for entry in entries {
            collect(&entry, files, false)?;
        }
        return Ok(());
    }
    match Format::of(path) {
        Some(format) => files.push((path.to_owned(), format)),
        // A file named on the command line must be readable as a spec file; one found in a
        // directory with another extension (a README) is skipped.
        None if named => {
            return Err(invalid(format!("{}: not a .yaml, .yml, .toml or .json file", path.display())));
        }
        None => {}
    }
    Ok(())
}

/// The task documents of a file, as JSON values.
fn documents(text: &str, format: Format) -> Result<Vec<serde_json::Value>, String> {
    let values: Vec<serde_json::Value> = match format {
        Format::Json => vec![serde_json::from_str(text).map_err(|err| format!("not JSON: {err}"))?],
        Format::Toml => vec![toml::from_str(text).map_err(|err| format!("not TOML: {err}"))?],
        Format::Yaml => {
            use serde::Deserialize;
            let mut values = Vec::new();
            for document in serde_yaml_ng::Deserializer::from_str(text) {
                let value =
                    serde_json::Value::deserialize(document).map_err(|err| format!("not YAML: {err}"))?;
                if !value.is_null() {
                    values.push(value);
                }
            }
            values
        }
    };
    let mut tasks = Vec::new();
    for value in values {
        match value {
            serde_json::Value::Array(items) => tasks.extend(items),
            serde_json::Value::Object(mut map) if map.len() == 1 && map.contains_key("tasks") => {
                match map.remove("tasks") {
                    Some(serde_json::Value::Array(items)) => tasks.extend(items),
                    _ => return Err("'tasks' must be a list of task specs".into()),
                }
            }
            other => tasks.push(other),
        }
    }
    Ok(tasks)
}

/// One change `apply` makes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// The task.
    pub id: TaskId,
    /// `create`, `update` or `delete`.
    pub action: &'static str,
    /// For an update: each changed field, with its value before and after.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldChange>,
    /// The file it comes from (not for a delete).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// A field of a spec that changes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldChange {
    /// Its name.
    pub field: String,
    /// Before (`null`: unset).
    pub from: serde_json::Value,
    /// After (`null`: unset).
    pub to: serde_json::Value,
}

/// What `apply` changes, judged on `view`: creations and updates in the files' order, then
/// deletions (with `prune`) in id order.
pub fn plan(view: &LogView, specs: &[FileSpec], prune: Option<&str>) -> Vec<Change> {
    let mut changes = Vec::new();
    for file in specs {
        let id = &file.spec.id;
        let origin = Some(file.origin.clone());
        match view.specs.get(id) {
            // Defined, but its newest definition is unreadable here: an update (its desired state
            // stays), not a creation.
            None if let Some(invalid) = view.invalid.get(id) => {
                let fields = vec![FieldChange {
                    field: "(definition)".into(),
                    from: serde_json::Value::String(format!("invalid: {}", invalid.reason)),
                    to: serde_json::Value::String("the file's".into()),
                }];
                changes.push(Change { id: id.clone(), action: "update", fields, origin });
            }
            None => changes.push(Change { id: id.clone(), action: "create", fields: Vec::new(), origin }),
            Some(entry) => {
                let fields = field_changes(&entry.spec, &file.spec);
                if !fields.is_empty() {
                    changes.push(Change { id: id.clone(), action: "update", fields, origin });
                }
            }
        }
    }
    if let Some(prefix) = prune {
        let named: std::collections::BTreeSet<&TaskId> = specs.iter().map(|file| &file.spec.id).collect();
        for id in view.defined_tasks() {
            if under(id, prefix) && !named.contains(id) {
                // A definition this build cannot read (a newer build's) is never pruned: nothing
                // here knows what it is.
                let action = if view.specs.contains_key(id) { "delete" } else { "keep" };
                changes.push(Change { id: id.clone(), action, fields: Vec::new(), origin: None });
            }
        }
    }
    changes
}

/// Whether `id` is `prefix` or below it (`a/b` is under `a` and `a/b`, not under `a/bc`).
pub fn under(id: &TaskId, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || id.as_str() == prefix
        || id.as_str().strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

/// The top-level fields whose values differ, as the specs serialise.
fn field_changes(before: &TaskSpec, after: &TaskSpec) -> Vec<FieldChange> {
    let object = |spec: &TaskSpec| match serde_json::to_value(spec).expect("specs serialise") {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    let (before, after) = (object(before), object(after));
    let mut names: Vec<&String> = before.keys().chain(after.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        // The own revision is the writer's count, not part of what a file declares.
        .filter(|name| name.as_str() != "revision")
        .filter_map(|name| {
            let from = before.get(name).cloned().unwrap_or(serde_json::Value::Null);
            let to = after.get(name).cloned().unwrap_or(serde_json::Value::Null);
            (from != to).then(|| FieldChange { field: name.clone(), from, to })
        })
        .collect()
}

/// The commands that carry out `changes`: a create is a `submit`; an update writes the spec
/// record only; a delete is a `delete`.
pub fn writes(
    view: &LogView,
    specs: &[FileSpec],
    changes: &[Change],
) -> Result<Vec<commands::Write>, CtlError> {
    let by_id: BTreeMap<&TaskId, &TaskSpec> = specs.iter().map(|file| (&file.spec.id, &file.spec)).collect();
    let mut writes = Vec::new();
    for change in changes {
        match change.action {
            "keep" => {}
            "delete" => writes.extend(commands::plan(view, &Commanded::Delete(change.id.clone()))?),
            action => {
                let spec = by_id[&change.id].clone();
                let mut planned = commands::plan(view, &Commanded::Submit(Box::new(spec)))?;
                if action == "update" {
                    // The spec only: its desired state stays as the operator left it.
                    planned.retain(|write| write.key == shiva_proto::topics::key::task(&change.id));
                }
                writes.extend(planned);
            }
        }
    }
    Ok(writes)
}

/// Checks the files as one batch: their `after` edges, with the cluster's other tasks (the
/// pruned ones left out), form no cycle. Each spec alone was checked when it was read.
pub fn check_batch(view: &LogView, specs: &[FileSpec], changes: &[Change]) -> Result<(), CtlError> {
    let pruned: std::collections::BTreeSet<&TaskId> =
        changes.iter().filter(|change| change.action == "delete").map(|change| &change.id).collect();
    let mut edges: BTreeMap<TaskId, Vec<TaskId>> = view
        .specs
        .iter()
        .filter(|(id, _)| !pruned.contains(id))
        .map(|(id, entry)| (id.clone(), entry.spec.after.clone()))
        .collect();
    for file in specs {
        edges.insert(file.spec.id.clone(), file.spec.after.clone());
    }
    if let Some(cycle) = shiva_proto::dag::find_cycle(&edges) {
        let path: Vec<&str> = cycle.iter().map(TaskId::as_str).collect();
        return Err(invalid(format!("field 'after': the files would form a cycle {}", path.join(" → "))));
    }
    Ok(())
}

/// Prints `changes` as `diff` and `apply` show them.
pub fn print_changes(changes: &[Change]) {
    if changes.iter().all(|change| change.action == "keep") {
        for change in changes {
            println!(
                "= {} (kept: its definition is unreadable to this shiva-ctl; prune leaves it)",
                change.id
            );
        }
        println!("no change");
        return;
    }
    for change in changes {
        match change.action {
            "create" => println!("+ {} (new, from {})", change.id, change.origin.as_deref().unwrap_or("?")),
            "delete" => println!("- {} (no file names it)", change.id),
            "keep" => println!(
                "= {} (kept: its definition is unreadable to this shiva-ctl; prune leaves it)",
                change.id
            ),
            _ => {
                println!("~ {} (from {})", change.id, change.origin.as_deref().unwrap_or("?"));
                for field in &change.fields {
                    println!("    {}: {} -> {}", field.field, field.from, field.to);
                }
            }
        }
    }
}

/// The defined tasks under `prefix` that `export` cannot write: their newest definition is
/// unreadable to this build.
pub fn unexported(view: &LogView, prefix: Option<&str>) -> Vec<TaskId> {
    view.invalid.keys().filter(|id| prefix.is_none_or(|prefix| under(id, prefix))).cloned().collect()
}

/// The defined specs under `prefix`, in id order, as `format` text that `apply` reads back.
pub fn export(view: &LogView, prefix: Option<&str>, format: Format) -> Result<String, CtlError> {
    let specs: Vec<serde_json::Value> = view
        .specs
        .iter()
        .filter(|(id, _)| prefix.is_none_or(|prefix| under(id, prefix)))
        .map(|(_, entry)| {
            let mut spec = entry.spec.clone();
            spec.revision = 0;
            serde_json::to_value(&spec).expect("specs serialise")
        })
        .collect();
    let failed =
        |err: &dyn std::fmt::Display| CtlError::Failed(anyhow::anyhow!("cannot write the specs: {err}"));
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(&specs).map_err(|err| failed(&err))? + "\n",
        Format::Toml => {
            toml::to_string(&serde_json::json!({ "tasks": specs })).map_err(|err| failed(&err))?
        }
        Format::Yaml => {
            let mut text = String::new();
            for spec in &specs {
                text.push_str("---\n");
                text.push_str(&serde_yaml_ng::to_string(spec).map_err(|err| failed(&err))?);
            }
            text
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, command: &str) -> TaskSpec {
        TaskSpec::new(TaskId::new(id).unwrap(), command, vec![])
    }

    /// A view defining `specs`, as the CLI reads them from the log.
    fn view_of(specs: Vec<TaskSpec>) -> LogView {
        use shiva_proto::records::{Body, Envelope};
        let mut view = LogView::default();
        for (offset, spec) in specs.into_iter().enumerate() {
            let key = shiva_proto::topics::key::task(&spec.id);
            let record =
                Envelope { sender: "ctl:t".into(), incarnation: None, sent_at_ms: 1, body: Body::Task(spec) };
            view.apply(
                shiva_proto::TopicKind::Commands,
                offset as i64,
                Some(key.as_bytes()),
                Some(&record.encode()),
            );
        }
        view
    }

    #[test]
    fn every_format_holds_several_tasks_and_errors_name_the_file_and_task() {
        let dir = std::env::temp_dir().join(format!("shiva-apply-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            "id: a/x\ncommand: sleep\nargs: ['1']\n---\nid: a/y\ncommand: 'true'\n",
        )
        .unwrap();
        std::fs::write(dir.join("b.toml"), "[[tasks]]\nid = \"b/x\"\ncommand = \"true\"\n\n[[tasks]]\nid = \"b/y\"\ncommand = \"true\"\nschedule = \"@daily\"\n").unwrap();
        std::fs::write(dir.join("c.json"), r#"[{"id": "c/x", "command": "true"}]"#).unwrap();
        std::fs::write(dir.join("README.md"), "not a spec").unwrap();
        let specs = read_specs(std::slice::from_ref(&dir)).unwrap();
        let ids: Vec<&str> = specs.iter().map(|file| file.spec.id.as_str()).collect();
        assert_eq!(ids, ["a/x", "a/y", "b/x", "b/y", "c/x"]);
        assert_eq!(specs[3].spec.schedule, ["@daily"]);

        std::fs::write(
            dir.join("d.yaml"),
            "id: d/x\ncommand: 'true'\n---\nid: d/y\ncommand: 'true'\nstop_grace: forever\n",
        )
        .unwrap();
        let err = read_specs(&[dir.join("d.yaml")]).unwrap_err().to_string();
        assert!(err.contains("d.yaml[1]") && err.contains("stop_grace"), "{err}");
        std::fs::write(dir.join("e.yaml"), "id: a/x\ncommand: 'true'\ncolour: red\n").unwrap();
        let err = read_specs(&[dir.join("a.yaml"), dir.join("e.yaml")]).unwrap_err().to_string();
        assert!(err.contains("colour") && err.contains("unknown field"), "{err}");
        std::fs::write(dir.join("e.yaml"), "id: a/x\ncommand: 'true'\n").unwrap();
        let err = read_specs(&[dir.join("a.yaml"), dir.join("e.yaml")]).unwrap_err().to_string();
        assert!(
            err.contains("defined twice") && err.contains("a.yaml[0]") && err.contains("e.yaml"),
            "{err}"
        );
        let err = read_specs(&[dir.join("README.md")]).unwrap_err().to_string();
        assert!(err.contains("not a .yaml"), "{err}");
        std::fs::write(dir.join("f.toml"), "id = ").unwrap();
        assert!(read_specs(&[dir.join("f.toml")]).unwrap_err().to_string().contains("not TOML"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_real_changes_are_planned_and_prune_stays_under_its_prefix() {
        let view = view_of(vec![spec("a/x", "true"), spec("a/old", "true"), spec("ab/keep", "true")]);
        let files = |specs: Vec<TaskSpec>| -> Vec<FileSpec> {
            specs.into_iter().map(|spec| FileSpec { origin: "f.yaml".into(), spec }).collect()
        };
        // The same spec: nothing.
        assert!(plan(&view, &files(vec![spec("a/x", "true")]), None).is_empty());
        // A changed command, a new task, and a prune of a/ (not of ab/).
        let changes = plan(&view, &files(vec![spec("a/x", "false"), spec("a/new", "true")]), Some("a"));
        let summary: Vec<(&str, &str)> = changes.iter().map(|c| (c.id.as_str(), c.action)).collect();
        assert_eq!(summary, [("a/x", "update"), ("a/new", "create"), ("a/old", "delete")]);
        assert_eq!(changes[0].fields.len(), 1);
        assert_eq!(changes[0].fields[0].field, "command");
        // An update writes the spec only; a create the spec and desired running; a delete two
        // tombstones.
        let writes =
            writes(&view, &files(vec![spec("a/x", "false"), spec("a/new", "true")]), &changes).unwrap();
        let keys: Vec<(&str, bool)> = writes.iter().map(|w| (w.key.as_str(), w.body.is_some())).collect();
        assert_eq!(
            keys,
            [
                ("task/a/x", true),
                ("task/a/new", true),
                ("desired/a/new", true),
                ("task/a/old", false),
                ("desired/a/old", false)
            ]
        );
        assert!(under(&TaskId::new("a/b").unwrap(), "a/"));
        assert!(!under(&TaskId::new("ab/c").unwrap(), "a"));
    }

    #[test]
    fn an_unreadable_definition_is_never_pruned_and_a_file_naming_it_updates_it() {
        let mut view = LogView::default();
        // A definition this build cannot read (a field out of range, as a newer build's may be).
        let bad = br#"{"v":1,"kind":"task","sender":"ctl:t","sent_at_ms":1,"body":{"id":"a/new-kind","command":"true","stop_grace":"forever"}}"#;
        view.apply(shiva_proto::TopicKind::Commands, 0, Some(b"task/a/new-kind"), Some(bad));
        assert!(view.invalid.contains_key(&TaskId::new("a/new-kind").unwrap()));
        let changes = plan(&view, &[], Some("a"));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].action, "keep");
        assert!(writes(&view, &[], &changes).unwrap().is_empty(), "nothing deleted");
        let file = vec![FileSpec { origin: "f.yaml".into(), spec: spec("a/new-kind", "true") }];
        let changes = plan(&view, &file, Some("a"));
        assert_eq!(changes[0].action, "update", "{changes:?}");
        let written = writes(&view, &file, &changes).unwrap();
        let keys: Vec<&str> = written.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["task/a/new-kind"], "its desired state stays");
    }

    #[test]
    fn after_cycles_across_the_files_are_refused_before_anything_is_written() {
        let mut a = spec("j/a", "true");
        a.once = true;
        a.after = vec![TaskId::new("j/b").unwrap()];
        let mut b = spec("j/b", "true");
        b.once = true;
        b.after = vec![TaskId::new("j/a").unwrap()];
        let files: Vec<FileSpec> =
            [a, b].into_iter().map(|spec| FileSpec { origin: "f.yaml".into(), spec }).collect();
        let view = LogView::default();
        let changes = plan(&view, &files, None);
        let err = check_batch(&view, &files, &changes).unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn extensions_are_read_in_any_case_and_linked_directories_are_not_followed() {
        let dir = std::env::temp_dir().join(format!("shiva-apply-case-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/A.YAML"), "id: x/a\ncommand: 'true'\n").unwrap();
        std::os::unix::fs::symlink(&dir, dir.join("sub/loop")).unwrap();
        let specs = read_specs(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(specs.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_export_reads_back_as_the_same_specs_in_every_format() {
        let mut periodic = spec("a/cron", "sh");
        periodic.args = vec!["-c".into(), "echo 'quoted: yes'".into()];
        periodic.schedule = vec!["0 15 10 ? * 2-6".into()];
        periodic.timezone = Some("Europe/Paris".into());
        periodic.env.insert("A".into(), "1".into());
        let view = view_of(vec![spec("a/x", "true"), periodic]);
        let dir = std::env::temp_dir().join(format!("shiva-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (format, name) in [(Format::Yaml, "x.yaml"), (Format::Toml, "x.toml"), (Format::Json, "x.json")] {
            std::fs::write(dir.join(name), export(&view, Some("a"), format).unwrap()).unwrap();
            let specs = read_specs(&[dir.join(name)]).unwrap();
            assert_eq!(specs.len(), 2, "{name}");
            assert!(
                plan(&view, &specs, Some("a")).is_empty(),
                "{name}: {:?}",
                plan(&view, &specs, Some("a"))
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
