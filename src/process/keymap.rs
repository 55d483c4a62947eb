//! A map from row keys to values, dense for the common case.
//!
//! ERP primary keys are mostly sequences (`AUTO_INCREMENT`): small, non-negative,
//! nearly contiguous integers. For those a vector indexed by the key beats a hash
//! map on both counts that matter on the hot path: a lookup is one bounds check and
//! one load instead of hashing and probing, and a slot costs the value alone instead
//! of the value, the key and the table's slack. Keys that are not such integers (or
//! lie far beyond the rows stored) go to a hash map.

use std::collections::HashMap;

use crate::event::Key;

/// Dense slots may run ahead of the stored rows by this factor plus [`SLACK`]
/// before new keys go to the sparse map, so a stray huge id cannot blow up memory.
const GROWTH: usize = 2;
const SLACK: usize = 1 << 16;

#[derive(Debug)]
pub struct KeyMap<V> {
    dense: Vec<Option<V>>,
    sparse: HashMap<Key, V, ahash::RandomState>,
    len: usize,
}

impl<V> Default for KeyMap<V> {
    fn default() -> Self {
        Self { dense: Vec::new(), sparse: HashMap::default(), len: 0 }
    }
}

impl<V> KeyMap<V> {
    fn slot(&self, key: &Key) -> Option<usize> {
        match key {
            Key::Int(i) => usize::try_from(*i).ok().filter(|i| *i < self.dense.len()),
            Key::Values(_) => None,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, key: &Key) -> Option<&V> {
        match self.slot(key) {
            Some(i) => self.dense[i].as_ref(),
            None => self.sparse.get(key),
        }
    }

    pub fn get_mut(&mut self, key: &Key) -> Option<&mut V> {
        match self.slot(key) {
            Some(i) => self.dense[i].as_mut(),
            None => self.sparse.get_mut(key),
        }
    }

    /// Inserts `value` at `key`, returning the value it replaced.
    pub fn insert(&mut self, key: Key, value: V) -> Option<V> {
        if let Key::Int(i) = key {
            if let Ok(i) = usize::try_from(i) {
                if i >= self.dense.len() && i < self.len.max(self.dense.len()) * GROWTH + SLACK {
                    self.grow(i + 1);
                }
                if i < self.dense.len() {
                    let old = self.dense[i].replace(value);
                    if old.is_none() {
                        self.len += 1;
                    }
                    return old;
                }
            }
        }
        let old = self.sparse.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Grows the dense part to at least `min` slots, moving sparse keys it now covers.
    fn grow(&mut self, min: usize) {
        let new_len = min.max(self.dense.len() * 3 / 2).max(1024);
        self.dense.resize_with(new_len, || None);
        if self.sparse.is_empty() {
            return;
        }
        let covered: Vec<Key> = self
            .sparse
            .keys()
            .filter(|k| matches!(k, Key::Int(i) if usize::try_from(*i).is_ok_and(|i| i < new_len)))
            .cloned()
            .collect();
        for k in covered {
            if let (Key::Int(i), Some(v)) = (&k, self.sparse.remove(&k)) {
                self.dense[*i as usize] = Some(v);
            }
        }
    }

    pub fn remove(&mut self, key: &Key) -> Option<V> {
        let old = match self.slot(key) {
            Some(i) => self.dense[i].take(),
            None => self.sparse.remove(key),
        };
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The value at `key`, inserted with `make` when absent.
    pub fn get_or_insert_with(&mut self, key: Key, make: impl FnOnce() -> V) -> &mut V {
        if self.get(&key).is_none() {
            self.insert(key.clone(), make());
        }
        self.get_mut(&key).expect("the value was inserted just above")
    }

    /// Every key, in no particular order.
    pub fn keys(&self) -> Vec<Key> {
        let dense = self
            .dense
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_some())
            .map(|(i, _)| Key::Int(i as i64));
        dense.chain(self.sparse.keys().cloned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_map_for_every_kind_of_key() {
        let mut m = KeyMap::default();
        assert_eq!(m.insert(Key::Int(5), "a"), None);
        assert_eq!(m.insert(Key::Int(-1), "neg"), None);
        assert_eq!(m.insert(Key::Int(10_000_000), "far"), None);
        assert_eq!(
            m.insert(Key::Values(Box::new([crate::event::Value::Str("x".into())])), "s"),
            None
        );
        assert_eq!(m.insert(Key::Int(5), "b"), Some("a"));
        assert_eq!(m.len(), 4);
        assert_eq!(m.get(&Key::Int(5)), Some(&"b"));
        assert_eq!(m.get(&Key::Int(10_000_000)), Some(&"far"));
        assert_eq!(m.get(&Key::Int(6)), None);
        // Growing the dense part over a sparse key keeps it reachable.
        for i in 0..200_000 {
            m.insert(Key::Int(i + 100), "x");
        }
        m.grow(10_000_001);
        assert_eq!(m.get(&Key::Int(10_000_000)), Some(&"far"));
        assert_eq!(m.remove(&Key::Int(10_000_000)), Some("far"));
        assert_eq!(m.get(&Key::Int(10_000_000)), None);
        assert_eq!(m.keys().len(), m.len());
        *m.get_or_insert_with(Key::Int(3), || "new") = "set";
        assert_eq!(m.get(&Key::Int(3)), Some(&"set"));
    }
}
