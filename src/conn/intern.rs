//! Shared copies of the short strings a session keeps for its access-log
//! line (request path, TLS server name), one table per shard thread.
//!
//! Why: a string allocated per session at handshake time lands between
//! the handshake's short-lived allocations (rustls's state above all), and
//! once those are freed it is what keeps each heap page from being given
//! back (`TlsSlot` has the measurement). Sessions mostly share a handful of
//! paths and names, so they share one allocation each, made once.
//!
//! Bounded against clients that send a new value every time: past
//! `CAPACITY` entries, or for a string longer than `LONGEST`, a session
//! gets its own copy as before. Entries are never evicted: a full table
//! of junk costs at most `CAPACITY × LONGEST` bytes per shard.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

const CAPACITY: usize = 1024;
const LONGEST: usize = 128;

thread_local! {
    static TABLE: RefCell<HashMap<Box<str>, Arc<str>>> = RefCell::new(HashMap::new());
}

pub fn intern(s: &str) -> Arc<str> {
    if s.len() > LONGEST {
        return s.into();
    }
    TABLE.with(|t| {
        let mut t = t.borrow_mut();
        if let Some(a) = t.get(s) {
            return a.clone();
        }
        let a: Arc<str> = s.into();
        if t.len() < CAPACITY {
            t.insert(s.into(), a.clone());
        }
        a
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_repeats_and_stays_bounded() {
        let a = intern("/ws");
        assert!(Arc::ptr_eq(&a, &intern("/ws")));
        let long = "x".repeat(LONGEST + 1);
        assert!(!Arc::ptr_eq(&intern(&long), &intern(&long)));
        for i in 0..CAPACITY * 2 {
            assert_eq!(&*intern(&format!("/n/{i}")), format!("/n/{i}"));
        }
        TABLE.with(|t| assert!(t.borrow().len() <= CAPACITY));
        // Still correct past the cap.
        assert_eq!(&*intern("/past-the-cap"), "/past-the-cap");
    }
}
