//! How one process shares its request slots among endpoints: claimed deliveries wait here, one
//! queue per endpoint (a project's scheme, host and port), and a slot that frees up goes to the
//! waiting endpoint that holds the fewest slots; among equals, to the one whose last start is the
//! oldest (endpoints take turns).
//!
//! Why not first come, first served: a claim takes a batch ahead, and one busy endpoint's batch
//! would stand in front of everyone else's deliveries. Why not a fixed share per endpoint: a worker
//! with one busy receiver would leave slots idle. With fewest-held-first, an endpoint alone may use
//! every slot, and as soon as another has work, each freed slot goes to it until they hold as many:
//! a fast endpoint gives its slots up within one request, and one whose requests hang gives them up
//! when they move to the places kept for slow requests (`DeliveryConfig::slow_request_after`).
//!
//! An endpoint with a slow request (past `slow_request_after`, in a slow place or still in its slot
//! for want of one) starts nothing more while it holds its slow share of the slots, whoever else
//! waits. Without that, an endpoint alone at every slot that starts to hang would fill the slow
//! places with its first requests and every freed slot with its next ones, which would hang there
//! for the request timeout while every other endpoint waited (its allowance, grown while it
//! answered fast, counts slots and places alike).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;
use uuid::Uuid;

/// An endpoint of a project: what slots are shared among.
pub(super) type EndpointKey = (Uuid, String);

/// What waits for an endpoint, and what it holds.
struct Endpoint<T> {
    waiting: VecDeque<(Instant, T)>,
    held: usize,
    /// Its requests past `slow_request_after`, not yet finished.
    slow: usize,
    /// When it last started something (a count of starts; 0: not since it was last idle).
    last_start: u64,
}

impl<T> Endpoint<T> {
    fn idle(&self) -> bool {
        self.held == 0 && self.slow == 0 && self.waiting.is_empty()
    }
}

/// Claimed deliveries waiting for a request slot, and the slots each endpoint holds. An endpoint is
/// remembered while it holds a slot, has a slow request or has something waiting.
pub(super) struct SlotQueue<T> {
    endpoints: HashMap<EndpointKey, Endpoint<T>>,
    /// The most slots an endpoint with a slow request may hold.
    slow_share: usize,
    starts: u64,
    len: usize,
}

impl<T> SlotQueue<T> {
    /// A queue in which an endpoint with a slow request holds `slow_share` slots at most (at least 1).
    pub(super) fn new(slow_share: usize) -> Self {
        SlotQueue {
            endpoints: HashMap::new(),
            slow_share: slow_share.max(1),
            starts: 0,
            len: 0,
        }
    }

    /// Whether nothing waits.
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `item` of `endpoint`, waiting since `since`.
    pub(super) fn push(&mut self, endpoint: EndpointKey, since: Instant, item: T) {
        self.endpoints
            .entry(endpoint)
            .or_insert_with(|| Endpoint {
                waiting: VecDeque::new(),
                held: 0,
                slow: 0,
                last_start: 0,
            })
            .waiting
            .push_back((since, item));
        self.len += 1;
    }

    /// Takes the item a freed slot goes to: the first of the waiting endpoint that holds the fewest
    /// slots (among equals, the one that started something least recently, then the one waiting
    /// longest), leaving out endpoints with a slow request that hold their slow share, and counts
    /// the slot as held by it until [`SlotQueue::release`]. The endpoints are at most the items
    /// waiting, the slots held and the slow requests, so the search costs no more than a claim
    /// batch and twice the slots.
    pub(super) fn start_next(&mut self) -> Option<(EndpointKey, T)> {
        let slow_share = self.slow_share;
        let (key, endpoint) = self
            .endpoints
            .iter_mut()
            .filter(|(_, endpoint)| {
                !endpoint.waiting.is_empty() && (endpoint.slow == 0 || endpoint.held < slow_share)
            })
            .min_by_key(|(_, endpoint)| {
                let since = endpoint.waiting.front().map(|(since, _)| *since);
                (endpoint.held, endpoint.last_start, since)
            })?;
        let (_, item) = endpoint.waiting.pop_front().expect("a waiting item");
        self.starts += 1;
        endpoint.last_start = self.starts;
        endpoint.held += 1;
        self.len -= 1;
        Some((key.clone(), item))
    }

    /// One of `endpoint`'s slots is free again.
    pub(super) fn release(&mut self, key: &EndpointKey) {
        self.update(key, |endpoint| {
            endpoint.held = endpoint.held.saturating_sub(1)
        });
    }

    /// One of `endpoint`'s requests went past `slow_request_after` (until [`SlotQueue::recovered`]).
    pub(super) fn slowed(&mut self, key: &EndpointKey) {
        self.update(key, |endpoint| endpoint.slow += 1);
    }

    /// One of `endpoint`'s slow requests finished.
    pub(super) fn recovered(&mut self, key: &EndpointKey) {
        self.update(key, |endpoint| {
            endpoint.slow = endpoint.slow.saturating_sub(1)
        });
    }

    fn update(&mut self, key: &EndpointKey, change: impl FnOnce(&mut Endpoint<T>)) {
        if let Some(endpoint) = self.endpoints.get_mut(key) {
            change(endpoint);
            if endpoint.idle() {
                self.endpoints.remove(key);
            }
        }
    }

    /// When the longest-waiting item began to wait.
    pub(super) fn oldest(&self) -> Option<Instant> {
        self.endpoints
            .values()
            .filter_map(|endpoint| endpoint.waiting.front().map(|(since, _)| *since))
            .min()
    }

