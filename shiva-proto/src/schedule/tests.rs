use chrono::TimeZone;

use super::*;
use crate::ids::TaskId;

fn schedule(expressions: &[&str], timezone: Option<&str>) -> Schedule {
    let mut spec = TaskSpec::new(TaskId::new("t").unwrap(), "true", vec![]);
    spec.schedule = expressions.iter().map(|e| e.to_string()).collect();
    spec.timezone = timezone.map(str::to_owned);
    Schedule::from_spec(&spec).unwrap().unwrap()
}

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
}

fn spacing(slots: &[DateTime<Utc>]) -> Vec<i64> {
    slots.windows(2).map(|w| (w[1] - w[0]).num_minutes()).collect()
}

#[test]
fn paris_skipped_hour_runs_once_at_the_transition() {
    // 2025-03-30: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that day.
    let daily = schedule(&["30 2 * * *"], Some("Europe/Paris"));
    let slots = daily.slots(utc(2025, 3, 28, 12, 0), utc(2025, 4, 1, 12, 0), 10);
    assert_eq!(
        slots,
        [utc(2025, 3, 29, 1, 30), utc(2025, 3, 30, 1, 0), utc(2025, 3, 31, 0, 30), utc(2025, 4, 1, 0, 30)],
        "03-30 runs once, at 03:00 CEST = 01:00 UTC"
    );
}

#[test]
fn paris_repeated_hour_runs_once() {
    // 2025-10-26: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
    let daily = schedule(&["30 2 * * *"], Some("Europe/Paris"));
    let slots = daily.slots(utc(2025, 10, 25, 12, 0), utc(2025, 10, 27, 12, 0), 10);
    assert_eq!(
        slots,
        [utc(2025, 10, 26, 0, 30), utc(2025, 10, 27, 1, 30)],
        "once, at the first 02:30 (CEST)"
    );
}

#[test]
fn new_york_gap_and_overlap() {
    let daily = schedule(&["30 2 * * *"], Some("America/New_York"));
    // 2025-03-09: 02:00 EST jumps to 03:00 EDT.
    let spring = daily.slots(utc(2025, 3, 8, 12, 0), utc(2025, 3, 10, 12, 0), 10);
    assert_eq!(spring, [utc(2025, 3, 9, 7, 0), utc(2025, 3, 10, 6, 30)]);
    // 2025-11-02: 02:00 EDT falls back to 01:00 EST; 01:30 happens twice.
    let at_one_thirty = schedule(&["30 1 * * *"], Some("America/New_York"));
    let fall = at_one_thirty.slots(utc(2025, 11, 1, 12, 0), utc(2025, 11, 3, 12, 0), 10);
    assert_eq!(fall, [utc(2025, 11, 2, 5, 30), utc(2025, 11, 3, 6, 30)], "once, at 01:30 EDT");
}

#[test]
fn sub_hourly_schedules_follow_utc_instants_through_both_transitions() {
    let half_hourly_ny = schedule(&["*/30 * * * *"], Some("America/New_York"));
    let fall = half_hourly_ny.slots(utc(2025, 11, 2, 4, 0), utc(2025, 11, 2, 8, 0), 100);
    assert_eq!(fall.len(), 8, "the repeated hour runs twice: {fall:?}");
    assert!(spacing(&fall).iter().all(|gap| *gap == 30));

    let half_hourly_paris = schedule(&["*/30 * * * *"], Some("Europe/Paris"));
    let spring = half_hourly_paris.slots(utc(2025, 3, 29, 23, 0), utc(2025, 3, 30, 3, 0), 100);
    assert!(spacing(&spring).iter().all(|gap| *gap == 30), "the missing hour is skipped: {spring:?}");
    assert_eq!(spring.len(), 8);
}

#[test]
fn syntaxes_and_unions() {
    let every_second = schedule(&["* * * * * *"], None);
    assert_eq!(every_second.slots(utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 0, 1), 1000).len(), 60);
    let quartz = schedule(&["0 0 12 ? * MON-FRI 2026"], None);
    assert_eq!(
        quartz.next_after(utc(2026, 11, 21, 0, 0)),
        Some(utc(2026, 11, 23, 12, 0)),
        "Saturday → Monday noon"
    );
    assert_eq!(quartz.next_after(utc(2026, 12, 31, 13, 0)), None, "no slot after its last year");
    let hourly = schedule(&["@hourly"], None);
    assert_eq!(hourly.next_after(utc(2026, 1, 1, 0, 0)), Some(utc(2026, 1, 1, 1, 0)));
    let union = schedule(&["0 * * * *", "0 */2 * * *", "30 0 * * *"], None);
    let slots = union.slots(utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 3, 0), 100);
    assert_eq!(
        slots,
        [utc(2026, 1, 1, 0, 30), utc(2026, 1, 1, 1, 0), utc(2026, 1, 1, 2, 0), utc(2026, 1, 1, 3, 0)]
    );
}

