use super::*;

fn err(text: &str) -> String {
    TaskSpec::from_user_json(text).unwrap_err().to_string()
}

#[test]
fn defaults_apply() {
    let spec = TaskSpec::from_user_json(r#"{"id":"a/b","command":"sleep","args":["10"]}"#).unwrap();
    assert_eq!(spec.stop_grace, DEFAULT_STOP_GRACE);
    assert!(spec.tags.is_empty() && spec.env.is_empty() && spec.workdir.is_none());
    assert_eq!(spec.kind(), TaskKind::Service);
}

#[test]
fn errors_name_the_field() {
    assert!(err(r#"{"id":"a","command":"x","colour":1}"#).contains("'colour': unknown field"));
    assert!(err(r#"{"id":"a/../b","command":"x"}"#).contains("'id'"));
    assert!(err(r#"{"id":"a","command":""}"#).contains("'command'"));
    assert!(err(r#"{"id":"a","command":"x","stop_grace":"-5s"}"#).contains("'stop_grace'"));
    assert!(err(r#"{"id":"a","command":"x","stop_grace":"2h"}"#).contains("'stop_grace'"));
    assert!(err(r#"{"id":"a","command":"x","tags":["a b"]}"#).contains("'tags[0]'"));
    assert!(err(r#"{"id":"a","command":"x","env":{"A=B":"1"}}"#).contains("'env.A=B'"));
    assert!(err(r#"{"id":"a","command":"x","workdir":"rel"}"#).contains("'workdir'"));
    assert!(err(r#"{"id":"a","command":"x","args":[1]}"#).contains("'args[0]'"));
    assert!(err(r#"{"command":"x"}"#).contains("missing field `id`"));
    assert!(err(r#"{"id":"a","command":"x"} junk"#).contains("trailing"));
}

#[test]
fn periodic_and_once_fields() {
    let periodic = TaskSpec::from_user_json(
        r#"{"id":"p","command":"x","schedule":"*/5 * * * *","timezone":"Europe/Paris","catch_up":"all",
            "starting_deadline":"10m","max_catch_up":20,"jitter":"3s","overlap":"queue","max_runtime":"1m"}"#,
    )
    .unwrap();
    assert_eq!(periodic.kind(), TaskKind::Periodic);
    assert_eq!(periodic.schedule, ["*/5 * * * *"]);
    assert_eq!(periodic.catch_up, CatchUp::All);
    let once = TaskSpec::from_user_json(
        r#"{"id":"o","command":"x","once":true,"max_attempts":5,"backoff":{"initial":"2s","multiplier":3},
            "permanent_exit_codes":[64,78],"after":["a/b"]}"#,
    )
    .unwrap();
    assert_eq!(once.kind(), TaskKind::Once);
    assert_eq!(once.backoff.delay_before(2), Duration::from_secs(2));
    assert_eq!(once.backoff.delay_before(3), Duration::from_secs(6));
    assert_eq!(once.backoff.delay_before(10), Duration::from_secs(60), "capped at backoff.max");
    let round_trip: TaskSpec = serde_json::from_str(&serde_json::to_string(&once).unwrap()).unwrap();
    assert_eq!(round_trip, once);
}

#[test]
fn periodic_and_once_errors_name_the_field() {
    assert!(err(r#"{"id":"a","command":"x","schedule":"* * * * * * * *"}"#).contains("'schedule[0]'"));
    assert!(err(r#"{"id":"a","command":"x","schedule":["@hourly","nope"]}"#).contains("'schedule[1]'"));
    assert!(
        err(r#"{"id":"a","command":"x","schedule":"@hourly","timezone":"Nowhere/City"}"#)
            .contains("'timezone'")
    );
    assert!(err(r#"{"id":"a","command":"x","schedule":"@hourly","jitter":"-1s"}"#).contains("'jitter'"));
    assert!(err(r#"{"id":"a","command":"x","schedule":"@hourly","catch_up":"some"}"#).contains("'catch_up'"));
    assert!(err(r#"{"id":"a","command":"x","schedule":"@hourly","once":true}"#).contains("'once'"));
    assert!(
        err(r#"{"id":"a","command":"x","catch_up":"all"}"#).contains("'catch_up': only applies to scheduled")
    );
    assert!(err(r#"{"id":"a","command":"x","after":["b"]}"#).contains("'after': only applies to once"));
    assert!(err(r#"{"id":"a","command":"x","once":true,"after":["a"]}"#).contains("cannot wait for itself"));
    assert!(err(r#"{"id":"a","command":"x","once":true,"max_attempts":0}"#).contains("'max_attempts'"));
    assert!(
        err(r#"{"id":"a","command":"x","once":true,"backoff":{"multiplier":0.5}}"#)
            .contains("'backoff.multiplier'")
    );
    assert!(err(r#"{"id":"a","command":"x","once":true,"backoff":{"speed":1}}"#).contains("backoff"));
    assert!(
        err(r#"{"id":"a","command":"x","once":true,"permanent_exit_codes":[0]}"#)
            .contains("'permanent_exit_codes'")
    );
    assert!(err(r#"{"id":"a","command":"x","once":true,"max_runtime":"0s"}"#).contains("'max_runtime'"));
}

#[test]
fn wire_reading_is_lenient() {
    let spec: TaskSpec = serde_json::from_str(r#"{"id":"a","command":"x","future":true}"#).unwrap();
    assert_eq!(spec.command, "x");
}

#[test]
fn supervision_fields() {
    let spec = TaskSpec::from_user_json(
        r#"{"id":"s","command":"x","stop_signal":"SIGINT","on_disconnect":"keep","max_restarts":3,
            "restart_window":"30s","stable_after":"5s","backoff":{"initial":"0s"},"permanent_exit_codes":[3],
            "user":"nobody","rlimits":{"nofile":1024,"core":0},"memory_max":"64MiB","cpu_max":0.5,
            "files":{"conf/app.yaml":"a: 1\n"}}"#,
    )
    .unwrap();
    assert_eq!(spec.stop_signal_number(), 2);
    assert_eq!(spec.on_disconnect, OnDisconnect::Keep);
    assert_eq!(spec.memory_max_bytes(), Some(64 << 20));
    let round_trip: TaskSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
    assert_eq!(round_trip, spec);
    assert_eq!(TaskSpec::from_user_json(r#"{"id":"s","command":"x"}"#).unwrap().stop_signal_number(), 15);
    assert_eq!(signal_number("term"), Some(15));
}

#[test]
fn supervision_errors_name_the_field() {
    assert!(err(r#"{"id":"a","command":"x","stop_signal":"SIGNOPE"}"#).contains("'stop_signal'"));
    assert!(err(r#"{"id":"a","command":"x","stop_signal":"KILL"}"#).contains("'stop_signal'"));
    assert!(err(r#"{"id":"a","command":"x","on_disconnect":"maybe"}"#).contains("'on_disconnect'"));
    assert!(err(r#"{"id":"a","command":"x","once":true,"max_restarts":2}"#).contains("'max_restarts'"));
    assert!(err(r#"{"id":"a","command":"x","restart_window":"0s"}"#).contains("'restart_window'"));
    assert!(err(r#"{"id":"a","command":"x","user":"a b"}"#).contains("'user'"));
    assert!(err(r#"{"id":"a","command":"x","rlimits":{"files":3}}"#).contains("'rlimits.files'"));
    assert!(err(r#"{"id":"a","command":"x","rlimits":{"nofile":-1}}"#).contains("rlimits.nofile"));
    assert!(err(r#"{"id":"a","command":"x","memory_max":"lots"}"#).contains("'memory_max'"));
    assert!(err(r#"{"id":"a","command":"x","memory_max":"10KiB"}"#).contains("'memory_max'"));
    assert!(err(r#"{"id":"a","command":"x","cpu_max":0}"#).contains("'cpu_max'"));
    assert!(
        err(r#"{"id":"a","command":"x","files":{"../etc/passwd":"x"}}"#).contains("'files.../etc/passwd'")
    );
    assert!(err(r#"{"id":"a","command":"x","files":{"/etc/passwd":"x"}}"#).contains("'files./etc/passwd'"));
    assert!(err(r#"{"id":"a","command":"x","files":{"./a":"x"}}"#).contains("'files../a'"));
    let big = "x".repeat(MAX_FILES_BYTES + 1);
    assert!(err(&format!(r#"{{"id":"a","command":"x","files":{{"a":"{big}"}}}}"#)).contains("'files':"));
    assert!(
        err(r#"{"id":"a","command":"x","schedule":"@hourly","backoff":{"initial":"2s"}}"#)
            .contains("'backoff'")
    );
}
