//! The per-direction payload queue.

use std::collections::VecDeque;

use super::Payload;

/// A FIFO of payloads that holds its first element inline: a relaying
/// connection usually has at most one payload queued per direction, and an
/// idle one has none, so the common case allocates nothing and an idle
/// connection pays 24 bytes per direction for its queue.
#[derive(Debug, Default)]
pub(super) struct Queue {
    first: Option<Payload>,
    /// Only while more than one payload waits; freed once drained. Boxed
    /// on purpose: a `VecDeque` is 32 bytes even when empty, the box is 8.
    #[allow(clippy::box_collection)]
    more: Option<Box<VecDeque<Payload>>>,
}

impl Queue {
    pub(super) fn push_back(&mut self, p: Payload) {
        if self.first.is_none() {
            self.first = Some(p);
        } else {
            self.more.get_or_insert_with(Box::default).push_back(p);
        }
    }

    pub(super) fn front(&self) -> Option<&Payload> {
        self.first.as_ref()
    }

    pub(super) fn front_mut(&mut self) -> Option<&mut Payload> {
        self.first.as_mut()
    }

    pub(super) fn pop_front(&mut self) -> Option<Payload> {
        let p = self.first.take();
        if let Some(more) = &mut self.more {
            self.first = more.pop_front();
            if more.is_empty() {
                self.more = None;
            }
        }
        p
    }

    pub(super) fn pop_back(&mut self) -> Option<Payload> {
        if let Some(more) = &mut self.more {
            let p = more.pop_back();
            if more.is_empty() {
                self.more = None;
            }
            if p.is_some() {
                return p;
            }
        }
        self.first.take()
    }

    pub(super) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.as_ref().map_or(0, |m| m.len())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Payload> {
        self.first
            .iter_mut()
            .chain(self.more.iter_mut().flat_map(|m| m.iter_mut()))
    }

    pub(super) fn into_iter(self) -> impl Iterator<Item = Payload> {
        self.first
            .into_iter()
            .chain(self.more.into_iter().flat_map(|m| m.into_iter()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(bid: u16) -> Payload {
        Payload::Ring {
            bid,
            start: 0,
            len: 1,
        }
    }

    fn bid(p: Option<Payload>) -> Option<u16> {
        match p {
            Some(Payload::Ring { bid, .. }) => Some(bid),
            _ => None,
        }
    }

    #[test]
    fn fifo_order_and_small_size() {
        let mut q = Queue::default();
        assert!(std::mem::size_of::<Queue>() <= 24);
        for i in 0..5 {
            q.push_back(ring(i));
        }
        assert_eq!(q.len(), 5);
        assert_eq!(bid(q.pop_back()), Some(4));
        for i in 0..4 {
            assert_eq!(bid(q.pop_front()), Some(i));
        }
        assert!(q.is_empty() && q.more.is_none());
        q.push_back(ring(9));
        assert_eq!(bid(q.pop_back()), Some(9));
        assert!(q.is_empty());
    }
}