#[test]
fn latest_slots_walk_back_from_the_end() {
    let hourly = schedule(&["0 * * * *"], None);
    let latest = hourly.latest_slots(utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 10, 0), 3);
    assert_eq!(latest, [utc(2026, 1, 1, 8, 0), utc(2026, 1, 1, 9, 0), utc(2026, 1, 1, 10, 0)]);
    let all = hourly.latest_slots(utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 3, 30), 100);
    assert_eq!(all, hourly.slots(utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 3, 30), 100));
    assert!(hourly.latest_slots(utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 0, 30), 5).is_empty());
}

#[test]
fn bad_schedules_name_the_field() {
    let error = |expressions: &[&str], timezone: Option<&str>| {
        let mut spec = TaskSpec::new(TaskId::new("t").unwrap(), "true", vec![]);
        spec.schedule = expressions.iter().map(|e| e.to_string()).collect();
        spec.timezone = timezone.map(str::to_owned);
        Schedule::from_spec(&spec).unwrap_err().to_string()
    };
    assert!(error(&["* * * * *", "61 * * * *"], None).contains("'schedule[1]'"));
    assert!(error(&["* * *"], None).contains("3 fields"));
    assert!(error(&["@sometimes"], None).contains("'schedule[0]'"));
    assert!(error(&["* * * * *"], Some("Mars/Olympus")).contains("'timezone'"));
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn slots_are_increasing_continuous_and_agree_backwards(
            start_minutes in 0i64..(365 * 24 * 60),
            hours in 1i64..12,
            zone in prop::sample::select(vec!["Europe/Paris", "America/New_York", "UTC"]),
        ) {
            let after = utc(2025, 1, 1, 0, 0) + TimeDelta::minutes(start_minutes);
            let until = after + TimeDelta::hours(hours);
            let half_hourly = schedule(&["*/30 * * * *"], Some(zone));
            let slots = half_hourly.slots(after, until, 1000);
            prop_assert!(slots.windows(2).all(|w| w[1] - w[0] == TimeDelta::minutes(30)), "{slots:?}");
            prop_assert!(slots.iter().all(|slot| *slot > after && *slot <= until));
            // Any window of h hours holds exactly 2h half-hour instants: none skipped, none doubled.
            prop_assert_eq!(slots.len() as i64, hours * 2);
            let tail = half_hourly.latest_slots(after, until, 3);
            prop_assert_eq!(&tail[..], &slots[slots.len().saturating_sub(3)..]);

            let daily = schedule(&["30 2 * * *", "15 1 * * 0"], Some(zone));
            let slots = daily.slots(after, after + TimeDelta::days(10), 100);
            prop_assert!(slots.windows(2).all(|w| w[0] < w[1]));
            let tail = daily.latest_slots(after, after + TimeDelta::days(10), 4);
            prop_assert_eq!(&tail[..], &slots[slots.len().saturating_sub(4)..]);
        }
    }
}

#[test]
fn an_expression_whose_dates_are_past_answers_quickly() {
    let mut spec = crate::TaskSpec::new(crate::TaskId::new("t").unwrap(), "x", vec![]);
    spec.schedule = vec!["0 0 0 1 1 * 2020".into(), "0 0 0 29 2 * 2024".into()];
    let schedule = Schedule::from_spec(&spec).unwrap().unwrap();
    let now = Utc::now();
    let started = std::time::Instant::now();
    for _ in 0..10 {
        assert_eq!(schedule.next_after(now), None);
        assert!(schedule.latest_slots(now - TimeDelta::days(30), now, 10).is_empty());
    }
    let each = started.elapsed() / 10;
    assert!(each < std::time::Duration::from_millis(50), "{each:?} per plan");
}

/// Weekdays of the slots of `expression` over the first two weeks of 2026 (UTC), in order,
/// as chrono names them.
fn weekdays(expression: &str) -> Vec<chrono::Weekday> {
    use chrono::Datelike;
    let slots = schedule(&[expression], None).slots(utc(2026, 1, 4, 0, 0), utc(2026, 1, 11, 0, 0), 100);
    slots.iter().map(|slot| slot.weekday()).collect()
}

