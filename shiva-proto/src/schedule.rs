//! Cron schedules of periodic tasks. Slots are UTC instants.
//!
//! Expressions have 5 fields (`m h dom mon dow`), 6 (seconds first), or 7 (Quartz style, with a
//! year); `?` is accepted for day-of-month and day-of-week, and the macros `@yearly`,
//! `@monthly`, `@weekly`, `@daily`, `@hourly`. A task may carry several; its slots are their
//! union. Daylight saving (in the task's `timezone`, default UTC), as implemented by croner:
//! a slot of a fixed-hour expression that falls in a skipped hour runs once, at the transition;
//! in a repeated hour it runs once, at the first occurrence; sub-hourly expressions (wildcard or
//! stepped hours) follow UTC instants, so they run through the repeated hour twice and skip the
//! missing one.

use chrono::{DateTime, Offset, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::CronParser;
use croner::{Cron, Direction};

use crate::spec::{SpecError, TaskSpec};

/// `at` without its fraction of a second.
fn whole_second(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(at.timestamp(), 0).unwrap_or(at)
}

/// `at + by` (negative `by`: earlier), saturating at chrono's limits: no instant panics.
fn shift(at: DateTime<Utc>, by: TimeDelta) -> DateTime<Utc> {
    at.checked_add_signed(by).unwrap_or(if by < TimeDelta::zero() {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

/// Whether `cron` has no occurrence at all from 1970 on. Proving it walks the calendar to
/// croner's end (tens of milliseconds), so the answer is remembered per expression and zone:
/// every reader validates every spec record it reads.
fn never_fires(cron: &Cron, expression: &str, timezone: Tz) -> bool {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static KNOWN: Mutex<Option<HashMap<(String, Tz), bool>>> = Mutex::new(None);
    let key = (expression.to_owned(), timezone);
    if let Some(known) = KNOWN.lock().ok().and_then(|known| known.as_ref()?.get(&key).copied()) {
        return known;
    }
    let origin = DateTime::<Utc>::UNIX_EPOCH.with_timezone(&timezone);
    let never = cron.find_next_occurrence(&origin, false).is_err();
    if let Ok(mut known) = KNOWN.lock() {
        let known = known.get_or_insert_with(HashMap::new);
        if known.len() >= 4096 {
            known.clear();
        }
        known.insert(key, never);
    }
    never
}

/// Whether `expression` is read the Quartz way (weekdays 1 = Sunday to 7 = Saturday): it has
/// 7 fields (a year) or a `?`. Others are read the POSIX way (0 or 7 = Sunday, 1 = Monday).
pub fn is_quartz(expression: &str) -> bool {
    expression.split_whitespace().count() == 7 || expression.contains('?')
}

const QUARTZ_WEEKDAYS: &str =
    "a Quartz expression (7 fields or a '?') numbers weekdays from 1 = Sunday to 7 = Saturday (or SUN-SAT)";

/// How an expression is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// 0 or 7 = Sunday, 1 = Monday.
    Posix,
    /// 1 = Sunday … 7 = Saturday.
    Quartz,
    /// Quartz's form with a weekday Quartz has not (0, 8): read the POSIX way, as every
    /// expression was before; a new spec is refused ([`Schedule::check_new`]).
    LegacyPosix,
}

/// Parses `expression`: a Quartz one with its weekdays turned into POSIX numbers first (croner's
/// own Quartz mode refuses `*/2` and `SAT-SUN`, which Quartz and earlier builds take).
fn parse(expression: &str) -> Result<(Cron, Style), String> {
    let posix = |text: &str| CronParser::builder().build().parse(text).map_err(|err| err.to_string());
    if !is_quartz(expression) {
        return Ok((posix(expression)?, Style::Posix));
    }
    match quartz_to_posix(expression) {
        Ok(translated) => Ok((posix(&translated)?, Style::Quartz)),
        Err(quartz) => match posix(expression) {
            Ok(cron) => Ok((cron, Style::LegacyPosix)),
            Err(_) => Err(format!("{quartz}: {QUARTZ_WEEKDAYS}")),
        },
    }
}

/// `expression` with the numbers of its day-of-week field (1 = Sunday … 7 = Saturday) turned into
/// POSIX ones (0 = Sunday … 6 = Saturday); names, `*`, `?`, steps, `L` and `#` keep their meaning.
/// `Err` names a weekday Quartz does not have.
fn quartz_to_posix(expression: &str) -> Result<String, String> {
    let mut fields: Vec<String> = expression.split_whitespace().map(str::to_owned).collect();
    let index = if fields.len() == 5 { 4 } else { 5 };
    let Some(field) = fields.get(index) else { return Ok(expression.to_owned()) };
    let day = |text: &str| -> Result<String, String> {
        if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
            match text.parse::<u32>() {
                Ok(number @ 1..=7) => Ok((number - 1).to_string()),
                _ => Err(format!("weekday {text} is not a Quartz weekday")),
            }
        } else {
            // A name (MON), or what croner will refuse with its own message.
            Ok(text.to_owned())
        }
    };
    let mut items = Vec::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        let range = if range == "?" || (range == "*" && step.is_none()) {
            range.to_owned()
        } else if range == "*" {
            // Stepped from Sunday, within the week (POSIX's 7 is Sunday again).
            "0-6".to_owned()
        } else if range.eq_ignore_ascii_case("L") {
            // Quartz: `L` alone in day-of-week is its last day, Saturday.
            "6".to_owned()
        } else if let Some(number) = range.strip_suffix(['L', 'l']) {
            format!("{}L", day(number)?)
        } else if let Some((number, nth)) = range.split_once('#') {
            format!("{}#{nth}", day(number)?)
        } else if let Some((from, to)) = range.split_once('-') {
            // A range ending on Sunday (`6-1`, Friday to Sunday) ends on POSIX's 7.
            let to = if to == "1" && from != "1" { "7".to_owned() } else { day(to)? };
            format!("{}-{to}", day(from)?)
        } else if step.is_some() {
            // `a/n`: from a to Saturday (in POSIX, `a/n` would run on to 7, Sunday again).
            format!("{}-6", day(range)?)
        } else {
            day(range)?
        };
        items.push(match step {
            Some(step) => format!("{range}/{step}"),
            None => range,
        });
    }
    fields[index] = items.join(",");
    Ok(fields.join(" "))
}

/// How far from a UTC-offset change the careful walk is used.
const TRANSITION_WINDOW: TimeDelta = TimeDelta::hours(3);

/// A task's parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    crons: Vec<Cron>,
    /// The spec's expressions, as written (one per cron).
    expressions: Vec<String>,
    timezone: Tz,
}

