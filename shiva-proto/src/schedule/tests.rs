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
