//! A task's runs as the view holds them, with one step's changes on top, so planning a task
//! does not copy its retained history.

use std::collections::BTreeMap;
use std::ops::Index;

use shiva_proto::view::RunEntry;
use uuid::Uuid;

/// The view's runs of a task (if any) under this step's changed entries.
pub(super) struct Runs<'a> {
    base: Option<&'a BTreeMap<Uuid, Box<RunEntry>>>,
    changed: BTreeMap<Uuid, RunEntry>,
}

impl<'a> Runs<'a> {
    pub(super) fn new(base: Option<&'a BTreeMap<Uuid, Box<RunEntry>>>) -> Self {
        Runs { base, changed: BTreeMap::new() }
    }

    pub(super) fn get(&self, id: &Uuid) -> Option<&RunEntry> {
        self.changed.get(id).or_else(|| self.base?.get(id).map(|entry| &**entry))
    }

    pub(super) fn contains_key(&self, id: &Uuid) -> bool {
        self.get(id).is_some()
    }

    /// The entry of `id` to change (a copy of the view's, or a new one).
    pub(super) fn entry(&mut self, id: Uuid) -> &mut RunEntry {
        let base = self.base;
        self.changed.entry(id).or_insert_with(|| {
            base.and_then(|runs| runs.get(&id)).map(|entry| (**entry).clone()).unwrap_or_default()
        })
    }

    /// Every entry, by run id.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&Uuid, &RunEntry)> {
        let changed = &self.changed;
        let mut base = self
            .base
            .into_iter()
            .flatten()
            .filter(move |(id, _)| !changed.contains_key(id))
            .map(|(id, entry)| (id, &**entry))
            .peekable();
        let mut mine = changed.iter().peekable();
        std::iter::from_fn(move || match (base.peek(), mine.peek()) {
            (Some((a, _)), Some((b, _))) if a < b => base.next(),
            (Some(_), None) => base.next(),
            _ => mine.next(),
        })
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &RunEntry> {
        self.iter().map(|(_, entry)| entry)
    }
}

impl Index<&Uuid> for Runs<'_> {
    type Output = RunEntry;

    fn index(&self, id: &Uuid) -> &RunEntry {
        self.get(id).expect("a run listed by this plan")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_show_over_the_view_in_run_id_order() {
        let ids: Vec<Uuid> = (1..=4u128).map(Uuid::from_u128).collect();
        let view: BTreeMap<Uuid, Box<RunEntry>> =
            [ids[0], ids[2]].iter().map(|id| (*id, Box::default())).collect();
        let mut runs = Runs::new(Some(&view));
        runs.entry(ids[3]);
        runs.entry(ids[1]);
        runs.entry(ids[2]).intent = None;
        let order: Vec<Uuid> = runs.iter().map(|(id, _)| *id).collect();
        assert_eq!(order, ids);
        assert!(runs.contains_key(&ids[1]) && !runs.contains_key(&Uuid::from_u128(9)));
        assert_eq!(view.len(), 2, "the view is untouched");
        assert_eq!(Runs::new(None).iter().count(), 0);
    }
}