impl Schedule {
    /// Parses a spec's `schedule` and `timezone`; `None` for a task without schedule. Errors name
    /// the field (`schedule[1]`, `timezone`).
    pub fn from_spec(spec: &TaskSpec) -> Result<Option<Schedule>, SpecError> {
        let timezone = match &spec.timezone {
            None => Tz::UTC,
            Some(name) => name.parse::<Tz>().map_err(|_| {
                SpecError(format!("field 'timezone': '{name}' is not an IANA time zone (e.g. Europe/Paris)"))
            })?,
        };
        if spec.schedule.is_empty() {
            return Ok(None);
        }
        let crons = spec
            .schedule
            .iter()
            .enumerate()
            .map(|(index, expression)| {
                let fields = expression.split_whitespace().count();
                let macro_form = expression.trim_start().starts_with('@');
                if !macro_form && !(5..=7).contains(&fields) {
                    return Err(SpecError(format!(
                        "field 'schedule[{index}]': '{expression}' has {fields} fields; cron takes 5, 6 (seconds first) or 7 (with a year)"
                    )));
                }
                let (cron, _) = parse(expression).map_err(|err| {
                    SpecError(format!("field 'schedule[{index}]': '{expression}' is not a cron expression: {err}"))
                })?;
                // One that never fires (`0 0 30 2 *`) would make every search for its next slot
                // walk the calendar to its end: refused.
                if never_fires(&cron, expression, timezone) {
                    return Err(SpecError(format!(
                        "field 'schedule[{index}]': '{expression}' never fires (no such date)"
                    )));
                }
                Ok(cron)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Schedule { crons, expressions: spec.schedule.clone(), timezone }))
    }

    /// What a new spec (`submit`, `apply`, the API) must meet beyond [`Schedule::from_spec`]:
    /// a Quartz expression's weekdays are Quartz's (1 to 7). A spec already in the log with a 0
    /// there is still read, the POSIX way, as before Quartz expressions were read the Quartz way.
    pub fn check_new(spec: &TaskSpec) -> Result<(), SpecError> {
        for (index, expression) in spec.schedule.iter().enumerate() {
            if is_quartz(expression)
                && let Err(err) = quartz_to_posix(expression)
            {
                return Err(SpecError(format!(
                    "field 'schedule[{index}]': '{expression}': {err}: {QUARTZ_WEEKDAYS}"
                )));
            }
        }
        Ok(())
    }

    /// Each expression in words (croner's English), marked `(Quartz)` when it is read the Quartz
    /// way, for `status` and `submit --dry-run`.
    pub fn describe(&self) -> Vec<String> {
        self.crons
            .iter()
            .zip(&self.expressions)
            .map(|(cron, expression)| {
                let style = match parse(expression).map(|(_, style)| style) {
                    Ok(Style::Quartz) => " (Quartz: 1 = Sunday)",
                    Ok(Style::LegacyPosix) => {
                        " (a Quartz form with a weekday Quartz has not: read the POSIX way, 0 = Sunday; write SUN-SAT)"
                    }
                    _ => "",
                };
                format!("{expression}: {}{style}", cron.describe())
            })
            .collect()
    }