#[test]
fn quartz_expressions_number_weekdays_the_quartz_way() {
    use chrono::Weekday::*;
    // Quartz: 1 = SUN … 7 = SAT. "0 15 10 ? * MON-FRI" is Quartz's own example; "2-6" is the
    // same days by number, as Punch users write it. 2026-01-04 is a Sunday.
    assert_eq!(weekdays("0 15 10 ? * MON-FRI"), [Mon, Tue, Wed, Thu, Fri]);
    assert_eq!(weekdays("0 15 10 ? * 2-6"), [Mon, Tue, Wed, Thu, Fri]);
    assert_eq!(weekdays("0 15 10 ? * 2-6 *"), [Mon, Tue, Wed, Thu, Fri]);
    assert_eq!(weekdays("0 15 10 ? * 1"), [Sun]);
    assert_eq!(weekdays("0 15 10 ? * 7"), [Sat]);
    assert_eq!(weekdays("0 15 10 ? * 1,7"), [Sun, Sat]);
    assert_eq!(weekdays("0 15 10 ? * SUN"), [Sun]);
    // Seven fields without `?` are Quartz too (a year).
    assert_eq!(weekdays("0 15 10 * * 2 2026"), [Mon]);
    // POSIX expressions (5 fields, or 6 with seconds, no `?`) keep 0/7 = Sunday, 1 = Monday.
    assert_eq!(weekdays("15 10 * * 1-5"), [Mon, Tue, Wed, Thu, Fri]);
    assert_eq!(weekdays("0 15 10 * * 1-5"), [Mon, Tue, Wed, Thu, Fri]);
    assert_eq!(weekdays("15 10 * * 0"), [Sun]);
    assert_eq!(weekdays("15 10 * * 7"), [Sun]);
}

#[test]
fn quartz_documented_examples() {
    // The examples of Quartz's CronTrigger tutorial, with what the tutorial says they mean.
    let slots = |expression: &str, from: DateTime<Utc>, count: usize| {
        schedule(&[expression], None).slots(from, utc(2100, 1, 1, 0, 0), count)
    };
    let at = |y, mo, d, h, mi, s| Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap();
    // "0 0 12 * * ?": 12pm (noon) every day.
    assert_eq!(
        slots("0 0 12 * * ?", utc(2026, 1, 1, 0, 0), 2),
        [utc(2026, 1, 1, 12, 0), utc(2026, 1, 2, 12, 0)]
    );
    // "0 15 10 ? * *" and "0 15 10 * * ? *": 10:15am every day.
    assert_eq!(
        slots("0 15 10 ? * *", utc(2026, 1, 1, 0, 0), 2),
        [utc(2026, 1, 1, 10, 15), utc(2026, 1, 2, 10, 15)]
    );
    assert_eq!(slots("0 15 10 * * ? *", utc(2026, 1, 1, 0, 0), 1), [utc(2026, 1, 1, 10, 15)]);
    // "0 15 10 * * ? 2005"-style: every day during one year only.
    assert_eq!(slots("0 15 10 * * ? 2027", utc(2026, 6, 1, 0, 0), 1), [utc(2027, 1, 1, 10, 15)]);
    // "0 0/5 14 * * ?": every 5 minutes from 2pm to 2:55pm.
    let every5 = slots("0 0/5 14 * * ?", utc(2026, 1, 1, 0, 0), 13);
    assert_eq!(every5.first(), Some(&utc(2026, 1, 1, 14, 0)));
    assert_eq!(every5[11], utc(2026, 1, 1, 14, 55));
    assert_eq!(every5[12], utc(2026, 1, 2, 14, 0));
    // "0 0-5 14 * * ?": every minute from 2pm to 2:05pm.
    assert_eq!(slots("0 0-5 14 * * ?", utc(2026, 1, 1, 0, 0), 7)[6], utc(2026, 1, 2, 14, 0));
    // "0 10,44 14 ? 3 WED": 2:10pm and 2:44pm every Wednesday in March (2026-03-04 is one).
    assert_eq!(
        slots("0 10,44 14 ? 3 WED", utc(2026, 1, 1, 0, 0), 3),
        [utc(2026, 3, 4, 14, 10), utc(2026, 3, 4, 14, 44), utc(2026, 3, 11, 14, 10)]
    );
    // "0 15 10 15 * ?": the 15th of every month.
    assert_eq!(
        slots("0 15 10 15 * ?", utc(2026, 1, 1, 0, 0), 2),
        [utc(2026, 1, 15, 10, 15), utc(2026, 2, 15, 10, 15)]
    );
    // "0 15 10 L * ?": the last day of every month.
    assert_eq!(
        slots("0 15 10 L * ?", utc(2026, 2, 1, 0, 0), 2),
        [utc(2026, 2, 28, 10, 15), utc(2026, 3, 31, 10, 15)]
    );
    // "0 15 10 ? * 6L": the last Friday of every month (2026-01-30, 2026-02-27).
    assert_eq!(
        slots("0 15 10 ? * 6L", utc(2026, 1, 1, 0, 0), 2),
        [utc(2026, 1, 30, 10, 15), utc(2026, 2, 27, 10, 15)]
    );
    // "0 15 10 ? * 6#3": the third Friday of every month (2026-01-16, 2026-02-20).
    assert_eq!(
        slots("0 15 10 ? * 6#3", utc(2026, 1, 1, 0, 0), 2),
        [utc(2026, 1, 16, 10, 15), utc(2026, 2, 20, 10, 15)]
    );
    // "0 0 12 1/5 * ?": every 5 days starting on the first of the month.
    assert_eq!(
        slots("0 0 12 1/5 * ?", utc(2026, 1, 1, 0, 0), 3),
        [utc(2026, 1, 1, 12, 0), utc(2026, 1, 6, 12, 0), utc(2026, 1, 11, 12, 0)]
    );
    // "0 11 11 11 11 ?": every November 11th at 11:11am.
    assert_eq!(slots("0 11 11 11 11 ?", utc(2026, 1, 1, 0, 0), 1), [at(2026, 11, 11, 11, 11, 0)]);
}

