use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

/// A broker's side of one channel: tags delivered in order, at most `prefetch` unacked,
/// checking every frame against what AMQP allows and what the verdicts were.
struct Broker {
    prefetch: usize,
    delivered: u64,
    /// Delivered and not yet acked or requeued: the verdict, once the handler gave one.
    unacked: BTreeMap<u64, Option<Settle>>,
    acked: u64,
    requeued: u64,
}

impl Broker {
    fn new(prefetch: usize) -> Self {
        Self {
            prefetch,
            delivered: 0,
            unacked: BTreeMap::new(),
            acked: 0,
            requeued: 0,
        }
    }

    fn deliver(&mut self) -> Option<u64> {
        (self.unacked.len() < self.prefetch).then(|| {
            self.delivered += 1;
            self.unacked.insert(self.delivered, None);
            self.delivered
        })
    }

    /// The handler's verdict on `tag`, passed on to the ledger.
    fn settle(&mut self, l: &mut Ledger, tag: u64, how: Settle, out: &mut Vec<Frame>) {
        *self.unacked.get_mut(&tag).expect("settled a delivered tag") = Some(how);
        l.settle(tag, how, out);
    }

    fn receive(&mut self, frames: &mut Vec<Frame>) {
        for frame in frames.drain(..) {
            match frame {
                Frame::AckUpTo(tag) => {
                    // An ack of an unknown (already acked) tag closes the channel.
                    assert!(
                        self.unacked.contains_key(&tag),
                        "multiple ack of {tag}: not outstanding"
                    );
                    let covered: Vec<u64> = self.unacked.range(..=tag).map(|(t, _)| *t).collect();
                    for t in covered {
                        let verdict = self.unacked.remove(&t).unwrap();
                        assert_eq!(
                            verdict,
                            Some(Settle::Ack),
                            "acked {t} with {frame:?} before its verdict"
                        );
                        self.acked += 1;
                    }
                }
                Frame::AckOne(tag) => {
                    let verdict = self
                        .unacked
                        .remove(&tag)
                        .expect("single ack: not outstanding");
                    assert_eq!(
                        verdict,
                        Some(Settle::Ack),
                        "acked {tag} without its verdict"
                    );
                    self.acked += 1;
                }
                Frame::Requeue(tag) => {
                    let verdict = self.unacked.remove(&tag).expect("requeue: not outstanding");
                    assert_eq!(verdict, Some(Settle::Requeue), "requeued {tag}");
                    self.requeued += 1;
                }
            }
        }
    }
}

/// What a flush does in the consume loop: advance, and release the stragglers when due.
fn flush(l: &mut Ledger, release: bool, out: &mut Vec<Frame>) {
    l.advance(out);
    if release && l.has_stragglers() {
        l.release_stragglers(out);
    }
}

#[test]
fn one_hung_delivery_keeps_the_ledger_within_the_window() {
    const PREFETCH: usize = 64;
    let mut broker = Broker::new(PREFETCH);
    let mut l = Ledger::default();
    let mut out = vec![];
    let hung = broker.deliver().unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut in_handler: Vec<u64> = vec![];
    let (mut settled, mut since_flush, mut flushes) = (0u64, 0u64, 0u64);
    while settled < 1_000_000 {
        while let Some(tag) = broker.deliver() {
            in_handler.push(tag);
        }
        if in_handler.is_empty() {
            // The whole window is settled behind the hung tag: the straggler timer fires.
            flush(&mut l, true, &mut out);
            broker.receive(&mut out);
            continue;
        }
        // Handlers finish out of order.
        let tag = in_handler.swap_remove(rng.usize(..in_handler.len()));
        broker.settle(&mut l, tag, Settle::Ack, &mut out);
        settled += 1;
        since_flush += 1;
        if since_flush == 16 {
            let before = l.visited;
            flushes += 1;
            flush(&mut l, flushes % 4 == 0, &mut out);
            assert!(
                l.visited - before <= 2 * since_flush,
                "flush {flushes} visited {} tags after {since_flush} settled",
                l.visited - before
            );
            since_flush = 0;
            broker.receive(&mut out);
        }
        assert!(
            l.len() <= PREFETCH,
            "ledger holds {} tags after {settled}",
            l.len()
        );
    }
    assert!(broker.unacked.contains_key(&hung));
    broker.settle(&mut l, hung, Settle::Ack, &mut out);
    for tag in in_handler {
        broker.settle(&mut l, tag, Settle::Ack, &mut out);
    }
    flush(&mut l, true, &mut out);
    broker.receive(&mut out);
    assert!(
        broker.unacked.is_empty(),
        "left unacked: {:?}",
        broker.unacked
    );
    assert_eq!(l.len(), 0);
}

