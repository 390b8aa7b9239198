//! The moment a provider call's answer arrives, between its status line and its body.
//!
//! A provider slot (`STAGE3_CONCURRENCY`) stands for an image the provider is drawing.
//! Once the provider answers, the drawing is done: the slot can start the next scene's
//! call while this answer is still downloading. What must stay bounded from then on is
//! memory, so the answer waits for room (one of `STAGE3_CONCURRENCY` places for answers
//! held in memory) before its body is read; until then it stays in the socket.
//!
//! Holding the slot until an answer found a decoder, as before, made a wave's next calls
//! wait for the previous wave's decoding: at 1 s provider latency and concurrency 8 the
//! second wave of a 16-scene batch started 40–90 ms late, and the batch ended that much
//! later.
//!
//! The next call can so start before this answer's body is read; a body that turns out to
//! be an error (a 200 carrying one) is then learnt a call later than before, as it always
//! was by the calls already in flight. Such answers cost nothing.
//!
//! Under a spending limit the slot is kept until the call has returned: what it cost is in
//! the answer's body, and the next call must be checked against what was really spent, not
//! against this one's estimate (with one slot, a batch then spends one call at a time).

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A call's provider slot, and the room its answer will take: see the module docs.
/// Dropping the gate gives back whichever of the two it holds.
#[derive(Debug)]
pub struct AnswerGate {
    /// The call's provider slot, until the provider answers (or the call returns).
    slot: Mutex<Option<OwnedSemaphorePermit>>,
    /// The slot stays until [`AnswerGate::call_returned`], not just until the answer.
    keep_slot_until_return: bool,
    /// Where the room for an answer comes from.
    rooms: Arc<Semaphore>,
    /// The answer's room, once it arrived.
    room: Mutex<Option<OwnedSemaphorePermit>>,
}

impl AnswerGate {
    /// A gate holding the call's provider `slot`, whose answer takes its room from `rooms`;
    /// `keep_slot_until_return` under a spending limit (see the module docs).
    pub(crate) fn new(
        slot: OwnedSemaphorePermit,
        rooms: Arc<Semaphore>,
        keep_slot_until_return: bool,
    ) -> Self {
        AnswerGate {
            slot: Mutex::new(Some(slot)),
            keep_slot_until_return,
            rooms,
            room: Mutex::new(None),
        }
    }

    /// Called by a provider when the answer carrying the image has arrived (its status
    /// said success) and before its body is read: gives the provider slot back, then
    /// waits for room to hold the answer. Once only. A provider that never calls it keeps
    /// its slot until a decoder takes its answer, which bounds the answers in memory the
    /// same way.
    pub async fn answered(&self) {
        if !self.keep_slot_until_return {
            drop(lock(&self.slot).take());
        }
        if lock(&self.room).is_some() {
            return;
        }
        let room = Arc::clone(&self.rooms)
            .acquire_owned()
            .await
            .expect("the answer rooms are never closed");
        *lock(&self.room) = Some(room);
    }

    /// The call has returned and its cost is settled: a slot kept for that goes back now
    /// if the answer holds a room (else it stays, bounding the answer in memory).
    pub(crate) fn call_returned(&self) {
        if lock(&self.room).is_some() {
            drop(lock(&self.slot).take());
        }
    }
}

/// The lock of a gate's permits: a panic elsewhere cannot leave one half-written.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gate holding one of `slots`, its answer's room from `rooms`.
    async fn gate(slots: &Arc<Semaphore>, rooms: &Arc<Semaphore>, keep: bool) -> AnswerGate {
        let slot = Arc::clone(slots).acquire_owned().await.unwrap();
        AnswerGate::new(slot, Arc::clone(rooms), keep)
    }

    fn one_of_each() -> (Arc<Semaphore>, Arc<Semaphore>) {
        (Arc::new(Semaphore::new(1)), Arc::new(Semaphore::new(1)))
    }

    #[tokio::test]
    async fn an_answer_gives_its_slot_back_and_waits_for_room() {
        let (slots, rooms) = one_of_each();
        let first = gate(&slots, &rooms, false).await;
        assert_eq!(slots.available_permits(), 0);
        first.answered().await;
        assert_eq!(slots.available_permits(), 1, "free for the next call");
        assert_eq!(rooms.available_permits(), 0, "the answer holds its room");

        // A second answer waits until the first one's room is given back.
        let second = gate(&slots, &rooms, false).await;
        {
            let waiting = second.answered();
            tokio::pin!(waiting);
            assert!(futures::poll!(waiting.as_mut()).is_pending());
            assert_eq!(slots.available_permits(), 1, "its slot went back first");
            drop(first);
            waiting.await;
        }
        assert_eq!(rooms.available_permits(), 0, "the second answer has it now");
        drop(second);
        assert_eq!(rooms.available_permits(), 1);
        assert_eq!(slots.available_permits(), 1);
    }

    #[tokio::test]
    async fn under_a_spending_limit_the_slot_waits_for_the_call_to_return() {
        let (slots, rooms) = one_of_each();
        let gate = gate(&slots, &rooms, true).await;
        gate.answered().await;
        assert_eq!(slots.available_permits(), 0, "the cost is not known yet");
        assert_eq!(rooms.available_permits(), 0);
        gate.call_returned();
        assert_eq!(slots.available_permits(), 1);
        drop(gate);
        assert_eq!(rooms.available_permits(), 1);
    }

    /// A provider that never says it answered: its slot bounds the answer in memory.
    #[tokio::test]
    async fn a_gate_never_entered_keeps_its_slot_until_dropped() {
        for keep in [false, true] {
            let (slots, rooms) = one_of_each();
            let gate = gate(&slots, &rooms, keep).await;
            gate.call_returned();
            assert_eq!(slots.available_permits(), 0, "no room bounds the answer");
            drop(gate);
            assert_eq!(slots.available_permits(), 1);
            assert_eq!(rooms.available_permits(), 1);
        }
    }
}
