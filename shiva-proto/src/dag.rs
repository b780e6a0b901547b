//! The `after` graph of one-shot tasks: a submission that would close a cycle is refused.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::TaskId;

/// A cycle through `after` edges (`a → b` means "a waits for b"), as the list of tasks on it
/// starting and ending with the same task, if the graph has one.
pub fn find_cycle(edges: &BTreeMap<TaskId, Vec<TaskId>>) -> Option<Vec<TaskId>> {
    let mut done = BTreeSet::new();
    for start in edges.keys() {
        let mut path = Vec::new();
        if let Some(cycle) = visit(start, edges, &mut path, &mut done) {
            return Some(cycle);
        }
    }
    None
}

fn visit<'a>(
    task: &'a TaskId,
    edges: &'a BTreeMap<TaskId, Vec<TaskId>>,
    path: &mut Vec<&'a TaskId>,
    done: &mut BTreeSet<&'a TaskId>,
) -> Option<Vec<TaskId>> {
    if let Some(position) = path.iter().position(|on_path| *on_path == task) {
        let mut cycle: Vec<TaskId> = path[position..].iter().map(|t| (*t).clone()).collect();
        cycle.push(task.clone());
        return Some(cycle);
    }
    if done.contains(task) {
        return None;
    }
    path.push(task);
    for next in edges.get(task).into_iter().flatten() {
        if let Some(cycle) = visit(next, edges, path, done) {
            return Some(cycle);
        }
    }
    path.pop();
    done.insert(task);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<TaskId, Vec<TaskId>> {
        edges
            .iter()
            .map(|(from, to)| {
                (TaskId::new(*from).unwrap(), to.iter().map(|t| TaskId::new(*t).unwrap()).collect())
            })
            .collect()
    }

    #[test]
    fn cycles_are_found_and_named() {
        assert_eq!(find_cycle(&graph(&[("a", &["b", "c"]), ("b", &["c"]), ("c", &[])])), None);
        assert_eq!(find_cycle(&graph(&[("a", &["missing"])])), None, "unknown tasks are not cycles");
        let cycle = find_cycle(&graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])])).unwrap();
        let names: Vec<&str> = cycle.iter().map(TaskId::as_str).collect();
        assert_eq!(names, ["a", "b", "c", "a"]);
        let self_loop = find_cycle(&graph(&[("x", &["x"])])).unwrap();
        assert_eq!(self_loop.len(), 2);
    }
}
