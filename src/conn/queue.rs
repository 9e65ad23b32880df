//! The per-direction payload queue.

use std::collections::VecDeque;

use super::Payload;

/// A FIFO of payloads that holds its first element inline: a relaying
/// connection usually has at most one payload queued per direction, and an
/// idle one has none, so the common case allocates nothing.
#[derive(Debug, Default)]
pub(super) struct Queue {
    first: Option<Payload>,
    /// Only used while more than one payload waits; freed once drained.
    more: VecDeque<Payload>,
}

impl Queue {
    pub(super) fn push_back(&mut self, p: Payload) {
        if self.first.is_none() {
            self.first = Some(p);
        } else {
            self.more.push_back(p);
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
        self.first = self.more.pop_front();
        if self.more.is_empty() && self.more.capacity() > 0 {
            self.more = VecDeque::new();
        }
        p
    }

    pub(super) fn pop_back(&mut self) -> Option<Payload> {
        self.more.pop_back().or_else(|| self.first.take())
    }

    pub(super) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub(super) fn into_iter(self) -> impl Iterator<Item = Payload> {
        self.first.into_iter().chain(self.more)
    }
}