#[derive(Clone, Debug)]
enum Step {
    Deliver,
    /// Settles the n-th (modulo) delivered tag still in a handler, unless it is hung.
    Settle(usize, bool),
    Flush,
    Release,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => Just(Step::Deliver),
        4 => (any::<usize>(), proptest::bool::weighted(0.1)).prop_map(|(n, r)| Step::Settle(n, r)),
        2 => Just(Step::Flush),
        1 => Just(Step::Release),
    ]
}

proptest! {
    /// Against the broker model: never an ack past an unfinished tag, a multiple ack only
    /// for an outstanding tag, requeues alone; the ledger never holds more than the
    /// window; in the end every tag is acked or requeued exactly once.
    #[test]
    fn frames_are_always_valid_and_the_ledger_bounded(
        prefetch in 1usize..12,
        hung in proptest::collection::btree_set(1u64..40, 0..3),
        steps in proptest::collection::vec(step(), 1..300),
    ) {
        let mut broker = Broker::new(prefetch);
        let mut l = Ledger::default();
        let mut out = vec![];
        let mut in_handler: Vec<u64> = vec![];
        for step in steps {
            match step {
                Step::Deliver => in_handler.extend(broker.deliver()),
                Step::Settle(n, requeue) => {
                    let free: Vec<usize> = (0..in_handler.len()).filter(|i| !hung.contains(&in_handler[*i])).collect();
                    if !free.is_empty() {
                        let tag = in_handler.swap_remove(free[n % free.len()]);
                        let how = if requeue { Settle::Requeue } else { Settle::Ack };
                        broker.settle(&mut l, tag, how, &mut out);
                    }
                }
                Step::Flush => l.advance(&mut out),
                Step::Release => flush(&mut l, true, &mut out),
            }
            broker.receive(&mut out);
            prop_assert!(l.len() <= prefetch, "ledger holds {} with a window of {}", l.len(), prefetch);
        }
        for tag in in_handler {
            broker.settle(&mut l, tag, Settle::Ack, &mut out);
        }
        flush(&mut l, true, &mut out);
        broker.receive(&mut out);
        prop_assert!(broker.unacked.is_empty());
        prop_assert_eq!(broker.acked + broker.requeued, broker.delivered);
        prop_assert_eq!(l.len(), 0);
    }
}

#[test]
fn in_order_completions_coalesce_into_one_ack() {
    let mut l = Ledger::default();
    let mut out = vec![];
    for tag in 1..=50 {
        l.settle(tag, Settle::Ack, &mut out);
    }
    l.advance(&mut out);
    assert_eq!(out, vec![Frame::AckUpTo(50)]);
}

#[test]
fn never_acks_past_an_unfinished_tag() {
    let mut l = Ledger::default();
    let mut out = vec![];
    for tag in [1, 2, 4, 5] {
        l.settle(tag, Settle::Ack, &mut out);
    }
    l.advance(&mut out);
    assert_eq!(out, vec![Frame::AckUpTo(2)]);
    out.clear();
    l.release_stragglers(&mut out);
    assert_eq!(out, vec![Frame::AckOne(4), Frame::AckOne(5)]);
    out.clear();
    l.settle(3, Settle::Ack, &mut out);
    l.advance(&mut out);
    // 4 and 5 were already acked alone; one frame for 3 covers it.
    assert_eq!(out, vec![Frame::AckUpTo(3)]);
    assert!(!l.has_stragglers());
}

#[test]
fn requeues_go_out_alone_and_count_as_settled() {
    let mut l = Ledger::default();
    let mut out = vec![];
    l.settle(2, Settle::Requeue, &mut out);
    l.settle(1, Settle::Ack, &mut out);
    l.settle(3, Settle::Ack, &mut out);
    l.advance(&mut out);
    assert_eq!(out, vec![Frame::Requeue(2), Frame::AckUpTo(3)]);
}

#[test]
fn duplicate_verdicts_are_ignored() {
    let mut l = Ledger::default();
    let mut out = vec![];
    l.settle(1, Settle::Ack, &mut out);
    l.advance(&mut out);
    l.settle(1, Settle::Requeue, &mut out);
    assert_eq!(out, vec![Frame::AckUpTo(1)]);
}
