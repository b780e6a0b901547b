//! A task's runs as the view holds them, with one step's changes on top, so planning a task
//! does not copy its retained history. A run the view keeps compact (over) is copied in full
//! only when the step changes it.

use std::collections::BTreeMap;

use shiva_proto::TaskId;
use shiva_proto::view::{Run, RunEntry, RunRef};
use uuid::Uuid;

/// The view's runs of a task (if any) under this step's changed entries.
pub(super) struct Runs<'a> {
    task: &'a TaskId,
    base: Option<&'a BTreeMap<Uuid, Run>>,
    changed: BTreeMap<Uuid, RunEntry>,
}

impl<'a> Runs<'a> {
    pub(super) fn new(task: &'a TaskId, base: Option<&'a BTreeMap<Uuid, Run>>) -> Self {
        Runs { task, base, changed: BTreeMap::new() }
    }

    pub(super) fn get(&self, id: &Uuid) -> Option<RunRef<'_>> {
        match self.changed.get(id) {
            Some(entry) => Some(RunRef::full(self.task, *id, entry)),
            None => Some(self.base?.get(id)?.at(self.task, *id)),
        }
    }

    pub(super) fn contains_key(&self, id: &Uuid) -> bool {
        self.get(id).is_some()
    }

    /// The entry of `id` to change (a copy of the view's, or a new one).
    pub(super) fn entry(&mut self, id: Uuid) -> &mut RunEntry {
        let (task, base) = (self.task, self.base);
        self.changed.entry(id).or_insert_with(|| {
            base.and_then(|runs| runs.get(&id))
                .map(|run| run.at(task, id).entry().into_owned())
                .unwrap_or_default()
        })
    }

    /// Every run, by run id.
    pub(super) fn iter(&self) -> impl Iterator<Item = RunRef<'_>> {
        let (task, changed) = (self.task, &self.changed);
        let mut base = self
            .base
            .into_iter()
            .flatten()
            .filter(move |(id, _)| !changed.contains_key(id))
            .map(move |(id, run)| run.at(task, *id))
            .peekable();
        let mut mine = changed.iter().map(move |(id, entry)| RunRef::full(task, *id, entry)).peekable();
        std::iter::from_fn(move || match (base.peek(), mine.peek()) {
            (Some(a), Some(b)) if a.id() < b.id() => base.next(),
            (Some(_), None) => base.next(),
            _ => mine.next(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_show_over_the_view_in_run_id_order() {
        let task = TaskId::new("t").unwrap();
        let ids: Vec<Uuid> = (1..=4u128).map(Uuid::from_u128).collect();
        let view: BTreeMap<Uuid, Run> =
            [ids[0], ids[2]].iter().map(|id| (*id, Run::keep(RunEntry::default()))).collect();
        let mut runs = Runs::new(&task, Some(&view));
        runs.entry(ids[3]);
        runs.entry(ids[1]);
        runs.entry(ids[2]).intent = None;
        let order: Vec<Uuid> = runs.iter().map(|run| run.id()).collect();
        assert_eq!(order, ids);
        assert!(runs.contains_key(&ids[1]) && !runs.contains_key(&Uuid::from_u128(9)));
        assert_eq!(view.len(), 2, "the view is untouched");
        assert_eq!(Runs::new(&task, None).iter().count(), 0);
    }
}