    /// Takes every item that has waited since `cutoff` or longer.
    pub(super) fn take_waiting_since(&mut self, cutoff: Instant) -> Vec<T> {
        let mut taken = Vec::new();
        self.endpoints.retain(|_, endpoint| {
            while endpoint
                .waiting
                .front()
                .is_some_and(|(since, _)| *since <= cutoff)
            {
                taken.extend(endpoint.waiting.pop_front().map(|(_, item)| item));
            }
            !endpoint.idle()
        });
        self.len -= taken.len();
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn endpoint(name: &str) -> EndpointKey {
        (Uuid::nil(), name.to_owned())
    }

    #[test]
    fn an_endpoint_alone_takes_every_slot_it_is_offered() {
        let mut queue = SlotQueue::new(8);
        let now = Instant::now();
        for n in 0..5 {
            queue.push(endpoint("a"), now, n);
        }
        let started: Vec<i32> = std::iter::from_fn(|| queue.start_next().map(|(_, n)| n)).collect();
        assert_eq!(started, [0, 1, 2, 3, 4]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_freed_slot_goes_to_the_endpoint_holding_the_fewest() {
        let mut queue = SlotQueue::new(8);
        let now = Instant::now();
        // "a" was claimed first and alone: it holds three slots.
        for n in 0..6 {
            queue.push(endpoint("a"), now, n);
        }
        for _ in 0..3 {
            queue.start_next().unwrap();
        }
        // "b" arrives later, behind a's waiting batch, and still goes first until it holds as many.
        for n in 10..15 {
            queue.push(endpoint("b"), now + Duration::from_millis(5), n);
        }
        let next: Vec<(String, i32)> = (0..4)
            .map(|_| {
                let (key, n) = queue.start_next().unwrap();
                (key.1, n)
            })
            .collect();
        assert_eq!(
            next,
            [
                ("b".to_owned(), 10),
                ("b".to_owned(), 11),
                ("b".to_owned(), 12),
                // Three each: "a", which started something least recently.
                ("a".to_owned(), 3),
            ]
        );
        // "b" finishes one: it holds two against a's four, and its next goes first.
        queue.release(&endpoint("b"));
        assert_eq!(queue.start_next().unwrap().1, 13);
    }

    #[test]
    fn with_one_slot_endpoints_take_turns() {
        let mut queue = SlotQueue::new(8);
        let now = Instant::now();
        for n in 0..4 {
            queue.push(endpoint("a"), now, n);
        }
        let (a, first) = queue.start_next().unwrap();
        assert_eq!(first, 0);
        // "b" arrives later, behind the rest of a's batch; a's request finishes, and both hold
        // none: "b", which has not started anything yet, goes first.
        queue.push(endpoint("b"), now + Duration::from_millis(5), 10);
        queue.push(endpoint("b"), now + Duration::from_millis(5), 11);
        let mut order = Vec::new();
        let mut holder = a;
        for _ in 0..5 {
            queue.release(&holder);
            let (next, n) = queue.start_next().unwrap();
            order.push(n);
            holder = next;
        }
        assert_eq!(order, [10, 1, 11, 2, 3]);
    }

    #[test]
    fn an_endpoint_with_a_slow_request_holds_its_slow_share_at_most() {
        let mut queue = SlotQueue::new(2);
        let now = Instant::now();
        for n in 0..10 {
            queue.push(endpoint("a"), now, n);
        }
        // Alone and fast, "a" takes every slot offered: four.
        for n in 0..4 {
            assert_eq!(queue.start_next().unwrap().1, n);
        }
        // Its four requests go slow and leave their slots for the slow places.
        for _ in 0..4 {
            queue.slowed(&endpoint("a"));
            queue.release(&endpoint("a"));
        }
        // Four slots are free; "a" starts two, its slow share, though nothing else waits.
        assert_eq!(queue.start_next().unwrap().1, 4);
        assert_eq!(queue.start_next().unwrap().1, 5);
        assert_eq!(queue.start_next(), None);
        // "b" takes what is left.
        queue.push(endpoint("b"), now, 20);
        queue.push(endpoint("b"), now, 21);
        assert_eq!(queue.start_next().unwrap().1, 20);
        assert_eq!(queue.start_next().unwrap().1, 21);
        // Once its slow requests are done, "a" is like any other endpoint again.
        for _ in 0..4 {
            queue.recovered(&endpoint("a"));
        }
        queue.release(&endpoint("b"));
        assert_eq!(queue.start_next().unwrap().1, 6);
        assert_eq!(queue.start_next().unwrap().1, 7);
    }

    #[test]
    fn only_what_waited_too_long_is_taken_out() {
        let mut queue = SlotQueue::new(8);
        let now = Instant::now();
        queue.push(endpoint("a"), now, 1);
        queue.push(endpoint("b"), now + Duration::from_millis(10), 2);
        queue.push(endpoint("a"), now + Duration::from_millis(20), 3);
        assert_eq!(queue.oldest(), Some(now));
        let mut taken = queue.take_waiting_since(now + Duration::from_millis(10));
        taken.sort();
        assert_eq!(taken, [1, 2]);
        assert_eq!(queue.oldest(), Some(now + Duration::from_millis(20)));
        assert_eq!(queue.start_next().unwrap().1, 3);
        assert_eq!(queue.start_next(), None);
    }
}