    /// The next `count` slots strictly after `after`, in the schedule's zone.
    pub fn upcoming(&self, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Tz>> {
        self.slots(after, DateTime::<Utc>::MAX_UTC, count)
            .into_iter()
            .map(|slot| slot.with_timezone(&self.timezone))
            .collect()
    }

    /// The schedule's zone.
    pub fn timezone(&self) -> Tz {
        self.timezone
    }

    /// The first slot strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.crons.iter().filter_map(|cron| self.next_of(cron, after)).min()
    }

    /// Whether the zone's UTC offset changes within [at - 3h, at + 3h].
    fn near_transition(&self, at: DateTime<Utc>) -> bool {
        let offset = |at: DateTime<Utc>| self.timezone.offset_from_utc_datetime(&at.naive_utc()).fix();
        offset(shift(at, -TRANSITION_WINDOW)) != offset(shift(at, TRANSITION_WINDOW))
    }

    /// Every slot from `at - 3h` to `at + 3h`, walked with croner's iterator, which alone yields
    /// the second occurrence of a repeated hour (a search that starts inside it skips it), and
    /// yields the two occurrences out of UTC order.
    fn walk_around(&self, cron: &Cron, at: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let start = shift(at, -TRANSITION_WINDOW).with_timezone(&self.timezone);
        let end = shift(at, TRANSITION_WINDOW);
        cron.iter_from(start, Direction::Forward)
            .map(|slot| slot.with_timezone(&Utc))
            .take_while(|slot| *slot <= shift(end, TimeDelta::hours(1)))
            .filter(|slot| *slot <= end)
            .collect()
    }

    fn next_of(&self, cron: &Cron, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Slots are whole seconds; croner keeps the start's fraction, so start from one.
        let after = whole_second(after);
        if self.near_transition(after) {
            let found = self.walk_around(cron, after).into_iter().filter(|slot| *slot > after).min();
            if found.is_some() {
                return found;
            }
            let later = shift(after, TRANSITION_WINDOW);
            if later == after {
                return None;
            }
            return self.next_of(cron, later);
        }
        let local = after.with_timezone(&self.timezone);
        let slot = cron.find_next_occurrence(&local, false).ok()?.with_timezone(&Utc);
        if self.near_transition(slot) {
            // Landed next to a transition from far away: settle it the same way as above.
            return self.walk_around(cron, slot).into_iter().filter(|found| *found > after).min();
        }
        (slot > after).then_some(slot)
    }

    /// The last slot before `before` (or at it, when `inclusive`).
    fn previous_of(&self, cron: &Cron, before: DateTime<Utc>, inclusive: bool) -> Option<DateTime<Utc>> {
        // Slots are whole seconds: before a fractional instant means at or before its second.
        let (before, inclusive) =
            if before == whole_second(before) { (before, inclusive) } else { (whole_second(before), true) };
        let counts = |slot: &DateTime<Utc>| if inclusive { *slot <= before } else { *slot < before };
        if self.near_transition(before) {
            let found = self.walk_around(cron, before).into_iter().filter(counts).max();
            if found.is_some() {
                return found;
            }
            let earlier = shift(before, -TRANSITION_WINDOW);
            if earlier == before {
                return None;
            }
            return self.previous_of(cron, earlier, true);
        }
        let local = before.with_timezone(&self.timezone);
        let slot = cron.find_previous_occurrence(&local, inclusive).ok()?.with_timezone(&Utc);
        if self.near_transition(slot) {
            // A backward search resolves a skipped hour to just before the gap, a forward one to
            // the transition: settle it with the forward walk, so both directions agree.
            let found = self.walk_around(cron, slot).into_iter().filter(counts).max();
            let earlier = shift(slot, -TRANSITION_WINDOW);
            if earlier == slot {
                return found;
            }
            return found.or_else(|| self.previous_of(cron, earlier, true));
        }
        counts(&slot).then_some(slot)
    }

    /// Slots in `(after, until]`, ascending, at most `limit` (the earliest ones).
    pub fn slots(&self, after: DateTime<Utc>, until: DateTime<Utc>, limit: usize) -> Vec<DateTime<Utc>> {
        let mut slots = Vec::new();
        let mut cursor = after;
        while slots.len() < limit {
            match self.next_after(cursor) {
                Some(slot) if slot <= until => {
                    slots.push(slot);
                    cursor = slot;
                }
                _ => break,
            }
        }
        slots
    }

    /// Slots in `(after, until]`, ascending, at most `limit` (the latest ones), by walking back
    /// from `until`: catching up after a long outage does not enumerate every missed slot.
    pub fn latest_slots(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut slots = Vec::new();
        let mut cursor = until;
        while slots.len() < limit {
            let inclusive = slots.is_empty();
            let previous =
                self.crons.iter().filter_map(|cron| self.previous_of(cron, cursor, inclusive)).max();
            match previous {
                Some(slot) if slot > after => {
                    slots.push(slot);
                    cursor = slot;
                }
                _ => break,
            }
        }
        slots.reverse();
        slots
    }
}

#[cfg(test)]
mod tests;
