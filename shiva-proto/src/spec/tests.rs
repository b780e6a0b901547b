use super::*;

fn err(text: &str) -> String {
    match TaskSpec::from_user_json(text) {
        Ok(_) => panic!("accepted: {}", text.chars().take(200).collect::<String>()),
        Err(err) => err.to_string(),
    }
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

/// Every bounded field, at its bounds (accepted) and just past them (refused, naming the
/// field, the value and the range).
#[test]
fn every_bound_is_enforced_at_its_edges() {
    let periodic = r#""schedule":"* * * * * *","catch_up":"latest""#;
    let once = r#""once":true"#;
    // (extra fields, accepted)
    let cases: &[(&str, bool, &str)] = &[
        (r#""stop_grace":"1h""#, true, ""),
        (r#""stop_grace":"1h 1ms""#, false, "stop_grace"),
        (r#""stop_grace":"0s""#, true, ""),
        (&format!(r#"{periodic},"starting_deadline":"5y""#), true, ""),
        (&format!(r#"{periodic},"starting_deadline":"5y 1s""#), false, "starting_deadline"),
        (&format!(r#"{periodic},"starting_deadline":"1000000y""#), false, "starting_deadline"),
        (&format!(r#"{periodic},"starting_deadline":"0s""#), true, ""),
        (&format!(r#"{periodic},"jitter":"1day""#), true, ""),
        (&format!(r#"{periodic},"jitter":"1day 1ms""#), false, "jitter"),
        (&format!(r#"{periodic},"max_runtime":"1ms""#), true, ""),
        (&format!(r#"{periodic},"max_runtime":"0s""#), false, "max_runtime"),
        (&format!(r#"{periodic},"max_runtime":"5y 1s""#), false, "max_runtime"),
        (&format!(r#"{periodic},"max_catch_up":1000"#), true, ""),
        (&format!(r#"{periodic},"max_catch_up":1001"#), false, "max_catch_up"),
        (&format!(r#"{periodic},"max_catch_up":0"#), false, "max_catch_up"),
        (&format!(r#"{periodic},"max_catch_up":4294967295"#), false, "max_catch_up"),
        (&format!(r#"{once},"max_attempts":1000"#), true, ""),
        (&format!(r#"{once},"max_attempts":1001"#), false, "max_attempts"),
        (&format!(r#"{once},"backoff":{{"initial":"1day","max":"1day","multiplier":100}}"#), true, ""),
        (&format!(r#"{once},"backoff":{{"initial":"1s","max":"1day 1s"}}"#), false, "backoff.max"),
        (&format!(r#"{once},"backoff":{{"initial":"1s","max":"100000000y"}}"#), false, "backoff.max"),
        (&format!(r#"{once},"backoff":{{"multiplier":100.5}}"#), false, "backoff.multiplier"),
        (&format!(r#"{once},"backoff":{{"multiplier":1e308}}"#), false, "backoff.multiplier"),
        (r#""max_restarts":10000"#, true, ""),
        (r#""max_restarts":10001"#, false, "max_restarts"),
        (r#""restart_window":"7days""#, true, ""),
        (r#""restart_window":"7days 1ms""#, false, "restart_window"),
        (r#""stable_after":"7days 1ms""#, false, "stable_after"),
        (r#""memory_max":"1PiB""#, true, ""),
        (r#""memory_max":"2PiB""#, false, "memory_max"),
        (r#""tags":["a","b"]"#, true, ""),
    ];
    for (extra, accepted, field) in cases {
        let text = format!(r#"{{"id":"a","command":"x",{extra}}}"#);
        match TaskSpec::from_user_json(&text) {
            Ok(_) => assert!(accepted, "{text} should be refused"),
            Err(err) => {
                let message = err.to_string();
                assert!(!accepted, "{text} should be accepted: {message}");
                assert!(message.contains(&format!("'{field}'")), "{text}: {message} should name {field}");
            }
        }
    }
    let message = err(&format!(r#"{{"id":"a","command":"x",{periodic},"starting_deadline":"1000000y"}}"#));
    assert!(message.contains("1000000years is out of range: from 0s to 5years"), "{message}");
}

#[test]
fn sizes_and_counts_are_bounded() {
    let long_tag = "t".repeat(256);
    assert!(err(&format!(r#"{{"id":"a","command":"x","tags":["{long_tag}"]}}"#)).contains("'tags[0]'"));
    let many: Vec<String> = (0..65).map(|i| format!("\"t{i}\"")).collect();
    assert!(err(&format!(r#"{{"id":"a","command":"x","tags":[{}]}}"#, many.join(","))).contains("'tags'"));
    let long_command = "c".repeat(4097);
    assert!(err(&format!(r#"{{"id":"a","command":"{long_command}"}}"#)).contains("'command'"));
    // One environment string at the kernel's cap is refused; one just under it is accepted.
    let over = "v".repeat(128 * 1024 - 2);
    assert!(err(&format!(r#"{{"id":"a","command":"x","env":{{"A":"{over}"}}}}"#)).contains("'env.A'"));
    let under = "v".repeat(128 * 1024 - 3);
    TaskSpec::from_user_json(&format!(r#"{{"id":"a","command":"x","env":{{"A":"{under}"}}}}"#)).unwrap();
    // 1 MiB of environment in 16 variables of 64 KiB runs; 2 MiB is refused, naming the total.
    let env = |count: usize| {
        let value = "v".repeat(64 * 1024 - 16);
        let vars: Vec<String> = (0..count).map(|i| format!(r#""V{i}":"{value}""#)).collect();
        format!(r#"{{"id":"a","command":"x","env":{{{}}}}}"#, vars.join(","))
    };
    TaskSpec::from_user_json(&env(16)).unwrap();
    let message = err(&env(32));
    assert!(message.contains("'args and env'") && message.contains("in all"), "{message}");
}

#[test]
fn a_spec_whose_records_would_be_too_large_is_refused_naming_the_size_and_limit() {
    // Control characters take 6 bytes each in JSON: 1.2 MB of them is within the exec limit,
    // but not within a record.
    let mut spec = TaskSpec::new(TaskId::new("a").unwrap(), "x", vec![]);
    for i in 0..20 {
        spec.env.insert(format!("V{i}"), "\u{1}".repeat(60 * 1024));
    }
    spec.validate().unwrap();
    let message = spec.check_record_size().unwrap_err().to_string();
    assert!(message.contains("too large") && message.contains("limit of"), "{message}");
    assert!(spec.validate_all().is_err());
    TaskSpec::new(TaskId::new("a").unwrap(), "x", vec![]).check_record_size().unwrap();
}

#[test]
fn a_schedule_that_never_fires_is_refused() {
    let started = std::time::Instant::now();
    let message = err(r#"{"id":"a","command":"x","schedule":["@hourly","0 0 30 2 *"]}"#);
    assert!(message.contains("'schedule[1]'") && message.contains("never fires"), "{message}");
    let proof = started.elapsed();
    assert!(proof < std::time::Duration::from_secs(5), "{proof:?}");
    // The proof is remembered: reading the same expression again costs nothing.
    let started = std::time::Instant::now();
    err(r#"{"id":"b","command":"x","schedule":["0 0 30 2 *"]}"#);
    let again = started.elapsed();
    eprintln!("proving '0 0 30 2 *' never fires: {proof:?} the first time, {again:?} again");
    TaskSpec::from_user_json(r#"{"id":"a","command":"x","schedule":"0 0 29 2 *"}"#).unwrap();
}

#[test]
fn file_paths_are_bounded() {
    let long_name = "n".repeat(256);
    assert!(
        err(&format!(r#"{{"id":"a","command":"x","files":{{"{long_name}":"x"}}}}"#)).contains("too long")
    );
    let ok_name = "n".repeat(255);
    TaskSpec::from_user_json(&format!(r#"{{"id":"a","command":"x","files":{{"d/{ok_name}":"x"}}}}"#))
        .unwrap();
}

#[test]
fn secrets_are_named_never_given_and_a_tenants_secrets_serve_only_its_tasks() {
    let spec = TaskSpec::from_user_json(
        r#"{"id":"t/app","command":"x","secrets":{"env":{"PW":"t/db"},"files":{"conf/pw":"shared"}}}"#,
    )
    .unwrap();
    assert_eq!(spec.secrets.env["PW"], "t/db");
    for (text, words) in [
        (r#"{"id":"u/app","command":"x","secrets":{"env":{"PW":"t/db"}}}"#, "secrets.env.PW"),
        (r#"{"id":"t/app","command":"x","env":{"PW":"1"},"secrets":{"env":{"PW":"t/db"}}}"#, "also in env"),
        (r#"{"id":"t/app","command":"x","secrets":{"env":{"SHIVA_X":"t/db"}}}"#, "SHIVA_"),
        (
            r#"{"id":"t/app","command":"x","files":{"a":"1"},"secrets":{"files":{"a":"t/db"}}}"#,
            "also in files",
        ),
        (r#"{"id":"t/app","command":"x","secrets":{"files":{"../a":"t/db"}}}"#, "secrets.files.../a"),
        (r#"{"id":"t/app","command":"x","secrets":{"env":{"PW":"a//b"}}}"#, "not a secret name"),
        (r#"{"id":"t/app","command":"x","secrets":{"value":"x"}}"#, "secrets.value"),
    ] {
        let found = err(text);
        assert!(found.contains(words), "{text}: {found}");
    }
}

#[test]
fn instances_are_asked_of_services_within_range_and_never_defined_by_id() {
    let spec = TaskSpec::from_user_json(r#"{"id":"web","command":"x","count":3}"#).unwrap();
    assert_eq!(spec.instances(), super::Instances::Count(3));
    let web = |n: &str| crate::TaskId::new(format!("web@{n}")).unwrap();
    assert!(spec.has_instance(&web("0")) && spec.has_instance(&web("2")));
    assert!(
        !spec.has_instance(&web("3")) && !spec.has_instance(&web("02")) && !spec.has_instance(&web("n1"))
    );
    let every = TaskSpec::from_user_json(r#"{"id":"agent","command":"x","every_node":true}"#).unwrap();
    assert_eq!(every.instances(), super::Instances::EveryNode);
    assert!(every.has_instance(&crate::TaskId::new("agent@host-1").unwrap()));
    assert!(!every.has_instance(&web("1")), "another task's");
    let instance = spec.instance_spec(web("1"));
    assert_eq!(instance.id.as_str(), "web@1");
    assert!(instance.runs_like(&spec) && instance != spec);
    instance.validate().unwrap();
    let other = TaskSpec { args: vec!["-v".into()], ..spec.clone() };
    assert!(!other.runs_like(&spec));
    let big = format!(r#"{{"id":"web","command":"x","count":2,"args":["{}"]}}"#, "a".repeat(70_000));
    assert!(err(&big).contains("at most 65536 bytes as JSON"), "{}", err(&big));
    let long = format!(r#"{{"id":"a/{}","command":"x","every_node":true}}"#, "w".repeat(127));
    assert!(err(&long).contains("too long for instances"), "{}", err(&long));
    let fits = format!(r#"{{"id":"a/{}","command":"x","every_node":true}}"#, "w".repeat(126));
    TaskSpec::from_user_json(&fits).unwrap();
    for (text, words) in [
        (r#"{"id":"web","command":"x","count":0}"#, "field 'count': 0 is out of range: from 1 to 1000"),
        (r#"{"id":"web","command":"x","count":1001}"#, "field 'count': 1001 is out of range"),
        (r#"{"id":"web","command":"x","count":-1}"#, "count"),
        (r#"{"id":"web","command":"x","count":2,"every_node":true}"#, "not both"),
        (r#"{"id":"web","command":"x","count":2,"once":true}"#, "field 'count': only applies to services"),
        (r#"{"id":"web","command":"x","every_node":true,"schedule":"* * * * *"}"#, "field 'every_node'"),
        (r#"{"id":"web@1","command":"x"}"#, "names an instance"),
        (r#"{"id":"web@a/b","command":"x"}"#, "invalid segment"),
    ] {
        let found = err(text);
        assert!(found.contains(words), "{text}: {found}");
    }
}