#[test]
fn a_quartz_weekday_zero_or_eight_is_refused_for_a_new_spec_and_read_as_before_from_the_log() {
    use chrono::Weekday::*;
    for expression in ["0 15 10 ? * 0", "0 15 10 ? * 8", "0 15 10 ? * 0-4"] {
        let mut spec = TaskSpec::new(TaskId::new("t").unwrap(), "true", vec![]);
        spec.schedule = vec![expression.into()];
        let err = spec.validate_new().unwrap_err().to_string();
        assert!(err.contains("1 = Sunday to 7 = Saturday"), "{expression}: {err}");
    }
    // Accepted by earlier builds, so possibly in the log: read the POSIX way, as they did,
    // never made invalid by an upgrade.
    assert_eq!(weekdays("0 15 10 ? * 0"), [Sun]);
    assert_eq!(weekdays("0 15 10 ? * 0-4"), [Sun, Mon, Tue, Wed, Thu]);
    assert!(schedule(&["0 15 10 ? * 0"], None).describe()[0].contains("read the POSIX way"));
}

#[test]
fn quartz_steps_name_ranges_last_and_nth_keep_their_meaning() {
    use chrono::Weekday::*;
    // `*/2` from Sunday: Sunday, Tuesday, Thursday, Saturday (croner's own Quartz mode refuses it).
    assert_eq!(weekdays("0 0 12 ? * */2"), [Sun, Tue, Thu, Sat]);
    assert_eq!(weekdays("0 0 12 ? * 2/2"), [Mon, Wed, Fri]);
    // Ranges of names ending on Sunday.
    assert_eq!(weekdays("0 0 10 ? * SAT-SUN"), [Sun, Sat]);
    assert_eq!(weekdays("0 0 10 ? * FRI-SUN"), [Sun, Fri, Sat]);
    assert_eq!(weekdays("0 0 10 ? * MON-SUN").len(), 7);
    assert_eq!(weekdays("0 0 10 ? * 6-1"), [Sun, Fri, Sat]);
    assert_eq!(weekdays("0 0 10 ? * 7-1"), [Sun, Sat]);
    assert_eq!(weekdays("0 0 10 ? * mon,wed"), [Mon, Wed]);
    // `L` alone is Saturday; a 5-field expression with `?` is Quartz too.
    assert_eq!(weekdays("0 0 10 ? * L"), [Sat]);
    assert_eq!(weekdays("0 10 ? * 2-6"), [Mon, Tue, Wed, Thu, Fri]);
    for expression in ["0 0 12 ? * */2", "0 0 10 ? * SAT-SUN", "0 0 10 ? * 6#3", "0 0 10 ? * 6L"] {
        let mut spec = TaskSpec::new(TaskId::new("t").unwrap(), "true", vec![]);
        spec.schedule = vec![expression.into()];
        spec.validate_new().unwrap_or_else(|err| panic!("{expression}: {err}"));
    }
}

#[test]
fn schedules_are_described_in_words_with_their_next_slots_in_the_zone() {
    let weekdays = schedule(&["0 15 10 ? * 2-6"], Some("Europe/Paris"));
    let words = weekdays.describe();
    assert_eq!(words.len(), 1);
    assert!(words[0].contains("Quartz"), "{words:?}");
    assert!(words[0].contains("Monday") && words[0].contains("Friday"), "{words:?}");
    let next = weekdays.upcoming(utc(2026, 1, 2, 12, 0), 5);
    let shown: Vec<String> = next.iter().map(|slot| slot.to_rfc3339()).collect();
    assert_eq!(
        shown,
        [
            "2026-01-05T10:15:00+01:00",
            "2026-01-06T10:15:00+01:00",
            "2026-01-07T10:15:00+01:00",
            "2026-01-08T10:15:00+01:00",
            "2026-01-09T10:15:00+01:00"
        ]
    );
    let posix = schedule(&["*/15 * * * *"], None);
    assert!(!posix.describe()[0].contains("Quartz"), "{:?}", posix.describe());
}
