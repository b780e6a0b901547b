//! docs/protocol.md's range column says what `spec/bounds.rs` enforces.

use shiva_proto::spec::bounds::{self, Span};

fn row<'d>(doc: &'d str, field: &str) -> &'d str {
    let start = format!("| `{field}` |");
    doc.lines().find(|line| line.starts_with(&start)).unwrap_or_else(|| panic!("no row for {field}"))
}

#[test]
fn the_range_column_matches_the_enforced_bounds() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let spans: [(&str, Span); 6] = [
        ("stop_grace", bounds::STOP_GRACE),
        ("starting_deadline", bounds::STARTING_DEADLINE),
        ("jitter", bounds::JITTER),
        ("max_runtime", bounds::MAX_RUNTIME),
        ("restart_window", bounds::RESTART_WINDOW),
        ("stable_after", bounds::STABLE_AFTER),
    ];
    for (field, span) in spans {
        let line = row(&doc, field);
        assert!(line.contains(&span.describe()), "{field}: expected {}: {line}", span.describe());
    }
    assert!(row(&doc, "backoff").contains(&format!("`initial` and `max` {}", bounds::BACKOFF.describe())));
    assert!(row(&doc, "backoff").contains(&format!(
        "`multiplier` {} to {}",
        bounds::MULTIPLIER.0,
        bounds::MULTIPLIER.1
    )));
    let counts = [
        ("max_catch_up", bounds::MAX_CATCH_UP),
        ("max_attempts", bounds::MAX_ATTEMPTS),
        ("max_restarts", bounds::MAX_RESTARTS),
        ("count", bounds::COUNT),
    ];
    for (field, (min, max)) in counts {
        assert!(row(&doc, field).contains(&format!("{min} to {max}")), "{field}");
    }
    assert_eq!(bounds::MEMORY_MAX, (1 << 20, 1 << 50));
    assert!(row(&doc, "memory_max").contains("1MiB to 1PiB"));
    assert!(row(&doc, "command").contains(&format!("1 to {} bytes", bounds::MAX_PATH_BYTES)));
    assert!(row(&doc, "workdir").contains(&format!("at most {} bytes", bounds::MAX_PATH_BYTES)));
    let string = format!("at most {} bytes with its NUL", bounds::MAX_ARG_STRING_BYTES);
    assert!(row(&doc, "args").contains(&string) && row(&doc, "env").contains(&string));
    assert!(row(&doc, "args").contains(&format!("at most {}", bounds::MAX_ARGS)));
    assert!(
        row(&doc, "command` + `args` + `env").contains(&format!("at most {} bytes", bounds::MAX_EXEC_BYTES))
    );
    assert!(row(&doc, "tags").contains(&format!(
        "at most {}; each at most {} bytes",
        bounds::MAX_LIST,
        bounds::MAX_TAG_BYTES
    )));
    assert!(row(&doc, "schedule").contains(&format!(
        "at most {} expressions, each at most {} bytes",
        bounds::MAX_LIST,
        bounds::MAX_CRON_BYTES
    )));
    assert!(row(&doc, "after").contains(&format!("at most {}", bounds::MAX_LIST)));
    assert!(row(&doc, "files").contains(&format!("at most {} files", bounds::MAX_FILES)));
}
